"""gpt-oss (transformers 5.24 models/gpt_oss/modeling_gpt_oss.py): openai/gpt-oss-20b and gpt-oss-120b.

Expert weights: the released checkpoints store the experts in MXFP4, and a training load dequantizes them to bf16
(`quantizers/quantizer_mxfp4.py` `Mxfp4HfQuantizer`: without the triton kernels, or on purpose with
`Mxfp4Config(dequantize=True)`, `Mxfp4Dequantize.convert` decodes `*_blocks` / `*_scales` into the load dtype, bf16 by
default, and drops the quantization config); the quantized `Mxfp4GptOssExperts` path cannot train
(`Mxfp4HfQuantizer.is_trainable` is False: the Trainer refuses it, PEFT adapters included). So the planner models
gpt-oss as a plain bf16 model whose expert stacks are ordinary (E, H, 2I) / (E, I, H) parameters.

The layer (`GptOssDecoderLayer.forward`): input_layernorm -> `GptOssAttention` -> + residual ->
post_attention_layernorm -> `GptOssMLP` (router + experts) -> + residual.
- Norms: `GptOssRMSNorm` multiplies by the weight in fp32 (`(weight * x).to(input_dtype)`, OLMo 2's "rms_fp32"):
  the fp32 input and 1/rms when x needs a gradient, the fp32 normalised tensor when the weight trains.
- Attention: q / k / v / o with `attention_bias` (default true, on all four), `head_dim` (default 64, not H / heads),
  GQA, RoPE (yarn by default) whose cos / sin are head_dim / 2 wide (`GptOssRotaryEmbedding.forward` does not
  repeat the frequencies; `_apply_rotary_emb` rotates the two halves: only cos and sin are kept,
  `Family.rotary_half_tables`), and a learned per-head sink logit `self_attn.sinks` (NH,) registered before the
  projections. transformers refuses SDPA (`GptOssPreTrainedModel._supports_sdpa = False`; the default falls back to
  eager, an explicit "sdpa" raises ValueError), so every plan is eager attention (`Family.sdpa` False).
  `eager_attention_forward`: q k^T * scaling (+ mask), `cat` with the sinks -> (b, NH, s, s + 1), minus its row max
  (`max(dim=-1)` keeps its int64 (b, NH, s, 1) indices), softmax in the compute dtype over s + 1 columns (kept: the
  [..., :-1] view the matmul with v reads is the same storage; under autocast an fp32 softmax and a 16-bit s x s
  copy), matmul with the repeated v (`sink_attention`).
  Sliding layers (`layer_types`: every other layer from layer 0, window 128) differ only in their additive mask.
- MLP (`GptOssMLP`): the router `mlp.router` (`GptOssTopKRouter`: bare weight (E, H) and bias (E,) parameters,
  `F.linear` -> `topk` (keeps its (T, k) int64 indices) -> softmax over the k selected logits in the logits' dtype
  (keeps its (T, k) output)); the experts `mlp.experts` (`GptOssExperts`: transposed stacks `gate_up_proj` (E, H, 2I)
  with gate / up interleaved, `down_proj` (E, I, H), each with a bias (E, 2I) / (E, H)), run by the chosen experts
  implementation (`lora_planner.families.moe.experts`). `_apply_gate` clamps gate (above) and up (both sides) -
  each clamp keeps its input, a strided view of gate_up's whole (S, 2I) output - then `gate * sigmoid(alpha gate)`
  and `(up + 1) * glu`: sigmoid's output, the clamped gate, up + 1 and glu, four (S, I) tensors (`gate_saves=4`).
  Under grouped_mm, trainable expert biases (full fine-tuning) keep the (S,) int64 index of their per-row gather.

PEFT 0.21.2: no default targets for gpt_oss (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING has no entry;
`LoraConfig` without targets raises): q_proj, v_proj are this tool's choice. transformers'
`_MODEL_TO_CONVERSION_PATTERN` has no gpt_oss entry, so PEFT's MoE conversion does not run: all-linear adapts
q / k / v / o only (the router is not an nn.Linear, the experts are 3-D parameters, lm_head is excluded). The
experts and the router take LoRA through `target_parameters` ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
"mlp.router.weight"): `lora.ParamWrapper` (`peft/tuners/lora/layer.py`; `GptOssExperts.is_transposed` is true, so
in / out are not swapped: gate_up lora_A (r E, H), lora_B (2I, r E); down lora_A (r E, I), lora_B (H, r E)), which
folds B A into a new bf16 copy of the weight on every forward and keeps it for backward
(`lora_planner.families.moe.folded_weight`).

Not modelled: flash-attention / flex attention with sinks (kernels-community hub kernels; flex attention cannot run
sinks on the CPU), their saved tensors were not measured; attention dropout (`attention_dropout`, 0 in the released
configs) on the sink softmax; a router adapted through target_parameters under autocast; autocast with the eager
experts loop (its `@` matmuls cast each hit expert's weight slices and inputs to 16-bit and keep those copies:
measured 120 KB more than planned per layer of the tiny test model; grouped_mm under autocast is modelled);
`output_router_logits` (the auxiliary loss keeps every layer's (T, E) softmax); the MXFP4 load's transient buffers
(an int32 index per weight and two copies of each dequantized tensor, one tensor at a time); the experts'
`batched_mm` implementation (keeps a per-row copy of the expert weights: avoid for training); expert parallelism.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.moe import INT64, experts, folded_weight
from lora_planner.families.rules import (
    FP32, Flow, SavedTensor, norm, normed_attention_input, output_projection, sliding_model_level,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.named_parameters()` order: `GptOssAttention` registers its `sinks` (NH,) before q / k / v / o (a 1-D
    parameter, listed as a "norm"-kind module: one weight, nothing LoRA can target); `GptOssMLP`: router (weight +
    bias), experts (gate_up_proj + bias, down_proj + bias); then the two layer norms."""
    h, n, e, i = spec.hidden_size, spec.num_layers, spec.num_experts, spec.moe_intermediate_size
    bias = spec.attention_bias
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(PREFIX + "self_attn.sinks", "norm", "attention", spec.num_heads, spec.num_heads, count=n),
        *attention_modules(spec, PREFIX, bias, bias),
        Module(PREFIX + "mlp.router", "router", "mlp", h, e, bias=True, count=n),
        Module(PREFIX + "mlp.experts.gate_up_proj", "experts", "mlp", h, 2 * i, bias=True, count=n, experts=e),
        Module(PREFIX + "mlp.experts.down_proj", "experts", "mlp", i, h, bias=True, count=n, experts=e),
        Module(PREFIX + "input_layernorm", "norm", "norms", h, h, count=n),
        Module(PREFIX + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def sink_attention(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """gpt-oss's `eager_attention_forward` (module docstring): q k^T keeps each operand for the other's gradient (k
    and v repeated to every head first when heads > kv heads); the scores need a gradient when q or k does, or when
    the sinks train (full fine-tuning): then the row max keeps its int64 indices, the softmax over s + 1 columns its
    output, and the matmul with v keeps v; with only v needing a gradient, the probabilities. The softmax runs in
    the compute dtype, in fp32 under autocast (`cat` promotes the 16-bit scores to the fp32 sinks' dtype): then
    `.to(value_states.dtype)` makes a 16-bit (s x s) copy of the probabilities, which the matmul with v keeps when v
    needs a gradient."""
    flow.note_attention(q_grad, k_grad, v_grad)
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    repeated = spec.q_size if spec.num_kv_heads != spec.num_heads else spec.kv_size
    rows = flow.b * spec.num_heads * flow.s
    softmax_e = FP32 if flow.amp else e
    probs = SavedTensor("attn.softmax_with_sink", rows * (flow.s + 1) * softmax_e)
    probs_copy = [SavedTensor("attn.probs", rows * flow.s * e)] if softmax_e != e and v_grad else []
    saved: list[SavedTensor] = []
    if k_grad:
        saved.append(SavedTensor("attn.q_rotated", tokens * spec.q_size * e))
    if q_grad:
        saved.append(SavedTensor("attn.k_repeated", tokens * repeated * e))
    if q_grad or k_grad or flow.full:
        saved += [SavedTensor("attn.row_max_indices", rows * INT64), probs, *probs_copy,
                  SavedTensor("attn.v_repeated", tokens * repeated * e)]
    elif v_grad:
        saved += probs_copy or [probs]
    return saved


def router(flow: Flow, x_needs_grad: bool) -> tuple[list[SavedTensor], bool, bool]:
    """`GptOssTopKRouter` (module docstring): (saved, whether it keeps its input x, whether the scores need a
    gradient). x is kept when the weight trains (full) or is adapted (its folded weight needs x for its gradient);
    under autocast `F.linear` keeps its 16-bit copy of x instead (reported as not kept) and, when x needs a
    gradient or the weight trains, its 16-bit copy of the weight; the scores are then 16-bit."""
    path = PREFIX + "mlp.router"
    if flow.input_grads is not None:
        flow.input_grads[path] = x_needs_grad
    trains = flow.full or flow.adapted(path)
    saved: list[SavedTensor] = []
    if flow.adapted(path):
        saved += folded_weight(flow, path, x_needs_grad)
    keeps_x = trains
    if flow.amp:
        m, e = flow.modules[path], flow.e_compute
        if trains:
            saved.append(SavedTensor("mlp.router.input_autocast_copy", flow.tokens * m.in_features * e))
            keeps_x = False
        if x_needs_grad or trains:
            saved.append(SavedTensor("mlp.router.weight_autocast_copy", m.in_features * m.out_features * e))
    scores_grad = x_needs_grad or trains
    if scores_grad:
        k = flow.spec.num_experts_per_tok
        saved += [SavedTensor("mlp.router.topk_indices", flow.tokens * k * INT64),
                  SavedTensor("mlp.router.topk_softmax", flow.tokens * k * flow.e_compute)]
    return saved, keeps_x, scores_grad


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One `GptOssDecoderLayer` (module docstring)."""
    spec, p = flow.spec, PREFIX
    saved, (q_grad, k_grad, v_grad) = normed_attention_input(flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                                            x_needs_grad)
    saved += sink_attention(flow, q_grad, k_grad, v_grad)
    own, attn_out_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size,
                                           q_grad or k_grad or v_grad or flow.full)
    saved += own
    mid_needs_grad = x_needs_grad or attn_out_grad
    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    own, keeps_x, scores_grad = router(flow, mid_needs_grad)
    saved += own
    own, _ = experts(flow, p, mid_needs_grad, scores_grad, fp32_scores=False, gate_saves=4, biases=True,
                     scores_e=flow.e_compute)
    saved += own
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", flow.tokens * spec.hidden_size * flow.e_stream))
    return saved


FAMILY = Family(model_types=("gpt_oss",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                peft_has_default=False, layer_prefix=PREFIX, last_linear="mlp.experts.down_proj",
                saves_after_last_linear=True, positions="rope", norm="rms_fp32", model_level=sliding_model_level,
                sdpa=False, models_sliding_window=True, rotary_half_tables=True,
                mask_refused="its sink attention with a padding mask is not measured yet",
                flash_refused="its attention sinks need the kernels-community FlashAttention-3 build, not the "
                              "flash-attn package",
                liger="Liger's gpt-oss patch (fused MoE experts) is not modelled yet")

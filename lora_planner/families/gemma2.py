"""Gemma 2 (transformers 5.24 models/gemma2/modeling_gemma2.py): google/gemma-2-2b, -9b, -27b (and -it).

The layer (`Gemma2DecoderLayer.forward`): four RMSNorms, `Gemma2RMSNorm` multiplying by (1 + w) in fp32 and casting
back (norm kind "rms_gemma": each keeps its fp32 input, 1/rms and the fp32 (1 + w) when its input needs a gradient,
the fp32 normalised tensor when its weight trains):
    h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
The post-norms read the o_proj / down_proj outputs (compute dtype); the pre-norms read the residual stream.
`Gemma2MLP`: down_proj(act(gate_proj x) * up_proj x) with `gelu_pytorch_tanh` (one op, keeps its input:
`rules.gated_mlp`). q/k/v/o carry `attention_bias`; the MLP has no biases.

Attention: transformers 5.24 refuses SDPA for this class (`Gemma2PreTrainedModel._supports_sdpa = False`, "sdpa does
not support softcapping"): `attn_implementation="sdpa"` raises ValueError, and the default (none given) falls back
to eager (`PreTrainedModel.get_correct_attn_implementation`). So every plan is eager attention (`Family.sdpa` False:
`lora_planner.activations.make_flow` plans eager and `plan_warnings` says so when SDPA was asked); flash-attention-2
is planned as flash-attn keeps it (`rules.flash_attention`: the soft-cap and the window are inside the kernel, no
S x S tensor), and so is FlexAttention (`rules.flex_attention`). `eager_attention_forward`: matmul(q, k^T) * scaling (scaling =
`query_pre_attn_scalar ** -0.5`, a scalar: nothing saved), then with `attn_logit_softcapping` scores / cap,
tanh, * cap: the scalar ops save nothing, tanh keeps its output (S x S per head, compute dtype) when q or k needs a
gradient; then + mask, the fp32 softmax and its 16-bit copy as in every eager family (`rules.eager_attention`).

Sliding-window layers (`layer_types`, by default every other layer from layer 0, `Gemma2Config.__post_init__`):
with eager attention the window is only a different additive mask (`masking_utils.eager_mask`: a (b, 1, s, s)
tensor in the embeddings' dtype, built once per kind in `Gemma2Model.forward`: `create_causal_mask` and
`create_sliding_window_causal_mask`). Adding a mask saves nothing, so sliding and full layers keep the same tensors;
the masks are transient, except under non-reentrant gradient checkpointing, which keeps each layer's mask argument
alive until that layer's backward: one mask per attention kind present (`rules.mask_arguments`; the full-attention
one is counted by `lora_planner.activations` for every eager family).

Outside the layers: `Gemma2TextScaledWordEmbedding` multiplies the embeddings by the scalar buffer `embed_scale`
(`Family.scalar_buffers`); `Gemma2ForCausalLM.forward` soft-caps the logits (`final_logit_softcapping`: / cap,
tanh, * cap before the loss): tanh keeps its output (B x S x V, the logits' dtype), counted with the loss
(`lora_planner.activations`). RoPE: one table (`Gemma2RotaryEmbedding`, cos / sin in the stream dtype).

Liger (`use_liger_kernel`, linkedin/Liger-Kernel `transformers/monkey_patch.py` `apply_liger_kernel_to_gemma2`):
`LigerRMSNormForGemma2` (offset 1, gemma casting mode, out of place) on the four layer norms and the final one (each
keeps its input and fp32 1/rms: `rules.liger_rms_norm`; out of place changes only its backward's buffer), GEGLU
(`LigerGEGLUMLP`: gate's and up's outputs, `rules.gated_mlp`), RoPE, and the fused linear cross-entropy with the
final soft-cap inside its kernel (`ops/cross_entropy.py` `HAS_SOFTCAPPING`: no tanh tensor). Modelled, not measured.

PEFT 0.21.2's default LoRA targets for gemma2: q_proj, v_proj (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
flex attention takes the window and the soft-cap inside its kernel, as flash-attn does (`rules.flex_attention`).
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.rules import (
    FLASH, FLEX, Flow, SavedTensor, attention_core, eager_attention, gated_mlp, mask_arguments, norm,
    normed_attention_input, output_projection,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.*` in transformers' registration order (`Gemma2Attention`: q, k, v, o; `Gemma2DecoderLayer`:
    self_attn, mlp, input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
    post_feedforward_layernorm), so `model.parameters()` order (what ZeRO flattens) is the list's order. Also
    Gemma 3's (`lora_planner.families.gemma3` inserts q_norm and k_norm after o_proj)."""
    h, n, layer, bias = spec.hidden_size, spec.num_layers, PREFIX, spec.attention_bias
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        *attention_modules(spec, layer, bias, bias),
        Module(layer + "mlp.gate_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.up_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.down_proj", "linear", "mlp", spec.intermediate_size, h, count=n),
        Module(layer + "input_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "pre_feedforward_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "post_feedforward_layernorm", "norm", "norms", h, h, count=n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def softcapped_eager_attention(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """`eager_attention_forward` with `softcap`: the shared eager rule plus tanh's output when the scores need a
    gradient (q or k does)."""
    flow.note_attention(q_grad, k_grad, v_grad)
    saved = eager_attention(flow, q_grad, k_grad, v_grad)
    if flow.spec.attn_logit_softcapping is not None and (q_grad or k_grad):
        scores = flow.b * flow.spec.num_heads * flow.s * flow.s
        saved.append(SavedTensor("attn.softcap_tanh", scores * flow.e_compute))
    return saved


def sandwich_layer(flow: Flow, x_needs_grad: bool, head_norms=None, attention=softcapped_eager_attention,
                   reads_saved_output: bool = False) -> list[SavedTensor]:
    """Pre- and post-norms around attention and MLP (Gemma 2 and Gemma 3): `head_norms(flow, x_needs_grad)` is what
    Gemma 3's q / k norms keep, `attention` the attention core, `reads_saved_output` whether o_proj reads the saved
    attention output without a copy (fused SDPA)."""
    spec, p = flow.spec, PREFIX
    saved, (q_grad, k_grad, v_grad) = normed_attention_input(flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                                            x_needs_grad)
    if head_norms is not None:
        saved += head_norms(flow, x_needs_grad)
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += attention(flow, q_grad, k_grad, v_grad)
    own, attn_out_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, attn_needs_grad,
                                           reads_saved_output=reads_saved_output)
    saved += own
    saved += norm(flow, "post_attention_layernorm", attn_out_grad)
    mid_needs_grad = x_needs_grad or attn_out_grad
    saved += norm(flow, "pre_feedforward_layernorm", mid_needs_grad)
    mlp_saved, mlp_out_grad = gated_mlp(flow, p + "mlp.", mid_needs_grad, "pre_feedforward_layernorm.output")
    saved += mlp_saved
    saved += norm(flow, "post_feedforward_layernorm", mlp_out_grad)
    return saved


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One Gemma 2 decoder layer (eager attention, or flash-attn, which soft-caps inside its kernel and takes the
    window as `window_size`: `rules.attention_core`; see the module docstring)."""
    if flow.t.attention in (FLASH, FLEX):  # both soft-cap and slide inside the kernel
        return sandwich_layer(flow, x_needs_grad, attention=attention_core)
    return sandwich_layer(flow, x_needs_grad)


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """Under checkpointing, the sliding layers' mask argument beside the full layers' (`rules.mask_arguments`)."""
    return mask_arguments(flow)


FAMILY = Family(model_types=("gemma2",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms_gemma",
                model_level=model_level, scalar_buffers=1, saves_after_last_linear=True, sdpa=False,
                models_sliding_window=True, liger="modelled")

"""StarCoder2 (transformers' models/starcoder2/modeling_starcoder2.py): StarCoder2 3B / 7B / 15B.

A pre-norm layer with nn.LayerNorm (weight and bias, `norm_epsilon`) before attention and MLP and as the final
norm; separate q/k/v/o projections and a plain MLP `c_fc` -> activation (`gelu_pytorch_tanh`, one op keeping its
input) -> `c_proj`, every linear with a bias when `use_bias` (the released models: yes); full RoPE
(`apply_rotary_pos_emb` without a cat, so q and k keep the projections' (b, s, heads, dim) layout and SDPA's
output needs no copy for o_proj, as in Llama); GQA.

Dropouts (the released models: 0.1 each), all `nn.functional.dropout`:
- `Starcoder2Model.forward`: `embedding_dropout` on the token embeddings (a mask when they need a gradient);
- `Starcoder2Attention.forward`: `residual_dropout` on o_proj's output; `Starcoder2MLP.forward`: on c_proj's;
- `attention_dropout` inside attention: eager keeps the mask and the dropped probabilities (`softmax_saved`);
  SDPA's CUDA kernels replay it from the RNG state (nothing more kept), while on the CPU SDPA with dropout has
  no fused kernel: the math path (`_scaled_dot_product_attention_math`) upcasts q, k, v to fp32, repeats k and v
  to every head, and keeps per operand what eager attention would, in fp32 (`_cpu_math_attention`).

Sliding window (`Starcoder2Config.sliding_window`, 4096 in the released models): `Starcoder2Model.forward` builds every
layer's mask with `create_sliding_window_causal_mask`. From --seq-len >= window on SDPA gets it (the shared rules of
`lora_planner.families.rules`, "sliding windows": k / v repeated to every head, the additive (b, 1, s, s) mask kept);
the CPU math path with attention dropout adds the mask in place and keeps what it keeps without one (measured:
tests/test_activations.py `starcoder2_swa`); under checkpointing the layers' mask argument stays alive.

PEFT 0.21.2 has no default LoRA targets for starcoder2: the plan assumes q_proj and v_proj and says so.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.rules import (
    FP32, Flow, SavedTensor, attention_core, dropout_mask, fused_output_reused, mask_arguments, norm,
    normed_attention_input,
    output_projection, plain_mlp,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.self_attn.{q,k,v,o}_proj`, `mlp.{c_fc,c_proj}`, LayerNorms with bias."""
    h, n, layer, bias = spec.hidden_size, spec.num_layers, PREFIX, spec.attention_bias
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, True, n),
        *attention_modules(spec, layer, bias, spec.attention_out_bias),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "mlp.c_fc", "linear", "mlp", h, spec.intermediate_size, spec.mlp_bias, n),
        Module(layer + "mlp.c_proj", "linear", "mlp", spec.intermediate_size, h, spec.mlp_bias, n),
        Module("model.norm", "norm", "norms", h, h, True),
    ]


def _cpu_math_attention(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """SDPA with dropout on the CPU (no fused kernel): see the module docstring."""
    flow.note_attention(q_grad, k_grad, v_grad)
    if not (q_grad or k_grad or v_grad):
        return []
    spec, tokens = flow.spec, flow.tokens
    scores = flow.b * spec.num_heads * flow.s * flow.s
    heads_wide = tokens * spec.q_size * FP32  # k and v repeated to every head (enable_gqa), all in fp32
    saved = []
    if k_grad:
        saved.append(SavedTensor("attn.q_fp32", heads_wide))
    if q_grad:
        saved.append(SavedTensor("attn.k_fp32", heads_wide))
    if q_grad or k_grad:  # the softmax backward: its output, the dropout mask, and v for dP = dO v^T
        saved += [SavedTensor("attn.probs_fp32", scores * FP32), SavedTensor("attn.dropout_mask_fp32", scores * FP32),
                  SavedTensor("attn.v_fp32", heads_wide)]
    if v_grad:
        saved.append(SavedTensor("attn.probs_dropped_fp32", scores * FP32))
    return saved


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """LayerNorm, q/k/v, RoPE, attention, o_proj, residual dropout; LayerNorm, c_fc, GELU, c_proj, dropout."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved, (q_grad, k_grad, v_grad) = normed_attention_input(flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                                            x_needs_grad)
    attn_needs_grad = q_grad or k_grad or v_grad
    cpu_math = flow.t.attention == "sdpa" and flow.t.device == "cpu" and spec.attention_dropout > 0
    saved += (_cpu_math_attention if cpu_math else attention_core)(flow, q_grad, k_grad, v_grad)
    # SDPA's fused output is laid out (b, s, heads, dim): o_proj reads it without a copy; eager and the math
    # path copy.
    own, mid_needs_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, attn_needs_grad,
                                            reads_saved_output=fused_output_reused(flow) and not cpu_math)
    saved += own
    saved += dropout_mask(flow, "attn.resid_dropout", tokens * h, spec.dropout, mid_needs_grad, e)

    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, keeps_x, out_grad = plain_mlp(flow, p + "mlp.c_fc", p + "mlp.c_proj", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    saved += dropout_mask(flow, "mlp.resid_dropout", tokens * h, spec.dropout, out_grad, e)
    return saved


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """The embedding dropout's mask; under checkpointing with frozen embeddings and that dropout, the embedding
    output that `enable_input_require_grads` makes a graph leaf (the AccumulateGrad node holds it: it is not
    layer 0's checkpointed input, which is the dropout's output), and the sliding window's mask argument."""
    spec, tokens, h = flow.spec, flow.tokens, flow.spec.hidden_size
    saved = dropout_mask(flow, "embeddings.dropout", tokens * h, spec.embedding_dropout, embeddings_need_grad,
                         flow.e_stream)
    if flow.t.grad_checkpointing and not flow.full and spec.embedding_dropout > 0:
        saved.append(SavedTensor("embeddings.output", tokens * h * flow.e_stream))
    return saved + mask_arguments(flow)


FAMILY = Family(model_types=("starcoder2",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.c_proj", positions="rope", norm="layer",
                model_level=model_level, norms_registered_last=True, residual_dropout=True, peft_has_default=False,
                models_sliding_window=True)

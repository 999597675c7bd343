"""OLMo 2 (transformers' models/olmo2/modeling_olmo2.py): post-norm placement and q / k norms over the full widths.

`Olmo2DecoderLayer.forward`: no input norms; `x + post_attention_layernorm(self_attn(x))`, then
`h + post_feedforward_layernorm(mlp(h))`. `Olmo2Attention.forward`: `q_norm(q_proj(x))` over all heads' channels
(`Olmo2RMSNorm(heads x head_dim)`), `k_norm(k_proj(x))` over the kv width, then the views, RoPE, SDPA / eager
attention and o_proj; `attention_bias` puts biases on q, k, v and o. `Olmo2RMSNorm` multiplies by its weight in
fp32 and casts after (`(weight * x).to(input_dtype)`, norm kind "rms_fp32"), so a trained norm keeps an fp32
normalised tensor. `Olmo2RotaryEmbedding.forward` returns cos / sin in fp32 (no cast to x's dtype) and
`apply_rotary_pos_emb` rotates in fp32 and casts back to q's / k's dtype, so the shared cos / sin tables RoPE's
backward keeps are fp32 (`Family.rotary_fp32`); the fp32 products are transient. Gated MLP as Llama's.

What a layer keeps (rules from `lora_planner.families.rules`): the q / k / v projections read the layer input
itself (the residual stream), so it is what they keep; q_norm / k_norm keep the fp32 copies of the projection
outputs and 1/rms per token (`rms_norm_of`); the attention core as Llama's; each post-norm keeps the fp32 copy
of its sublayer's output (o_proj, down_proj) and 1/rms; gate / up read the stream after the attention residual.

Liger (`use_liger_kernel`, Liger-Kernel `monkey_patch.py` `apply_liger_kernel_to_olmo2` on the instance): its RMSNorm
on the two post-norms (out of place) and the final norm, SwiGLU, RoPE and the fused linear cross-entropy; q_norm /
k_norm stay transformers' (the instance patch leaves them). Modelled, not measured.

PEFT 0.21.2 has no default LoRA targets for olmo2 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING has no
entry: `get_peft_model` asks for target_modules): the planner uses q_proj, v_proj and says so
(`Family.peft_has_default` False).
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.rules import (
    Flow, SavedTensor, attention_core, attention_projections, fused_output_reused, gated_mlp, liger_rms_norm,
    output_projection, rms_norm_of,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.{self_attn,mlp}.*` in transformers' registration order (`Olmo2Attention`: q, k, v, o,
    q_norm, k_norm; `Olmo2DecoderLayer`: self_attn, mlp, post_attention_layernorm, post_feedforward_layernorm)."""
    h, n, layer, bias = spec.hidden_size, spec.num_layers, PREFIX, spec.attention_bias
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        *attention_modules(spec, layer, bias, bias),
        Module(layer + "self_attn.q_norm", "norm", "norms", spec.q_size, spec.q_size, count=n),
        Module(layer + "self_attn.k_norm", "norm", "norms", spec.kv_size, spec.kv_size, count=n),
        Module(layer + "mlp.gate_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.up_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.down_proj", "linear", "mlp", spec.intermediate_size, h, count=n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "post_feedforward_layernorm", "norm", "norms", h, h, count=n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One decoder layer: attention on the stream, post-norm, residual; gated MLP, post-norm, residual."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved, keeps_x, (q_grad, k_grad, v_grad) = attention_projections(
        flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), x_needs_grad)
    if keeps_x:
        saved.append(SavedTensor("layer.input", tokens * h * flow.e_stream))
    saved += rms_norm_of(flow, "self_attn.q_norm", tokens * spec.q_size, spec.q_size, e, q_grad, fp32_product=True)
    saved += rms_norm_of(flow, "self_attn.k_norm", tokens * spec.kv_size, spec.kv_size, e, k_grad, fp32_product=True)
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += attention_core(flow, q_grad, k_grad, v_grad)
    own, attn_out_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, attn_needs_grad,
                                           reads_saved_output=fused_output_reused(flow))
    saved += own
    saved += _post_norm(flow, "post_attention_layernorm", attn_out_grad)

    mid_needs_grad = x_needs_grad or attn_out_grad
    mlp_saved, mlp_out_grad = gated_mlp(flow, p + "mlp.", mid_needs_grad, "attention_residual.output")
    saved += mlp_saved
    saved += _post_norm(flow, "post_feedforward_layernorm", mlp_out_grad)
    return saved


def _post_norm(flow: Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """A post-norm on its sublayer's output: `Olmo2RMSNorm`, or Liger's (`apply_liger_kernel_to_olmo2` patches the
    instance's post-norms and the final norm, out of place, not q_norm / k_norm: `rules.liger_rms_norm`)."""
    h = flow.spec.hidden_size
    if flow.liger:
        return liger_rms_norm(flow, name, x_needs_grad)
    return rms_norm_of(flow, name, flow.tokens * h, h, flow.e_compute, x_needs_grad, fp32_product=True)


FAMILY = Family(model_types=("olmo2",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms_fp32",
                peft_has_default=False, rotary_fp32=True, linear_reads_layer_input=True,
                saves_after_last_linear=True, liger="modelled")

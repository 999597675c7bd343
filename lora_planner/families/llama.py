"""Llama and the families that share its layer: Mistral, Qwen2, Gemma (transformers' modeling_llama.py,
modeling_mistral.py, modeling_qwen2.py, modeling_gemma.py).

Pre-norm decoder layer: RMSNorm -> separate q/k/v projections -> RoPE -> attention -> o_proj -> residual;
RMSNorm -> gated MLP (act(gate_proj x) * up_proj x -> down_proj) -> residual. Biases: Llama's
`attention_bias` / `mlp_bias`, Qwen2's q/k/v always, Gemma's `attention_bias`. Gemma's RMSNorm multiplies by
(1 + w) in fp32 and the model keeps a scalar `embed_scale` buffer.

Sliding windows (the shared rules of `lora_planner.families.rules`, "sliding windows"): Mistral's `sliding_window`
(MistralConfig: 4096 by default, null in v0.3 / Nemo) puts every layer behind `create_sliding_window_causal_mask`
(`MistralModel.forward`); Qwen2's applies with `use_sliding_window` to the "sliding_attention" layers of
`layer_types` (by default those from `max_window_layers` on: `Qwen2Config.__post_init__`, `Qwen2Model.forward`). From
--seq-len >= window on, SDPA gets a materialised mask on those layers: each keeps k / v repeated to every head and an
additive (b, 1, s, s) mask (`rules.attention_core`); checkpointing keeps the mask arguments (`rules.mask_arguments`).
Llama and Gemma have no window.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.rules import (
    Flow, SavedTensor, attention_core, fused_output_reused, gated_mlp, norm, normed_attention_input, output_projection,
    sliding_model_level,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.{self_attn,mlp}.*`, RMSNorm (weight only)."""
    h, n, layer = spec.hidden_size, spec.num_layers, PREFIX
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, count=n),
        *attention_modules(spec, layer, spec.attention_bias, spec.attention_out_bias),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "mlp.gate_proj", "linear", "mlp", h, spec.intermediate_size, spec.mlp_bias, n),
        Module(layer + "mlp.up_proj", "linear", "mlp", h, spec.intermediate_size, spec.mlp_bias, n),
        Module(layer + "mlp.down_proj", "linear", "mlp", spec.intermediate_size, h, spec.mlp_bias, n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One decoder layer (pre-norm, separate q/k/v/o, gated MLP)."""
    spec = flow.spec
    p = PREFIX
    saved, (q_grad, k_grad, v_grad) = normed_attention_input(flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"),
                                                            x_needs_grad)
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += attention_core(flow, q_grad, k_grad, v_grad)
    own, mid_needs_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, attn_needs_grad,
                                            reads_saved_output=fused_output_reused(flow))
    saved += own
    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, _ = gated_mlp(flow, p + "mlp.", mid_needs_grad, "post_attention_layernorm.output")
    return saved + mlp_saved


def _family(model_type: str, **overrides) -> Family:
    # transformers registers the decoder layer's norms after attention and MLP (LlamaDecoderLayer.__init__:
    # self_attn, mlp, input_layernorm, post_attention_layernorm), so `model.parameters()` is not forward order.
    rules = dict(model_types=(model_type,), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                 layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms",
                 norms_registered_last=True, liger="modelled")
    return Family(**{**rules, **overrides})


FAMILIES = (
    _family("llama"),
    # Sliding windows: `rules.attention_core` (the layers) and `rules.mask_arguments` (checkpointing's mask arguments)
    _family("mistral", model_level=sliding_model_level, models_sliding_window=True),
    _family("qwen2", model_level=sliding_model_level, models_sliding_window=True),
    _family("gemma", norm="rms_gemma", scalar_buffers=1),  # GemmaModel's `embed_scale` buffer
)

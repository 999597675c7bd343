"""Qwen3 (transformers' models/qwen3/modeling_qwen3.py): the Llama layer plus an RMSNorm on q and on k per head.

`Qwen3Attention.forward`: `q_norm(q_proj(x).view(b, s, heads, head_dim))` and the same for k with `k_norm`
(`Qwen3RMSNorm(head_dim)`, Llama-style: `weight * x.to(input_dtype)`), then RoPE, SDPA / eager attention, o_proj.
Everything else is `LlamaDecoderLayer` (pre-norm, gated MLP); `attention_bias` puts biases on q, k, v and o
(all four, `Qwen3Attention.__init__`). What the layer saves is Llama's (`lora_planner.families.llama.layer`) plus,
for each of q and k when it needs a gradient, the norm's fp32 input and its per-head 1/rms (and, when the norm
weight trains, its normalised input): `rules.rms_norm_of`.

Sliding-window layers (`use_sliding_window`; `layer_types`, by default the layers from `max_window_layers` on:
`Qwen3Config.__post_init__`; `Qwen3Model.forward` builds their mask with `create_sliding_window_causal_mask`): from
--seq-len >= window on, SDPA's sliding layers keep k / v repeated to every head and an additive (b, 1, s, s) mask
(the shared rules of `lora_planner.families.rules`, "sliding windows"). PEFT 0.21.2's default targets for qwen3 are
q_proj and v_proj (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
"""

from __future__ import annotations

from lora_planner.families import llama
from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.rules import Flow, SavedTensor, rms_norm_of, sliding_model_level
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.{self_attn,mlp}.*` in transformers' registration order (`Qwen3Attention`: q, k, v, o,
    q_norm, k_norm; `Qwen3DecoderLayer`: self_attn, mlp, input_layernorm, post_attention_layernorm), so
    `model.parameters()` order (what ZeRO flattens) is the list's order."""
    h, n, layer, bias = spec.hidden_size, spec.num_layers, PREFIX, spec.attention_bias
    d = spec.head_dim
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        *attention_modules(spec, layer, bias, bias),
        Module(layer + "self_attn.q_norm", "norm", "norms", d, d, count=n),
        Module(layer + "self_attn.k_norm", "norm", "norms", d, d, count=n),
        Module(layer + "mlp.gate_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.up_proj", "linear", "mlp", h, spec.intermediate_size, count=n),
        Module(layer + "mlp.down_proj", "linear", "mlp", spec.intermediate_size, h, count=n),
        Module(layer + "input_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def qk_head_norms(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """`q_norm` and `k_norm` on the projections' outputs (compute dtype), one row per head and token."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    q_grad = x_needs_grad or flow.trains(PREFIX + "self_attn.q_proj")
    k_grad = x_needs_grad or flow.trains(PREFIX + "self_attn.k_proj")
    return (rms_norm_of(flow, "self_attn.q_norm", tokens * spec.q_size, spec.head_dim, e, q_grad)
            + rms_norm_of(flow, "self_attn.k_norm", tokens * spec.kv_size, spec.head_dim, e, k_grad))


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """Llama's layer with the q / k head norms between the projections and RoPE."""
    saved = llama.layer(flow, x_needs_grad)
    at = next((i for i, item in enumerate(saved) if item.name.startswith("attn.")), len(saved))
    return saved[:at] + qk_head_norms(flow, x_needs_grad) + saved[at:]


FAMILY = Family(model_types=("qwen3",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms",
                model_level=sliding_model_level, models_sliding_window=True, liger="modelled")

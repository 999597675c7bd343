"""OLMoE (transformers' models/olmoe/modeling_olmoe.py): a pre-norm Llama-style layer with whole-width q / k norms
and a sparse MoE MLP.

`OlmoeAttention`: `q_norm(q_proj(x))` over the whole q width (`OlmoeRMSNorm(hidden_size)`) and `k_norm(k_proj(x))`
over the kv width, Llama-style (`weight * x.to(input_dtype)`: `rules.rms_norm_of`), `attention_bias` on q, k, v and o;
no sliding window (`OlmoeModel.forward` builds a causal mask only). `OlmoeSparseMoeBlock`: router `gate` (fp32
softmax, top-k, `norm_topk_prob`, scores cast to the logits' dtype) and fused `experts` of width
`intermediate_size` (`lora_planner.families.moe`). `clip_qkv` (in-place clamps of q, k, v) is refused by the reader.
PEFT 0.21.2 has no default targets for olmoe (q_proj, v_proj are this tool's choice); all-linear follows PEFT's
qwen2_moe conversion pattern.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.moe import decoder_layer, mlp_modules, moe_conversion, norms_last_layout
from lora_planner.families.rules import Flow, SavedTensor, rms_norm_of
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`OlmoeAttention`: q, k, v, o, q_norm (hidden wide), k_norm (kv wide); `OlmoeDecoderLayer`: self_attn, mlp,
    input_layernorm, post_attention_layernorm."""
    n, bias = spec.num_layers, spec.attention_bias
    return norms_last_layout(spec, [
        *attention_modules(spec, PREFIX, bias, bias),
        Module(PREFIX + "self_attn.q_norm", "norm", "norms", spec.q_size, spec.q_size, count=n),
        Module(PREFIX + "self_attn.k_norm", "norm", "norms", spec.kv_size, spec.kv_size, count=n),
        *mlp_modules(spec, PREFIX),
    ])


def qk_width_norms(flow: Flow, q_grad: bool, k_grad: bool) -> list[SavedTensor]:
    """`q_norm` / `k_norm` over the projections' whole width, in the compute dtype."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    return (rms_norm_of(flow, "self_attn.q_norm", tokens * spec.q_size, spec.q_size, e, q_grad)
            + rms_norm_of(flow, "self_attn.k_norm", tokens * spec.kv_size, spec.kv_size, e, k_grad))


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    return decoder_layer(flow, x_needs_grad, qk_norms=qk_width_norms)


FAMILY = Family(model_types=("olmoe",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                peft_has_default=False, layer_prefix=PREFIX, last_linear="mlp.experts.down_proj", saves_after_last_linear=True, positions="rope",
                norm="rms", norms_registered_last=True, **moe_conversion("olmoe"))

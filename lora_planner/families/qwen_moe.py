"""Qwen2-MoE and Qwen3-MoE (transformers' models/qwen2_moe/modeling_qwen2_moe.py, models/qwen3_moe/...).

Both: a pre-norm Llama-style layer whose MLP is a sparse MoE block (`lora_planner.families.moe`): the router `gate`
(fp32 softmax, top-k, renormalised only with `norm_topk_prob`, scores cast back to the logits' dtype), the fused
`experts` (`num_experts` of width `moe_intermediate_size`); layers in `mlp_only_layers`, or off the
`decoder_sparse_step`, keep a dense MLP of `intermediate_size`.

- Qwen2-MoE (`Qwen2MoeSparseMoeBlock`): q / k / v biases (`qkv_bias`), no o_proj bias; every MoE block also runs a
  `shared_expert` (a gated MLP of `shared_expert_intermediate_size`) scaled by `sigmoid(shared_expert_gate(x))`.
  Sliding windows on the "sliding_attention" entries of `layer_types` (`Qwen2MoeConfig.__post_init__`).
- Qwen3-MoE (`Qwen3MoeAttention`): Qwen3's per-head q / k RMSNorms (`lora_planner.families.qwen3.qk_head_norms`),
  `attention_bias` on q, k, v and o; `sliding_window` (with `use_sliding_window`) on every layer.

PEFT 0.21.2 has no default targets for either (its mapping has no qwen2_moe / qwen3_moe entry): q_proj, v_proj are
this tool's choice. all-linear differs between the two, as PEFT 0.21.2 runs it (checked against PEFT in the tests):
- Qwen3-MoE: PEFT's transformers-v5 conversion (transformers' `_MODEL_TO_CONVERSION_PATTERN` sends qwen3_moe to the
  "qwen2_moe" pattern) moves gate_proj / up_proj / down_proj / gate into target_parameters: gate_up_proj at rank x2,
  down_proj, gate.weight; dense MLPs in `mlp_only_layers` are then not adapted.
- Qwen2-MoE: no conversion runs (qwen2_moe is a pattern's target, not a key of that mapping), so all-linear adapts
  the nn.Linear modules only: attention, the shared expert, its 1-wide shared_expert_gate and dense MLPs; the routed
  experts and the router stay frozen (name them with --target-parameters to adapt them).
"""

from __future__ import annotations

from lora_planner.families import qwen3
from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.moe import decoder_layer, mlp_modules, moe_conversion, norms_last_layout
from lora_planner.families.rules import Flow, SavedTensor, sliding_model_level
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def qwen2_moe_layout(spec: ModelSpec) -> list[Module]:
    """`Qwen2MoeDecoderLayer.__init__`: self_attn, mlp, input_layernorm, post_attention_layernorm."""
    return norms_last_layout(spec, [*attention_modules(spec, PREFIX, spec.attention_bias, False),
                                    *mlp_modules(spec, PREFIX)])


def qwen3_moe_layout(spec: ModelSpec) -> list[Module]:
    """`Qwen3MoeAttention`: q, k, v, o (`attention_bias` on all four), q_norm, k_norm; then the MoE block and the
    two layer norms."""
    n, d, bias = spec.num_layers, spec.head_dim, spec.attention_bias
    return norms_last_layout(spec, [
        *attention_modules(spec, PREFIX, bias, bias),
        Module(PREFIX + "self_attn.q_norm", "norm", "norms", d, d, count=n),
        Module(PREFIX + "self_attn.k_norm", "norm", "norms", d, d, count=n),
        *mlp_modules(spec, PREFIX, router_first=False),  # Qwen3MoeSparseMoeBlock: experts, then gate
    ])


def qwen2_moe_layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    return decoder_layer(flow, x_needs_grad)


def qwen3_moe_layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    return decoder_layer(flow, x_needs_grad, qk_norms=lambda f, q, k: qwen3.qk_head_norms(f, x_needs_grad))


FAMILIES = (
    Family(model_types=("qwen2_moe",), layout=qwen2_moe_layout, layer=qwen2_moe_layer,
           peft_default_targets=("q_proj", "v_proj"), peft_has_default=False, layer_prefix=PREFIX,
           last_linear="mlp.experts.down_proj", saves_after_last_linear=True, positions="rope", norm="rms", norms_registered_last=True,
           model_level=sliding_model_level, models_sliding_window=True),
    Family(model_types=("qwen3_moe",), liger="Liger's fused MoE experts (LigerExperts) are not modelled yet",
           layout=qwen3_moe_layout, layer=qwen3_moe_layer,
           peft_default_targets=("q_proj", "v_proj"), peft_has_default=False, layer_prefix=PREFIX,
           last_linear="mlp.experts.down_proj", saves_after_last_linear=True, positions="rope", norm="rms", norms_registered_last=True,
           model_level=sliding_model_level, models_sliding_window=True, **moe_conversion("qwen3_moe")),
)

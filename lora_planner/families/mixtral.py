"""Mixtral (transformers' models/mixtral/modeling_mixtral.py): Mistral's layer with a sparse MoE block as its MLP.

`MixtralDecoderLayer`: input_layernorm -> `MixtralAttention` (q / k / v / o, no biases, RoPE, `sliding_window` on
every layer when set, as Mistral) -> post_attention_layernorm -> `MixtralSparseMoeBlock`: the router `gate`
(`MixtralTopKRouter`: fp32 softmax, top-k, always renormalised, scores kept fp32) and the fused `experts`
(`num_local_experts` of width `intermediate_size`), run by the chosen experts implementation
(`lora_planner.families.moe`). PEFT 0.21.2's mapping gives mixtral q_proj / v_proj, but under transformers 5 its
MoE conversion empties the default targets (`lora_planner.planner.plan_warnings` says so); all-linear adds
gate.weight, gate_up_proj (rank x2, from w1 + w3) and down_proj (w2) as target_parameters.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module, attention_modules
from lora_planner.families.moe import decoder_layer, mlp_modules, moe_conversion, norms_last_layout
from lora_planner.families.rules import Flow, SavedTensor, sliding_model_level
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`MixtralDecoderLayer.__init__` registers self_attn, mlp (gate, experts), then the two norms."""
    return norms_last_layout(spec, [*attention_modules(spec, PREFIX, False, False), *mlp_modules(spec, PREFIX)])


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    return decoder_layer(flow, x_needs_grad, fp32_scores=True)


FAMILY = Family(model_types=("mixtral",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.experts.down_proj", saves_after_last_linear=True, positions="rope", norm="rms",
                norms_registered_last=True, model_level=sliding_model_level, models_sliding_window=True,
                **moe_conversion("mixtral"),
                liger="Liger's fused MoE experts (LigerExperts) are not modelled yet")

"""gpt-oss (`lora_planner.families.gpt_oss`): parameters, buffers, LoRA trainable counts and the config reader, held
to transformers 5.24 and PEFT 0.21.2 on meta-device models (saved activations: tests/test_activations.py, the
gpt_oss entries of MOE_CASES).

Full size: gpt-oss-20b and gpt-oss-120b's shapes (their config.json; the 120b one is the 20b file with its stated
differences: 36 layers, 128 experts) against transformers' count on the meta device and the hub's safetensors totals
(huggingface.js parse-safetensors-metadata test fixtures: 20,914,757,184 and 116,829,156,672, the MXFP4 experts
counted as two values per byte).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.families import family_rules
from lora_planner.params import (
    adapted_layers, buffer_bytes, buffer_numel, count_params, lora_params, module_inventory, targetable_names,
)
from tests.hf_reference import hf_config, meta_model, params_by_module, peft_targets, total_params


def _full_size(layers: int, experts: int) -> dict:
    return {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
            "num_local_experts": experts, "num_experts_per_tok": 4, "experts_per_token": 4,
            "max_position_embeddings": 131072, "rope_theta": 150000, "sliding_window": 128,
            "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
            "attention_bias": True, "tie_word_embeddings": False, "router_aux_loss_coef": 0.9,
            "output_router_logits": False, "swiglu_limit": 7.0, "rms_norm_eps": 1e-05,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False,
                             "rope_theta": 150000},
            "quantization_config": {"quant_method": "mxfp4",
                                    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"]}}


FULL_SIZE = {"gpt-oss-20b": (_full_size(24, 32), 20_914_757_184),
             "gpt-oss-120b": (_full_size(36, 128), 116_829_156_672)}

_TINY = {"model_type": "gpt_oss", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 48,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
         "max_position_embeddings": 512, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8}
TINY = {
    "tiny": _TINY,
    # no attention biases, tied embeddings, the `num_experts` alias, head_dim x heads above hidden, all layers full
    "tiny-variant": {**_TINY, "attention_bias": False, "tie_word_embeddings": True, "num_experts": 4,
                     "num_local_experts": 8, "head_dim": 32, "layer_types": ["full_attention"] * 3},
    # GptOssConfig's head_dim (64), num_key_value_heads (8) and sliding_window (128)
    "tiny-defaults": {**{k: v for k, v in _TINY.items()
                         if k not in ("head_dim", "num_key_value_heads", "sliding_window")}, "num_attention_heads": 8},
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_totals_match_transformers_and_the_hub(name):
    config, published = FULL_SIZE[name]
    spec = spec_from_config(config, name)
    assert count_params(spec).total == published == total_params(meta_model(config))


@pytest.mark.parametrize("key", TINY)
def test_params_and_buffers_match_transformers(key):
    """Totals, each module's parameters (layers folded onto layer 0; the experts' four tensors and the attention's
    sinks under their module paths), buffers (RoPE's two fp32 tables, head_dim / 2 each)."""
    config = TINY[key]
    spec = spec_from_config(config, key)
    model = meta_model(config)
    assert count_params(spec).total == total_params(model)
    real = params_by_module(model)
    planned: dict[str, int] = {}
    for m in module_inventory(spec):
        # `mlp.experts.gate_up_proj` (a parameter) belongs to module `mlp.experts`; `self_attn.sinks` to `self_attn`
        path = m.path.rsplit(".", 1)[0] if m.kind == "experts" or m.path.endswith(".sinks") else m.path
        planned[path] = planned.get(path, 0) + m.params
    assert {k: v for k, v in planned.items() if v} == {k: v for k, v in real.items() if v}
    # model.named_parameters() order (what ZeRO flattens): the layout's order
    names = [n for n, _ in model.named_parameters() if ".layers.0." in n]
    assert names[0].endswith("self_attn.sinks") and names[-1].endswith("post_attention_layernorm.weight")
    assert buffer_numel(spec) == sum(b.numel() for b in model.buffers())
    with torch.device("meta"):
        bf16 = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    assert buffer_bytes(spec, "bf16") == sum(b.numel() * b.element_size() for b in bf16.buffers())


def test_spec_fields_follow_gpt_oss_config():
    spec = spec_from_config(TINY["tiny-defaults"], "defaults")
    cfg = hf_config(TINY["tiny-defaults"])
    assert (spec.head_dim, spec.num_kv_heads, spec.sliding_window) == (cfg.head_dim, cfg.num_key_value_heads,
                                                                       cfg.sliding_window) == (64, 8, 128)
    assert spec.layer_types == tuple(cfg.layer_types) == ("sliding_attention", "full_attention", "sliding_attention")
    assert (spec.num_experts, spec.moe_intermediate_size, spec.attention_bias, spec.attention_out_bias) == (8, 48,
                                                                                                         True, True)
    variant = spec_from_config(TINY["tiny-variant"], "variant")
    assert variant.num_experts == hf_config(TINY["tiny-variant"]).num_local_experts == 4  # the alias wins
    rules = family_rules("gpt_oss")
    assert not rules.sdpa and not rules.peft_has_default and not rules.moe_conversion


@pytest.mark.parametrize("config, field", [
    ({**_TINY, "sliding_window": None}, "sliding_window"),
    ({**_TINY, "head_dim": None}, "head_dim"),  # GptOssConfig: `head_dim: int` (strict)
    ({**_TINY, "num_key_value_heads": None}, "num_key_value_heads"),
    ({**_TINY, "swiglu_limit": 7}, "swiglu_limit"),  # a float field refuses an int
    ({**_TINY, "layer_types": ["sliding_attention"]}, "layer_types"),
])
def test_reader_refuses_what_transformers_refuses(config, field):
    with pytest.raises(PlannerInputError) as err:
        spec_from_config(config, "bad")
    assert field in err.value.field


def _peft_trainable(config: dict, r: int, targets: tuple[str, ...] | None,
                    target_parameters: tuple[str, ...] | None) -> int:
    model = meta_model(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=peft_targets(targets) if targets else None,
                      target_parameters=list(target_parameters) if target_parameters else None)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lora)
    return int(peft_model.get_nb_trainable_parameters()[0])


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LORA_CASES = [
    (4, ("q_proj", "v_proj"), None),  # the planner's default (PEFT has none)
    (4, ("all-linear",), None),  # q / k / v / o only: no conversion, the router and experts are not nn.Linear
    (8, ("all-linear",), EXPERTS),
    (4, ("q_proj", "v_proj"), ("mlp.experts.down_proj",)),
    (4, ("o_proj",), ("mlp.router.weight",)),
    (2, ("layers.1.self_attn.k_proj",), EXPERTS + ("mlp.router.weight",)),
]


@pytest.mark.parametrize("key", ["tiny", "tiny-variant"])
@pytest.mark.parametrize("r, targets, params", LORA_CASES)
def test_lora_counts_match_peft(key, r, targets, params):
    config = TINY[key]
    spec = spec_from_config(config, key)
    assert lora_params(spec, r, targets, None, params).trainable_params == _peft_trainable(config, r, targets, params)


def test_default_targets_are_the_documented_choice_and_peft_has_none():
    spec = spec_from_config(_TINY, "tiny")
    assert lora_params(spec, 4, None).trainable_params == _peft_trainable(_TINY, 4, ("q_proj", "v_proj"), None)
    with pytest.raises(ValueError, match="target_modules"):  # PEFT 0.21.2: no default for gpt_oss
        _peft_trainable(_TINY, 4, None, None)
    assert {m.path.rsplit(".", 1)[-1] for m, _ in adapted_layers(spec, ("all-linear",))} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    assert "sinks" not in targetable_names(spec) and "router" not in targetable_names(spec)
    with pytest.raises(PlannerInputError, match="target-parameters"):  # an MoE parameter named as a module
        lora_params(spec, 4, ("gate_up_proj",))

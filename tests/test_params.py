"""Parameter and LoRA accounting (`lora_planner.params`) against real `transformers` / `peft` models.

Every catalog model is rebuilt from its catalog config dict on the meta device (see `tests/hf_reference.py`)
and the planner's numbers must equal the real ones exactly: totals, per-group sums, every inventory
module's path / shape / bias / repeat count, and LoRA trainable / all-parameter counts as
`PeftModel.get_nb_trainable_parameters()` reports them.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM

from lora_planner.catalog import MODEL_CONFIGS, resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.families import FAMILY_RULES
from lora_planner.params import (
    buffer_bytes,
    buffer_numel,
    check_sequence_length,
    target_description,
    GROUPS,
    count_params,
    targetable_names,
    lora_params,
    module_inventory,
    rank_for_trainable_fraction,
    resolve_targets,
)
from lora_planner.specs import LoraSpec
from tests.hf_reference import (
    LINEAR_TYPES,
    Conv1D,
    hf_config,
    layer_index,
    meta_model,
    module_instances,
    params_by_module,
    peft_lora_counts,
    total_params,
)

CATALOG = tuple(MODEL_CONFIGS)

# Published parameter totals (the model cards / safetensors metadata of each Hugging Face repo), pinned
# independently of both the planner and transformers.
PUBLISHED_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-7b": 8_537_680_896,
    "phi-2": 2_779_683_840,
    "gpt2": 124_439_808,
    "bloom-7b1": 7_069_016_064,
    "tinyllama-1.1b": 1_100_048_384,
    # Newer entries (each equals transformers on meta, `test_total_matches_transformers`); the published, rounded
    # figure of the model card in the comment.
    "llama-3.1-70b": 70_553_706_496,  # 70.6 B
    "llama-3.1-405b": 405_853_388_800,  # 405.8 B
    "qwen2.5-3b": 3_085_938_688,  # 3.09 B
    "qwen2.5-32b": 32_763_876_352,  # the card says 32.5 B (31.0 B non-embedding); transformers builds this
    "qwen2.5-72b-instruct": 72_706_203_648,  # 72.7 B
    "mistral-7b-v0.3": 7_248_023_552,  # 7.25 B
    "mistral-nemo-12b": 12_247_782_400,  # 12.2 B
    "smollm2-135m": 134_515_008,  # 135 M
    "smollm2-360m": 361_821_120,  # 362 M
    "smollm2-1.7b": 1_711_376_384,  # 1.71 B
    "deepseek-r1-distill-qwen-1.5b": 1_777_088_000,  # 1.78 B (untied lm_head)
    "deepseek-r1-distill-qwen-32b": 32_763_876_352,  # Qwen2.5-32B's shapes
    "qwen3-0.6b": 596_049_920,  # 0.6 B (0.44 B non-embedding)
    "qwen3-1.7b": 1_720_574_976,  # 1.7 B (1.4 B non-embedding)
    "qwen3-4b": 4_022_468_096,  # 4.0 B (3.6 B non-embedding)
    "qwen3-8b": 8_190_735_360,  # 8.2 B (6.95 B non-embedding)
    "qwen3-14b": 14_768_307_200,  # 14.8 B (13.2 B non-embedding)
    "qwen3-32b": 32_762_123_264,  # 32.8 B (31.2 B non-embedding)
    "olmo2-7b": 7_298_617_344,  # 7.30 B
    "olmo2-13b": 13_716_198_400,  # 13.7 B
    "pythia-6.9b-deduped": 6_857_302_016,  # 6.86 B (Pythia paper, Table 1: 6,857,302,016)
    "pythia-12b-deduped": 11_846_072_320,  # 11.8 B (Pythia paper: 11,846,072,320)
    "gpt-neox-20b": 20_554_567_680,  # 20.6 B (GPT-NeoX-20B paper: 20,554,567,680)
    "granite-3.3-8b-instruct": 8_170_864_640,  # 8.17 B
    "phi-3-mini-4k-instruct": 3_821_079_552,  # 3.8 B
    "phi-3.5-mini-instruct": 3_821_079_552,  # 3.8 B
    "phi-4": 14_659_507_200,  # 14.7 B
    "phi-4-mini-instruct": 3_836_021_760,  # 3.8 B (tied embeddings)
    "starcoder2-3b": 3_030_371_328,  # 3.03 B
    "starcoder2-7b": 7_173_923_840,  # 7.17 B
    "starcoder2-15b": 15_655_899_136,  # 15.7 B (tied embeddings: its config.json has no tie_word_embeddings key)
    "smollm3-3b": 3_075_098_624,  # 3.08 B (tied embeddings)
    "llama-3.3-70b-instruct": 70_553_706_496,  # 70.6 B (Llama 3.1 70B's shapes)
    "qwen2.5-14b": 14_770_033_664,  # 14.7 B (13.1 B non-embedding)
    "qwen2.5-72b": 72_706_203_648,  # 72.7 B
    "mistral-small-24b": 23_572_403_200,  # 24 B (its safetensors index: 47,144,806,400 bytes in bf16)
    "phi-3-medium-4k-instruct": 13_960_238_080,  # 14 B
    "deepseek-r1-distill-qwen-7b": 7_615_616_512,  # 7.62 B (Qwen2.5-7B's shapes)
    "deepseek-r1-distill-llama-8b": 8_030_261_248,  # 8.03 B (its hub safetensors total)
    "gemma-2-2b": 2_614_341_888,  # 2.61 B (tied embeddings)
    "gemma-2-9b": 9_241_705_984,  # 9.24 B
    "gemma-2-27b": 27_227_128_320,  # 27.2 B
    "gemma-3-1b": 999_885_952,  # 1.0 B
    # MoE: the hub's safetensors totals (model cards: total / active)
    "mixtral-8x7b": 46_702_792_704,  # 46.7 B / 12.9 B
    "mixtral-8x22b": 140_620_634_112,  # 141 B / 39 B
    "qwen1.5-moe-a2.7b": 14_315_784_192,  # 14.3 B / 2.7 B
    "qwen3-30b-a3b": 30_532_122_624,  # 30.5 B / 3.3 B
    "qwen3-235b-a22b": 235_093_634_560,  # 235 B / 22 B
    "olmoe-1b-7b": 6_919_161_856,  # 6.9 B / 1.3 B
    "gpt-oss-20b": 20_914_757_184,  # 21 B / 3.6 B
    "gpt-oss-120b": 116_829_156_672,  # 117 B / 5.1 B
    "deepseek-v2-lite": 15_706_484_224,  # 16 B / 2.4 B
    "deepseek-v3": 671_026_404_352,  # 671 B main model (the hub's 685 B adds the MTP module) / 37 B
}
# Active parameters per token (`ParamCounts.active`), as the model cards round them.
PUBLISHED_ACTIVE = {"mixtral-8x7b": 12.9e9, "mixtral-8x22b": 39e9, "qwen1.5-moe-a2.7b": 2.7e9, "qwen3-30b-a3b": 3.3e9,
                    "qwen3-235b-a22b": 22e9, "olmoe-1b-7b": 1.3e9}
# gpt-oss's card counts active parameters without the input embedding table (`embedding_free_active_params`).
PUBLISHED_ACTIVE_NO_EMBEDDINGS = {"gpt-oss-20b": 3.6e9, "gpt-oss-120b": 5.1e9, "deepseek-v2-lite": 2.4e9,
                                  "deepseek-v3": 36.6e9}  # DeepSeek-V3's README: "Activation parameters: 36.6B"


def _family(name: str) -> str:
    return MODEL_CONFIGS[name][1]["model_type"]


@pytest.fixture(scope="module", params=CATALOG)
def built(request):
    """(catalog name, ModelSpec, meta model); read-only users only (PEFT tests build their own)."""
    name = request.param
    return name, resolve_model(name), meta_model(MODEL_CONFIGS[name][1])


# --------------------------------------------------------------------------------------------------
# 1. Base-model parameter counts
# --------------------------------------------------------------------------------------------------

def test_every_catalog_model_has_a_published_total():
    assert set(PUBLISHED_TOTALS) == set(MODEL_CONFIGS)


@pytest.mark.parametrize(("name", "expected"), PUBLISHED_TOTALS.items())
def test_total_matches_published(name, expected):
    assert count_params(resolve_model(name)).total == expected


@pytest.mark.parametrize(("name", "expected"), PUBLISHED_ACTIVE.items())
def test_moe_active_params_match_the_model_cards(name, expected):
    counts = count_params(resolve_model(name))
    assert abs(counts.active - expected) / expected < 0.03, counts.active
    assert counts.active < counts.total


@pytest.mark.parametrize(("name", "expected"), PUBLISHED_ACTIVE_NO_EMBEDDINGS.items())
def test_moe_active_params_without_embeddings_match_the_model_cards(name, expected):
    from lora_planner.params import embedding_free_active_params

    assert abs(embedding_free_active_params(resolve_model(name)) - expected) / expected < 0.03


def test_moe_active_params_by_hand():
    """Mixtral-8x7B: 2 of 8 experts of 3 x 4096 x 14336 in each of 32 layers are active."""
    counts = count_params(resolve_model("mixtral-8x7b"))
    assert counts.total - counts.active == 32 * 6 * 3 * 4096 * 14336


def test_total_matches_transformers(built):
    name, spec, model = built
    assert count_params(spec).total == total_params(model)


def test_group_counts_match_transformers(built):
    """Every real parameter belongs to an inventory module; summing them by the inventory's groups gives
    `count_params(...).by_group` exactly (norms, embeddings, lm_head, attention, mlp)."""
    name, spec, model = built
    group_of = {_owner(m): m.group for m in module_inventory(spec)}
    real = params_by_module(model)
    assert set(real) <= set(group_of), f"real modules missing from the inventory: {set(real) - set(group_of)}"
    by_group = dict.fromkeys(GROUPS, 0)
    for path, numel in real.items():
        by_group[group_of[path]] += numel
    counts = count_params(spec)
    assert counts.by_group == by_group
    assert sum(counts.by_group.values()) == counts.total


def test_module_params_match_transformers(built):
    """Module by module: `Module.params` equals the real parameters folded onto that layer-0 path."""
    name, spec, model = built
    real = params_by_module(model)
    planned: dict[str, int] = {}
    for module in module_inventory(spec):  # an MoE experts module's stacks are several inventory entries
        planned[_owner(module)] = planned.get(_owner(module), 0) + module.params
    for path, params in planned.items():
        assert params == real.get(path, 0), path


def _first_instance(m):
    """The entry as its first layer names it (inventory paths are layer 0's; DeepSeek's MoE blocks start at layer
    `first_k_dense_replace`)."""
    return dataclasses.replace(m, path=m.layer_path(m.layer_indices[0])) if m.layers else m


def _owner(m) -> str:
    """The module that owns an inventory entry's parameters: itself, or for an entry whose path is a parameter's own
    name (a 3-D experts stack, `mlp.experts.gate_up_proj`; gpt-oss's per-head `self_attn.sinks`) its module."""
    return m.path.rsplit(".", 1)[0] if _is_parameter(m) else m.path


def _is_parameter(m) -> bool:
    return m.kind == "experts" or m.path.endswith(".sinks")


def test_inventory_paths_shapes_and_counts(built):
    """Each inventory path exists in `named_modules()`, has the stated kind, weight shape ((out, in) for
    nn.Linear, (in, out) for GPT-2's Conv1D, (vocab, hidden) for embeddings, (width,) for norms), bias,
    and repeats `count` times (once per layer, with layer indices 0..count-1)."""
    name, spec, model = built
    modules = dict(model.named_modules())
    instances = module_instances(model)
    for m in module_inventory(spec):
        if m.kind == "experts":  # a 3-D parameter (E, out, in) of the experts module (transposed: (E, in, out))
            owner = modules[_owner(_first_instance(m))]
            weight = getattr(owner, m.path.rsplit(".", 1)[1])
            shape = (m.experts, m.in_features, m.out_features) if getattr(owner, "is_transposed", False) else (
                m.experts, m.out_features, m.in_features)
            assert tuple(weight.shape) == shape, m.path
            assert instances[_owner(m)] == m.count, m.path
            continue
        if _is_parameter(m):  # gpt-oss's attention sinks: one (heads,) parameter of the attention module
            owner = modules[_owner(_first_instance(m))]
            assert tuple(getattr(owner, m.path.rsplit(".", 1)[1]).shape) == (m.out_features,), m.path
            continue
        assert _first_instance(m).path in modules, m.path
        real = modules[_first_instance(m).path]
        bias = getattr(real, "bias", None)
        if m.kind == "router":  # a bare (E, H) parameter of a custom module (not an nn.Linear)
            assert not isinstance(real, LINEAR_TYPES), m.path
            assert tuple(real.weight.shape) == (m.out_features, m.in_features), m.path
        elif m.kind == "linear":
            assert isinstance(real, LINEAR_TYPES), (m.path, type(real))
            expected = (m.in_features, m.out_features) if isinstance(real, Conv1D) else (m.out_features,
                                                                                         m.in_features)
            assert tuple(real.weight.shape) == expected, m.path
            assert m.weight_numel_each == (0 if m.tied else real.weight.numel())
        elif m.kind == "embedding":
            assert isinstance(real, nn.Embedding), (m.path, type(real))
            assert tuple(real.weight.shape) == (m.in_features, m.out_features), m.path
        else:
            assert not isinstance(real, (*LINEAR_TYPES, nn.Embedding)), m.path
            assert tuple(real.weight.shape) == (m.out_features,) and m.in_features == m.out_features, m.path
        assert (bias is not None) == m.bias, m.path
        if bias is not None:
            assert tuple(bias.shape) == (m.out_features,), m.path
        assert instances[m.path] == m.count, m.path
        if m.count > 1 and not m.layers:
            assert layer_index(m.path) == 0, m.path
            assert m.path.replace(".0.", f".{m.count - 1}.", 1) in modules
            assert m.path.replace(".0.", f".{m.count}.", 1) not in modules


def test_inventory_lists_every_parameter_holding_module(built):
    """No module with parameters of its own is left out of the inventory (layer-0 representatives)."""
    name, spec, model = built
    inventory = {_owner(m) for m in module_inventory(spec)}
    owners = {path for path, mod in model.named_modules()
              if any(True for _ in mod.parameters(recurse=False)) and layer_index(path) in (None, 0)}
    assert owners <= inventory, owners - inventory


def test_tied_lm_head_is_the_embedding(built):
    name, spec, model = built
    lm_head = module_inventory(spec)[-1]
    assert lm_head.path == "lm_head" and lm_head.group == "lm_head"
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert lm_head.tied == spec.tie_word_embeddings == shared
    if lm_head.tied:
        assert lm_head.params == 0
        assert count_params(spec).by_group["lm_head"] == 0


@pytest.mark.parametrize(("name", "group", "expected"), [
    # Llama-2-7B by hand: 32000 x 4096 embeddings and head, 65 RMSNorms of 4096, 32 x 4 x 4096^2 attention,
    # 32 x 3 x 4096 x 11008 gated MLP.
    ("llama-2-7b", "embeddings", 131_072_000),
    ("llama-2-7b", "lm_head", 131_072_000),
    ("llama-2-7b", "norms", 266_240),
    ("llama-2-7b", "attention", 2_147_483_648),
    ("llama-2-7b", "mlp", 4_328_521_728),
    # GPT-2 small: wte 50257 x 768 + wpe 1024 x 768, tied head, biased Conv1Ds and LayerNorms.
    ("gpt2", "embeddings", 39_383_808),
    ("gpt2", "lm_head", 0),
    ("gpt2", "norms", 38_400),
    ("gpt2", "attention", 28_348_416),
    ("gpt2", "mlp", 56_669_184),
    # Phi-2: biased lm_head (2560 x 51200 + 51200).
    ("phi-2", "lm_head", 131_123_200),
    # Llama-3.2-1B: tied head, GQA k/v of 8 x 64.
    ("llama-3.2-1b", "lm_head", 0),
    ("llama-3.2-1b", "attention", 16 * (2048 * 2048 * 2 + 2048 * 512 * 2)),
    # Qwen2.5-0.5B: q/k/v biases, no o_proj bias.
    ("qwen2.5-0.5b", "attention", 24 * (896 * 896 + 896 + 2 * (896 * 128 + 128) + 896 * 896)),
])
def test_group_counts_by_hand(name, group, expected):
    assert count_params(resolve_model(name)).by_group[group] == expected


@pytest.mark.parametrize(("family", "expected"), [
    ("llama", ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head")),
    ("phi", ("embed_tokens", "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head")),
    ("gpt2", ("wte", "wpe", "c_attn", "c_proj", "c_fc", "lm_head")),
    ("bloom", ("word_embeddings", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head")),
    ("gpt_neox", ("embed_in", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head")),
    ("phi3", ("embed_tokens", "o_proj", "qkv_proj", "gate_up_proj", "down_proj", "lm_head")),
    ("starcoder2", ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj", "lm_head")),
])
def test_targetable_names(family, expected):
    name = next(n for n in CATALOG if _family(n) == family)
    assert targetable_names(resolve_model(name)) == expected


# --------------------------------------------------------------------------------------------------
# 2. LoRA counts against PEFT
# --------------------------------------------------------------------------------------------------

LLAMA_LIKE_CASES = [
    (8, ("q_proj", "v_proj")),
    (16, ("q_proj", "v_proj")),
    (64, ("all-linear",)),
    (4, ("gate_proj", "up_proj", "down_proj")),
    (32, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (8, ("embed_tokens", "lm_head")),
]
FAMILY_CASES = {
    "qwen3": LLAMA_LIKE_CASES,
    "olmo2": LLAMA_LIKE_CASES,  # PEFT has no default: q_proj, v_proj (the first case)
    "gpt_neox": [
        (8, ("query_key_value",)),  # PEFT's default
        (64, ("all-linear",)),
        (4, ("dense_h_to_4h", "dense_4h_to_h")),
        (16, ("dense",)),  # attention.dense only
        (8, ("embed_in", "lm_head")),
    ],
    "granite": LLAMA_LIKE_CASES,  # PEFT has no default: q_proj, v_proj (the first case)
    "smollm3": LLAMA_LIKE_CASES,  # PEFT has no default: q_proj, v_proj (the first case)
    "gemma2": LLAMA_LIKE_CASES,  # PEFT's default: q_proj, v_proj
    "gemma3_text": LLAMA_LIKE_CASES,  # PEFT's default: q_proj, v_proj
    "phi3": [
        (8, ("qkv_proj",)),  # PEFT has no default: the fused qkv_proj
        (64, ("all-linear",)),
        (4, ("gate_up_proj", "down_proj")),
        (16, ("o_proj",)),
        (8, ("embed_tokens", "lm_head")),
    ],
    "starcoder2": [
        (8, ("q_proj", "v_proj")),  # PEFT has no default: q_proj, v_proj
        (64, ("all-linear",)),
        (4, ("c_fc", "c_proj")),  # mlp.c_fc / mlp.c_proj
        (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (8, ("embed_tokens",)),
    ],
    "llama": LLAMA_LIKE_CASES,
    "mistral": LLAMA_LIKE_CASES,
    "qwen2": LLAMA_LIKE_CASES,
    "gemma": LLAMA_LIKE_CASES,
    "phi": [
        (8, ("q_proj", "v_proj")),
        (64, ("all-linear",)),
        (4, ("fc1", "fc2")),
        (16, ("dense",)),
        (8, ("lm_head",)),
    ],
    "gpt2": [
        (8, ("c_attn",)),
        (16, ("c_attn",)),
        (64, ("all-linear",)),
        (4, ("c_fc", "c_proj")),
        (8, ("c_proj",)),  # matches attn.c_proj and mlp.c_proj
        (8, ("attn.c_proj",)),  # a dotted suffix picks one of them
        (2, ("wte", "wpe")),
        (768, ("c_attn",)),  # the largest rank the fused 768 -> 2304 projection allows
    ],
    "bloom": [
        (8, ("query_key_value",)),
        (64, ("all-linear",)),
        (4, ("dense_h_to_4h", "dense_4h_to_h")),
        (16, ("dense",)),  # self_attention.dense only (the MLP's names end differently)
        (8, ("word_embeddings",)),
    ],
    # MoE: PEFT's transformers-v5 conversion turns v4 names of the experts / router into target_parameters
    # (gate_up_proj at rank 2r); all-linear adds all of them (Mixtral, Qwen3-MoE, OLMoE); Qwen2-MoE has no conversion
    "mixtral": [
        (8, ("q_proj", "v_proj")),  # PEFT's mapping (its default lookup fails under transformers 5)
        (16, ("all-linear",)),
        (4, ("w1", "w3")),  # -> mlp.experts.gate_up_proj at r = 8
        (8, ("w2", "gate")),  # -> mlp.experts.down_proj and mlp.gate.weight
        (8, ("embed_tokens", "lm_head")),
    ],
    "qwen3_moe": [
        (8, ("q_proj", "v_proj")),  # PEFT has no default: q_proj, v_proj
        (16, ("all-linear",)),
        (4, ("gate_proj", "up_proj", "down_proj")),  # -> the expert stacks
        (32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate")),
    ],
    "olmoe": [
        (8, ("q_proj", "v_proj")),  # PEFT has no default: q_proj, v_proj
        (16, ("all-linear",)),
        (4, ("gate_proj", "up_proj", "down_proj")),
        (8, ("embed_tokens", "lm_head")),
    ],
    "deepseek_v2": [
        (8, ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),  # PEFT has no default: this tool's MLA choice
        (16, ("all-linear",)),  # + the expert stacks (gate_up_proj at 2r) and the router; not the shared experts
        (4, ("gate_proj", "up_proj", "down_proj")),  # -> the expert stacks only (PEFT's conversion)
    ],
    "deepseek_v3": [
        (8, ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
        (16, ("all-linear",)),
        (8, ("q_a_proj", "q_b_proj", "gate")),
    ],
    "gpt_oss": [
        (8, ("q_proj", "v_proj")),  # PEFT has no default: q_proj, v_proj (no MoE conversion for gpt_oss)
        (16, ("all-linear",)),  # attention only: the router and the experts are not nn.Linear
        (32, ("q_proj", "k_proj", "v_proj", "o_proj")),
    ],
    "qwen2_moe": [
        (8, ("q_proj", "v_proj")),  # PEFT has no default: q_proj, v_proj
        (16, ("all-linear",)),  # attention, the shared expert, its 1-wide gate; the routed experts stay frozen
        (4, ("gate_proj", "up_proj", "down_proj")),  # the shared expert's linears (no conversion for qwen2_moe)
        (16, ("shared_expert_gate",)),  # 1 wide: PEFT adapts it at any rank
    ],
}
PEFT_CASES = [
    pytest.param(name, r, targets, id=f"{name}-r{r}-{'+'.join(targets)}")
    for name in CATALOG
    for r, targets in FAMILY_CASES[_family(name)]
]


def test_peft_cases_cover_every_model_and_family():
    covered = {case.values[0] for case in PEFT_CASES}
    assert covered == set(CATALOG)
    assert set(FAMILY_CASES) == {_family(n) for n in CATALOG}


@pytest.mark.parametrize("model_type", sorted(FAMILY_RULES))
def test_default_targets_are_pefts(model_type):
    """A family's default targets are PEFT 0.21.2's own (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); where
    PEFT has none (`peft_has_default` False), the model type is indeed missing from PEFT's table."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    family = FAMILY_RULES[model_type]
    if family.peft_has_default:
        assert set(family.peft_default_targets) == set(peft_defaults[model_type])
    else:
        assert model_type not in peft_defaults


@pytest.mark.parametrize(("name", "r", "targets"), PEFT_CASES)
def test_lora_counts_match_peft(name, r, targets):
    counts = lora_params(resolve_model(name), r, targets)
    trainable, total = peft_lora_counts(MODEL_CONFIGS[name][1], r, targets)
    assert (counts.trainable_params, counts.all_params) == (trainable, total)
    assert counts.trainable_fraction == trainable / total
    assert counts.base_params == count_params(resolve_model(name)).total


def test_lora_llama_7b_q_v_r8_pinned():
    counts = lora_params(resolve_model("llama-7b"), 8, ("q_proj", "v_proj"))
    assert counts.trainable_params == 4_194_304  # 32 layers x 2 x 8 x (4096 + 4096)
    assert counts.all_params == 6_742_609_920
    assert round(100 * counts.trainable_fraction, 4) == 0.0622  # PEFT prints "trainable%: 0.0622"
    assert [m.path for m in counts.target_modules] == ["model.layers.0.self_attn.q_proj",
                                                      "model.layers.0.self_attn.v_proj"]


@pytest.mark.parametrize(("name", "r", "targets", "expected"), [
    ("gpt2", 8, ("c_attn",), 12 * 8 * (768 + 2304)),
    ("gpt2", 8, ("c_proj",), 12 * 8 * (768 + 768) + 12 * 8 * (3072 + 768)),
    ("llama-3.2-1b", 16, ("k_proj",), 16 * 16 * (2048 + 512)),
    ("gemma-7b", 8, ("q_proj", "o_proj"), 28 * 8 * 2 * (3072 + 4096)),  # q: 16 x 256 = 4096 > hidden
    ("bloom-7b1", 8, ("query_key_value",), 30 * 8 * (4096 + 3 * 4096)),
    ("qwen2.5-0.5b", 8, ("embed_tokens",), 8 * (151936 + 896)),
])
def test_lora_counts_by_hand(name, r, targets, expected):
    assert lora_params(resolve_model(name), r, targets).trainable_params == expected


def test_lora_counts_are_linear_in_r():
    spec = resolve_model("mistral-7b")
    one = lora_params(spec, 1, ("all-linear",)).trainable_params
    for r in (2, 7, 64, 1024):
        assert lora_params(spec, r, ("all-linear",)).trainable_params == r * one


@pytest.mark.parametrize("targets", [("q_proj", "q_proj"), ("q_proj", "self_attn.q_proj")])
def test_duplicate_targets_are_counted_once(targets):
    spec = resolve_model("llama-2-7b")
    assert lora_params(spec, 8, targets).trainable_params == lora_params(spec, 8, ("q_proj",)).trainable_params


def test_all_linear_is_every_linear_but_the_head():
    for name in ("gpt2", "phi-2", "bloom-7b1", "llama-3.2-1b"):
        spec = resolve_model(name)
        chosen = resolve_targets(spec, ("all-linear",))
        expected = [m for m in module_inventory(spec) if m.kind == "linear" and m.path != "lm_head"]
        assert list(chosen) == expected


# Layer-specific targets: PEFT adapts only the named layer.
@pytest.mark.parametrize(("target", "layers"), [
    ("model.layers.0.self_attn.q_proj", 1),
    ("layers.3.self_attn.q_proj", 1),
    ("self_attn.q_proj", 32),
])
def test_layer_specific_target_matches_peft(target, layers):
    spec = resolve_model("llama-2-7b")
    trainable, _ = peft_lora_counts(MODEL_CONFIGS["llama-2-7b"][1], 8, (target,))
    assert trainable == layers * 8 * (4096 + 4096)
    assert lora_params(spec, 8, (target,)).trainable_params == trainable


# PEFT's layers_to_transform: the suffix matches are kept only in the listed layers; an exact full name
# is always adapted; modules outside the layers (lm_head) have no index and drop out.
@pytest.mark.parametrize(("name", "targets", "layers"), [
    ("llama-2-7b", ("q_proj", "v_proj"), (0,)),
    ("llama-2-7b", ("q_proj", "down_proj"), (3, 7, 31)),
    ("llama-2-7b", ("model.layers.5.self_attn.q_proj", "v_proj"), (0, 1)),
    ("llama-2-7b", ("v_proj", "lm_head"), (2,)),
    ("gpt2", ("c_attn", "c_proj"), (0, 11)),
    ("bloom-7b1", ("query_key_value",), (29,)),
    ("phi-2", ("fc1", "dense"), (1, 2)),
])
def test_layers_to_transform_matches_peft(name, targets, layers):
    spec = resolve_model(name)
    trainable, _ = peft_lora_counts(MODEL_CONFIGS[name][1], 8, targets, layers)
    assert lora_params(spec, 8, targets, layers).trainable_params == trainable


@pytest.mark.parametrize(("targets", "layers", "message"), [
    (("all-linear",), (1,), "list the modules instead: --target q_proj,k_proj"),
    (("q_proj",), (32,), "no layer 32 in llama-2-7b, which has 32 layers"),
    (("embed_tokens",), (1,), "'embed_tokens' matches nothing in layers_to_transform [1]"),
])
def test_layers_to_transform_errors(targets, layers, message):
    with pytest.raises(PlannerInputError, match=re.escape(message)):
        lora_params(resolve_model("llama-2-7b"), 8, targets, layers)


@pytest.mark.parametrize(("targets", "layers", "described"), [
    (None, None, ("self_attn.q_proj (all 32 layers)", "self_attn.v_proj (all 32 layers)")),
    (("layers.3.self_attn.q_proj",), None, ("self_attn.q_proj (layer 3)",)),
    (("q_proj",), (0, 1, 2, 3, 8, 30, 31), ("self_attn.q_proj (layers 0-3, 8, 30-31)",)),
    (("lm_head", "o_proj"), None, ("self_attn.o_proj (all 32 layers)", "lm_head")),
])
def test_target_description_says_which_layers(targets, layers, described):
    assert target_description(resolve_model("llama-2-7b"), targets, layers) == described


# --------------------------------------------------------------------------------------------------
# 4. LoRA input errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [0, -1, -8, 1.5, True, "8"])
def test_lora_spec_rejects_bad_rank(r):
    with pytest.raises(PlannerInputError) as err:
        LoraSpec(r=r)
    assert err.value.field == "r"
    assert str(err.value).startswith("r: ")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"alpha": 0}, "alpha"),
    ({"alpha": -16.0}, "alpha"),
    ({"target_modules": ()}, "target"),
    ({"target_modules": ("q_proj", " ")}, "target"),
    ({"adapter_dtype": "fp8"}, "adapter_dtype"),
])
def test_lora_spec_rejects_bad_fields(kwargs, field):
    with pytest.raises(PlannerInputError) as err:
        LoraSpec(**kwargs)
    assert err.value.field == field


def test_lora_spec_defaults():
    spec = LoraSpec()
    assert (spec.r, spec.effective_alpha, spec.scaling) == (8, 16.0, 2.0)
    assert LoraSpec(r=4, alpha=8).scaling == 2.0


@pytest.mark.parametrize(("name", "r", "targets", "width", "module"), [
    ("gpt2", 769, ("c_attn",), 768, "c_attn"),
    ("gpt2", 769, ("all-linear",), 768, "c_attn"),
    ("llama-3.2-1b", 513, ("k_proj",), 512, "k_proj"),  # GQA: 8 kv heads x 64
    ("llama-3.2-1b", 513, ("all-linear",), 512, "k_proj"),
    ("qwen2.5-0.5b", 129, ("v_proj",), 128, "v_proj"),  # 2 kv heads x 64
    ("llama-2-7b", 4097, ("q_proj", "v_proj"), 4096, "q_proj"),
])
def test_rank_wider_than_a_target_layer(name, r, targets, width, module):
    spec = resolve_model(name)
    with pytest.raises(PlannerInputError) as err:
        lora_params(spec, r, targets)
    assert err.value.field == "r"
    assert str(width) in str(err.value) and module in str(err.value)
    assert lora_params(spec, width, targets).r == width  # the largest allowed rank works


@pytest.mark.parametrize(("name", "target", "choices"), [
    ("gpt2", "q_proj", ("c_attn", "c_proj", "c_fc", "all-linear")),
    ("llama-2-7b", "c_attn", ("q_proj", "v_proj", "down_proj", "all-linear")),
    ("llama-2-7b", "qproj", ("q_proj",)),
    ("llama-2-7b", "mlp", ("gate_proj",)),  # a container, not a layer
    ("bloom-7b1", "q_proj", ("query_key_value", "dense_h_to_4h")),
    ("phi-2", "o_proj", ("dense", "fc1", "fc2")),
])
def test_unknown_target_names_the_choices(name, target, choices):
    valid = {"gpt2": "c_attn", "bloom": "query_key_value"}.get(_family(name), "v_proj")
    with pytest.raises(PlannerInputError) as err:
        lora_params(resolve_model(name), 8, (valid, target))  # the unknown name is not the first
    assert err.value.field == "target"
    assert repr(target) in str(err.value)
    for choice in choices:
        assert choice in err.value.fix


@pytest.mark.parametrize(("name", "target"), [
    ("llama-2-7b", "input_layernorm"),
    ("llama-2-7b", "norm"),  # model.norm
    ("gpt2", "ln_1"),
    ("gpt2", "ln_f"),
    ("phi-2", "final_layernorm"),
    ("bloom-7b1", "word_embeddings_layernorm"),
])
def test_norm_target_is_rejected(name, target):
    with pytest.raises(PlannerInputError) as err:
        lora_params(resolve_model(name), 8, (target,))
    assert err.value.field == "target"
    assert "norm" in err.value.problem


@pytest.mark.parametrize("targets", [("all-linear", "q_proj"), ("q_proj", "all-linear"),
                                     ("all-linear", "all-linear")])
def test_all_linear_cannot_be_combined(targets):
    with pytest.raises(PlannerInputError) as err:
        lora_params(resolve_model("llama-2-7b"), 8, targets)
    assert err.value.field == "target"
    assert "all-linear" in str(err.value)


# --------------------------------------------------------------------------------------------------
# 6. rank_for_trainable_fraction
# --------------------------------------------------------------------------------------------------

# (model, targets) where every fraction up to 0.3 is reachable without exceeding any targeted width.
FRACTION_CASES = [
    ("llama-2-7b", ("all-linear",)),
    ("llama-2-7b", ("gate_proj", "up_proj", "down_proj")),
    ("gpt2", ("all-linear",)),
    ("gpt2", ("c_fc", "c_proj")),
    ("phi-2", ("all-linear",)),
    ("gemma-7b", ("all-linear",)),
    ("bloom-7b1", ("all-linear",)),
]
# ... and where the largest allowed rank stops short of 0.3 (GQA k/v projections are narrow).
CAPPED_CASES = [
    ("tinyllama-1.1b", ("all-linear",)),  # k/v: 2048 -> 256, at most 15.5 %
    ("qwen2.5-1.5b", ("all-linear",)),  # k/v: 1536 -> 256, at most 16.1 %
    ("gpt2", ("c_attn",)),  # at most 18.5 %
]


def _max_rank(spec, targets):
    return min(min(m.in_features, m.out_features) for m in resolve_targets(spec, targets))


@pytest.mark.parametrize(("name", "targets"), FRACTION_CASES)
def test_fraction_cases_are_feasible(name, targets):
    spec = resolve_model(name)
    assert lora_params(spec, _max_rank(spec, targets), targets).trainable_fraction > 0.3


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(case=st.sampled_from(FRACTION_CASES), fraction=st.floats(1e-4, 0.3))
def test_rank_for_fraction_is_the_smallest_reaching_rank(case, fraction):
    name, targets = case
    spec = resolve_model(name)
    r = rank_for_trainable_fraction(spec, fraction, targets)
    assert r >= 1
    assert lora_params(spec, r, targets).trainable_fraction >= fraction
    if r > 1:
        assert lora_params(spec, r - 1, targets).trainable_fraction < fraction


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(case=st.sampled_from(CAPPED_CASES + FRACTION_CASES[:2]), fraction=st.floats(1e-4, 0.3))
def test_rank_for_fraction_beyond_the_widest_rank_is_an_input_error(case, fraction):
    """Either the smallest usable rank that reaches the fraction, or a PlannerInputError when even the
    largest rank every targeted layer allows falls short."""
    name, targets = case
    spec = resolve_model(name)
    reachable = lora_params(spec, _max_rank(spec, targets), targets).trainable_fraction >= fraction
    if not reachable:
        with pytest.raises(PlannerInputError):
            rank_for_trainable_fraction(spec, fraction, targets)
        return
    r = rank_for_trainable_fraction(spec, fraction, targets)
    assert lora_params(spec, r, targets).trainable_fraction >= fraction
    if r > 1:
        assert lora_params(spec, r - 1, targets).trainable_fraction < fraction


@pytest.mark.parametrize(("name", "targets"), CAPPED_CASES)
def test_capped_cases_are_capped(name, targets):
    spec = resolve_model(name)
    assert 0.01 < lora_params(spec, _max_rank(spec, targets), targets).trainable_fraction < 0.3


@pytest.mark.parametrize(("name", "targets", "r"), [
    ("llama-2-7b", ("q_proj", "v_proj"), 1),
    ("llama-2-7b", ("q_proj", "v_proj"), 6),
    ("llama-2-7b", ("q_proj", "v_proj"), 8),
    ("llama-2-7b", ("q_proj", "v_proj"), 49),
    ("gpt2", ("c_attn",), 16),
    ("qwen2.5-0.5b", ("all-linear",), 64),
])
def test_rank_for_exactly_the_fraction_of_rank_r_is_r(name, targets, r):
    """Asking for exactly the fraction LoRA rank r gives (as `LoraCounts.trainable_fraction` reports it)
    must give back r, not r + 1."""
    spec = resolve_model(name)
    fraction = lora_params(spec, r, targets).trainable_fraction
    assert rank_for_trainable_fraction(spec, fraction, targets) == r


@pytest.mark.parametrize(("name", "targets", "fraction", "expected"), [
    ("llama-2-7b", ("q_proj", "v_proj"), 1e-9, 1),
    ("llama-2-7b", ("q_proj", "v_proj"), 0.000622, 8),  # 0.0622 % is r = 8 (0.06220594 %)
    ("llama-2-7b", ("q_proj", "v_proj"), 0.000623, 9),
    ("gpt2", ("all-linear",), 0.01, 9),  # r = 8: 0.939 %, r = 9: 1.055 %
])
def test_rank_for_fraction_table(name, targets, fraction, expected):
    assert rank_for_trainable_fraction(resolve_model(name), fraction, targets) == expected


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_rank_for_fraction_rejects_out_of_range(fraction):
    with pytest.raises(PlannerInputError) as err:
        rank_for_trainable_fraction(resolve_model("gpt2"), fraction, ("c_attn",))
    assert err.value.field == "trainable-fraction"


@pytest.mark.parametrize(("name", "targets", "fraction"), [
    ("gpt2", ("c_attn",), 0.3),  # would need r = 1447 > 768
    ("qwen2.5-0.5b", ("k_proj",), 0.2),  # k_proj is 896 -> 128
])
def test_rank_for_unreachable_fraction_is_an_input_error(name, targets, fraction):
    """A fraction no allowed rank reaches must raise a PlannerInputError, not return a rank that
    `lora_params` then rejects."""
    with pytest.raises(PlannerInputError):
        rank_for_trainable_fraction(resolve_model(name), fraction, targets)


def test_rank_for_fraction_rejects_bad_targets():
    with pytest.raises(PlannerInputError) as err:
        rank_for_trainable_fraction(resolve_model("gpt2"), 0.01, ("q_proj",))
    assert err.value.field == "target"


def test_meta_models_have_no_storage():
    model = meta_model(MODEL_CONFIGS["llama-2-70b"][1])
    assert all(p.device == torch.device("meta") for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Sequences longer than a learned position table; buffers and a tied lm_head's bias as transformers has them
# --------------------------------------------------------------------------------------------------

def test_gpt2_refuses_a_sequence_past_its_learned_positions():
    """transformers' GPT2Model has no position row past n_positions: the forward raises IndexError, so the
    planner refuses the plan with the limit in the fix."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    tiny(torch.zeros(1, 8, dtype=torch.long))  # 8 positions: fine
    with pytest.raises(IndexError):
        tiny(torch.zeros(1, 9, dtype=torch.long))
    gpt2 = resolve_model("gpt2")
    check_sequence_length(gpt2, 1024)
    with pytest.raises(PlannerInputError) as err:
        check_sequence_length(gpt2, 1025)
    assert err.value.field == "seq_len" and err.value.fix == "use a seq_len <= 1,024"
    assert "learned position table" in err.value.problem and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "gemma-7b", "phi-2", "bloom-7b1"])
def test_rope_and_alibi_models_run_past_max_position_embeddings(name):
    """RoPE extrapolates and ALiBi has no table: longer sequences stay plannable (plan_warnings says so)."""
    spec = resolve_model(name)
    check_sequence_length(spec, 4 * spec.max_position_embeddings)
    assert [t for t, f in FAMILY_RULES.items() if f.positions == "learned"] == ["gpt2"]


_TINY_BUFFERS = {
    "llama": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama-head-dim-3": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 3},
    "qwen2-odd-head": {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 84, "intermediate_size": 48,
                       "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gemma": {"model_type": "gemma", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
    "phi-default-half": {"model_type": "phi", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 2},
    "phi-odd-rotary": {"model_type": "phi", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "partial_rotary_factor": 0.3},
    "phi-tied": {"model_type": "phi", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 4},
    "bloom": {"model_type": "bloom", "vocab_size": 64, "hidden_size": 32, "n_layer": 1, "n_head": 4},
    # SmolLM3: biases on q / k / v / o and the MLP, untied, a head_dim of its own, a NoPE layer
    "smollm3-biased": {"model_type": "smollm3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                       "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
                       "no_rope_layers": [1, 0], "pad_token_id": None},
    # Gemma 2: embed_scale, one RoPE table; Gemma 3: one RoPE table per layer kind (local and global), q / k norms
    "gemma2-biased": {"model_type": "gemma2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                      "attention_bias": True, "tie_word_embeddings": False},
    "gemma3-two-kinds": {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                         "sliding_window_pattern": 2},
    "gemma3-one-kind": {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
}


@pytest.mark.parametrize("key", _TINY_BUFFERS)
def test_buffers_and_parameters_match_transformers(key):
    """RoPE's inv_freq / original_inv_freq hold ceil(rotary_dim / 2) each (an odd rotary dim rounds up);
    Phi's rotary_dim is int(head_dim x partial_rotary_factor), 0.5 by default; a tied Phi lm_head keeps its bias."""
    config = _TINY_BUFFERS[key]
    spec = spec_from_config(config, key)
    model = meta_model(config)
    assert buffer_numel(spec) == sum(b.numel() for b in model.buffers())
    assert count_params(spec).total == total_params(model)
    # Bytes, as a bf16 model keeps them: RoPE's two tables stay fp32 (two storages), Gemma's embed_scale is bf16.
    with torch.device("meta"):
        bf16 = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    assert buffer_bytes(spec, "bf16") == sum(b.numel() * b.element_size() for b in bf16.buffers())
    assert all(b.dtype == (torch.bfloat16 if n.endswith("embed_scale") else torch.float32)
               for n, b in bf16.named_buffers())


# --------------------------------------------------------------------------------------------------
# DeepSeek-V2 / V3 (lora_planner/families/deepseek.py): MLA with and without q_lora_rank, dense first layers, shared
# experts, the fp32 router and V3's fp32 e_score_correction_bias buffer; LoRA through PEFT's qwen2_moe conversion.
# --------------------------------------------------------------------------------------------------

_DEEPSEEK_BASE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 24,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
                  "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
                  "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1}
_DEEPSEEK_TINY = {
    "v3": {"model_type": "deepseek_v3", **_DEEPSEEK_BASE, "n_group": 4, "topk_group": 3},
    "v3-q-proj-biased-tied": {"model_type": "deepseek_v3", **_DEEPSEEK_BASE, "n_group": 2, "topk_group": 1,
                              "q_lora_rank": None, "attention_bias": True, "tie_word_embeddings": True,
                              "first_k_dense_replace": 0, "num_local_experts": 4},  # the alias wins
    "v3-all-dense": {"model_type": "deepseek_v3", **_DEEPSEEK_BASE, "n_group": 2, "topk_group": 2,
                     "first_k_dense_replace": 5},
    "v2-lite-like": {"model_type": "deepseek_v2", **_DEEPSEEK_BASE, "q_lora_rank": None},
    "v2-biased-glg": {"model_type": "deepseek_v2", **_DEEPSEEK_BASE, "attention_bias": True, "mlp_bias": True,
                      "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "num_experts": 4,
                      "first_k_dense_replace": 2, "n_shared_experts": 1},
}
_DEEPSEEK_LORA = (  # (target_modules, target_parameters)
    (None, None),  # this tool's default: kv_a_proj_with_mqa, kv_b_proj, o_proj
    (("all-linear",), None),
    (("gate_proj", "up_proj", "down_proj"), None),  # converted: the routed experts only
    (("o_proj",), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")),
    (("q_a_proj", "q_proj", "kv_b_proj", "gate"), None),
)


def _peft_trainable(config: dict, targets: tuple[str, ...], target_parameters: tuple[str, ...] | None) -> int:
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets if targets != ("all-linear",) else "all-linear",
                      target_parameters=list(target_parameters) if target_parameters else None)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = get_peft_model(meta_model(config), lora)
    return int(model.get_nb_trainable_parameters()[0])


@pytest.mark.parametrize("key", _DEEPSEEK_TINY)
def test_deepseek_params_buffers_and_lora_match_transformers_and_peft(key):
    config = _DEEPSEEK_TINY[key]
    spec = spec_from_config(config, key)
    model = meta_model(config)
    assert count_params(spec).total == total_params(model)
    mine: dict[str, int] = {}
    for m in module_inventory(spec):  # transformers' experts module holds both stacks
        path = m.path.rsplit(".", 1)[0] if m.kind == "experts" else m.path
        mine[path] = mine.get(path, 0) + m.params
    assert params_by_module(model) == {path: n for path, n in mine.items() if n}
    assert buffer_numel(spec) == sum(b.numel() for b in model.buffers())
    with torch.device("meta"):
        bf16 = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    assert buffer_bytes(spec, "bf16") == sum(b.numel() * b.element_size() for b in bf16.buffers())
    from lora_planner.step import _stored_weight_bytes  # the router's weight stays fp32 (`Module.fp32`)

    assert _stored_weight_bytes(spec, False, "bf16") == sum(p.numel() * p.element_size() for p in bf16.parameters())
    for targets, params in _DEEPSEEK_LORA:
        if targets and "q_proj" in targets and key != "v2-lite-like" and key != "v3-q-proj-biased-tied":
            targets = tuple(t for t in targets if t != "q_proj")
        if targets and "q_a_proj" in targets and spec.q_lora_rank == 0:
            targets = tuple(t for t in targets if t != "q_a_proj")
        if spec.num_layers == len(spec.dense_layers) and targets is not None:
            continue  # no MoE layer: PEFT's converted targets match nothing (all-linear: PEFT adapts the attention, the
            # planner refuses the unmatched gate_up_proj; not a released model)
        resolved = FAMILY_RULES[spec.family].peft_default_targets if targets is None else targets
        mine = lora_params(spec, 4, targets, target_parameters=params).trainable_params
        assert mine == _peft_trainable(config, resolved, params), (key, targets, params)


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "deepseek-v3"])
def test_deepseek_full_size_totals_match_transformers(name):
    """/tmp/moe/catalog's configs (DeepSeek-V2-Lite, DeepSeek-V3): 15,706,484,224 and 671,026,404,352 parameters."""
    config = _DEEPSEEK_FULL[name]
    assert count_params(spec_from_config(config, name)).total == total_params(meta_model(config)) == {
        "deepseek-v2-lite": 15_706_484_224, "deepseek-v3": 671_026_404_352}[name]


_DEEPSEEK_FULL = {
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                         "norm_topk_prob": False, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                         "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 1, "topk_group": 1,
                         "routed_scaling_factor": 1.0, "topk_method": "greedy", "max_position_embeddings": 163840,
                         "attention_bias": False, "tie_word_embeddings": False},
    "deepseek-v3": {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "max_position_embeddings": 163840,
                    "attention_bias": False, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("r, alpha, rslora", [(8, None, False), (16, None, True), (4, 6, True), (64, 16, True)])
def test_lora_scaling_equals_peft(r, alpha, rslora):
    """`LoraSpec.scaling` against PEFT's own (`LoraLayer.scaling`, set in `update_layer`: alpha / sqrt(r) with
    `use_rslora`), on a meta Llama."""
    import warnings

    from peft import LoraConfig, get_peft_model

    spec = LoraSpec(r=r, alpha=alpha, use_rslora=rslora)
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 1, "num_attention_heads": 4}
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = get_peft_model(meta_model(config), LoraConfig(r=r, lora_alpha=spec.effective_alpha,
                                                              target_modules=["q_proj"], use_rslora=rslora))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(spec.scaling, rel=1e-12)


def test_modules_to_save_resolution():
    """PEFT's suffix match: embed_tokens and lm_head on Llama; GPT-2's wte / wpe and its tied lm_head; a layer module
    or an unknown name is refused with what can be named."""
    from lora_planner.params import modules_to_save

    assert [m.path for m in modules_to_save(resolve_model("llama-3.1-8b"), ("embed_tokens", "lm_head"))] == \
        ["model.embed_tokens", "lm_head"]
    assert [m.path for m in modules_to_save(resolve_model("gpt2"), ("wte", "lm_head"))] == \
        ["transformer.wte", "lm_head"]
    for names, fragment in [(("q_proj",), "not planned yet"), (("embed",), "has no module")]:
        with pytest.raises(PlannerInputError) as err:
            modules_to_save(resolve_model("llama-3.1-8b"), names)
        assert err.value.field == "modules_to_save" and fragment in err.value.problem


@pytest.mark.parametrize("model, bias, targets, expected", [
    # Qwen2: q / k / v carry biases; lora_only trains those of the adapted q and v, all every one (no norm bias)
    ("qwen2.5-7b", "lora_only", None, {"model.layers.0.self_attn.q_proj": 3584,
                                       "model.layers.0.self_attn.v_proj": 512}),
    ("qwen2.5-7b", "all", ("o_proj",), {"model.layers.0.self_attn.q_proj": 3584, "model.layers.0.self_attn.k_proj": 512,
                                        "model.layers.0.self_attn.v_proj": 512}),
    ("llama-3.1-8b", "all", None, {}),  # no biases: PEFT trains nothing more, and neither does the plan
    ("qwen2.5-7b", "none", None, {}),
])
def test_trained_biases(model, bias, targets, expected):
    """PEFT's `bias` (`_mark_only_adapters_as_trainable`): which base biases train, one entry per module."""
    from lora_planner.params import bias_numel, trained_biases

    spec = resolve_model(model)
    found = trained_biases(spec, LoraSpec(bias=bias, target_modules=targets))
    assert {m.path: bias_numel(m) for m, _ in found} == expected
    assert all(len(layers) == spec.num_layers for _, layers in found)


def test_trained_biases_all_includes_norms():
    """GPT-2 under bias="all": every Conv1D's bias and both LayerNorms' of each layer, and ln_f's outside them."""
    from lora_planner.params import bias_numel, trained_biases

    spec = resolve_model("gpt2")
    found = {m.path: (bias_numel(m), len(layers)) for m, layers in trained_biases(spec, LoraSpec(bias="all"))}
    assert found["transformer.h.0.ln_1"] == (768, 12) and found["transformer.ln_f"] == (768, 0)
    assert found["transformer.h.0.mlp.c_fc"] == (3072, 12)
    # GPT-2 124M: per layer c_attn 2,304 + c_proj 768 + c_fc 3,072 + c_proj 768 + two LayerNorms 2 x 768; ln_f 768
    assert sum(n * max(count, 1) for n, count in found.values()) == 12 * (2304 + 768 + 3072 + 768 + 2 * 768) + 768


@pytest.mark.parametrize("model, indices, expected", [
    # the list form: the input embeddings; a tied model's lm_head with them, sharing their delta
    ("llama-3.1-8b", (("", tuple(range(128000, 128256))),), [("model.embed_tokens", 256, False)]),
    ("qwen2.5-0.5b", (("", (1, 2, 3)),), [("model.embed_tokens", 3, False), ("lm_head", 3, True)]),
    # the dict form: each named module its own delta; tied with equal indices: shared, with different ones: apart
    ("llama-3.1-8b", (("embed_tokens", (1, 2)), ("lm_head", (1, 2, 3))),
     [("model.embed_tokens", 2, False), ("lm_head", 3, False)]),
    ("qwen2.5-0.5b", (("embed_tokens", (1, 2)), ("lm_head", (1, 2))),
     [("model.embed_tokens", 2, False), ("lm_head", 2, True)]),
    ("qwen2.5-0.5b", (("embed_tokens", (1, 2)), ("lm_head", (1, 2, 3))),
     [("model.embed_tokens", 2, False), ("lm_head", 3, False)]),
    ("qwen2.5-0.5b", (("lm_head", (1, 2)),), [("lm_head", 2, False)]),  # the embeddings unwrapped: no tying
    ("llama-3.1-8b", (("", (5, 5, 6)),), [("model.embed_tokens", 2, False)]),  # repeated ids count once
])
def test_trainable_token_layers(model, indices, expected):
    """PEFT 0.21.2's `set_additional_trainable_modules` for `trainable_token_indices`."""
    from lora_planner.params import trainable_token_layers

    layers = trainable_token_layers(resolve_model(model), LoraSpec(trainable_token_indices=indices))
    assert [(layer.module.path, layer.tokens, layer.shared) for layer in layers] == expected


@pytest.mark.parametrize("indices, mts, fragment", [
    ((("wte", (1,)),), None, "no embedding or output layer named 'wte'"),
    ((("", (128256,)),), None, "past llama-3.1-8b's vocabulary"),
    ((("embed_tokens", (1,)),), ("embed_tokens",), "both in modules_to_save"),
])
def test_trainable_token_layers_refused(indices, mts, fragment):
    from lora_planner.params import trainable_token_layers

    with pytest.raises(PlannerInputError) as err:
        trainable_token_layers(resolve_model("llama-3.1-8b"),
                               LoraSpec(trainable_token_indices=indices, modules_to_save=mts))
    assert err.value.field == "trainable_token_indices" and fragment in err.value.problem

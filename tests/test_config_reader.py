"""The config.json reader (`lora_planner.config_reader`).

config.json files are written to `tmp_path` and read back through `load_config_json` / `resolve_model`;
the resulting parameter count must equal that of the `transformers` model built from the same dict on
the meta device (see `tests/hf_reference.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.catalog import MODEL_CONFIGS, resolve_model
from lora_planner.config_reader import load_config_json, spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.gpus import MIB
from lora_planner.params import count_params
from lora_planner.specs import FAMILIES
from tests.hf_reference import hf_config, meta_model, total_params

# --------------------------------------------------------------------------------------------------
# config.json files as Hugging Face publishes them (extra keys the reader must ignore included)
# --------------------------------------------------------------------------------------------------

CONFIG_FILES = {
    # GQA + explicit head_dim + tied embeddings + llama3 rope scaling (Llama-3.2-1B's config.json).
    "llama-gqa-head-dim-tied": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
    },
    # head_dim larger than hidden / heads (q_proj widens: 16 x 192 = 3072 > 2048).
    "llama-wide-head-dim": {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 2048, "intermediate_size": 5504,
        "num_hidden_layers": 3, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 192,
    },
    "llama-biases": {
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 2, "num_attention_heads": 8, "attention_bias": True, "mlp_bias": True,
    },
    # No num_key_value_heads, no tie_word_embeddings, no head_dim: transformers' defaults.
    "llama-minimal": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 4, "num_attention_heads": 16,
    },
    "llama-null-optionals": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": None, "head_dim": None,
    },
    # Qwen2: q/k/v biases, tied embeddings (Qwen2.5-0.5B's config.json).
    "qwen2-tied-biases": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "qwen2-untied": {
        "model_type": "qwen2", "vocab_size": 5000, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
    },
    # Gemma-2B: multi-query attention, head_dim 256, tied by default (no tie_word_embeddings key).
    "gemma-mqa": {
        "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 16384, "max_position_embeddings": 8192,
        "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
        "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True,
        "vocab_size": 256000,
    },
    # Phi with qk_layernorm (LayerNorm(head_dim) with bias on q and k), GQA, biased lm_head.
    "phi-qk-layernorm": {
        "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_act": "gelu_new", "partial_rotary_factor": 0.4, "qk_layernorm": True,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    # Phi-2's config.json.
    "phi-2": {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256,
        "embd_pdrop": 0.0, "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "phi", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0",
        "use_cache": True, "vocab_size": 51200,
    },
    # GPT-2 with n_inner (not 4 x hidden) and a different context length.
    "gpt2-n-inner": {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 512, "n_layer": 4, "n_head": 8,
        "n_inner": 1024, "n_positions": 2048, "activation_function": "gelu_new",
    },
    # gpt2-medium's config.json (n_inner null -> 4 x hidden, tied head by default).
    "gpt2-medium": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
        "n_inner": None, "n_layer": 24, "n_positions": 1024, "n_special": 0, "predict_special_tokens": True,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "vocab_size": 50257,
    },
    "gpt2-untied": {
        "model_type": "gpt2", "vocab_size": 1000, "n_embd": 128, "n_layer": 2, "n_head": 4,
        "tie_word_embeddings": False,
    },
    # bloom-560m's config.json.
    "bloom-560m": {
        "apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
        "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
        "model_type": "bloom", "n_head": 16, "n_inner": None, "n_layer": 24, "offset_alibi": 100,
        "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True, "skip_bias_add_qkv": False,
        "slow_but_exact": False, "unk_token_id": 0, "use_cache": True, "vocab_size": 250880,
    },
    # Old BLOOM checkpoints spell the width n_embed.
    "bloom-n-embed": {
        "model_type": "bloom", "vocab_size": 1000, "n_embed": 256, "n_layer": 2, "num_attention_heads": 8,
    },
}


def _write(tmp_path, config, filename="config.json"):
    path = tmp_path / filename
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("key", CONFIG_FILES)
def test_config_json_count_matches_transformers(tmp_path, key):
    config = CONFIG_FILES[key]
    spec = load_config_json(_write(tmp_path, config))
    assert count_params(spec).total == total_params(meta_model(config))


@pytest.mark.parametrize("key", CONFIG_FILES)
def test_config_json_fields_match_transformers(tmp_path, key):
    """The reader resolves the same shapes transformers does (defaults included)."""
    config = CONFIG_FILES[key]
    spec = load_config_json(_write(tmp_path, config))
    cfg = hf_config(config)
    model = meta_model(config)
    assert spec.family == config["model_type"]
    assert spec.hidden_size == cfg.hidden_size
    assert spec.num_layers == cfg.num_hidden_layers
    assert spec.num_heads == cfg.num_attention_heads
    assert spec.vocab_size == cfg.vocab_size
    assert spec.tie_word_embeddings == cfg.tie_word_embeddings
    if spec.family == "gpt2" or "max_position_embeddings" in config:  # only GPT-2's wpe depends on it
        assert spec.max_position_embeddings == cfg.max_position_embeddings
    embeddings = model.get_input_embeddings().weight
    assert tuple(embeddings.shape) == (spec.vocab_size, spec.hidden_size)
    if spec.family not in ("gpt2", "bloom"):
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.out_features == spec.q_size
        assert attn.k_proj.out_features == spec.kv_size
        assert spec.num_kv_heads == cfg.num_key_value_heads
        mlp = model.model.layers[0].mlp
        up = mlp.up_proj if hasattr(mlp, "up_proj") else mlp.fc1
        assert up.out_features == spec.intermediate_size


@pytest.mark.parametrize("key", ["gpt2-medium", "llama-gqa-head-dim-tied", "bloom-560m"])
def test_config_json_via_resolve_model(tmp_path, key):
    """resolve_model takes a config.json path or the folder holding one."""
    config = CONFIG_FILES[key]
    path = _write(tmp_path, config)
    expected = total_params(meta_model(config))
    assert count_params(resolve_model(str(path))).total == expected
    assert count_params(resolve_model(str(tmp_path))).total == expected
    assert count_params(load_config_json(tmp_path)).total == expected
    assert resolve_model(str(path)).name == str(path)


@pytest.mark.parametrize(("key", "expected"), [
    ("gpt2-medium", 354_823_168),
    ("bloom-560m", 559_214_592),
    ("qwen2-tied-biases", 494_032_768),
    ("gemma-mqa", 2_506_172_416),
    ("phi-2", 2_779_683_840),
    ("llama-gqa-head-dim-tied", 1_235_814_400),
    ("mistral", 7_241_732_096),
])
def test_config_json_published_totals(tmp_path, key, expected):
    assert count_params(load_config_json(_write(tmp_path, CONFIG_FILES[key]))).total == expected


# Keys transformers' class for the family ignores, or defaults the reader must mirror. Each case is a
# catalog config with one edit; the count must still equal transformers'.
def _edited(name, **edits):
    config = copy.deepcopy(MODEL_CONFIGS[name][1])
    for key, value in edits.items():
        if value is dataclasses.MISSING:
            del config[key]
        else:
            config[key] = value
    return config


FAMILY_DEFAULT_CASES = {
    "qwen3-untied": _edited("qwen3-0.6b", tie_word_embeddings=False),
    "qwen3-tie-default": _edited("qwen3-0.6b", tie_word_embeddings=dataclasses.MISSING),  # Qwen3Config: untied
    "olmo2-kv-default": _edited("olmo2-7b", num_key_value_heads=dataclasses.MISSING),  # null: the heads
    "gemma-no-head-dim": _edited("gemma-7b", head_dim=dataclasses.MISSING),  # GemmaConfig: head_dim=256
    "gemma-untied": _edited("gemma-7b", tie_word_embeddings=False),
    "gemma-attention-bias": _edited("gemma-7b", attention_bias=True),  # q/k/v and o_proj
    "gemma-mlp-bias-ignored": _edited("gemma-7b", mlp_bias=True),
    "mistral-attention-bias-ignored": _edited("mistral-7b", attention_bias=True),
    "mistral-mlp-bias-ignored": _edited("mistral-7b", mlp_bias=True),
    "mistral-head-dim": _edited("mistral-7b", head_dim=64),
    "qwen2-mlp-bias-ignored": _edited("qwen2.5-0.5b", mlp_bias=True),
    "qwen2-attention-bias-false-ignored": _edited("qwen2.5-0.5b", attention_bias=False),
    "qwen2-tie-default": _edited("qwen2.5-0.5b", tie_word_embeddings=dataclasses.MISSING),
    "qwen2-head-dim": _edited("qwen2.5-0.5b", head_dim=128),
    "phi-tie-default": _edited("phi-2", tie_word_embeddings=dataclasses.MISSING),
    "phi-gqa": _edited("phi-2", num_key_value_heads=8),
    "phi-qk-layernorm-with-head-dim": _edited("phi-2", head_dim=64, qk_layernorm=True),
    "bloom-n-inner-ignored": _edited("bloom-7b1", n_inner=1000),
    "bloom-n-inner-null": _edited("bloom-7b1", n_inner=None),
    "gpt2-max-position-embeddings": _edited("gpt2", n_positions=dataclasses.MISSING,
                                            max_position_embeddings=512),
    "gpt2-untied": _edited("gpt2", tie_word_embeddings=False),
    "llama-no-kv-heads": _edited("llama-2-7b", num_key_value_heads=dataclasses.MISSING),
    "llama-tie-default": _edited("llama-2-7b", tie_word_embeddings=dataclasses.MISSING),
}


@pytest.mark.parametrize("key", FAMILY_DEFAULT_CASES)
def test_family_defaults_and_ignored_keys_match_transformers(key):
    config = FAMILY_DEFAULT_CASES[key]
    assert count_params(spec_from_config(config, key)).total == total_params(meta_model(config))


# --------------------------------------------------------------------------------------------------
# config.json errors
# --------------------------------------------------------------------------------------------------

LLAMA_SMALL = CONFIG_FILES["llama-minimal"]


@pytest.mark.parametrize(("config", "field", "words"), [
    ({**LLAMA_SMALL, "model_type": "t5"}, "model_type", ("'t5'", *FAMILIES)),
    ({**LLAMA_SMALL, "model_type": "bart"}, "model_type", ("'bart'", "llama")),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "model_type"}, "model_type", ("None",)),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "hidden_size"}, "hidden_size", ("missing",)),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "num_hidden_layers"}, "num_hidden_layers", ("missing",)),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "num_attention_heads"}, "num_attention_heads",
     ("missing",)),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "vocab_size"}, "vocab_size", ("missing",)),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "intermediate_size"}, "intermediate_size", ("missing",)),
    ({**LLAMA_SMALL, "hidden_size": None}, "hidden_size", ("missing",)),
    ({**LLAMA_SMALL, "hidden_size": "1024"}, "hidden_size", ("positive integer", "'1024'")),
    ({**LLAMA_SMALL, "hidden_size": 0}, "hidden_size", ("positive integer",)),
    ({**LLAMA_SMALL, "hidden_size": -1024}, "hidden_size", ("positive integer",)),
    ({**LLAMA_SMALL, "hidden_size": 1024.0}, "hidden_size", ("positive integer",)),
    ({**LLAMA_SMALL, "num_hidden_layers": True}, "num_hidden_layers", ("positive integer",)),
    ({**LLAMA_SMALL, "num_key_value_heads": 3}, "num_key_value_heads", ("divide",)),
    ({"model_type": "gpt2", "vocab_size": 100, "n_layer": 2, "n_head": 2}, "hidden_size", ("missing",)),
])
def test_bad_config_names_the_field(tmp_path, config, field, words):
    with pytest.raises(PlannerInputError) as err:
        load_config_json(_write(tmp_path, config))
    assert field in err.value.field
    message = str(err.value)
    assert field in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(("content", "words"), [
    (b"not json at all", ("not valid JSON",)),
    (b'{"model_type": "llama", ', ("not valid JSON",)),
    (b"\xff\xfe\x00garbage", ("not valid JSON",)),
    (b"", ("not valid JSON",)),
    (b"[1, 2, 3]", ("JSON object",)),
    (b'[{"model_type": "llama"}]', ("JSON object",)),
    (b"null", ("JSON object",)),
    (b"42", ("JSON object",)),
])
def test_unreadable_config_file(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    for load in (load_config_json, lambda p: resolve_model(str(p))):
        with pytest.raises(PlannerInputError) as err:
            load(path)
        for word in words:
            assert word in str(err.value)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("relative", ["missing/config.json", "nope.json", "empty-dir"])
def test_missing_config_file(tmp_path, relative):
    (tmp_path / "empty-dir").mkdir()
    path = tmp_path / relative
    for load in (load_config_json, lambda p: resolve_model(str(p))):
        with pytest.raises(PlannerInputError) as err:
            load(path)
        assert err.value.field == "model"
        assert "cannot read" in err.value.problem


# --------------------------------------------------------------------------------------------------
# Differential: the reader accepts exactly what transformers 5.24 builds (meta device), and where it
# is stricter by design, it says so for a reason listed in `spec_from_config`'s docstring
# --------------------------------------------------------------------------------------------------

# One tiny config per family, with every key the reader reads (transformers builds each in milliseconds).
TINY = {
    "llama": {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "attention_dropout": 0.0, "hidden_act": "silu"},
    "mistral": {"model_type": "mistral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "max_position_embeddings": 256, "sliding_window": 64, "tie_word_embeddings": False,
                "attention_dropout": 0.0, "hidden_act": "silu"},
    "qwen2": {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": True, "use_sliding_window": False,
              "sliding_window": 64, "attention_dropout": 0.0, "hidden_act": "silu"},
    "gemma": {"model_type": "gemma", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
              "hidden_act": "gelu", "max_position_embeddings": 256, "attention_bias": False,
              "tie_word_embeddings": True, "attention_dropout": 0.0},
    "phi": {"model_type": "phi", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "partial_rotary_factor": 0.5, "qk_layernorm": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0,
            "attention_dropout": 0.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
            "hidden_act": "gelu_new"},
    "gpt2": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": None,
             "n_positions": 128, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
             "attn_pdrop": 0.1, "tie_word_embeddings": True},
    "bloom": {"model_type": "bloom", "vocab_size": 128, "hidden_size": 64, "n_layer": 2, "n_head": 4,
              "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": True},
    "gpt_neox": {"model_type": "gpt_neox", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256, "rotary_pct": 0.25,
                 "use_parallel_residual": True, "attention_bias": True, "hidden_dropout": 0.0,
                 "attention_dropout": 0.0, "tie_word_embeddings": False, "hidden_act": "gelu"},
    "granite": {"model_type": "granite", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 256, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                "embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.015625, "tie_word_embeddings": True, "hidden_act": "silu"},
    "phi3": {"model_type": "phi3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "partial_rotary_factor": 0.75,
             "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0, "max_position_embeddings": 256,
             "sliding_window": 64, "tie_word_embeddings": False, "pad_token_id": 0, "hidden_act": "silu"},
    "starcoder2": {"model_type": "starcoder2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256, "sliding_window": 64, "use_bias": True, "residual_dropout": 0.1,
                   "embedding_dropout": 0.1, "attention_dropout": 0.1, "tie_word_embeddings": True,
                   "hidden_act": "gelu_pytorch_tanh"},
    "qwen3": {"model_type": "qwen3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "max_position_embeddings": 256, "attention_bias": False, "use_sliding_window": False,
              "sliding_window": 64, "max_window_layers": 1, "tie_word_embeddings": True, "attention_dropout": 0.0,
              "hidden_act": "silu"},
    "olmo2": {"model_type": "olmo2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "attention_bias": False, "tie_word_embeddings": False,
              "attention_dropout": 0.0, "hidden_act": "silu"},
    "smollm3": {"model_type": "smollm3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 256, "attention_bias": False, "mlp_bias": False,
                "use_sliding_window": False, "sliding_window": 64, "no_rope_layers": [1, 0],
                "no_rope_layer_interval": 4, "tie_word_embeddings": True, "attention_dropout": 0.0, "pad_token_id": 0,
                "hidden_act": "silu"},
    "gemma2": {"model_type": "gemma2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 256, "sliding_window": 64,
               "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "attention_bias": False, "tie_word_embeddings": True, "attention_dropout": 0.0, "pad_token_id": 0},
    "gemma3_text": {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 256, "sliding_window": 64,
                    "sliding_window_pattern": 2, "query_pre_attn_scalar": 16, "final_logit_softcapping": None,
                    "attention_bias": False, "tie_word_embeddings": True, "attention_dropout": 0.0, "pad_token_id": 0},
}
# Keys a config.json may add that some family's class reads, ignores, or spells differently.
EXTRA_KEYS = ("head_dim", "partial_rotary_factor", "num_key_value_heads", "n_positions", "max_position_embeddings",
              "n_embed", "hidden_size", "attention_bias", "mlp_bias", "qk_layernorm", "sliding_window",
              "use_sliding_window", "n_inner", "intermediate_size", "resid_pdrop", "attention_dropout")
_LAYER_KEY = {"gpt2": "n_layer", "bloom": "n_layer"}


def _transformers_count(config) -> int | None:
    """transformers' parameter count for `config`, or None when it refuses to build it (any exception:
    strict type validation, a class validator, or the model's own __init__)."""
    try:
        return total_params(meta_model(config))
    except Exception:  # noqa: BLE001 - any refusal counts as a refusal
        return None


def _planner_count(config) -> int | None:
    """The planner's count, or None when it refuses (only ever a PlannerInputError)."""
    try:
        return count_params(spec_from_config(config, "cfg.json")).total
    except PlannerInputError:
        return None


def _mutated(base, **edits):
    config = copy.deepcopy(base)
    for key, value in edits.items():
        if value is dataclasses.MISSING:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _catalog_small(name, **edits):
    """A catalog config cut to one layer (real widths, real vocabulary), then edited."""
    family = MODEL_CONFIGS[name][1]["model_type"]
    return _mutated(MODEL_CONFIGS[name][1], **{_LAYER_KEY.get(family, "num_hidden_layers"): 1, **edits})


NAN, INF = float("nan"), float("inf")
# (case id, config): both accept (counts equal) or both refuse.
AGREEING_CASES = [
    # types, as the @strict config classes check them
    ("llama-hidden-string", _catalog_small("llama-2-7b", hidden_size="4096")),
    ("llama-hidden-float", _catalog_small("llama-2-7b", hidden_size=4096.0)),
    ("llama-layers-bool", _catalog_small("llama-2-7b", num_hidden_layers=True)),
    ("llama-vocab-list", _catalog_small("llama-2-7b", vocab_size=[32000])),
    ("llama-tie-string", _catalog_small("llama-2-7b", tie_word_embeddings="false")),
    ("llama-tie-int", _catalog_small("llama-2-7b", tie_word_embeddings=0)),
    ("llama-tie-null", _catalog_small("llama-2-7b", tie_word_embeddings=None)),
    ("llama-attention-bias-yes", _catalog_small("llama-2-7b", attention_bias="yes")),
    ("llama-mlp-bias-int", _catalog_small("llama-2-7b", mlp_bias=1)),
    ("llama-kv-heads-float", _catalog_small("llama-3-8b", num_key_value_heads=8.0)),
    ("llama-head-dim-string", _catalog_small("llama-3.2-1b", head_dim="64")),
    ("llama-dropout-string", _catalog_small("llama-2-7b", attention_dropout="0.1")),
    ("llama-dropout-bool", _catalog_small("llama-2-7b", attention_dropout=True)),
    ("llama-act-unknown", _catalog_small("llama-2-7b", hidden_act="swiglu")),
    ("llama-act-int", _catalog_small("llama-2-7b", hidden_act=1)),
    ("llama-positions-null", _catalog_small("llama-2-7b", max_position_embeddings=None)),
    ("mistral-window-float", _catalog_small("mistral-7b", sliding_window=4096.0)),
    ("mistral-window-string", _catalog_small("mistral-7b", sliding_window="4096")),
    ("mistral-kv-null", _catalog_small("mistral-7b", num_key_value_heads=None)),
    ("mistral-dropout-null", _catalog_small("mistral-7b", attention_dropout=None)),
    ("qwen2-use-window-string", _catalog_small("qwen2.5-0.5b", use_sliding_window="true")),
    ("qwen2-window-dict", _catalog_small("qwen2.5-0.5b", sliding_window={"size": 4096})),
    ("gemma-head-dim-null", _catalog_small("gemma-7b", head_dim=None)),
    ("gemma-act-null", _catalog_small("gemma-7b", hidden_act=None)),
    ("phi-qk-layernorm-string", _catalog_small("phi-2", qk_layernorm="false")),
    ("phi-partial-rotary-null", _catalog_small("phi-2", partial_rotary_factor=None)),
    ("phi-partial-rotary-string", _catalog_small("phi-2", partial_rotary_factor="0.4")),
    ("gpt2-n-embd-string", _catalog_small("gpt2", n_embd="768")),
    ("gpt2-activation-unknown", _catalog_small("gpt2", activation_function="gelu2")),
    ("gpt2-positions-float", _catalog_small("gpt2", n_positions=1024.0)),
    ("gpt2-inner-float", _catalog_small("gpt2", n_inner=3072.0)),
    ("bloom-n-head-string", _catalog_small("bloom-7b1", n_head="32")),
    ("bloom-tie-string", _catalog_small("bloom-7b1", tie_word_embeddings="true")),
    # hidden size not a multiple of the heads: Llama (validate_architecture), GPT-2, BLOOM (Attention.__init__)
    ("llama-hidden-not-multiple", _catalog_small("llama-2-7b", hidden_size=4100)),
    ("llama-hidden-not-multiple-head-dim", _catalog_small("llama-3.2-1b", hidden_size=2050)),
    ("gpt2-hidden-not-multiple", _catalog_small("gpt2", n_embd=770)),
    ("bloom-hidden-not-multiple", _catalog_small("bloom-7b1", hidden_size=4100)),
    ("bloom-n-embed-not-multiple", _mutated(TINY["bloom"], n_embed=66)),
    # ...which Mistral / Qwen2 / Gemma / Phi floor (hidden // heads) and build
    ("mistral-hidden-floored", _mutated(TINY["mistral"], hidden_size=66, head_dim=None)),
    ("qwen2-hidden-floored", _mutated(TINY["qwen2"], hidden_size=66)),
    ("phi-hidden-floored", _mutated(TINY["phi"], hidden_size=66)),
    ("gemma-hidden-any", _mutated(TINY["gemma"], hidden_size=66)),
    # a head of width 0: RoPE divides by zero
    ("qwen2-head-dim-zero-derived", _mutated(TINY["qwen2"], hidden_size=3)),
    ("llama-head-dim-zero", _mutated(TINY["llama"], head_dim=0)),
    ("mistral-head-dim-zero-means-derived", _mutated(TINY["mistral"], head_dim=0)),
    # RoPE needs an even rotary dimension above 4 (validate_rope), except where only part of it rotates
    ("llama-odd-head-dim", _mutated(TINY["llama"], head_dim=7)),
    ("gemma-odd-head-dim", _mutated(TINY["gemma"], head_dim=9)),
    ("llama-odd-head-dim-3", _mutated(TINY["llama"], head_dim=3)),
    ("qwen2-odd-head-dim-given", _mutated(TINY["qwen2"], head_dim=7)),
    ("qwen2-odd-head-dim-derived", _mutated(TINY["qwen2"], hidden_size=84, num_attention_heads=4)),
    ("phi-odd-head-dim-partial", _mutated(TINY["phi"], head_dim=7)),
    # head_dim read with getattr by Qwen2 / Phi: null fails there
    ("qwen2-head-dim-null", _mutated(TINY["qwen2"], head_dim=None)),
    ("phi-head-dim-null", _mutated(TINY["phi"], head_dim=None)),
    ("phi-head-dim-given", _mutated(TINY["phi"], head_dim=24, qk_layernorm=True)),
    # dropouts nn.Dropout refuses at construction
    ("gpt2-resid-negative", _catalog_small("gpt2", resid_pdrop=-0.1)),
    ("gpt2-attn-above-one", _catalog_small("gpt2", attn_pdrop=1.5)),
    ("phi-resid-inf", _catalog_small("phi-2", resid_pdrop=INF)),
    ("bloom-attention-dropout-two", _catalog_small("bloom-7b1", attention_dropout=2)),
    ("phi-dropout-int-one", _catalog_small("phi-2", embd_pdrop=1)),
    ("llama-dropout-null", _catalog_small("llama-2-7b", attention_dropout=None)),
    # keys a family ignores, and the spellings each class prefers
    ("llama-partial-rotary-ignored", _mutated(TINY["llama"], partial_rotary_factor=0.25)),
    ("llama-partial-rotary-junk-ignored", _mutated(TINY["llama"], partial_rotary_factor="x")),
    ("mistral-bias-junk-ignored", _mutated(TINY["mistral"], attention_bias="yes", mlp_bias=[1])),
    ("gpt2-head-dim-ignored", _mutated(TINY["gpt2"], head_dim=-1, num_key_value_heads="x")),
    ("bloom-positions-ignored", _mutated(TINY["bloom"], max_position_embeddings="x", n_positions=-1)),
    ("llama-n-positions-ignored", _mutated(TINY["llama"], n_positions="x")),
    ("gpt2-max-positions-wins", _mutated(TINY["gpt2"], max_position_embeddings=48)),
    ("gpt2-max-positions-wins-bad", _mutated(TINY["gpt2"], max_position_embeddings="48")),
    ("gpt2-hidden-size-wins", _mutated(TINY["gpt2"], hidden_size=32)),
    ("bloom-n-embed-wins", _mutated(TINY["bloom"], n_embed=48)),
    ("bloom-n-embed-null-ignored", _mutated(TINY["bloom"], n_embed=None)),
    ("bloom-num-hidden-layers-wins", _mutated(TINY["bloom"], num_hidden_layers=3)),
    ("gemma-hidden-activation-ignored", _mutated(TINY["gemma"], hidden_activation="tanh")),
    ("qwen2-window-unused-still-typed", _mutated(TINY["qwen2"], sliding_window=-5.5)),
    # defaults of each class for an omitted key
    ("qwen2-kv-null-means-heads", _mutated(TINY["qwen2"], num_key_value_heads=None)),
    ("phi-partial-rotary-default", _mutated(TINY["phi"], partial_rotary_factor=dataclasses.MISSING)),
    ("phi-tied-keeps-its-lm-head-bias", _mutated(TINY["phi"], tie_word_embeddings=True)),
    ("gpt2-n-inner-null", _mutated(TINY["gpt2"], n_inner=None)),
    ("mistral-window-null", _mutated(TINY["mistral"], sliding_window=None)),
    ("gpt_neox-parallel-int", _mutated(TINY["gpt_neox"], use_parallel_residual=1)),
    ("gpt_neox-attention-bias-null", _mutated(TINY["gpt_neox"], attention_bias=None)),
    ("gpt_neox-hidden-not-multiple", _mutated(TINY["gpt_neox"], num_attention_heads=6)),
    ("gpt_neox-hidden-dropout-above-one", _mutated(TINY["gpt_neox"], hidden_dropout=1.5)),
    ("gpt_neox-kv-heads-ignored", _mutated(TINY["gpt_neox"], num_key_value_heads=2)),
    ("gpt_neox-rope-parameters-factor", _mutated(TINY["gpt_neox"], rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    ("granite-multiplier-string", _mutated(TINY["granite"], logits_scaling="8")),
    ("granite-multiplier-null", _mutated(TINY["granite"], residual_multiplier=None)),
    ("granite-multiplier-int", _mutated(TINY["granite"], embedding_multiplier=12)),
    ("granite-head-dim", _mutated(TINY["granite"], head_dim=32)),
    ("granite-head-dim-null", _mutated(TINY["granite"], head_dim=None)),
    ("granite-biases", _mutated(TINY["granite"], attention_bias=True, mlp_bias=True)),
    ("phi3-pad-default-above-vocab", _mutated(TINY["phi3"], pad_token_id=dataclasses.MISSING)),
    ("phi3-pad-null", _mutated(TINY["phi3"], pad_token_id=None)),
    ("phi3-partial-rotary-default", _mutated(TINY["phi3"], partial_rotary_factor=dataclasses.MISSING)),
    ("phi3-partial-rotary-null", _mutated(TINY["phi3"], partial_rotary_factor=None)),
    ("phi3-head-dim", _mutated(TINY["phi3"], head_dim=24)),
    ("phi3-head-dim-null", _mutated(TINY["phi3"], head_dim=None)),
    ("phi3-biases-ignored", _mutated(TINY["phi3"], attention_bias=True, mlp_bias=True)),
    ("phi3-resid-int", _mutated(TINY["phi3"], resid_pdrop=0)),
    ("phi3-window-float", _mutated(TINY["phi3"], sliding_window=64.0)),
    ("phi3-kv-null-means-heads", _mutated(TINY["phi3"], num_key_value_heads=None)),
    ("phi4-mini-small", _catalog_small("phi-4-mini-instruct")),
    ("starcoder2-no-bias", _mutated(TINY["starcoder2"], use_bias=False)),
    ("starcoder2-bias-int", _mutated(TINY["starcoder2"], use_bias=1)),
    ("starcoder2-head-dim", _mutated(TINY["starcoder2"], head_dim=24)),
    ("starcoder2-head-dim-zero", _mutated(TINY["starcoder2"], head_dim=0)),
    ("starcoder2-untied", _mutated(TINY["starcoder2"], tie_word_embeddings=False)),
    ("starcoder2-tie-default", _mutated(TINY["starcoder2"], tie_word_embeddings=dataclasses.MISSING)),
    ("starcoder2-kv-null", _mutated(TINY["starcoder2"], num_key_value_heads=None)),
    ("starcoder2-15b-small", _catalog_small("starcoder2-15b")),
    ("qwen3-0.6b-small", _catalog_small("qwen3-0.6b")),
    ("qwen3-head-dim-default-128", _mutated(TINY["qwen3"], head_dim=dataclasses.MISSING)),  # not hidden // heads
    ("qwen3-head-dim-null", _mutated(TINY["qwen3"], head_dim=None)),  # a plain int in Qwen3Config
    ("qwen3-odd-head-dim", _mutated(TINY["qwen3"], head_dim=7)),
    ("qwen3-hidden-not-multiple", _mutated(TINY["qwen3"], hidden_size=66)),
    ("qwen3-attention-bias", _mutated(TINY["qwen3"], attention_bias=True)),  # q, k, v and o
    ("qwen3-kv-null-means-heads", _mutated(TINY["qwen3"], num_key_value_heads=None)),
    ("smollm3-3b-small", _catalog_small("smollm3-3b")),
    ("smollm3-pad-default-above-vocab", _mutated(TINY["smollm3"], pad_token_id=dataclasses.MISSING)),  # 128004
    ("smollm3-tie-default", _mutated(TINY["smollm3"], tie_word_embeddings=dataclasses.MISSING)),  # tied
    ("smollm3-kv-null-means-heads", _mutated(TINY["smollm3"], num_key_value_heads=None)),
    ("smollm3-biases", _mutated(TINY["smollm3"], attention_bias=True, mlp_bias=True)),  # q, k, v, o and the MLP
    ("smollm3-head-dim", _mutated(TINY["smollm3"], head_dim=32)),  # undeclared, read with getattr
    ("smollm3-head-dim-null", _mutated(TINY["smollm3"], head_dim=None)),
    ("smollm3-odd-head-dim", _mutated(TINY["smollm3"], head_dim=7)),
    ("smollm3-no-rope-layers-too-few", _mutated(TINY["smollm3"], no_rope_layers=[1])),  # IndexError
    ("smollm3-no-rope-layers-longer", _mutated(TINY["smollm3"], no_rope_layers=[1, 0, 1, 0])),
    ("smollm3-no-rope-layers-bools", _mutated(TINY["smollm3"], no_rope_layers=[True, False])),
    ("smollm3-no-rope-layers-string", _mutated(TINY["smollm3"], no_rope_layers="10")),
    ("smollm3-no-rope-layers-null", _mutated(TINY["smollm3"], no_rope_layers=None)),  # by the interval
    ("smollm3-interval-zero", _mutated(TINY["smollm3"], no_rope_layers=None, no_rope_layer_interval=0)),
    ("smollm3-interval-zero-unused", _mutated(TINY["smollm3"], no_rope_layer_interval=0)),
    ("smollm3-interval-float", _mutated(TINY["smollm3"], no_rope_layer_interval=4.0)),
    ("smollm3-window-on-nope-layers", _mutated(TINY["smollm3"], use_sliding_window=True)),
    ("smollm3-layer-types-too-few", _mutated(TINY["smollm3"], layer_types=["full_attention"])),
    ("smollm3-dropout-int", _mutated(TINY["smollm3"], attention_dropout=0)),
    ("qwen3-window-used", _mutated(TINY["qwen3"], use_sliding_window=True)),
    ("qwen3-max-window-layers-string", _mutated(TINY["qwen3"], max_window_layers="1")),
    ("qwen3-layer-types", _mutated(TINY["qwen3"], use_sliding_window=True,
                                   layer_types=["full_attention", "sliding_attention"])),
    ("qwen3-layer-types-string", _mutated(TINY["qwen3"], layer_types="full_attention")),
    ("qwen3-layer-types-too-few", _mutated(TINY["qwen3"], layer_types=["full_attention"])),
    ("qwen3-dropout-int", _mutated(TINY["qwen3"], attention_dropout=0)),
    ("olmo2-7b-small", _catalog_small("olmo2-7b")),
    ("olmo2-head-dim", _mutated(TINY["olmo2"], head_dim=24)),  # undeclared, read with getattr
    ("olmo2-head-dim-null", _mutated(TINY["olmo2"], head_dim=None)),
    ("olmo2-hidden-not-multiple", _mutated(TINY["olmo2"], hidden_size=66)),
    ("olmo2-attention-bias", _mutated(TINY["olmo2"], attention_bias=True)),
    ("olmo2-kv-null-means-heads", _mutated(TINY["olmo2"], num_key_value_heads=None)),
    ("olmo2-mlp-bias-ignored", _mutated(TINY["olmo2"], mlp_bias=True)),
    # gemma2 / gemma3_text: Gemma2Config / Gemma3TextConfig types and validators
    ("gemma2-2b-small", _catalog_small("gemma-2-2b")),
    ("gemma2-27b-small", _catalog_small("gemma-2-27b")),  # head_dim 128 below hidden / heads (144)
    ("gemma2-softcap-int", _mutated(TINY["gemma2"], final_logit_softcapping=30)),  # float | None: refused
    ("gemma2-attn-softcap-null", _mutated(TINY["gemma2"], attn_logit_softcapping=None)),
    ("gemma2-scalar-float", _mutated(TINY["gemma2"], query_pre_attn_scalar=144.0)),  # int: refused
    ("gemma2-scalar-zero", _mutated(TINY["gemma2"], query_pre_attn_scalar=0)),  # 0 ** -0.5: ZeroDivisionError
    ("gemma2-kv-null", _mutated(TINY["gemma2"], num_key_value_heads=None)),  # a plain int: refused
    ("gemma2-hidden-not-multiple", _mutated(TINY["gemma2"], hidden_size=66)),  # validate_architecture
    ("gemma2-act-gelu", _mutated(TINY["gemma2"], hidden_activation="gelu")),
    ("gemma2-act-unknown", _mutated(TINY["gemma2"], hidden_activation="geglu")),
    ("gemma2-hidden-act-ignored", _mutated(TINY["gemma2"], hidden_act="geglu")),  # the MLP reads hidden_activation
    ("gemma2-layer-types", _mutated(TINY["gemma2"], layer_types=["full_attention", "full_attention"])),
    ("gemma2-layer-types-too-few", _mutated(TINY["gemma2"], layer_types=["full_attention"])),
    ("gemma2-layer-types-unknown", _mutated(TINY["gemma2"], layer_types=["full_attention", "local"])),
    ("gemma2-pad-above-vocab", _mutated(TINY["gemma2"], pad_token_id=128)),
    ("gemma2-bias-untied", _mutated(TINY["gemma2"], attention_bias=True, tie_word_embeddings=False)),
    ("gemma3-1b-small", _catalog_small("gemma-3-1b")),
    ("gemma3-pattern-default", _mutated(TINY["gemma3_text"], sliding_window_pattern=dataclasses.MISSING)),
    ("gemma3-pattern-zero", _mutated(TINY["gemma3_text"], sliding_window_pattern=0)),  # ZeroDivisionError
    ("gemma3-pattern-zero-unused", _mutated(TINY["gemma3_text"], sliding_window_pattern=0,
                                            layer_types=["full_attention"] * 3)),
    ("gemma3-pattern-string", _mutated(TINY["gemma3_text"], sliding_window_pattern="6")),
    ("gemma3-pattern-float", _mutated(TINY["gemma3_text"], sliding_window_pattern=1.5)),
    ("gemma3-softcaps", _mutated(TINY["gemma3_text"], final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    ("gemma3-head-dim-odd", _mutated(TINY["gemma3_text"], head_dim=7)),
]

# (case id, config, key named): transformers builds these, the planner refuses them on purpose (see
# `spec_from_config`'s docstring: "Stricter than transformers").
STRICTER_CASES = [
    ("llama-hidden-missing", _mutated(TINY["llama"], hidden_size=dataclasses.MISSING), "hidden_size"),
    ("gpt2-layers-missing", _mutated(TINY["gpt2"], n_layer=dataclasses.MISSING), "n_layer"),
    ("llama-layers-zero", _mutated(TINY["llama"], num_hidden_layers=0), "num_hidden_layers"),
    ("llama-vocab-zero", _mutated(TINY["llama"], vocab_size=0), "vocab_size"),
    ("gpt2-positions-zero", _mutated(TINY["gpt2"], n_positions=0), "n_positions"),
    ("gpt2-heads-negative", _mutated(TINY["gpt2"], n_head=-1), "n_head"),
    ("llama-kv-not-dividing", _mutated(TINY["llama"], num_key_value_heads=3), "num_key_value_heads"),
    ("mistral-kv-default-8-of-4", _mutated(TINY["mistral"], num_key_value_heads=dataclasses.MISSING),
     "num_key_value_heads"),
    ("llama-attention-dropout-negative", _mutated(TINY["llama"], attention_dropout=-0.1), "attention_dropout"),
    ("qwen2-attention-dropout-nan", _mutated(TINY["qwen2"], attention_dropout=NAN), "attention_dropout"),
    ("gpt2-resid-nan", _mutated(TINY["gpt2"], resid_pdrop=NAN), "resid_pdrop"),
    ("bloom-hidden-dropout-above-one", _mutated(TINY["bloom"], hidden_dropout=1.5), "hidden_dropout"),
    ("phi-partial-rotary-above-one", _mutated(TINY["phi"], partial_rotary_factor=1.5), "partial_rotary_factor"),
    ("phi-partial-rotary-zero", _mutated(TINY["phi"], partial_rotary_factor=0), "partial_rotary_factor"),
    ("phi-head-dim-bool", _mutated(TINY["phi"], head_dim=True), "head_dim"),
    ("phi3-partial-rotary-above-one", _mutated(TINY["phi3"], partial_rotary_factor=1.5), "partial_rotary_factor"),
    ("phi3-window-zero", _mutated(TINY["phi3"], sliding_window=0), "sliding_window"),
    ("starcoder2-residual-dropout-nan", _mutated(TINY["starcoder2"], residual_dropout=NAN), "residual_dropout"),
    ("starcoder2-embedding-dropout-above-one", _mutated(TINY["starcoder2"], embedding_dropout=1.5), "embedding_dropout"),
    ("starcoder2-kv-default-2-of-3", _mutated(TINY["starcoder2"], num_attention_heads=3, hidden_size=66,
                                              num_key_value_heads=dataclasses.MISSING), "num_key_value_heads"),
    ("mistral-window-zero", _mutated(TINY["mistral"], sliding_window=0), "sliding_window"),
    ("gpt_neox-rotary-pct-above-one", _mutated(TINY["gpt_neox"], rotary_pct=2.0), "rotary_pct"),
    ("gpt_neox-rotary-pct-bool", _mutated(TINY["gpt_neox"], rotary_pct=True), "rotary_pct"),
    # Qwen3Config accepts any allowed layer type; Qwen3Model masks only full / sliding layers (KeyError in forward)
    ("qwen3-layer-types-chunked", _mutated(TINY["qwen3"], layer_types=["full_attention", "chunked_attention"]),
     "layer_types"),
    ("llama-act-prelu", _mutated(TINY["llama"], hidden_act="prelu"), "hidden_act"),
    # the models build the sliding-window mask in every forward (create_sliding_window_causal_mask raises on null)
    ("gemma2-window-null", _mutated(TINY["gemma2"], sliding_window=None), "sliding_window"),
    ("gemma3-window-null", _mutated(TINY["gemma3_text"], sliding_window=None), "sliding_window"),
    ("gemma3-bidirectional", _mutated(TINY["gemma3_text"], use_bidirectional_attention=True),
     "use_bidirectional_attention"),  # EmbeddingGemma: not a causal LM
    ("gemma2-layer-types-chunked", _mutated(TINY["gemma2"], layer_types=["full_attention", "chunked_attention"]),
     "layer_types"),
    ("llama-hidden-above-bound", _mutated(TINY["llama"], hidden_size=2**21, head_dim=16), "hidden_size"),
    ("qwen2-vocab-above-bound", _mutated(TINY["qwen2"], vocab_size=10**15), "vocab_size"),
    # a "sliding_attention" layer with no window: create_sliding_window_causal_mask raises in every forward
    ("qwen3-sliding-layers-no-window", _mutated(TINY["qwen3"], layer_types=["full_attention", "sliding_attention"]),
     "layer_types"),
    ("qwen2-sliding-layers-no-window", _mutated(TINY["qwen2"], layer_types=["sliding_attention"] * 2),
     "layer_types"),
    ("smollm3-sliding-layers-no-window", _mutated(TINY["smollm3"], sliding_window=None,
                                                  layer_types=["full_attention", "sliding_attention"]), "layer_types"),
]


@pytest.mark.parametrize("config", [c for _, c in AGREEING_CASES], ids=[i for i, _ in AGREEING_CASES])
def test_reader_accepts_exactly_what_transformers_builds(config):
    expected = _transformers_count(config)
    assert _planner_count(config) == expected


@pytest.mark.parametrize(("config", "key"), [c[1:] for c in STRICTER_CASES], ids=[c[0] for c in STRICTER_CASES])
def test_reader_is_stricter_on_purpose(config, key):
    if key not in ("hidden_size", "vocab_size"):  # (no need to build the above-bound ones)
        assert _transformers_count(config) is not None
    with pytest.raises(PlannerInputError) as err:
        spec_from_config(config, "cfg.json")
    assert err.value.field.startswith("cfg.json: ") and key in err.value.field
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("edits", "window"), [
    ({}, None),  # use_sliding_window false
    ({"use_sliding_window": True}, 64),  # layer 1 is NoPE: SmolLM3Config makes it "sliding_attention"
    ({"use_sliding_window": True, "no_rope_layers": [1, 1]}, None),  # no NoPE layer, no sliding layer
    ({"use_sliding_window": True, "sliding_window": None}, None),
    ({"use_sliding_window": True, "no_rope_layers": None, "no_rope_layer_interval": 2}, 64),  # layer 1 NoPE
    ({"use_sliding_window": True, "no_rope_layers": [1, 1], "layer_types": ["sliding_attention"] * 2}, 64),
    ({"use_sliding_window": True, "layer_types": ["full_attention"] * 2}, None),
])
def test_smollm3_window_applies_to_its_sliding_layers(edits, window):
    """SmolLM3Config.__post_init__: NoPE layers are "sliding_attention" when use_sliding_window and sliding_window
    are both set (unless layer_types says otherwise); SmolLM3Attention uses the window on those layers only."""
    config = _mutated(TINY["smollm3"], **edits)
    assert spec_from_config(config, "cfg.json").sliding_window == window
    built = hf_config(config)
    sliding = "sliding_attention" in built.layer_types and built.use_sliding_window
    assert (built.sliding_window if sliding else None) == window


@pytest.mark.parametrize("family, edits", [
    ("mistral", {}), ("mistral", {"sliding_window": None}), ("phi3", {}), ("phi3", {"sliding_window": 2047}),
    ("starcoder2", {}), ("starcoder2", {"sliding_window": None}),
    ("qwen2", {}), ("qwen2", {"use_sliding_window": True}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
    ("qwen2", {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 0}), ("qwen3", {"max_window_layers": 0}),
    ("smollm3", {"use_sliding_window": True}), ("smollm3", {"layer_types": ["full_attention", "sliding_attention"]}),
])
def test_sliding_layers_match_transformers(family, edits):
    """The window and its layers (`layer_types`) are what the model builds its masks for: each config class's
    `layer_types` (Qwen2 / Qwen3 / SmolLM3, with the window they read), or every layer when Mistral / Phi-3 /
    StarCoder2 set `sliding_window` (their models pick create_sliding_window_causal_mask globally)."""
    config = _mutated(TINY[family], **edits)
    spec, built = spec_from_config(config, "cfg.json"), hf_config(config)
    types = getattr(built, "layer_types", None) or (["sliding_attention"] * built.num_hidden_layers
                                                     if built.sliding_window is not None else [])
    sliding = "sliding_attention" in types
    assert spec.layer_types == (tuple(types) if sliding else None), (family, edits)
    assert spec.sliding_window == (built.sliding_window if sliding else None)


@pytest.mark.parametrize("edits", [
    {}, {"sliding_window_pattern": dataclasses.MISSING}, {"sliding_window_pattern": 3}, {"sliding_window_pattern": 1},
    {"sliding_window_pattern": -2}, {"sliding_window_pattern": True},
    {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
])
def test_gemma_layer_types_and_caps_match_transformers(edits):
    """The reader's layer kinds (Gemma3TextConfig.__post_init__'s pattern, or layer_types) and soft-caps are the
    config transformers builds (Gemma 2: sliding first, alternating)."""
    for family in ("gemma2", "gemma3_text"):
        config = _mutated(TINY[family], **(edits if family == "gemma3_text" or "layer_types" not in edits else {}))
        spec, built = spec_from_config(config, "cfg.json"), hf_config(config)
        assert spec.layer_types == tuple(built.layer_types), (family, edits)
        assert spec.final_logit_softcapping == built.final_logit_softcapping
        assert spec.attn_logit_softcapping == (built.attn_logit_softcapping if family == "gemma2" else None)
        assert spec.sliding_window == built.sliding_window


def test_reader_and_transformers_agree_on_every_tiny_config():
    for family, config in TINY.items():
        assert _planner_count(config) == _transformers_count(config) is not None, family


def _stricter_on_purpose(family, key, value) -> bool:
    """Whether the one-key edit (key, value) of TINY[family] is one of the planner's deliberate refusals of a
    config transformers builds (the docstring's "Stricter than transformers" list)."""
    sizes = {"vocab_size", "hidden_size", "n_embd", "n_embed", "num_hidden_layers", "n_layer", "num_attention_heads",
             "n_head", "intermediate_size", "n_inner", "max_position_embeddings", "n_positions",
             "num_key_value_heads", "head_dim"}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is dataclasses.MISSING:
        return True  # a required size omitted, or a class default kv-head count that does not divide 4
    if key in sizes and isinstance(value, bool):
        return True  # Qwen2 / Phi read an undeclared head_dim with getattr: True builds a 1-wide head
    if key in sizes and isinstance(value, int) and not isinstance(value, bool):
        if value <= 0 or value > 2**14:  # (2**14: the smallest bound; these tiny configs stay far below others)
            return True
        if key == "num_key_value_heads" and 4 % value:
            return True
        kv = TINY[family].get("num_key_value_heads")
        if key in ("num_attention_heads", "n_head") and kv and value % kv:
            return True
        width = TINY[family].get("hidden_size", TINY[family].get("n_embd"))
        if key in ("num_attention_heads", "n_head") and "head_dim" not in TINY[family] and width and value > width:
            return True  # hidden // heads is a head_dim of 0: zero-width heads, refused (Granite builds them)
    if key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "residual_dropout",
               "embedding_dropout") and number:
        return not (math.isfinite(value) and 0 <= value <= 1)
    if key == "rotary_pct" and family == "gpt_neox":
        return True  # only a fraction in (0, 1] (GPTNeoXConfig does not type it)
    if key == "partial_rotary_factor" and family in ("phi", "phi3"):
        return isinstance(value, (int, float)) and not (math.isfinite(value) and 0 < value <= 1)
    if key == "sliding_window" and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        return True
    if key == "sliding_window" and value is None and family in ("gemma2", "gemma3_text"):
        return True  # both models build the sliding-window mask in every forward: null fails there, refused now
    return key in ("hidden_act", "activation_function", "hidden_activation") and value in ("prelu", "xielu")


HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 48, 10**12, 2**31, 2**63, 10**15, 64.0, 1.5, 0.5, -0.5, 2.0, 1e308,
                     NAN, INF, -INF, "64", "false", "true", "yes", "", "silu", "gelu", "prelu", "gelu_new", None,
                     True, False, [64], [], {"a": 1}, {}, [[[]]], dataclasses.MISSING]),
    st.integers(-3, 160),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(family=st.sampled_from(sorted(TINY)), data=st.data())
def test_hostile_one_key_edits(family, data):
    """One key of a tiny config (or one key a family may add) set to a hostile value: the reader returns a
    ModelSpec or raises PlannerInputError, nothing else; when it accepts, transformers builds the same
    parameter count; when it refuses what transformers builds, the refusal is a deliberate one."""
    key = data.draw(st.sampled_from(sorted(set(TINY[family]) - {"model_type"} | set(EXTRA_KEYS))), label="key")
    value = data.draw(HOSTILE, label="value")
    config = _mutated(TINY[family], **{key: value})
    try:
        spec = spec_from_config(config, "cfg.json")
    except PlannerInputError as err:
        assert err.field.startswith("cfg.json") and "\n" not in str(err)
        spec = None
    if spec is not None:
        assert count_params(spec).total == _transformers_count(config)
    elif not _stricter_on_purpose(family, key, value):
        assert _transformers_count(config) is None, f"transformers builds {key}={value!r}"


# --------------------------------------------------------------------------------------------------
# Absurd sizes are refused at once; config files are read size-bounded
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("edits", "key"), [
    ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
    ({"vocab_size": 10**15}, "vocab_size"),
    ({"hidden_size": 2**40, "head_dim": 128}, "hidden_size"),
    ({"intermediate_size": 10**9}, "intermediate_size"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings"),
    ({"num_attention_heads": 2**20, "num_key_value_heads": 2**20, "hidden_size": 2**20, "head_dim": 1},
     "num_attention_heads"),
    ({"head_dim": 2**30}, "head_dim"),
])
def test_absurd_sizes_are_refused_at_once(edits, key):
    config = _mutated(MODEL_CONFIGS["llama-2-7b"][1], **edits)
    start = time.perf_counter()
    with pytest.raises(PlannerInputError) as err:
        spec_from_config(config, "big.json")
    assert time.perf_counter() - start < 0.5
    assert err.value.field == f"big.json: {key}" and "limit" in err.value.problem


def test_gpt2_absurd_layers_name_its_own_key():
    with pytest.raises(PlannerInputError) as err:
        spec_from_config(_mutated(MODEL_CONFIGS["gpt2"][1], n_layer=10**12), "g.json")
    assert err.value.field == "g.json: n_layer"


def test_config_json_is_read_size_bounded(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG_FILES["llama-minimal"]) + " " * (16 * MIB))
    with pytest.raises(PlannerInputError, match="more than the"):
        load_config_json(path)


# DeepSeek-V2 / V3 (lora_planner/families/deepseek.py): the MLA / router fields as transformers' config classes set
# them, and the configs their modules cannot build or run refused in one line.
_DS = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 80, "moe_intermediate_size": 24,
       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
       "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 2}


@pytest.mark.parametrize("config", [
    {"model_type": "deepseek_v3", **_DS, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2},
    {"model_type": "deepseek_v3", **_DS, "n_group": 2, "topk_group": 1, "q_lora_rank": None, "num_local_experts": 4},
    {"model_type": "deepseek_v2", **_DS, "q_lora_rank": 32, "norm_topk_prob": True, "num_experts": 4},
    {"model_type": "deepseek_v2", **_DS, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
], ids=["v3", "v3-q-proj-alias", "v2-alias", "v2-glg"])
def test_deepseek_fields_match_transformers(config):
    spec, hf = spec_from_config(config, "ds.json"), hf_config(config)
    v3 = config["model_type"] == "deepseek_v3"
    assert spec.head_dim == hf.head_dim == hf.qk_rope_head_dim
    assert (spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
    assert spec.shared_expert_intermediate_size == hf.n_shared_experts * hf.moe_intermediate_size
    assert spec.dense_layers == tuple(range(min(hf.first_k_dense_replace, hf.num_hidden_layers)))
    assert spec.q_lora_rank == (hf.q_lora_rank or 0) and spec.kv_lora_rank == hf.kv_lora_rank
    assert spec.norm_topk_prob == (v3 and bool(hf.norm_topk_prob))  # V2's router never renormalises
    grouped = v3 or hf.topk_method == "group_limited_greedy"
    assert (spec.router_groups, spec.router_topk_groups) == ((hf.n_group, hf.topk_group) if grouped else (0, 0))
    assert spec.router_sigmoid == v3
    assert count_params(spec).total == total_params(meta_model(config))


@pytest.mark.parametrize(("config", "key"), [
    ({"model_type": "deepseek_v2", **_DS, "num_experts_per_tok": None}, "num_experts_per_tok"),
    ({"model_type": "deepseek_v2", **{k: v for k, v in _DS.items() if k != "num_experts_per_tok"}},
     "num_experts_per_tok"),  # DeepseekV2Config's default is None: the router's topk fails
    ({"model_type": "deepseek_v3", **_DS, "num_key_value_heads": 2}, "num_key_value_heads"),
    ({"model_type": "deepseek_v3", **_DS, "n_group": 3, "topk_group": 1}, "n_group"),  # 8 experts in 3 groups
    ({"model_type": "deepseek_v3", **_DS, "n_group": 8, "topk_group": 1}, "n_group"),  # groups of one: topk(2)
    ({"model_type": "deepseek_v3", **_DS, "first_k_dense_replace": None}, "first_k_dense_replace"),
    ({"model_type": "deepseek_v2", **_DS, "topk_method": "noaux_tc"}, "topk_method"),
    ({"model_type": "deepseek_v2", **_DS, "qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"model_type": "deepseek_v2", **_DS, "hidden_size": 66}, "hidden_size"),
    ({"model_type": "deepseek_v3", **_DS, "n_group": 4, "routed_scaling_factor": 2}, "routed_scaling_factor"),
])
def test_deepseek_configs_refused(config, key):
    with pytest.raises(PlannerInputError) as err:
        spec_from_config(config, "ds.json")
    assert err.value.field == f"ds.json: {key}"


def test_a_huge_layer_count_is_refused_before_per_layer_lists_are_built():
    """Found by the fuzz suite: a Qwen3 config with 10^20 layers hung building its layer_types; refused at once."""
    config = {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 10**20, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    with pytest.raises(PlannerInputError, match="num_hidden_layers: 1e\\+20 is above the planner's limit of 16,384"):
        spec_from_config(config, "huge")

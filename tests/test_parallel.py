"""Per-GPU memory with several GPUs (`lora_planner.parallel`): the ZeRO arithmetic on a tiny spec, and the
prediction against each rank's measured peak under torch.distributed (2 CPU ranks, gloo)."""

from __future__ import annotations

import pytest
import torch

from lora_planner.catalog import resolve_model, spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.specs import LoraSpec, TrainingSpec

TINY = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "tiny-llama")
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")


def training(method="full", gpus=2, strategy=None, **kw) -> TrainingSpec:
    base = dict(method=method, dtype="fp32", batch_size=2, seq_len=16, device="cpu", lora=LoraSpec(r=4))
    base.update(kw)
    return TrainingSpec(gpus=gpus, strategy=strategy, **base)


def phase(estimate, name):
    return next(p.breakdown for p in estimate.phases if p.phase == name)


def test_ddp_adds_one_copy_of_the_trainable_gradients_to_every_phase():
    single = estimate_memory(TINY, training(gpus=1))
    ddp = estimate_memory(TINY, training(strategy="ddp"))
    assert training().resolved_strategy == "ddp" and training(gpus=1).resolved_strategy is None
    for a, b in zip(single.phases, ddp.phases):
        assert b.breakdown.gradients_bytes == a.breakdown.gradients_bytes + 881_920  # fp32 parameters
        assert b.breakdown.total_bytes == a.breakdown.total_bytes + 881_920


def test_zero1_divides_the_optimizer_state():
    ddp = estimate_memory(TINY, training(strategy="ddp", gpus=4))
    zero1 = estimate_memory(TINY, training(strategy="zero1", gpus=4))
    assert phase(zero1, "optimizer_step").optimizer_states_bytes == -(-phase(ddp, "optimizer_step").optimizer_states_bytes // 4)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_full_sharding_divides_model_states_at_the_optimizer_step(strategy):
    single = phase(estimate_memory(TINY, training(gpus=1)), "optimizer_step")
    sharded = phase(estimate_memory(TINY, training(strategy=strategy, gpus=4)), "optimizer_step")
    buffers = 2 * 8 * 4  # RoPE buffers stay replicated
    assert sharded.weights_bytes == -(-(single.weights_bytes - buffers) // 4) + buffers
    assert sharded.gradients_bytes == -(-single.gradients_bytes // 4)
    assert sharded.optimizer_states_bytes == -(-single.optimizer_states_bytes // 4)


def test_zero2_holds_every_layer_gathered_at_the_end_of_forward():
    zero2 = phase(estimate_memory(TINY, training(strategy="zero2")), "forward_end")
    zero3 = phase(estimate_memory(TINY, training(strategy="zero3")), "forward_end")
    assert zero2.weights_bytes - zero3.weights_bytes == 2 * 184_832  # both decoder layers, fp32


def test_sharding_helps_a_70b_model_on_8_gpus():
    spec = resolve_model("llama-2-70b")
    peaks = {s: estimate_memory(spec, TrainingSpec(method="full", gpus=8, strategy=s)).peak_allocated_bytes
             for s in STRATEGIES}
    assert peaks["fsdp"] == peaks["zero3"] < peaks["zero2"] < peaks["zero1"] < peaks["ddp"]
    # ZeRO's Pos+g+p: (2 + 2 + 2K) bytes per parameter over N, K = 2 bf16 AdamW states, plus foreach's copy.
    psi = 68_976_648_192
    assert peaks["fsdp"] == pytest.approx((2 + 2 + 4 + 2) * psi / 8, rel=0.01)


@pytest.mark.parametrize("kw, field", [
    (dict(gpus=0), "gpus"), (dict(gpus=1, strategy="fsdp"), "strategy"), (dict(gpus=2, strategy="zero9"), "strategy")])
def test_bad_parallel_settings(kw, field):
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(**kw)
    assert err.value.field == field


# ---------------------------------------------------------------------------------------------- measured

@pytest.fixture(scope="module")
def measured():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from lora_planner.profiler.distributed import measure_distributed_many
    from lora_planner.profiler.runner import ProfileRequest

    jobs = [(ProfileRequest(TINY.name, TINY, training(method, gpus=1), backend="builtin", mode="cpu", steps=3),
             strategy) for strategy in STRATEGIES for method in ("full", "lora")]
    results = measure_distributed_many(jobs, world_size=2)
    return {(strategy, request.training.method): ranks for (request, strategy), ranks in zip(jobs, results)}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_predicted_per_rank_peak_matches_torch_distributed(measured, strategy, method):
    ranks = measured[(strategy, method)]
    predicted = estimate_memory(TINY, training(method, strategy=strategy)).peak_allocated_bytes
    for rank in ranks:
        assert abs(predicted / rank.peak_bytes - 1) <= 0.05, (strategy, method, predicted, rank.peak_bytes)

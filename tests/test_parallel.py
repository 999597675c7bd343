"""Per-GPU memory with several GPUs (`lora_planner.parallel`): the ZeRO arithmetic on a tiny spec, and the
prediction against each rank's measured peak under torch.distributed (2 CPU ranks, gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.parallel import deepspeed
from lora_planner.parallel.deepspeed import DeepSpeedZeroConfig
from lora_planner.specs import LoraSpec, TrainingSpec

TINY = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "tiny-llama")
TORCH_STRATEGIES = ("ddp", "ddp-zero1", "fsdp-grad-op", "fsdp")  # measured here with torch alone
DEEPSPEED_STAGES = ("deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")


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
    zero1 = estimate_memory(TINY, training(strategy="ddp-zero1", gpus=4))
    assert phase(zero1, "optimizer_step").optimizer_states_bytes == -(-phase(ddp, "optimizer_step").optimizer_states_bytes // 4)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-grad-op"])
def test_full_sharding_divides_model_states_at_the_optimizer_step(strategy):
    single = phase(estimate_memory(TINY, training(gpus=1)), "optimizer_step")
    sharded = phase(estimate_memory(TINY, training(strategy=strategy, gpus=4)), "optimizer_step")
    buffers = 2 * 8 * 4  # RoPE buffers stay replicated
    assert sharded.weights_bytes == -(-(single.weights_bytes - buffers) // 4) + buffers
    assert sharded.gradients_bytes == -(-single.gradients_bytes // 4)
    assert sharded.optimizer_states_bytes == -(-single.optimizer_states_bytes // 4)


def test_fsdp_grad_op_holds_every_layer_gathered_at_the_end_of_forward():
    grad_op = phase(estimate_memory(TINY, training(strategy="fsdp-grad-op")), "forward_end")
    full_shard = phase(estimate_memory(TINY, training(strategy="fsdp")), "forward_end")
    assert grad_op.weights_bytes - full_shard.weights_bytes == 2 * 184_832  # both decoder layers, fp32


def test_sharding_helps_a_70b_model_on_8_gpus():
    spec = resolve_model("llama-2-70b")
    peaks = {s: estimate_memory(spec, TrainingSpec(method="full", gpus=8, strategy=s, optimizer_impl="foreach",
                                                   seq_len=512)).peak_allocated_bytes
             for s in TORCH_STRATEGIES + DEEPSPEED_STAGES}
    assert peaks["fsdp"] < peaks["fsdp-grad-op"] < peaks["ddp-zero1"] < peaks["ddp"]
    assert peaks["deepspeed-zero3"] < peaks["deepspeed-zero2"] < peaks["deepspeed-zero1"] < peaks["ddp"]
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
             strategy) for strategy in TORCH_STRATEGIES for method in ("full", "lora")]
    results = measure_distributed_many(jobs, world_size=2)
    return {(strategy, request.training.method): ranks for (request, strategy), ranks in zip(jobs, results)}


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_predicted_per_rank_peak_matches_torch_distributed(measured, strategy, method):
    ranks = measured[(strategy, method)]
    predicted = estimate_memory(TINY, training(method, strategy=strategy)).peak_allocated_bytes
    for rank in ranks:
        assert abs(predicted / rank.peak_bytes - 1) <= 0.05, (strategy, method, predicted, rank.peak_bytes)


# ---------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, engine", [
    ("ddp", "ddp"), ("ddp-zero1", "ddp-zero1"), ("zero-redundancy-optimizer", "ddp-zero1"), ("fsdp", "fsdp"),
    ("fsdp-full-shard", "fsdp"), ("fsdp-grad-op", "fsdp-grad-op"), ("zero1", "deepspeed-zero1"),
    ("zero2", "deepspeed-zero2"), ("zero3", "deepspeed-zero3"), ("deepspeed-zero2", "deepspeed-zero2"),
    (None, "ddp")])
def test_every_strategy_name_resolves_to_one_engine(name, engine):
    assert training(strategy=name).resolved_strategy == engine


def test_json_says_what_an_alias_was_taken_as(capsys):
    from lora_planner.cli import main

    assert main(["--model", "gpt2", "--method", "lora", "--gpus", "2", "--strategy", "zero2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["strategy"] == "deepspeed-zero2"


# ---------------------------------------------------------------------------------------------- DeepSpeed

def test_issue_9_deepspeed_zero2_lora_lands_near_ddp_not_40_percent_over():
    """Issue 9: llama-3.1-8b LoRA on 2 GPUs, 2048 tokens, checkpointing. `zero2` used to be FSDP's
    SHARD_GRAD_OP (every layer gathered through forward: 25.94 GiB vs ddp's 18.48). DeepSpeed's ZeRO-2
    keeps the frozen bf16 base replicated and partitions only the adapters' gradients and state: near
    ddp, plus its 1e9-byte gradient bucket in backward (below the loss's peak here)."""
    spec = resolve_model("llama-3.1-8b")
    peaks = {s: estimate_memory(spec, TrainingSpec(method="lora", gpus=2, strategy=s, seq_len=2048,
                                                   grad_checkpointing=True)).peak_allocated_bytes
             for s in ("ddp", "zero2", "deepspeed-zero2", "fsdp-grad-op")}
    assert peaks["zero2"] == peaks["deepspeed-zero2"]
    assert abs(peaks["deepspeed-zero2"] / peaks["ddp"] - 1) < 0.01
    assert peaks["fsdp-grad-op"] > 1.3 * peaks["ddp"]  # the old `zero2`: still available under its own name


SMALL_BUCKETS = DeepSpeedZeroConfig(reduce_bucket_size=50_000, allgather_bucket_size=50_000)


def ds_phases(method="full", strategy="deepspeed-zero2", zero=SMALL_BUCKETS, **kw):
    t = training(method, strategy=strategy, **kw)
    return {p.phase: p.breakdown for p in deepspeed.phases(TINY, t, None, zero)}


def test_deepspeed_zero2_full_fp32_by_hand():
    """TINY full fine-tune, fp32, 2 ranks: 220,480 parameters (881,920 bytes) flattened (already a multiple
    of 2 x 2), partition 110,240 elements; fp32 master partition 440,960 bytes (a clone even in fp32);
    AdamW's two fp32 states of the one flat partition + its 4-byte step: 881,924; gradient bucket 50,000
    x 4 bytes in backward. In `model.parameters()` order (embedding, per layer q k v o gate up down then
    the two norms, final norm, lm_head) the boundary at 110,240 cuts layer 1's o_proj (4,096 elements at
    110,208): rank 0's grads_in_partition is 110,208 + 4,096 = 114,304 elements, rank 1's 110,272."""
    assert deepspeed._rank_partitions(deepspeed._trainable_order(TINY, training()), 2) == (110_240, (
        deepspeed.RankPartition(114_304, 64_000, 0), deepspeed.RankPartition(110_272, 64_000, 0)))
    single = phase(estimate_memory(TINY, training(gpus=1)), "forward_start")
    ds = ds_phases()
    assert ds["forward_start"].weights_bytes == single.weights_bytes + 440_960 == 881_920 + 64 + 440_960
    assert ds["forward_start"].optimizer_states_bytes == 2 * 440_960 + 4
    assert ds["forward_start"].gradients_bytes == 0  # the bucket is released at the end of each backward
    # lm_head's 64,000-element gradient exceeds the bucket: reduced from its own storage at the next hook,
    # when the last rank makes its grads_in_partition
    assert ds["backward_layers"].gradients_bytes == 200_000 + 4 * 110_272 + 4 * 64_000
    # step: grads_in_partition beside the norm's fp64 copy of the largest piece (the embedding)
    assert ds["optimizer_step"].temporaries_bytes == 4 * 114_304 + 8 * 64_000


def test_deepspeed_casts_lora_adapters_to_bf16_and_keeps_an_fp32_master_partition():
    """PEFT keeps adapters in fp32 on a bf16 base; DeepSpeed's bf16 mode casts every parameter to bf16.
    TINY q/v LoRA r=4: 2 layers x (q: 4 x 64 + 64 x 4, v: 4 x 64 + 32 x 4) = 1,792 adapter elements, bf16 in
    the model (3,584 bytes, not PEFT's 7,168), and an 896-element fp32 partition per rank."""
    lora_single = estimate_memory(TINY, training("lora", gpus=1, dtype="bf16"))
    ds = ds_phases("lora", dtype="bf16")
    base = lora_single.phases[0].breakdown.weights_bytes - 4 * 1_792  # bf16 base + buffers
    assert ds["forward_start"].weights_bytes == base + 2 * 1_792 + 4 * 896


@pytest.mark.parametrize("strategy", DEEPSPEED_STAGES)
def test_deepspeed_refuses_torch_autocast(strategy):
    with pytest.raises(PlannerInputError) as err:
        estimate_memory(TINY, training(strategy=strategy, amp="bf16"))
    assert err.value.field == "amp"


def test_deepspeed_zero3_partitions_all_but_persistent_parameters():
    """Stage 3: parameters with <= stage3_param_persistence_threshold elements stay whole on every rank
    (beside their partition); with threshold 0 every parameter is partitioned."""
    kept = ds_phases(strategy="deepspeed-zero3", zero=DeepSpeedZeroConfig(stage3_param_persistence_threshold=10**5))
    partitioned = ds_phases(strategy="deepspeed-zero3", zero=DeepSpeedZeroConfig(stage3_param_persistence_threshold=0))
    assert kept["optimizer_step"].weights_bytes - partitioned["optimizer_step"].weights_bytes == 881_920  # all < 1e5


# ---------------------------------------------------------------------------------------------- DeepSpeed, measured

# |predicted / busiest rank's measured peak - 1| on TINY, 2 CPU ranks, every case held to the project's
# 0.5 %. Measured (this DeepSpeed, 2 ranks): zero1 full -0.0004 %, zero2 full +0.23 % (the moment the last
# rank makes grads_in_partition is mid final-norm backward: lm_head's input and the norm's saved tensors are
# gone, the planner keeps them), zero3 full -0.20 %, LoRA +0.01 to +0.02 %.
DS_TOLERANCE = 0.005


def _ds_job(strategy: str, method: str):
    from lora_planner.profiler.runner import ProfileRequest

    return ProfileRequest(TINY.name, TINY, training(method, gpus=1), backend="builtin", mode="cpu", steps=3), strategy


@pytest.fixture(scope="module")
def ds_measured():
    from lora_planner.profiler.distributed import deepspeed_available, measure_distributed_many

    if not deepspeed_available():
        pytest.skip("needs DeepSpeed (pip install deepspeed; DS_BUILD_OPS=0)")
    jobs = [_ds_job(strategy, method) for strategy in DEEPSPEED_STAGES for method in ("full", "lora")]
    results = measure_distributed_many(jobs, world_size=2, zero=SMALL_BUCKETS)
    return {(strategy, request.training.method): ranks for (request, strategy), ranks in zip(jobs, results)}


@pytest.mark.parametrize("strategy", DEEPSPEED_STAGES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_predicted_per_rank_peak_matches_deepspeed(ds_measured, strategy, method):
    predicted = max(p.breakdown.total_bytes for p in deepspeed.phases(
        TINY, training(method, strategy=strategy), None, SMALL_BUCKETS))
    busiest = max(rank.peak_bytes for rank in ds_measured[(strategy, method)])  # what the planner predicts
    # gloo's worker thread can free a collective's tensor a moment late, which inflated ZeRO-2 full's peak at
    # random (+0.5 % to +1.7 %) until the profiler waited for it after every synchronous collective
    # (`_deepspeed_collectives_below_tracker`); a late scalar or an overlapped stage-3 buffer can remain (seen
    # once more in CI: zero2 full +1.5 %). A late free only ever raises a measured peak, so a peak above the
    # prediction is measured once more and the lower of the two is the run's: a planner error shows in both.
    if busiest > predicted * (1 + DS_TOLERANCE):
        from lora_planner.profiler.distributed import measure_distributed_many

        (again,) = measure_distributed_many([_ds_job(strategy, method)], world_size=2, zero=SMALL_BUCKETS)
        busiest = min(busiest, max(rank.peak_bytes for rank in again))
    assert abs(predicted / busiest - 1) <= DS_TOLERANCE, (strategy, method, predicted, busiest)


@pytest.mark.parametrize("strategy", DEEPSPEED_STAGES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_deepspeed_keeps_an_fp32_master_partition(ds_measured, strategy, method):
    trainable = 881_920 if method == "full" else 7_168  # fp32 bytes
    for rank in ds_measured[(strategy, method)]:
        assert rank.buffers_at_peak["ds_fp32_master"] == trainable // 2


# ---------------------------------------------------------------------------------------------- MoE (issue 12)

@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b", "qwen1.5-moe-a2.7b"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
def test_deepspeed_shards_expert_stacks_like_any_parameter(name, targets):
    """ZeRO flattens every parameter tensor: the expert stacks (E x out x in each) and PEFT's ParamWrapper adapters
    ((r E) x in, out x (r E), gate_up_proj at 2r) are counted whole, so the tensors ZeRO partitions add up to the
    model's and the adapters' totals (expert parallelism is not modelled)."""
    from lora_planner.catalog import resolve_model
    from lora_planner.params import count_params, lora_params
    from lora_planner.specs import LoraSpec

    spec = resolve_model(name)
    t = TrainingSpec(method="lora", gpus=8, strategy="deepspeed-zero3", lora=LoraSpec(r=16, target_modules=targets))
    tensors = deepspeed._parameters(spec, t)
    assert sum(n * count for n, count, trainable in tensors if not trainable) == count_params(spec).total
    assert sum(n * count for n, count, trainable in tensors if trainable) == \
        lora_params(spec, 16, targets).trainable_params
    order = deepspeed._trainable_order(spec, t)
    assert sum(order) == lora_params(spec, 16, targets).trainable_params
    full = TrainingSpec(method="full", gpus=8, strategy="deepspeed-zero3")
    assert sum(deepspeed._trainable_order(spec, full)) == count_params(spec).total
    plan = estimate_memory(spec, full)
    single = estimate_memory(spec, TrainingSpec(method="full"))
    assert plan.peak_allocated_bytes < single.peak_allocated_bytes / 2  # weights, gradients, states sharded 8 ways


@pytest.mark.parametrize("strategy, expected", [
    # transformers 5.24 integrations/deepspeed.py trainer_config_finalize, h = 4,096 (Llama-3.1-8B)
    ("deepspeed-zero3", dict(reduce_bucket_size=4096 * 4096, stage3_prefetch_bucket_size=15_099_494,
                             stage3_param_persistence_threshold=40_960, stage3_max_live_parameters=10**9)),
    # below stage 3 the Trainer fills reduce_bucket_size only; the rest keep DeepSpeed's defaults
    ("deepspeed-zero2", dict(reduce_bucket_size=16_777_216, stage3_prefetch_bucket_size=50_000_000,
                             stage3_param_persistence_threshold=100_000, stage3_max_live_parameters=10**9)),
])
def test_hf_trainer_auto_sizes_by_hand(strategy, expected):
    auto = (("reduce_bucket_size", "auto"), ("stage3_prefetch_bucket_size", "auto"),
            ("stage3_param_persistence_threshold", "auto"), ("overlap_comm", False))
    t = TrainingSpec(method="full", gpus=8, strategy=strategy, zero_config=auto)
    zero = deepspeed.zero_config_for(resolve_model("llama-3.1-8b"), t)
    assert {k: getattr(zero, k) for k in expected} == expected and zero.overlap_comm is False
    assert deepspeed.zero_config_for(TINY, TrainingSpec(method="full", gpus=2, strategy=strategy)) == \
        deepspeed.DEFAULT_CONFIG


def test_zero_config_reaches_the_plan():
    """A smaller reduce bucket (what --from a DeepSpeed JSON sets) shrinks the ZeRO-2 plan by the bucket's bytes."""
    def peak(zero_config):
        t = training("full", strategy="deepspeed-zero2", zero_config=zero_config)
        return estimate_memory(TINY, t).peak_allocated_bytes
    small = peak((("reduce_bucket_size", 50_000), ("allgather_bucket_size", 50_000)))
    assert small == max(b.total_bytes for b in ds_phases(zero=SMALL_BUCKETS).values())
    assert peak(()) > small

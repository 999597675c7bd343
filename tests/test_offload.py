"""CPU offload (`lora_planner.parallel.offload` and the offloading branches of `parallel.deepspeed` / `parallel.fsdp`):
host buffers by hand, what leaves the GPU, the settings refused, the CLI, and DeepSpeed ZeRO-Offload run on 2 CPU
ranks (gloo), where the GPU side and the host side together are the rank's whole memory."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.parallel import deepspeed
from lora_planner.parallel.deepspeed import DeepSpeedZeroConfig
from lora_planner.parallel.offload import HostBuffer, host_memory
from tests.test_parallel import SMALL_BUCKETS, TINY, training

# Full fine-tuning: every parameter of TINY (the largest: 64,000 elements) inside one reduction bucket (a larger one
# is held in one more copy than planned: `parallel.deepspeed`'s docstring). LoRA: test_parallel's small buckets (a
# bucket far above the adapters is made at the first gradient hook, when the planner still counts every layer's saved
# tensors: +4 % on TINY with or without offload).
WIDE_BUCKETS = DeepSpeedZeroConfig(reduce_bucket_size=500_000, allgather_bucket_size=500_000)
BUCKETS = {"lora": SMALL_BUCKETS, "full": WIDE_BUCKETS}


def test_deepspeed_zero2_host_buffers_by_hand():
    """TINY, fp32, 2 ranks. LoRA r 4 on q / v: 2 layers x (256 + 256 + 256 + 128) = 1,792 trainable elements, a
    partition of 896, the largest adapter 256: the fp32 master, its gradient and the staging copy (896 x 4 each) and
    `temp_grad_buffer_for_cpu_offload` (256 x 4) pinned, AdamW's two moments (2 x 896 x 4) pageable. Full: 220,480
    elements, a partition of 110,240, the largest parameter 64,000 (the embeddings)."""
    lora = host_memory(TINY, training("lora", strategy="deepspeed-zero2", offload="optimizer"))
    assert [(b.name, b.nbytes, b.pinned) for b in lora.buffers] == [
        ("fp32 master partition", 3584, True), ("fp32 gradient partition", 3584, True),
        ("16-bit staging partition", 3584, True), ("temp_grad_buffer_for_cpu_offload", 1024, True),
        ("optimizer states", 7168, False)]
    assert (lora.total_bytes, lora.pinned_bytes, lora.pinned_reserved_bytes) == (18944, 11776, 3 * 4096 + 1024)
    full = host_memory(TINY, training("full", strategy="deepspeed-zero2", offload="optimizer"))
    # master, gradient and staging copy (fp32 here: 4 bytes each), the largest parameter's buffer, the two moments
    assert full.total_bytes == 3 * 110_240 * 4 + 64_000 * 4 + 2 * 110_240 * 4 == 2_460_800
    unpinned = host_memory(TINY, training("full", strategy="deepspeed-zero2", offload="optimizer",
                                          offload_pin_memory=False))
    assert unpinned.pinned_bytes == 0 and unpinned.total_bytes == full.total_bytes


def test_deepspeed_zero3_offload_param_moves_the_partitions():
    """Stage 3: the fp32 master pageable, its gradient and the 16-bit gradient partitions pinned; with offload_param
    the 16-bit partitions of parameters above `stage3_param_persistence_threshold` too (on TINY none: every parameter
    is below 1e5 elements and stays whole on the GPU)."""
    t = training("full", strategy="deepspeed-zero3", offload="optimizer")
    host = host_memory(TINY, t)
    assert [(b.name, b.pinned) for b in host.buffers] == [
        ("fp32 master partition", False), ("fp32 gradient partition", True), ("16-bit gradient partitions", True),
        ("optimizer states", False)]
    assert host.total_bytes == 110_240 * (4 + 4 + 4 + 8)
    assert host_memory(TINY, replace(t, offload="params")).total_bytes == host.total_bytes
    big = resolve_model("llama-3.1-8b")
    params = host_memory(big, training("full", gpus=8, strategy="deepspeed-zero3", offload="params", dtype="bf16"))
    names = {b.name: b for b in params.buffers}
    assert names["16-bit trainable partitions"].pinned and names["16-bit frozen partitions"].nbytes == 0


def test_offload_leaves_the_gpu():
    """What offloading takes off each rank's GPU: DeepSpeed stage 2 the fp32 master and the optimizer states (adding
    the largest parameter's `temp_grad_buffer_for_gpu_offload`); FSDP2 the shards, their gradients and states."""
    def peak_parts(t):
        return max(estimate_memory(TINY, t).phases, key=lambda p: p.breakdown.total_bytes).breakdown

    plain = {p.phase: p.breakdown for p in deepspeed.phases(TINY, training("lora", strategy="deepspeed-zero2"), None)}
    off = {p.phase: p.breakdown for p in deepspeed.phases(
        TINY, training("lora", strategy="deepspeed-zero2", offload="optimizer"), None)}
    assert plain["forward_start"].weights_bytes - off["forward_start"].weights_bytes == 896 * 4 - 256 * 4
    assert off["forward_start"].optimizer_states_bytes == 0 < plain["forward_start"].optimizer_states_bytes
    fsdp = peak_parts(training("full", gpus=4, strategy="fsdp", offload="params"))
    sharded = peak_parts(training("full", gpus=4, strategy="fsdp"))
    assert fsdp.optimizer_states_bytes == 0 < sharded.optimizer_states_bytes


@pytest.mark.parametrize("settings, fragment", [
    (dict(offload="optimizer"), "offloading is a DeepSpeed ZeRO or FSDP feature"),
    (dict(offload="optimizer", strategy="ddp"), "not ddp's"),
    (dict(offload="optimizer", strategy="fsdp"), "moves parameters, gradients and optimizer states together"),
    (dict(offload="params", strategy="deepspeed-zero2"), "under ZeRO-3 only"),
    (dict(offload="disk", strategy="deepspeed-zero3"), "offload"),
    (dict(offload="optimizer", strategy="deepspeed-zero2", gpus_per_node=4), "4 GPUs per node, but gpus is 2"),
])
def test_offload_refused(settings, fragment):
    with pytest.raises(PlannerInputError) as err:
        training("full", **settings)
    assert fragment in str(err.value)


def test_pinned_blocks_are_reserved_at_powers_of_two():
    """torch's caching host allocator rounds every page-locked block up to a power of two."""
    assert HostBuffer("x", 3584, True).reserved_bytes == 4096
    assert HostBuffer("x", 3584, False).reserved_bytes == 3584
    assert HostBuffer("x", 3 + 5, True, (3, 5)).reserved_bytes == 4 + 8


def test_offload_cli(capsys):
    """`--offload optimizer` with DeepSpeed ZeRO-2 on one GPU: Llama-3.1-8B full fine-tuning at 2,048 tokens with
    checkpointing fits a 24 GB RTX 4090 (21.19 GiB on the device) with 135.6 GiB of host RAM (18 bytes a parameter:
    fp32 master, its gradient, AdamW's moments and a 16-bit staging copy); --json's `host`; a wrong pairing: exit 2."""
    base = ["--model", "llama-3.1-8b", "--method", "full", "--seq-len", "2048", "--grad-checkpointing",
            "--strategy", "deepspeed-zero2", "--offload", "optimizer"]
    assert main([*base, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    full = doc["methods"]["full"]
    assert round(full["peak_device_bytes"] / 2**30, 2) == 21.19
    assert round(full["host"]["per_rank_bytes"] / 2**30, 2) == 135.6
    assert doc["inputs"]["offload"] == "optimizer" and full["host"]["ranks_per_node"] == 1
    assert main([*base, "--gpu", "rtx-4090"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "host RAM per rank" in out and "offloaded to host RAM (pinned" in out
    assert main([*base[:-4], "--offload", "optimizer"]) == 2
    assert "offload: offloading is a DeepSpeed ZeRO or FSDP feature" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ds_offload_measured():
    from lora_planner.profiler.distributed import deepspeed_available, measure_distributed_many
    from lora_planner.profiler.runner import ProfileRequest

    if not deepspeed_available():
        pytest.skip("needs DeepSpeed (pip install deepspeed; DS_BUILD_OPS=0)")
    measured = {}
    for method, zero in BUCKETS.items():
        stages = ("deepspeed-zero2", "deepspeed-zero3")
        jobs = [(ProfileRequest(TINY.name, TINY, training(method, strategy=stage, offload="optimizer"),
                                backend="builtin", mode="cpu", steps=3), stage) for stage in stages]
        measured.update({(stage, method): ranks for stage, ranks in
                         zip(stages, measure_distributed_many(jobs, world_size=2, zero=zero))})
    return measured


@pytest.mark.parametrize("stage", ["deepspeed-zero2", "deepspeed-zero3"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero_offload_matches_deepspeed_on_cpu_ranks(ds_offload_measured, stage, method):
    """DeepSpeed 0.19.8 with `offload_optimizer` on 2 CPU ranks (gloo), the client AdamW stepping the host partition:
    on a CPU rank the GPU side and the host side share one memory, so the busiest rank's measured peak is the
    planner's GPU peak plus its host RAM, within 0.5 % (measured: stage 2 -0.001 % / -0.000 %, stage 3 -0.001 % /
    -0.39 %)."""
    t = training(method, strategy=stage, offload="optimizer")
    gpu = max(p.breakdown.total_bytes for p in deepspeed.phases(TINY, t, None, BUCKETS[method]))
    busiest = max(rank.peak_bytes for rank in ds_offload_measured[(stage, method)])
    assert abs((gpu + host_memory(TINY, t).total_bytes) / busiest - 1) <= 0.005, (gpu, busiest)
    for rank in ds_offload_measured[(stage, method)]:
        assert rank.buffers_at_peak["ds_offload_fp32_grad"] == rank.buffers_at_peak["ds_fp32_master"]


def test_profile_refuses_offload(tmp_path, capsys):
    """`lora-plan profile` measures on the CPU, where the GPU side and the host side are one memory: refused with the
    reason (the validation is `test_zero_offload_matches_deepspeed_on_cpu_ranks`), nothing written."""
    out = tmp_path / "runs.jsonl"
    assert main(["profile", "--model", "llama-2-7b", "--method", "lora", "--strategy", "deepspeed-zero2",
                 "--offload", "optimizer", "--mode", "cpu", "--out", str(out)]) == 2
    assert "offload: a profiled step runs on the CPU" in capsys.readouterr().err
    assert not out.exists()

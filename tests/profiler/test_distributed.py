"""Per-rank memory under torch.distributed (`lora_planner.profiler.distributed`): 2 CPU ranks on gloo,
every strategy with full fine-tuning and LoRA on a tiny builtin Llama, against the single-process run.

All ten distributed runs share one launch (a module fixture): starting torch in two processes is the
slow part."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.profiler import distributed
from lora_planner.profiler.distributed import measure_distributed_many, measure_single, resolve_strategy
from lora_planner.profiler.runner import ProfileRequest, build_model
from lora_planner.specs import LoraSpec, TrainingSpec

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
SPEC = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "tiny-llama")
METHODS = ("full", "lora")
STRATEGIES = ("ddp", "ddp-zero1", "fsdp-grad-op", "fsdp")  # torch engines; DeepSpeed: tests/test_parallel.py
FSDP_LIKE = ("fsdp-grad-op", "fsdp")


def request(method: str, steps: int = 3, **kw) -> ProfileRequest:
    training = TrainingSpec(method=method, dtype="fp32", batch_size=2, seq_len=16, device="cpu", lora=LoraSpec(r=4),
                            **kw)
    return ProfileRequest(model=SPEC.name, spec=SPEC, training=training, backend="builtin", mode="cpu", steps=steps)


@pytest.fixture(scope="module")
def runs():
    jobs = [(request(m), s) for s in STRATEGIES for m in METHODS]
    results = measure_distributed_many(jobs, world_size=WORLD, cross_check=True)
    return {(s, r.training.method): ranks for (r, s), ranks in zip(jobs, results)}


@pytest.fixture(scope="module")
def single():
    return {m: measure_single(request(m)) for m in METHODS}


def group_bytes(method: str) -> tuple[int, int, int]:
    """(root group, one decoder layer, buffers) parameter bytes of the unwrapped model: FSDP2's groups."""
    torch.manual_seed(0)
    model = build_model(request(method), "cpu")
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return total - SPEC.num_layers * layer, layer, buffers


# ---------------------------------------------------------------------------------------------- every run


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_rank_reports_a_consistent_peak(runs, strategy, method):
    ranks = runs[strategy, method]
    assert [m.rank for m in ranks] == list(range(WORLD))
    for m in ranks:
        assert m.strategy == strategy and m.world_size == WORLD
        assert sum(m.breakdown_bytes.values()) == m.peak_bytes > 0
        assert m.peak_phase in ("forward", "backward", "optimizer_step")
        assert m.phases[m.peak_phase]["peak_bytes"] == m.peak_bytes
        assert m.peak_bytes == max(m.steps_peak_bytes) and m.peak_step == 3  # the steady state, last step
        assert m.off_thread_frees == 0 and m.release_timeouts == 0  # no late frees from gloo's threads


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp-zero1"])
@pytest.mark.parametrize("method", METHODS)
def test_ranks_doing_the_same_work_peak_the_same(runs, strategy, method):
    first, *rest = runs[strategy, method]
    for m in rest:
        assert m.peak_bytes == first.peak_bytes and m.peak_phase == first.peak_phase
        assert m.breakdown_bytes == first.breakdown_bytes and m.buffers_at_peak == first.buffers_at_peak


@pytest.mark.parametrize("method", METHODS)
def test_zero1_ranks_differ_by_their_partitions_optimizer_state_only(runs, method):
    ranks = runs["ddp-zero1", method]
    torch.manual_seed(0)
    largest = max(p.numel() * p.element_size() for p in build_model(request(method), "cpu").parameters()
                  if p.requires_grad)
    peaks = [m.peak_bytes for m in ranks]
    assert max(peaks) - min(peaks) <= 2 * largest  # AdamW: two states per tensor, whole tensors per rank
    others = [{k: v for k, v in m.breakdown_bytes.items() if k not in ("optimizer_states", "temporaries")}
              for m in ranks]
    assert all(o == others[0] for o in others)


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("method", METHODS)
def test_ddp_is_the_single_process_step_plus_its_gradient_buckets(runs, single, method):
    for m in runs["ddp", method]:
        assert m.peak_bytes >= single[method].peak_bytes
        # gradient_as_bucket_view=False: one flat copy of every trainable gradient, live all step long
        assert m.ddp_bucket_bytes == m.full_trainable_bytes == m.buffers_at_peak["ddp_grad_buckets"]
        assert m.peak_bytes == single[method].peak_bytes + m.ddp_bucket_bytes
        assert m.peak_phase == single[method].peak_phase
        assert m.breakdown_bytes["gradients"] == single[method].breakdown_bytes["gradients"] + m.ddp_bucket_bytes
        assert m.phases["forward"]["peak_breakdown"]["gradients"] == m.ddp_bucket_bytes  # before any .grad
        assert m.local_param_bytes == m.full_param_bytes  # replicated


@pytest.mark.parametrize("method", METHODS)
def test_zero1_shards_the_optimizer_state_only(runs, method):
    ddp, zero1 = runs["ddp", method], runs["ddp-zero1", method]
    ddp_states = ddp[0].breakdown_bytes["optimizer_states"]
    states = [m.breakdown_bytes["optimizer_states"] for m in zero1]
    assert sum(states) == ddp_states  # every tensor's state on exactly one rank
    assert all(abs(s - ddp_states / WORLD) <= 0.02 * ddp_states for s in states)
    for m in zero1:
        assert m.ddp_bucket_bytes == m.buffers_at_peak["ddp_grad_buckets"] == ddp[0].ddp_bucket_bytes
        assert m.breakdown_bytes["weights"] == ddp[0].breakdown_bytes["weights"]


# ---------------------------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("strategy", FSDP_LIKE)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_shards_weights_gradients_and_optimizer_states(runs, strategy, method):
    ddp = runs["ddp", method][0]
    root, layer, buffers = group_bytes(method)
    for m in runs[strategy, method]:
        assert m.local_param_bytes == m.full_param_bytes // WORLD  # frozen base weights too, under LoRA
        assert m.local_trainable_bytes == m.full_trainable_bytes // WORLD
        states = m.breakdown_bytes["optimizer_states"]
        assert abs(states - ddp.breakdown_bytes["optimizer_states"] / WORLD) <= 0.01 * states
        step = m.phases["optimizer_step"]
        assert step["peak_breakdown"]["weights"] == m.local_param_bytes + buffers  # resharded by then
        assert step["peak_breakdown"]["gradients"] == m.local_trainable_bytes  # sharded gradients
        idle = m.phases["zero_grad"]["end_breakdown"]  # end of the step: grads and batch gone
        assert idle["weights"] == m.local_param_bytes + buffers and idle["gradients"] == 0
        gathered = m.buffers_at_peak["fsdp_unsharded_params"]
        assert m.breakdown_bytes["weights"] == m.local_param_bytes + buffers + gathered
        if strategy == "fsdp-grad-op":  # nothing resharded before backward: the whole model at the forward peak
            assert gathered == root + SPEC.num_layers * layer
        else:  # the root group (never resharded after forward) plus one layer
            assert gathered == root + layer
        assert m.gloo_scratch_bytes == root  # gloo's largest staging copy (not counted): the root group


@pytest.mark.parametrize("name, engine", [("zero1", "deepspeed-zero1"), ("zero2", "deepspeed-zero2"),
                                          ("zero3", "deepspeed-zero3"), ("fsdp-full-shard", "fsdp"),
                                          ("zero-redundancy-optimizer", "ddp-zero1"), ("fsdp", "fsdp")])
def test_old_names_resolve_to_the_engine_they_mean(name, engine):
    assert resolve_strategy(name) == engine


def test_fsdp_full_fine_tuning_peaks_below_single_process_and_ddp(runs, single):
    for strategy in FSDP_LIKE:
        assert runs[strategy, "full"][0].peak_bytes < single["full"].peak_bytes < runs["ddp", "full"][0].peak_bytes


def test_fsdp_lora_can_peak_above_ddp_on_a_small_model(runs):
    """Sharding the frozen base saves half the weights, but FSDP2 gathers the whole root group (embeddings
    + lm_head: 58 % of this model) and keeps each group's flat all-gather buffer until the next group's
    all-gather: on a model whose embeddings dominate, LoRA under FSDP peaks above DDP."""
    assert runs["fsdp", "lora"][0].peak_bytes > runs["ddp", "lora"][0].peak_bytes


@pytest.mark.parametrize("strategy", FSDP_LIKE)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_peak_equals_torchs_fsdp_mem_tracker(runs, strategy, method):
    for m in runs[strategy, method]:
        assert m.reference_peak_bytes in (m.peak_bytes, None)  # None: this torch has no FSDPMemTracker


def test_fsdp_peak_counts_resized_storages(runs):
    """FSDP2 frees gathered parameters with UntypedStorage.resize_(0): after the forward of a resharding
    group its gathered bytes must leave the count (else every layer would stay gathered)."""
    root, layer, _ = group_bytes("lora")
    for strategy in ("fsdp",):
        m = runs[strategy, "lora"][0]
        assert m.buffers_at_peak["fsdp_unsharded_params"] < root + SPEC.num_layers * layer


# ---------------------------------------------------------------------------------------------- inputs


def test_bad_inputs_are_one_line_errors_before_any_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(distributed, "_worker", no_launch)
    with pytest.raises(PlannerInputError, match="strategy"):
        distributed.measure_distributed(request("lora"), "zero4")
    with pytest.raises(PlannerInputError, match="steps"):
        distributed.measure_distributed(request("lora", steps=2), "ddp")
    with pytest.raises(PlannerInputError, match="world_size"):
        distributed.measure_distributed(request("lora"), "fsdp", world_size=0)
    with pytest.raises(PlannerInputError, match="mode"):
        distributed.measure_distributed(replace(request("lora"), mode="fake"), "fsdp")


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_a_rank_interrupted_by_ctrl_c_exits_quietly(monkeypatch, capsys):
    """Issue 10 class 4: a rank's KeyboardInterrupt is no traceback, just exit code 130."""
    import signal

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "_run_rank", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            distributed._worker(0, WORLD, 0, [], "unused", False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.code == distributed.EXIT_INTERRUPTED == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


class _FakeProcess:
    def __init__(self):
        self.alive, self.terminated = True, False

    def is_alive(self):
        return self.alive

    def terminate(self):
        self.terminated, self.alive = True, False

    def kill(self):
        self.alive = False

    def join(self, timeout=None):
        pass


@pytest.mark.parametrize("failure", [
    KeyboardInterrupt(),
    torch.multiprocessing.ProcessExitedException("process 0 terminated with exit code 130", 0, 1, 130),
])
def test_the_parent_stops_the_ranks_and_raises_one_keyboard_interrupt(monkeypatch, failure):
    import signal

    seen = {}
    processes = [_FakeProcess(), _FakeProcess()]

    class Context:
        def __init__(self):
            self.processes = processes

        def join(self):
            raise failure

    def spawn(fn, args, nprocs, join):
        seen["sigint while starting"] = signal.getsignal(signal.SIGINT)
        assert fn is distributed._worker and nprocs == WORLD and join is False
        return Context()

    monkeypatch.setattr(torch.multiprocessing, "spawn", spawn)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        measure_distributed_many([(request("lora"), "ddp")], world_size=WORLD)
    assert seen["sigint while starting"] is signal.SIG_IGN  # the ranks start with Ctrl-C ignored
    assert signal.getsignal(signal.SIGINT) is before  # and the parent's handler is back
    assert all(p.terminated for p in processes)


def test_a_rank_that_fails_otherwise_is_still_an_error(monkeypatch):
    class Context:
        processes = [_FakeProcess()]

        def join(self):
            raise torch.multiprocessing.ProcessExitedException("process 0 terminated with exit code 1", 0, 1, 1)

    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda *a, **k: Context())
    with pytest.raises(RuntimeError, match="exit code 1"):
        measure_distributed_many([(request("lora"), "ddp")], world_size=WORLD)

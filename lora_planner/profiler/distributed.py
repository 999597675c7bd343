"""Per-rank memory of a training step under torch.distributed data parallelism, measured on CPU.

`measure_distributed(request, strategy, world_size)` spawns `world_size` CPU processes (one gloo process
group on loopback: MASTER_ADDR=127.0.0.1, a free port, GLOO_SOCKET_IFNAME the loopback interface; one
torch thread per process), builds the same model on every rank (same seed), wraps it per strategy and
measures each rank with the exact live-tensor tracker (`tracker.measure_training_step`, `request.steps`
steps). Each rank's batch is the request's micro-batch (`training.batch_size` sequences per rank;
different tokens per rank). Each process has its own tracker, so a rank's numbers are that rank's
tensors only. `measure_distributed_many` runs several (request, strategy) jobs in one launch (torch's
import in every process is the slow part); `measure_single` is the unwrapped reference, in process.

Ctrl-C: the ranks start with SIGINT ignored (no traceback per rank from their start-up) and exit quietly
with code 130 when interrupted while measuring; the parent stops any rank still running and raises one
KeyboardInterrupt, so `lora-plan profile` prints its single "interrupted" line. A Ctrl-C in the moment the
ranks are being started is ignored (press it again).

Strategies:

- ``ddp``: `DistributedDataParallel(model)`, default settings (`gradient_as_bucket_view=False`, 25 MiB
  buckets, 1 MiB first bucket, `broadcast_buffers=True`), the request's optimizer. Per rank: full
  weights, gradients and optimizer states, plus DDP's *gradient buckets*: a flat copy of every trainable
  gradient (bucket bytes = trainable parameter bytes, one bucket per dtype and size cap), allocated by
  the C++ reducer at construction and again when it rebuilds them in step 2's forward; live from then
  on, through every phase. Reported as `gradients` and named `ddp_grad_buckets`.
- ``zero1``: DDP as above + `ZeroRedundancyOptimizer(params, optimizer_class=<the request's optimizer
  class>, **its settings)`: optimizer state (and the optimizer's scratch) for this rank's partition of
  the trainable tensors only. The partition is greedy by tensor size over whole tensors, so ranks differ
  by up to one tensor's state. Weights, gradients and buckets as DDP.
- ``zero3`` and ``fsdp`` (the same configuration): FSDP2 `fully_shard(layer, reshard_after_forward=True)`
  on every decoder layer, then `fully_shard(model)` on the root (the standard recipe; FSDP2 never
  reshards the root group after forward). Parameters, gradients and optimizer states are sharded (dim-0
  chunks, padded to a multiple of the world size); a layer's parameters are all-gathered before its
  forward and again before its backward (the next layer's is prefetched in backward), and freed after.
- ``zero2``: the same recipe with `reshard_after_forward=False`: parameters stay gathered from their
  forward all-gather to the end of their backward (gradients and optimizer states sharded, parameters
  whole through forward and backward: ZeRO-2-like). Unlike DeepSpeed's ZeRO-2 the parameters are
  resharded after backward, so the optimizer step sees shards.

torch 2.13's gloo has the collectives FSDP2 needs on CPU (`all_gather_into_tensor`,
`reduce_scatter_tensor`, sum and avg, fp32 and bf16): FSDP2 runs as is (no FSDP1 fallback). Under LoRA,
FSDP2 shards the frozen base weights like the trainable ones (a frozen weight costs its shard at rest and
its full size while its group is gathered); only the adapters have gradients and optimizer states.

What the tracker sees, and what this module does about it:

- FSDP2 frees and re-allocates gathered parameters with `UntypedStorage.resize_` (not an op). Left
  alone, the tracker keeps every gathered layer live from its first all-gather on (+17-19 % on the test
  model). `_fsdp_hooks` wraps FSDP2's `alloc_storage` / `free_storage` / `init_unsharded_param` so the
  tracker re-reads each storage right after its resize, and labels the gathered parameters `weights`
  (`weights` = this rank's shards + the groups gathered at that moment). With it the per-rank peak
  equals that of torch's `FSDPMemTracker` (`torch.distributed._tools.fsdp2_mem_tracker`, which patches
  `resize_` itself) byte for byte: `cross_check=True` runs every FSDP job under both.
- gloo's collectives allocate outside the tracker and are not counted: `_allgather_base` gathers into a
  fresh flat tensor of the output's size on gloo's worker thread and copies it out; `reduce_scatter_tensor`
  clones its whole input, all-reduces the clone and copies this rank's chunk out; the ring all-reduce
  (DDP, the clone) uses gloo-internal scratch. These are gloo artifacts (NCCL writes into the given
  buffers), so FSDP2's collectives run below the tracker (the clone would otherwise be seen only in
  part); the largest such staging buffer of the run is reported as `gloo_scratch_bytes`.
- gloo completes a collective's future (waking the caller) before its worker thread releases the work
  and the tensors and views it holds. A buffer the program drops in that window is freed later, on the
  worker thread, at a racy moment: peaks then differ between ranks and runs. After each FSDP2
  collective the caller waits until the storages' reference counts are back (`_await_release`), and
  DDP's pre-forward (bucket rebuild with its index broadcast, buffer broadcast: tens of bytes) runs
  below the tracker. `off_thread_frees` counts the frees that still happened on another thread (0 in
  the tests).
- ZeroRedundancyOptimizer keeps its state in an inner optimizer: registered as `optimizer_states` after
  each of its steps.
- DDP's buckets are made by the C++ reducer outside any op: the tracker adopts them when backward first
  writes into them, so step 1 and step 2 (whose forward rebuilds them) see them only from their
  backward on; from step 3 they are live from the step's start. DDP and ZeRO-1 need `steps >= 3`, and
  the reported peak is the last step that reaches the overall maximum.
- Within a DTensor op (FSDP2's sharded parameters in the optimizer step) only the op's outputs are seen
  (the step's ops are element-wise on the local shard).

FSDP2 buffers seen (per rank; a group's flat size = its parameters padded to a multiple of the world
size): each all-gather writes a flat buffer of the group's full size, then copies it out into the
gathered parameters (another full size). In forward the flat buffer is kept until the next group's
copy-out has finished (`comm_ctx.all_gather_state`; the walrus in `wait_for_unshard` keeps the previous
state alive until that function returns), so a forward copy-out holds the previous group's flat buffer,
this group's flat buffer and this group's gathered parameters, plus the root group's gathered parameters
(never resharded after forward). In backward the flat buffer is freed right after the copy-out, the next
group is prefetched, and each group's gradients are copied into a flat reduce-scatter input (the group's
unsharded gradient size) whose output (1/world size of it) becomes the sharded `.grad`s.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from lora_planner.errors import PlannerInputError
from lora_planner.parallel.deepspeed import DEFAULT_CONFIG, DeepSpeedZeroConfig, deepspeed_config
from lora_planner.profiler.runner import (
    Measurement, ProfileRequest, _loss_fn, _train_step, batch_factory, build_model, build_optimizer,
)
from lora_planner.profiler.tracker import (
    LiveTensorTracker, MemoryCategory, Phase, StepPeak, _optimizer_state_tensors, measure_training_step,
)
from lora_planner.specs import STRATEGIES as SPEC_STRATEGIES
from lora_planner.specs import STRATEGY_ALIASES, Strategy

__all__ = [
    "STRATEGIES",
    "DistributedMeasurement",
    "Strategy",
    "measure_distributed",
    "measure_distributed_many",
    "measure_single",
]

STRATEGIES: tuple[str, ...] = SPEC_STRATEGIES  # canonical names; STRATEGY_ALIASES (zero2, ...) resolve to them
DDP_STRATEGIES = frozenset({"ddp", "ddp-zero1"})
FSDP_RESHARD_AFTER_FORWARD = {"fsdp": True, "fsdp-grad-op": False}
DEEPSPEED_STAGES = {"deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}
MIN_DDP_STEPS = 3  # DDP rebuilds its buckets in step 2's forward; step 3 on is the steady state
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass(frozen=True)
class DistributedMeasurement(Measurement):
    """One rank's measurement; `peak_bytes`, `peak_phase`, `breakdown_bytes` (at the peak) as in
    `runner.Measurement`, for this rank's tensors.

    phases: the peak step's phases: name -> {"peak_bytes", "peak_breakdown", "end_bytes", "end_breakdown"}.
    buffers_at_peak: named distributed storages live at the peak (bytes): "ddp_grad_buckets" (in
    `gradients`), "fsdp_unsharded_params" (gathered parameters, in `weights`), "fsdp_all_gather_buffer"
    (flat all-gather output of a group), "fsdp_reduce_scatter_input" (flat unsharded gradients of a
    group), "fsdp_reduce_scatter_output" (its sharded result, which the sharded `.grad`s view).
    local_param_bytes / local_trainable_bytes: this rank's parameter storages at rest (shards under FSDP).
    full_param_bytes / full_trainable_bytes: the unwrapped model's.
    ddp_bucket_bytes: DDP's own log of its (rebuilt) bucket sizes, summed; 0 without DDP.
    gloo_scratch_bytes: largest staging buffer gloo allocated inside one FSDP2 collective (not counted).
    reference_peak_bytes: with `cross_check=True`, FSDP strategies only: the peak of the same run (rebuilt
    from the same seed) under torch's own `FSDPMemTracker`, which tracks FSDP2's resizes its own way.
    """

    rank: int = 0
    world_size: int = 1
    strategy: str = "single"
    peak_step: int = 0
    steps_peak_bytes: tuple[int, ...] = ()
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    buffers_at_peak: dict[str, int] = field(default_factory=dict)
    local_param_bytes: int = 0
    local_trainable_bytes: int = 0
    full_param_bytes: int = 0
    full_trainable_bytes: int = 0
    ddp_bucket_bytes: int = 0
    gloo_scratch_bytes: int = 0
    off_thread_frees: int = 0
    off_thread_free_bytes: int = 0
    release_timeouts: int = 0
    reference_peak_bytes: int | None = None


# ---------------------------------------------------------------------------------------------- checks


def resolve_strategy(strategy: str) -> str:
    """The canonical engine name of `strategy` (aliases such as zero2 -> deepspeed-zero2)."""
    resolved = STRATEGY_ALIASES.get(strategy, strategy)
    if resolved not in STRATEGIES:
        raise PlannerInputError("strategy", f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    return resolved


def deepspeed_available() -> bool:
    """Whether DeepSpeed can be imported here (it is optional: `pip install deepspeed`, DS_BUILD_OPS=0)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _check(request: ProfileRequest, strategy: str, world_size: int) -> None:
    strategy = resolve_strategy(strategy)
    if strategy in DEEPSPEED_STAGES:
        if not deepspeed_available():
            raise PlannerInputError("strategy", f"{strategy} needs DeepSpeed, which is not installed",
                                    "pip install deepspeed (DS_BUILD_OPS=0 is enough: it runs on CPU with gloo)")
        deepspeed_config(replace(request.training, gpus=max(world_size, 2), strategy=strategy))  # refuses --amp
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlannerInputError("world_size", f"must be a positive integer, got {world_size!r}", "pass e.g. 2")
    if request.mode not in ("cpu", "auto"):
        raise PlannerInputError("mode", f"distributed runs are real CPU steps on gloo, not {request.mode!r}",
                                "use --mode cpu")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        raise PlannerInputError("strategy", "this torch build has no torch.distributed gloo backend",
                                "install a torch build with distributed support (the PyPI wheels have it)")
    if request.training.method == "qlora":
        raise PlannerInputError("method", "QLoRA is profiled on one process only (the distributed profiler does "
                                "not wrap bitsandbytes' 4-bit weights)", "profile QLoRA without --gpus, or full / lora")
    if strategy in DDP_STRATEGIES and request.steps < MIN_DDP_STEPS:
        raise PlannerInputError(
            "steps", f"{strategy} needs at least {MIN_DDP_STEPS} steps (DDP rebuilds its gradient buckets in "
                     f"step 2; step 3 on is the steady state), got {request.steps}",
            f"use --steps {MIN_DDP_STEPS} or more")


# ---------------------------------------------------------------------------------------------- wrapping


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder-layer list: the first ModuleList of `num_layers` modules of one class (builtin
    `model.layers`, HF `model.layers` / `transformer.h`, under PEFT's wrappers too)."""
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and num_layers > 0 and len(module) == num_layers
                and len({type(m) for m in module}) == 1):
            return module
    raise PlannerInputError("strategy", f"found no list of {num_layers} decoder layers to shard in "
                                        f"{type(model).__name__}", "use ddp or zero1 for this model")


def _zero_optimizer(model: nn.Module, request: ProfileRequest) -> torch.optim.Optimizer:
    """ZeroRedundancyOptimizer over the trainable parameters, with the class and settings that
    `runner.build_optimizer` picks for the request."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    template = build_optimizer(model, request.training)
    cls = type(template)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in template.defaults.items() if k in accepted}
    del template
    params = [p for p in model.parameters() if p.requires_grad]
    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)


def _pre_forward_below_tracker(ddp: nn.Module) -> None:
    """Run DDP's pre-forward (bucket rebuild after step 1 with its index broadcast; buffer broadcast)
    below any dispatch mode: its small broadcast tensors are otherwise freed by gloo's worker thread at a
    racy moment (ranks differ by tens of bytes), and the rebuilt buckets are adopted anyway when backward
    first writes into them."""
    pre_forward = ddp._pre_forward

    def below_tracker(*inputs: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return pre_forward(*inputs, **kwargs)

    ddp._pre_forward = below_tracker


def _wrap(model: nn.Module, strategy: str, request: ProfileRequest) -> tuple[nn.Module, torch.optim.Optimizer]:
    if strategy in DDP_STRATEGIES:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        _pre_forward_below_tracker(ddp)
        if strategy == "ddp":
            return ddp, build_optimizer(model, request.training)
        return ddp, _zero_optimizer(model, request)
    from torch.distributed.fsdp import fully_shard

    reshard = FSDP_RESHARD_AFTER_FORWARD[strategy]
    for layer in _decoder_layers(model, request.spec.num_layers):
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model, build_optimizer(model, request.training)


# ---------------------------------------------------------------------------------------------- tracker
# The tracker's records are read here (same package): a storage's current lifetime is
# `tracker._live[address]`; names are kept per lifetime (id of the record), so an address reused by a
# later storage is never taken for a named buffer.


class _RankTracker(LiveTensorTracker):
    """The live-tensor tracker, counting frees that happen on another thread than its own (a gloo worker
    dropping the last reference to a collective's tensor: such a free may come late)."""

    def __init__(self) -> None:
        super().__init__()
        self._owner = threading.get_ident()
        self.off_thread_frees = 0
        self.off_thread_free_bytes = 0

    def _on_finalize(self, rec: Any) -> None:
        if threading.get_ident() != self._owner and rec.free_seq is None:
            self.off_thread_frees += 1
            self.off_thread_free_bytes += rec.nbytes
        super()._on_finalize(rec)


def _name_storages(tracker: LiveTensorTracker, names: dict[int, str], tensors: Sequence[torch.Tensor],
                   name: str) -> None:
    for t in tensors:
        rec = tracker._live.get(t.untyped_storage()._cdata)
        if rec is not None:
            names[id(rec)] = name


def _label_persistent_unregistered(tracker: LiveTensorTracker, names: dict[int, str], name: str,
                                   category: MemoryCategory) -> int:
    """Storages still live after the last step that nobody registered (the steps' own tensors are gone
    by then): state a wrapper keeps across steps outside any op, i.e. DDP's gradient buckets. Labels
    them `category` for their whole lifetime, names them, returns their bytes."""
    with tracker._lock:
        found = [(rec, st) for rec in tracker._live.values()
                 if rec.category is None and rec.nbytes and (st := rec.ref()) is not None]
    for rec, st in found:
        tracker.register(torch.empty(0, dtype=torch.uint8).set_(st), category)  # a view: no allocation
        names[id(rec)] = name
    return sum(rec.nbytes for rec, _ in found)


def _buffers_at(tracker: LiveTensorTracker, event: int, names: dict[int, str]) -> dict[str, int]:
    """Named storages live at tracker event `event`: name -> bytes."""
    out: dict[str, int] = {}
    with tracker._lock:
        for rec in tracker._records:
            if rec.alloc_seq > event:
                break
            if rec.free_seq is not None and rec.free_seq <= event:
                continue
            if (name := names.get(id(rec))) is not None:
                out[name] = out.get(name, 0) + rec.nbytes
    return out


# ---------------------------------------------------------------------------------------------- FSDP2


def _use_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """References to each tensor's storage (every tensor or view on it holds one) plus to the tensor
    itself (gloo's work may hold the very tensor it was given, which leaves the storage count unchanged)."""
    return [torch._C._storage_Use_Count(t.untyped_storage()._cdata) + t._use_count() for t in tensors]


def _await_release(tensors: Sequence[torch.Tensor], before: Sequence[int], timeout_s: float = 2.0) -> bool:
    """Wait until gloo's worker thread has dropped its references to a finished collective's tensors
    (each storage's reference count back to its value before the call; gloo keeps views of them in the
    work, which its worker releases after waking the caller). False on timeout."""
    deadline = time.monotonic() + timeout_s
    while any(n > b for n, b in zip(_use_counts(tensors), before)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0)
    return True


@contextlib.contextmanager
def _fsdp_hooks(tracker: LiveTensorTracker, names: dict[int, str]) -> Iterator[dict[str, int]]:
    """While active: FSDP2's resize_-based alloc/free of gathered parameters is shown to `tracker`
    (labelled `weights`), its buffers are named, and its collectives run below the tracker and wait for
    gloo's worker to release their tensors. Yields counters."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param, _fsdp_param_group

    counts = {"alloc_storage": 0, "free_storage": 0, "all_gather": 0, "reduce_scatter": 0,
              "release_timeouts": 0, "gloo_scratch_bytes": 0}
    orig_alloc, orig_free = _fsdp_param.alloc_storage, _fsdp_param.free_storage
    orig_init_unsharded = _fsdp_param.FSDPParam.init_unsharded_param
    orig_allocate = _fsdp_collectives.DefaultAllocMixin.allocate

    def gathered(tensors: Sequence[torch.Tensor]) -> None:
        tracker.register(list(tensors), MemoryCategory.WEIGHTS)  # re-reads the (resized) storage
        _name_storages(tracker, names, tensors, "fsdp_unsharded_params")

    def alloc_storage(tensor: torch.Tensor) -> None:
        orig_alloc(tensor)
        counts["alloc_storage"] += 1
        gathered([tensor])

    def free_storage(tensor: torch.Tensor) -> None:
        orig_free(tensor)
        counts["free_storage"] += 1
        gathered([tensor])

    def init_unsharded_param(self: Any) -> None:
        orig_init_unsharded(self)
        gathered([*self.all_gather_outputs, *getattr(self, "_unsharded_inner_tensors", [])])

    def all_gather_allocate(self: Any, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = orig_allocate(self, size, dtype=dtype, device=device)
        counts["all_gather"] += 1
        _name_storages(tracker, names, [out], "fsdp_all_gather_buffer")
        return out

    def reduce_scatter_allocate(self: Any, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = orig_allocate(self, size, dtype=dtype, device=device)
        # foreach_reduce allocates the flat input (the group's unsharded gradients), then the output
        counts["reduce_scatter"] += 1
        name = "fsdp_reduce_scatter_input" if counts["reduce_scatter"] % 2 else "fsdp_reduce_scatter_output"
        _name_storages(tracker, names, [out], name)
        return out

    def collective(call: Any, staging: str) -> Any:
        def wrapper(self: Any, output_tensor: torch.Tensor, input_tensor: torch.Tensor, *args: Any,
                    async_op: bool = False, **kwargs: Any) -> Any:
            tensors = (output_tensor, input_tensor)
            before = _use_counts(tensors)
            scratch = (output_tensor if staging == "output" else input_tensor).untyped_storage().nbytes()
            counts["gloo_scratch_bytes"] = max(counts["gloo_scratch_bytes"], int(scratch))
            with _disable_current_modes():
                work = call(self, output_tensor, input_tensor, *args, async_op=async_op, **kwargs)
            if not async_op and not _await_release(tensors, before):
                counts["release_timeouts"] += 1
            return work

        return wrapper

    patches = [
        (_fsdp_param, "alloc_storage", alloc_storage),
        (_fsdp_param_group, "alloc_storage", alloc_storage),
        (_fsdp_param, "free_storage", free_storage),
        (_fsdp_param.FSDPParam, "init_unsharded_param", init_unsharded_param),
        (_fsdp_collectives.DefaultAllGather, "allocate", all_gather_allocate),
        (_fsdp_collectives.DefaultReduceScatter, "allocate", reduce_scatter_allocate),
        # gloo stages an all-gather in a new tensor of the output's size and a reduce-scatter in a clone
        # of its input (ProcessGroupGloo.cpp)
        (_fsdp_collectives.DefaultAllGather, "__call__",
         collective(_fsdp_collectives.DefaultAllGather.__call__, "output")),
        (_fsdp_collectives.DefaultReduceScatter, "__call__",
         collective(_fsdp_collectives.DefaultReduceScatter.__call__, "input")),
    ]
    missing = object()
    saved = [(obj, name, obj.__dict__.get(name, missing)) for obj, name, _ in patches]
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        yield counts
    finally:
        for obj, name, fn in saved:
            if fn is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, fn)


# ---------------------------------------------------------------------------------------------- one rank


def _storage_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # DTensor shards
        st = t.untyped_storage()
        seen[st._cdata] = int(st.nbytes())
    return sum(seen.values())


def _ddp_bucket_bytes(model: nn.Module) -> int:
    get = getattr(model, "_get_ddp_logging_data", None)
    if get is None:
        return 0
    data = get()
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
    return sum(int(s) for s in str(sizes).split(",") if s.strip())


def _measure_rank(request: ProfileRequest, strategy: str | None, rank: int, world_size: int,
                  zero: DeepSpeedZeroConfig = DEFAULT_CONFIG) -> DistributedMeasurement:
    """This process's measurement: `strategy` None is the unwrapped single-process run."""
    t = request.training
    torch.manual_seed(request.seed)
    model = build_model(request, "cpu")
    full_param_bytes = _storage_bytes(model.parameters())
    full_trainable_bytes = _storage_bytes(p for p in model.parameters() if p.requires_grad)
    if strategy in DEEPSPEED_STAGES:
        return _measure_deepspeed_rank(request, model, strategy, rank, world_size, zero,
                                       full_param_bytes=full_param_bytes, full_trainable_bytes=full_trainable_bytes)
    if strategy is None:
        wrapped, optimizer = model, build_optimizer(model, t)
    else:
        wrapped, optimizer = _wrap(model, strategy, request)
    tracker = _RankTracker()
    names: dict[int, str] = {}
    hook = None
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer's local optimizer
    if inner is not None:
        hook = inner.register_step_post_hook(
            lambda opt, args, kwargs: tracker.register(_optimizer_state_tensors(opt), MemoryCategory.OPTIMIZER_STATES))
    make_batch = batch_factory(request.spec, t, "cpu", request.seed + 1000 * rank)
    fsdp = strategy in FSDP_RESHARD_AFTER_FORWARD
    counts: dict[str, int] = {}
    try:
        with _fsdp_hooks(tracker, names) if fsdp else contextlib.nullcontext({}) as counts:
            result = measure_training_step(wrapped, make_batch, optimizer, steps=request.steps,
                                           loss_fn=_loss_fn(t, "cpu"), tracker=tracker)
    finally:
        if hook is not None:
            hook.remove()
    bucket_bytes = 0
    if strategy in DDP_STRATEGIES:
        _label_persistent_unregistered(tracker, names, "ddp_grad_buckets", MemoryCategory.GRADIENTS)
        bucket_bytes = _ddp_bucket_bytes(wrapped)
    # re-resolve every step with the categories known now (ZeRO's states, DDP's buckets)
    steps = [tracker.step_result(s.step) for s in result.steps]
    params = list(wrapped.parameters())
    measurement = _to_measurement(
        steps, tracker, names, rank=rank, world_size=world_size, strategy=strategy or "single",
        local_param_bytes=_storage_bytes(params),
        local_trainable_bytes=_storage_bytes(p for p in params if p.requires_grad),
        full_param_bytes=full_param_bytes, full_trainable_bytes=full_trainable_bytes, ddp_bucket_bytes=bucket_bytes,
        gloo_scratch_bytes=counts.get("gloo_scratch_bytes", 0), release_timeouts=counts.get("release_timeouts", 0))
    tracker.detach()
    return measurement


def _to_measurement(steps: list[StepPeak], tracker: _RankTracker, names: dict[int, str], **fields: Any
                    ) -> DistributedMeasurement:
    top = max(s.peak_bytes for s in steps)
    peak = [s for s in steps if s.peak_bytes == top][-1]  # the last step reaching the maximum
    phases = {p.phase: {"peak_bytes": p.peak_bytes, "peak_breakdown": dict(p.peak_breakdown),
                        "end_bytes": p.end_bytes, "end_breakdown": dict(p.end_breakdown)} for p in peak.phases}
    return DistributedMeasurement(
        peak_bytes=peak.peak_bytes, peak_phase=peak.peak_phase, breakdown_bytes=dict(peak.peak_breakdown),
        step1_peak_bytes=steps[0].peak_bytes,
        steady_peak_bytes=max(s.peak_bytes for s in steps[1:]) if len(steps) > 1 else None,
        peak_step=peak.step, steps_peak_bytes=tuple(s.peak_bytes for s in steps), phases=phases,
        buffers_at_peak=_buffers_at(tracker, peak.peak_event, names),
        off_thread_frees=tracker.off_thread_frees, off_thread_free_bytes=tracker.off_thread_free_bytes, **fields)


# ---------------------------------------------------------------------------------------------- DeepSpeed

# DeepSpeed ZeRO optimizer attributes holding the states a rank keeps across steps (stage_1_and_2.py
# `DeepSpeedZeroOptimizer`, stage3.py `DeepSpeedZeroOptimizer_Stage3`): name -> (category, buffer name).
_DEEPSPEED_STATE = {
    "bit16_groups_flat": (MemoryCategory.WEIGHTS, "ds_bit16_flat"),
    "fp16_partitioned_groups_flat": (MemoryCategory.WEIGHTS, "ds_bit16_partition"),
    "single_partition_of_fp32_groups": (MemoryCategory.WEIGHTS, "ds_fp32_master"),
    "fp32_partitioned_groups_flat": (MemoryCategory.WEIGHTS, "ds_fp32_master"),
    "grad_partitions_flat_buffer": (MemoryCategory.GRADIENTS, "ds_grad_partitions"),
    # ZeRO-Offload's host buffers (`lora_planner.parallel.offload`) and its GPU gradient staging buffer
    "param_buffer_of_bit16_for_cpu_offload_groups": (MemoryCategory.WEIGHTS, "ds_offload_bit16_staging"),
    "temp_grad_buffer_for_cpu_offload": (MemoryCategory.GRADIENTS, "ds_offload_temp_grad_host"),
    "temp_grad_buffer_for_gpu_offload": (MemoryCategory.GRADIENTS, "ds_offload_temp_grad_device"),
    "param_groups_fp16_flat_cpu_memory": (MemoryCategory.WEIGHTS, "ds_offload_bit16_partition"),
}


def _deepspeed_buffers(zero_optimizer: Any) -> list[tuple[str, MemoryCategory, list[torch.Tensor]]]:
    out = []
    for attr, (category, name) in _DEEPSPEED_STATE.items():
        value = getattr(zero_optimizer, attr, None)
        tensors = [t for t in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(t, torch.Tensor)]
        if tensors:
            out.append((name, category, tensors))
    if getattr(zero_optimizer, "cpu_offload", False) or getattr(zero_optimizer, "offload_optimizer", False):
        # the host fp32 gradient of the master partition (stage_1_and_2.py / stage3.py `initialize_optimizer_states`)
        masters = getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or \
            getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])
        grads = [m.grad for m in masters if isinstance(getattr(m, "grad", None), torch.Tensor)]
        if grads:
            out.append(("ds_offload_fp32_grad", MemoryCategory.GRADIENTS, grads))
    buckets = [b.buffer for b in getattr(zero_optimizer, "ipg_buckets", {}).values()]
    tensors = [t for b in buckets for t in (b if isinstance(b, list) else [b]) if isinstance(t, torch.Tensor)]
    if tensors:
        out.append(("ds_ipg_bucket", MemoryCategory.GRADIENTS, tensors))
    return out


# deepspeed/comm/torch.py `TorchBackend`: the collectives DeepSpeed's ZeRO optimizers call.
# Only the flat-tensor ones (stage 3's reduce-scatter and all-gather): gloo stages them in copies NCCL does not
# make. Stage 1/2's `reduce` / `all_reduce` stay tracked: below the tracker, gloo's worker then releases
# an extra-large gradient's storage late (it stayed live into `step` on 2 CPU ranks), which NCCL does not.
_DEEPSPEED_COLLECTIVES = ("reduce_scatter_tensor", "all_gather_into_tensor")
# Stages 1 and 2 reduce gradients with these; they stay tracked (their buffers are DeepSpeed's), but each
# waits, like the ones above, until gloo's worker has let go of its tensors: otherwise a bucket or a
# gradient freed by the worker a moment late inflates the peak at random (+0.5 % to +1.7 % seen).
_DEEPSPEED_TRACKED_COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter")


@contextlib.contextmanager
def _deepspeed_collectives_below_tracker() -> Iterator[None]:
    """While active, DeepSpeed's collectives run below the tracker: gloo stages them in buffers of its own
    that NCCL does not allocate (`reduce_scatter_tensor` clones its whole input, which the tracker first
    sees at a `split`; stage 3 reduce-scatters every gradient that does not fit the bucket). What
    DeepSpeed itself allocates around a collective (flat copies, outputs) is still tracked. Like FSDP2's
    (`_fsdp_hooks`), the call then waits until gloo's worker has dropped its references."""
    from deepspeed.comm import comm as ds_comm

    backend = ds_comm.cdb
    names = _DEEPSPEED_COLLECTIVES + _DEEPSPEED_TRACKED_COLLECTIVES
    originals = {name: getattr(backend, name) for name in names if hasattr(backend, name)}

    def waiting(call: Any, untracked: bool) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            before = _use_counts(tensors)
            with _disable_current_modes() if untracked else contextlib.nullcontext():
                work = call(*args, **kwargs)
            # Overlapped (async) collectives are not waited for: their tensors are referenced again before
            # `wait()`, so no count to wait for is known; ZeRO-3 uses them (overlap_comm), see the tests.
            if not (kwargs.get("async_op", False) or (len(args) >= 4 and args[3] is True)):
                _await_release(tensors, before)
            return work

        return wrapper

    for name, call in originals.items():
        setattr(backend, name, waiting(call, untracked=name in _DEEPSPEED_COLLECTIVES))
    try:
        yield
    finally:
        for name, call in originals.items():
            setattr(backend, name, call)


def _restore_torch_linear() -> None:
    """Undo ZeRO-3's global `torch.nn.functional.linear = zero3_linear_wrap` (partition_parameters.py
    `InsertPostInitMethodToModuleSubClasses._enable_mem_efficient_linear`, which "will persist unless
    manually reset"), so that the jobs after a stage-3 job in this process run the plain linear."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _measure_deepspeed_rank(request: ProfileRequest, model: nn.Module, strategy: str, rank: int, world_size: int,
                            zero: DeepSpeedZeroConfig, **fields: Any) -> DistributedMeasurement:
    """One rank under DeepSpeed ZeRO (`deepspeed.initialize` with the planner's config dict:
    `parallel.deepspeed.deepspeed_config`; the client optimizer is `runner.build_optimizer`'s). A step is
    `engine(**batch).loss`, `engine.backward(loss)`, `engine.step()` (which also zeroes the gradients),
    with the tracker's phases forward / backward / optimizer_step / zero_grad (empty). DeepSpeed's
    persistent buffers are registered and named (`ds_*` in `buffers_at_peak`); stage 1/2's gradient
    bucket, made at the first gradient hook of each backward, is registered as it is made. DeepSpeed's
    collectives run below the tracker (`_deepspeed_collectives_below_tracker`: gloo's staging copies are
    not what NCCL allocates), and ZeRO-3's global linear patch is undone afterwards."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    t = request.training
    config = deepspeed_config(replace(t, gpus=world_size, strategy=strategy), zero)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, t), config=config)
        with _deepspeed_collectives_below_tracker():
            return _measure_deepspeed_engine(request, engine, strategy, rank, world_size, **fields)
    finally:
        _restore_torch_linear()


def _measure_deepspeed_engine(request: ProfileRequest, engine: Any, strategy: str, rank: int, world_size: int,
                              **fields: Any) -> DistributedMeasurement:
    t = request.training
    zero_optimizer = engine.optimizer
    basic = zero_optimizer.optimizer  # the client optimizer, over this rank's fp32 partition
    tracker = _RankTracker()
    names: dict[int, str] = {}

    def register_state() -> None:
        for name, category, tensors in _deepspeed_buffers(zero_optimizer):
            tracker.register(tensors, category)
            _name_storages(tracker, names, tensors, name)

    if hasattr(zero_optimizer, "setup_buckets"):  # stages 1 and 2: the bucket of each backward
        setup_buckets = zero_optimizer.setup_buckets

        def setup_and_register() -> None:
            setup_buckets()
            register_state()

        zero_optimizer.setup_buckets = setup_and_register
    params = list(engine.module.parameters())
    make_batch = batch_factory(request.spec, t, "cpu", request.seed + 1000 * rank)
    loss_fn = _loss_fn(t, "cpu")
    steps: list[StepPeak] = []
    with tracker:
        tracker.register(params, MemoryCategory.WEIGHTS)
        tracker.register([p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None],
                         MemoryCategory.WEIGHTS)
        tracker.register(list(engine.module.buffers()), MemoryCategory.WEIGHTS)
        register_state()
        tracker.register(_optimizer_state_tensors(basic), MemoryCategory.OPTIMIZER_STATES)
        for _ in range(request.steps):
            tracker.begin_step(Phase.FORWARD)
            batch = make_batch()
            loss = loss_fn(engine, batch)
            tracker.mark_phase(Phase.BACKWARD)
            engine.backward(loss)
            del loss
            tracker.mark_phase(Phase.OPTIMIZER_STEP)
            engine.step()
            tracker.register(_optimizer_state_tensors(basic), MemoryCategory.OPTIMIZER_STATES)
            tracker.mark_phase(Phase.ZERO_GRAD)
            del batch
            steps.append(tracker.end_step())
    steps = [tracker.step_result(s.step) for s in steps]
    local = [getattr(p, "ds_tensor", p) for p in params]
    measurement = _to_measurement(
        steps, tracker, names, rank=rank, world_size=world_size, strategy=strategy,
        local_param_bytes=_storage_bytes(local),
        local_trainable_bytes=_storage_bytes(x for x, p in zip(local, params) if p.requires_grad), **fields)
    tracker.detach()
    return measurement


def _fsdp_mem_tracker_peak(request: ProfileRequest, strategy: str, rank: int) -> int | None:
    """The same FSDP2 run again under torch's `FSDPMemTracker` (private API: None when this torch has
    none); collectives below the tracker and released as in the measured run."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    except ImportError:  # pragma: no cover - depends on the installed torch
        return None
    t = request.training
    torch.manual_seed(request.seed)
    model, optimizer = _wrap(build_model(request, "cpu"), strategy, request)
    make_batch = batch_factory(request.spec, t, "cpu", request.seed + 1000 * rank)
    loss_fn = _loss_fn(t, "cpu")
    reference = FSDPMemTracker(model, optimizer)
    with _fsdp_hooks(LiveTensorTracker(), {}), reference:
        for _ in range(request.steps):
            _train_step(model, make_batch(), optimizer, loss_fn)
            reference.reset_mod_stats()
    return int(sum(snap["Total"] for snap in reference.get_tracker_snapshot("peak").values()))


# ---------------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_ifname() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # pragma: no cover - platform without if_nameindex
        return None
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)


EXIT_INTERRUPTED = 130  # a rank stopped by Ctrl-C exits with this code, quietly


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[ProfileRequest, str]], out_dir: str,
            cross_check: bool, zero: DeepSpeedZeroConfig = DEFAULT_CONFIG) -> None:
    """A rank process's entry point. The ranks start with Ctrl-C ignored (`_sigint_ignored`: no traceback
    from their torch import); here it becomes a KeyboardInterrupt again, and the rank exits quietly with
    `EXIT_INTERRUPTED` (the parent prints the one "interrupted" line)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _run_rank(rank, world_size, port, jobs, out_dir, cross_check, zero)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def _run_rank(rank: int, world_size: int, port: int, jobs: list[tuple[ProfileRequest, str]], out_dir: str,
              cross_check: bool, zero: DeepSpeedZeroConfig) -> None:
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at first import

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if (ifname := _loopback_ifname()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    results: list[Any] = []
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        for request, strategy in jobs:
            try:
                measured = _measure_rank(request, strategy, rank, world_size, zero)
                if cross_check and strategy in FSDP_RESHARD_AFTER_FORWARD:
                    gc.collect()
                    measured = replace(measured, reference_peak_bytes=_fsdp_mem_tracker_peak(request, strategy, rank))
                results.append(measured)
            except PlannerInputError as err:
                results.append(("PlannerInputError", err.field, err.problem, err.fix))
                raise
            except Exception as err:
                results.append(("error", f"rank {rank}, {strategy} {request.training.method}: "
                                         f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
                raise
            finally:
                gc.collect()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C while the rank processes start (a process started meanwhile inherits it, and Python
    keeps an inherited SIG_IGN), so an interrupt during their slow torch import prints no traceback
    per rank; the parent, which gets it too once the ranks have started, stops them (`_stop`).
    Only in the main thread (where signal handlers live); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(processes: Sequence[Any], grace_s: float = 5.0) -> None:
    """End the rank processes still running: SIGTERM (no traceback), SIGKILL after `grace_s`."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def measure_distributed_many(jobs: Sequence[tuple[ProfileRequest, Strategy]], world_size: int = 2, *,
                             cross_check: bool = False, zero: DeepSpeedZeroConfig = DEFAULT_CONFIG
                             ) -> list[list[DistributedMeasurement]]:
    """Several (request, strategy) runs in one launch of `world_size` CPU processes; per job, one
    measurement per rank (index = rank). Strategy aliases (zero2, ...) are resolved (`resolve_strategy`).
    `cross_check`: also run each FSDP job under torch's `FSDPMemTracker` (`reference_peak_bytes`).
    `zero`: the DeepSpeed ZeRO settings of the deepspeed-* jobs (DeepSpeed's defaults)."""
    jobs = [(request, resolve_strategy(strategy)) for request, strategy in jobs]
    for request, strategy in jobs:
        _check(request, strategy, world_size)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lora_planner_dist_") as out_dir:
        failure: BaseException | None = None
        with _sigint_ignored():  # the ranks inherit it: no traceback if Ctrl-C hits their start-up
            context = mp.spawn(_worker, args=(world_size, _free_port(), jobs, out_dir, cross_check, zero),
                               nprocs=world_size, join=False)
        try:
            while not context.join():
                pass
        except KeyboardInterrupt:
            _stop(context.processes)
            raise
        except mp.ProcessExitedException as err:
            if err.exit_code == EXIT_INTERRUPTED:  # a rank was interrupted: so is the run
                _stop(context.processes)
                raise KeyboardInterrupt from None
            failure = err
        except Exception as err:  # the ranks' own records say more; raised below
            failure = err
        per_rank: list[list[Any]] = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                per_rank.append(pickle.load(f))
                continue
            per_rank.append([])
    out: list[list[DistributedMeasurement]] = []
    for i, (request, strategy) in enumerate(jobs):
        row = []
        for rank in range(world_size):
            item = per_rank[rank][i] if i < len(per_rank[rank]) else None
            if isinstance(item, tuple) and item[0] == "PlannerInputError":
                raise PlannerInputError(*item[1:])
            if isinstance(item, tuple):
                raise RuntimeError(item[1]) from failure
            if item is None:
                raise RuntimeError(f"rank {rank} returned no result for {strategy} {request.training.method}"
                                   + (f": {failure}" if failure else "")) from failure
            row.append(item)
        out.append(row)
    return out


def measure_distributed(request: ProfileRequest, strategy: Strategy, world_size: int = 2, *,
                        cross_check: bool = False, zero: DeepSpeedZeroConfig = DEFAULT_CONFIG
                        ) -> list[DistributedMeasurement]:
    """`request` trained under `strategy` on `world_size` CPU processes: one measurement per rank."""
    return measure_distributed_many([(request, strategy)], world_size, cross_check=cross_check, zero=zero)[0]


def measure_single(request: ProfileRequest) -> DistributedMeasurement:
    """The same measurement, unwrapped, in this process (the single-process reference)."""
    return _measure_rank(request, None, 0, 1)

"""Exact live-tensor memory tracker for a training step, on CPU or under FakeTensorMode.

`LiveTensorTracker` is a `TorchDispatchMode`: every op's outputs are inspected and each *new* untyped
storage is recorded once (views share a storage, so they cost nothing), with a `weakref.finalize`
on the storage to record its free. The tracker keeps the live byte count, the global, per-step and
per-phase peaks, and an append-only log of storage records with allocation/free sequence numbers.

Categories are resolved *late*: a snapshot (peak, phase end) is just a sequence number, and the
breakdown is computed from the records that were live at that moment, using each record's category
as known when the breakdown is asked for. So the storage that autograd allocates in backward and
that only later becomes `p.grad`, or the `exp_avg` created inside step 1's `optimizer.step()` and
only registered after it, are classified correctly at the peak even though the peak happened first.

Classification of a storage: its registered category if any (`register`); else `activations` when
it was created in a forward phase and was still alive when the backward phase began (saved
tensors, the loss, the batch); else `temporaries`.

What "exact" means here: the sum of `untyped_storage().nbytes()` of every storage produced by an
op (or registered) and not yet freed, checked for a new peak after every op. Not counted: allocator
rounding/caching, scratch memory that a kernel allocates internally without returning a tensor,
storages no op ever touched and no one registered, and `UntypedStorage.resize_` called directly
(not an op; FSDP does this) until the storage is next seen. Under FakeTensorMode the same accounting runs on fake storages (their `nbytes()` is
the real size), so a fake run gives the real run's numbers byte for byte when the op sequence is
the same.

Enter FakeTensorMode *before* the tracker (tracker on top of the mode stack), e.g.::

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        result = measure_training_step(model, make_batch, optimizer)
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

try:  # private torch API: guard it so a torch upgrade fails with a clear message
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
    from torch.utils._pytree import tree_leaves
except ImportError as exc:  # pragma: no cover - depends on the installed torch
    raise ImportError(
        "lora_planner.profiler.tracker needs torch's private dispatch-mode API "
        "(torch.utils._python_dispatch.TorchDispatchMode, torch.utils._pytree.tree_leaves), "
        f"which this torch ({torch.__version__}) does not provide; install torch>=2.1"
    ) from exc

try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover - depends on the installed torch
    _FakeTensor = None

__all__ = [
    "CATEGORY_KEYS",
    "LiveTensorTracker",
    "MemoryCategory",
    "Phase",
    "PeakRecord",
    "PhaseSnapshot",
    "StorageInfo",
    "hf_fake_parity",
    "StepMeasurement",
    "StepPeak",
    "measure_training_step",
]


class MemoryCategory(str, Enum):
    """Breakdown keys; `.value` is the planner's key string (`MemoryCategory.WEIGHTS == "weights"`)."""

    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    OPTIMIZER_STATES = "optimizer_states"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"


CATEGORY_KEYS: tuple[str, ...] = tuple(c.value for c in MemoryCategory)


class Phase:
    """Phase names used by `measure_training_step` (any string is accepted by `mark_phase`)."""

    SETUP = "setup"  # before the first step
    FORWARD = "forward"  # make_batch + forward + loss
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"
    ZERO_GRAD = "zero_grad"
    IDLE = "idle"  # between end_step() and the next begin_step()


# ----------------------------------------------------------------------------------------------
# results (frozen; breakdowns are plain dicts keyed by CATEGORY_KEYS, all keys always present)


@dataclass(frozen=True)
class PhaseSnapshot:
    """One phase of one step: its own peak, and what was live when it ended."""

    step: int
    phase: str
    peak_bytes: int
    peak_breakdown: dict[str, int]
    end_bytes: int
    end_breakdown: dict[str, int]
    peak_event: int  # tracker event numbers: pass to LiveTensorTracker.storages_live_at
    end_event: int


@dataclass(frozen=True)
class StepPeak:
    """One training step: the peak (when and of what) and the phase-by-phase snapshots."""

    step: int
    peak_bytes: int
    peak_phase: str
    peak_breakdown: dict[str, int]
    start_bytes: int
    end_bytes: int
    phases: tuple[PhaseSnapshot, ...]
    peak_event: int  # tracker event number of the peak: LiveTensorTracker.storages_live_at(it)

    def phase(self, name: str) -> PhaseSnapshot:
        """The last snapshot of phase `name` in this step."""
        for snap in reversed(self.phases):
            if snap.phase == name:
                return snap
        raise KeyError(f"phase {name!r} not in step {self.step}: {[p.phase for p in self.phases]}")


@dataclass(frozen=True)
class StorageInfo:
    """One storage live at some event (see `LiveTensorTracker.storages_live_at`)."""

    nbytes: int
    category: str
    created_step: int
    created_phase: str
    adopted: bool
    op: str  # the op whose output first showed it ("register", or the input-adopting op)
    shape: tuple[int, ...]  # shape and dtype of that first tensor
    dtype: str


@dataclass(frozen=True)
class PeakRecord:
    """The tracker's overall peak since it was created."""

    peak_bytes: int
    step: int
    phase: str
    breakdown: dict[str, int]


@dataclass(frozen=True)
class StepMeasurement:
    """`measure_training_step` result. Step 1 allocates optimizer state lazily, so it is reported
    apart from the steady state (the largest of steps 2..N)."""

    steps: tuple[StepPeak, ...]
    is_fake: bool
    param_bytes: int
    trainable_param_bytes: int
    buffer_bytes: int
    adopted_bytes: int  # storages first seen as op inputs (neither produced by an op nor registered)

    @property
    def first_step(self) -> StepPeak:
        return self.steps[0]

    @property
    def steady_state(self) -> StepPeak | None:
        """Largest-peak step among steps 2..N (None when only one step was run)."""
        rest = self.steps[1:]
        return max(rest, key=lambda s: s.peak_bytes) if rest else None

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.steps)

    @property
    def peak_step(self) -> StepPeak:
        return max(self.steps, key=lambda s: s.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peak_bytes"] = self.peak_bytes
        return out


# ----------------------------------------------------------------------------------------------
# tracker


class _Record:
    """One storage lifetime: live for alloc_seq <= t < free_seq (free_seq None: still live)."""

    __slots__ = (
        "adopted",
        "alloc_seq",
        "dtype",
        "op",
        "shape",
        "category",
        "finalizer",
        "free_seq",
        "key",
        "nbytes",
        "phase",
        "ref",
        "step",
        "survived_to_backward",
    )

    def __init__(self, key: int, nbytes: int, step: int, phase: str, ref: weakref.ref) -> None:
        self.key = key
        self.nbytes = nbytes
        self.step = step
        self.phase = phase
        self.ref = ref
        self.alloc_seq = 0
        self.free_seq: int | None = None
        self.category: MemoryCategory | None = None
        self.survived_to_backward = False
        self.adopted = False
        self.finalizer: weakref.finalize | None = None
        self.op: Any = None  # OpOverload, or a string; stringified lazily
        self.shape: Any = None
        self.dtype: Any = None


class _Mark:
    """A peak candidate / phase boundary: bytes at sequence number seq."""

    __slots__ = ("nbytes", "phase", "seq", "step")

    def __init__(self, nbytes: int, seq: int, phase: str, step: int) -> None:
        self.nbytes = nbytes
        self.seq = seq
        self.phase = phase
        self.step = step


class _PhaseMark:
    __slots__ = ("end_bytes", "end_seq", "peak", "phase", "step")

    def __init__(self, step: int, phase: str, peak: _Mark, end_bytes: int, end_seq: int) -> None:
        self.step = step
        self.phase = phase
        self.peak = peak
        self.end_bytes = end_bytes
        self.end_seq = end_seq


def _as_category(category: MemoryCategory | str) -> MemoryCategory:
    try:
        return MemoryCategory(category)
    except ValueError:
        raise ValueError(
            f"category: {category!r} is not a memory category; use one of {list(CATEGORY_KEYS)}"
        ) from None


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in a tensor, a module (params + buffers), a mapping, or any nested iterable."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (str, bytes)):
        return
    elif isinstance(obj, Iterable):
        for v in obj:
            yield from _iter_tensors(v)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """Untyped storages behind `t` (inner tensors of traceable wrapper subclasses included)."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        out: list[torch.UntypedStorage] = []
        for attr in attrs:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                out.extend(_storages(inner))
        return out
    try:
        return [t.untyped_storage()]
    except (NotImplementedError, RuntimeError):  # sparse / nested / storage-less tensors
        return []


_LIFT_OPS = frozenset(
    op
    for name in ("lift_fresh", "lift_fresh_copy", "lift")
    for op in [getattr(getattr(torch.ops.aten, name, None), "default", None)]
    if op is not None
)


class LiveTensorTracker(TorchDispatchMode):
    """Records every untyped storage produced by ops (or registered) and when it dies.

    Use as a context manager (a dispatch mode). Within it: `register(tensors, category)` for
    parameters, gradients, optimizer states or anything made outside the mode; `begin_step()`,
    `mark_phase(name)`, `end_step()` to delimit a step. `live_bytes`, `peak` and `live_breakdown()`
    can be read at any time.

    adopt_unknown_inputs: a storage first seen as an *input* of an op (created outside the mode,
    never registered) is adopted: counted as live from that moment (see `adopted_bytes`).
    """

    def __init__(
        self,
        *,
        adopt_unknown_inputs: bool = True,
        forward_phases: Iterable[str] = (Phase.FORWARD,),
        backward_phase: str = Phase.BACKWARD,
    ) -> None:
        super().__init__()
        self._adopt = adopt_unknown_inputs
        self._forward_phases = frozenset(forward_phases)
        self._backward_phase = backward_phase
        self._lock = threading.RLock()
        self._records: list[_Record] = []  # allocation order
        self._alloc_seqs: list[int] = []  # parallel to _records, for bisect
        self._live: dict[int, _Record] = {}  # StorageImpl address -> live record
        self._seq = 0
        self._live_bytes = 0
        self._step = 0
        self._phase = Phase.SETUP
        self._in_step = False
        self._peak = _Mark(0, 0, self._phase, 0)
        self._step_peak = _Mark(0, 0, self._phase, 0)
        self._step_start_bytes: dict[int, int] = {}
        self._step_peaks: dict[int, _Mark] = {}
        self._step_end_bytes: dict[int, int] = {}
        self._phase_peak = _Mark(0, 0, self._phase, 0)
        self._phase_marks: list[_PhaseMark] = []
        self.adopted_bytes = 0
        self.adopted_storages = 0

    # ---- dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        # torch.tensor(...) builds its tensor below the modes and hands it to lift_fresh: that is
        # an allocation, not an adoption (the output is tracked as new below)
        if self._adopt and func not in _LIFT_OPS:
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor):
                    self._track(a, None, adopt=True, op=func)
        out = func(*args, **kwargs)
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._track(o, None, op=func)
        return out

    # ---- bookkeeping ------------------------------------------------------------------------

    def _track(
        self, t: torch.Tensor, category: MemoryCategory | None, adopt: bool = False, op: Any = "register"
    ) -> None:
        for st in _storages(t):
            key = st._cdata
            with self._lock:
                rec = self._live.get(key)
                if rec is not None and rec.ref() is not st:
                    self._free(rec)  # stale entry: the address was reused before the finalizer ran
                    rec = None
                if rec is not None and rec.nbytes != st.nbytes():
                    # storage resized in place (resize_ / out= ops): close the old lifetime, reopen
                    old = rec
                    self._free(old)
                    rec = self._new_record(st, key, t, op)
                    rec.category = old.category
                    rec.survived_to_backward = old.survived_to_backward
                if rec is None:
                    rec = self._new_record(st, key, t, op)
                    if adopt:
                        rec.adopted = True
                        self.adopted_bytes += rec.nbytes
                        self.adopted_storages += 1
                if category is not None:
                    rec.category = category
                self._bump_peak()

    def _new_record(self, st: torch.UntypedStorage, key: int, t: torch.Tensor, op: Any) -> _Record:
        # create every Python object first (a GC pass may run finalizers), then update counters
        rec = _Record(key, int(st.nbytes()), self._step, self._phase, weakref.ref(st))
        rec.op = op
        rec.shape = t.shape
        rec.dtype = t.dtype
        fin = weakref.finalize(st, self._on_finalize, rec)
        fin.atexit = False
        rec.finalizer = fin
        self._seq += 1
        rec.alloc_seq = self._seq
        self._records.append(rec)
        self._alloc_seqs.append(rec.alloc_seq)
        self._live[key] = rec
        self._live_bytes += rec.nbytes
        return rec

    def _on_finalize(self, rec: _Record) -> None:
        with self._lock:
            self._free(rec)

    def _free(self, rec: _Record) -> None:
        if rec.free_seq is not None:
            return
        if rec.finalizer is not None:
            rec.finalizer.detach()
        self._seq += 1
        rec.free_seq = self._seq
        self._live_bytes -= rec.nbytes
        if self._live.get(rec.key) is rec:
            del self._live[rec.key]

    def _bump_peak(self) -> None:
        b = self._live_bytes
        if b > self._phase_peak.nbytes:
            self._phase_peak = _Mark(b, self._seq, self._phase, self._step)
        if b > self._step_peak.nbytes:
            self._step_peak = _Mark(b, self._seq, self._phase, self._step)
        if b > self._peak.nbytes:
            self._peak = _Mark(b, self._seq, self._phase, self._step)

    def _classify(self, rec: _Record) -> MemoryCategory:
        if rec.category is not None:
            return rec.category
        if rec.survived_to_backward:
            return MemoryCategory.ACTIVATIONS
        return MemoryCategory.TEMPORARIES

    # ---- public API ---------------------------------------------------------------------------

    def register(self, tensors: Any, category: MemoryCategory | str) -> None:
        """Label the storages of `tensors` (a tensor, module, mapping or nested iterable of
        tensors) as `category`; storages not seen before (made outside the mode) start being
        tracked now. A storage keeps its latest registered category for its whole lifetime."""
        cat = _as_category(category)
        for t in _iter_tensors(tensors):
            self._track(t, cat)

    def mark_phase(self, name: str) -> None:
        """End the current phase (recording its peak and end snapshot) and start phase `name`.
        Entering the backward phase turns the still-live, unregistered storages created in a
        forward phase into activations."""
        with self._lock:
            self._close_phase()
            if name == self._backward_phase:
                for rec in self._live.values():
                    if rec.phase in self._forward_phases:
                        rec.survived_to_backward = True
            self._open_phase(name)

    def begin_step(self, phase: str = Phase.FORWARD) -> None:
        """Start a new step (numbered from 1) whose first phase is `phase`."""
        with self._lock:
            if self._in_step:
                raise RuntimeError("begin_step: the previous step was not ended; call end_step()")
            self._close_phase()
            self._step += 1
            self._in_step = True
            self._step_start_bytes[self._step] = self._live_bytes
            self._step_peak = _Mark(self._live_bytes, self._seq, phase, self._step)
            self._open_phase(phase)

    def end_step(self) -> StepPeak:
        """Close the current step and return its peak and phase snapshots (categories resolved
        with everything registered so far)."""
        with self._lock:
            if not self._in_step:
                raise RuntimeError("end_step: no step in progress; call begin_step() first")
            self._close_phase()
            self._in_step = False
            self._step_peaks[self._step] = self._step_peak
            self._step_end_bytes[self._step] = self._live_bytes
            self._open_phase(Phase.IDLE)
        return self.step_result(self._step)

    def step_result(self, step: int) -> StepPeak:
        """(Re-)resolve finished step `step`'s snapshots with the categories known now."""
        if step not in self._step_peaks:
            raise KeyError(f"step {step} is not a finished step; finished: {sorted(self._step_peaks)}")
        marks = [m for m in self._phase_marks if m.step == step]
        peak = self._step_peaks[step]
        phases = tuple(
            PhaseSnapshot(
                step=step,
                phase=m.phase,
                peak_bytes=m.peak.nbytes,
                peak_breakdown=self.breakdown_at(m.peak.seq),
                end_bytes=m.end_bytes,
                end_breakdown=self.breakdown_at(m.end_seq),
                peak_event=m.peak.seq,
                end_event=m.end_seq,
            )
            for m in marks
        )
        return StepPeak(
            step=step,
            peak_bytes=peak.nbytes,
            peak_phase=peak.phase,
            peak_breakdown=self.breakdown_at(peak.seq),
            start_bytes=self._step_start_bytes[step],
            end_bytes=self._step_end_bytes[step],
            phases=phases,
            peak_event=peak.seq,
        )

    def breakdown_at(self, event: int) -> dict[str, int]:
        """Live bytes per category at event number `event`, with the categories known now."""
        out = dict.fromkeys(CATEGORY_KEYS, 0)
        with self._lock:
            n = bisect.bisect_right(self._alloc_seqs, event)
            for rec in self._records[:n]:
                if rec.free_seq is None or rec.free_seq > event:
                    out[self._classify(rec).value] += rec.nbytes
        return out

    def storages_live_at(self, event: int) -> list[StorageInfo]:
        """Every storage live at event number `event` (e.g. `StepPeak.peak_event`), largest first."""
        with self._lock:
            n = bisect.bisect_right(self._alloc_seqs, event)
            live = [r for r in self._records[:n] if r.free_seq is None or r.free_seq > event]
            out = [
                StorageInfo(
                    nbytes=r.nbytes,
                    category=self._classify(r).value,
                    created_step=r.step,
                    created_phase=r.phase,
                    adopted=r.adopted,
                    op=str(r.op),
                    shape=tuple(int(d) for d in r.shape),
                    dtype=str(r.dtype).removeprefix("torch."),
                )
                for r in live
            ]
        return sorted(out, key=lambda i: -i.nbytes)

    def live_breakdown(self) -> dict[str, int]:
        """Live bytes per category now."""
        with self._lock:
            out = dict.fromkeys(CATEGORY_KEYS, 0)
            for rec in self._live.values():
                out[self._classify(rec).value] += rec.nbytes
            return out

    @property
    def live_bytes(self) -> int:
        return self._live_bytes

    @property
    def peak_bytes(self) -> int:
        return self._peak.nbytes

    @property
    def peak(self) -> PeakRecord:
        p = self._peak
        return PeakRecord(p.nbytes, p.step, p.phase, self.breakdown_at(p.seq))

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def step(self) -> int:
        return self._step

    def detach(self) -> None:
        """Stop listening for frees of still-live storages (lets the tracker be collected while
        the model lives on). Live counts are frozen from here on."""
        with self._lock:
            for rec in self._live.values():
                if rec.finalizer is not None:
                    rec.finalizer.detach()
                    rec.finalizer = None

    # ---- phases ---------------------------------------------------------------------------------

    def _close_phase(self) -> None:
        self._phase_marks.append(
            _PhaseMark(self._step, self._phase, self._phase_peak, self._live_bytes, self._seq)
        )

    def _open_phase(self, name: str) -> None:
        self._phase = name
        self._phase_peak = _Mark(self._live_bytes, self._seq, name, self._step)


# ----------------------------------------------------------------------------------------------
# one training step, measured


def _compute_loss(model: torch.nn.Module, batch: Any, loss_fn: Callable[..., Any] | None) -> torch.Tensor:
    # a helper so that the model output (e.g. the logits) dies on return, as in a Trainer loop
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if isinstance(batch, Mapping):
            out = model(**batch)
        elif isinstance(batch, (tuple, list)):
            out = model(*batch)
        else:
            out = model(batch)
        if isinstance(out, torch.Tensor):
            loss = out
        elif isinstance(out, Mapping) and "loss" in out:
            loss = out["loss"]
        else:
            loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss: the model output has no scalar `.loss` (pass labels in the batch) and no "
            "loss_fn was given; pass loss_fn=lambda model, batch: <scalar tensor>"
        )
    return loss


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in _iter_tensors(state)]


def _quant_state_tensors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' quantized weights that are neither parameters nor buffers: an 8-bit weight's
    row scales (`Int8Params.SCB`, moved to its module's state by the first forward); each
    `Params4bit.quant_state`'s `absmax`, NF4 `code` book and `offset`, and its nested (double-quantization)
    state's `absmax` and `code` (bitsandbytes `functional.QuantState`, made by `quantize_4bit`). They are part of
    the weight for as long as the model lives; unregistered, the ones an op reads would be adopted in the first
    forward (and counted as activations) and the code book, which no op reads, not at all."""
    out: list[torch.Tensor] = []
    for p in params:
        scale = getattr(p, "SCB", None)  # LLM.int8's `Int8Params`: the fp32 scale of each output row
        if isinstance(scale, torch.Tensor):
            out.append(scale)
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [t for t in (getattr(state, name, None) for name in ("absmax", "code", "offset"))
                    if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return out


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        for st in _storages(t):
            seen[st._cdata] = int(st.nbytes())
    return sum(seen.values())


def measure_training_step(
    model: torch.nn.Module,
    make_batch: Callable[[], Any],
    optimizer: torch.optim.Optimizer,
    steps: int = 3,
    *,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    set_to_none: bool = True,
    tracker: LiveTensorTracker | None = None,
) -> StepMeasurement:
    """Run `steps` training steps under a `LiveTensorTracker` and report each step's peak.

    A step is: phase "forward" (batch = make_batch(); loss = model(**batch).loss, or
    loss_fn(model, batch); the model output is dropped once the loss is taken), phase "backward"
    (loss.backward(); the loss is dropped; every p.grad is registered as gradients), phase
    "optimizer_step" (optimizer.step(); every tensor in optimizer.state is registered as
    optimizer_states), phase "zero_grad" (optimizer.zero_grad(set_to_none)); the batch lives until
    the step ends. Parameters, buffers and bitsandbytes' quantization states
    (`_quant_state_tensors`) are registered as weights before step 1. The batch is
    classified like any forward-made storage (activations, since it outlives the forward).

    Works the same under FakeTensorMode (enter it first, then call this).
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}; pass steps=3")
    own_tracker = tracker is None
    tr = LiveTensorTracker() if tracker is None else tracker
    params: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            params.setdefault(id(p), p)
    plist = list(params.values())
    buffers = list(model.buffers())
    is_fake = _FakeTensor is not None and any(isinstance(p, _FakeTensor) for p in plist)
    results: list[StepPeak] = []
    with tr:
        tr.register(plist, MemoryCategory.WEIGHTS)
        tr.register(buffers, MemoryCategory.WEIGHTS)
        tr.register(_quant_state_tensors(plist), MemoryCategory.WEIGHTS)
        tr.register([p.grad for p in plist if p.grad is not None], MemoryCategory.GRADIENTS)
        tr.register(_optimizer_state_tensors(optimizer), MemoryCategory.OPTIMIZER_STATES)
        for _ in range(steps):
            tr.begin_step(Phase.FORWARD)
            batch = make_batch()
            loss = _compute_loss(model, batch, loss_fn)
            tr.mark_phase(Phase.BACKWARD)
            loss.backward()
            del loss
            tr.register([p.grad for p in plist if p.grad is not None], MemoryCategory.GRADIENTS)
            tr.mark_phase(Phase.OPTIMIZER_STEP)
            optimizer.step()
            tr.register(_optimizer_state_tensors(optimizer), MemoryCategory.OPTIMIZER_STATES)
            # A parameter whose storage the step replaced (bitsandbytes' `Linear4bit.forward` casts its bias for
            # good: `bias.data = bias.data.to(x.dtype)`) is still a weight, for the new storage's whole life.
            tr.register(plist, MemoryCategory.WEIGHTS)
            tr.mark_phase(Phase.ZERO_GRAD)
            optimizer.zero_grad(set_to_none=set_to_none)
            del batch
            results.append(tr.end_step())
    if own_tracker:
        tr.detach()
    return StepMeasurement(
        steps=tuple(results),
        is_fake=is_fake,
        param_bytes=_storage_bytes(plist),
        trainable_param_bytes=_storage_bytes(p for p in plist if p.requires_grad),
        buffer_bytes=_storage_bytes(buffers),
        adopted_bytes=tr.adopted_bytes,
    )


# ----------------------------------------------------------------------------------------------
# FakeTensorMode parity for Hugging Face models


@contextlib.contextmanager
def hf_fake_parity() -> Iterator[None]:
    """Make a transformers model take, on FakeTensors, the branch it takes on real unpacked batches.

    transformers treats FakeTensors as "tracing" and then skips its data-dependent checks: with no
    attention_mask it cannot see that the position ids hold one sequence per row, so it builds a
    packed-sequence mask and a materialised 4-D attention mask (and SDPA then repeats k/v), which
    a real run of the same batch does not. Inside this context, `find_packed_sequence_indices`
    answers "not packed" for FakeTensors (the real answer for ordinary, unpacked batches), so a
    fake run replays the real op sequence. No-op when transformers is not installed.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None or _FakeTensor is None:
        yield
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        result = orig(position_ids)
        return None if isinstance(position_ids, _FakeTensor) else result

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig

"""A training step's peak as PyTorch's CPU allocator reports it, with no dispatch mode in the way.

Why a second instrument beside the exact tracker (`lora_planner.profiler.tracker`): any `TorchDispatchMode` changes
one thing autograd does. When several gradients flow into one tensor, the engine sums them in its input buffer
(`torch/csrc/autograd/input_buffer.cpp`, `accumulate`): in place into the first one (`old.add_(new)`) when
`can_accumulate_inplace` holds, else out of place (`old + new`, a third buffer). `can_accumulate_inplace` asks
`!at::isTensorSubclassLike(v)`, and `isTensorSubclassLike` (`aten/src/ATen/TensorSubclassLikeUtils.h`) is true for
every tensor while a Python dispatch mode is on (`c10::impl::dispatch_mode_enabled()`). So under the tracker (or
FakeTensorMode) every accumulation is out of place. Where the accumulated tensor is small (the residual stream,
T x H) this decides no peak on any run we measured; where it is a whole parameter (the eager experts loop selects
`gate_up_proj[e]` once per expert, so each expert's `SelectBackward` writes a full (E, 2I, H) gradient into the
stack's buffer) the tracker reports a stack more than the real run holds (`tests/profiler/test_allocator.py`).

This instrument runs one step with `torch.profiler.profile(profile_memory=True)` and no mode: the CPU allocator's
reporter (`c10/core/CPUAllocator.cpp`, `ProfiledCPUMemoryReporter`) posts every allocation and free made while
profiling with its running total (`total_allocated`); the peak above the step's start is the largest total minus
the total before the first event. It counts what the allocator hands out, so it also sees scratch a kernel allocates
internally (the tracker does not) and nothing of storages that were alive before the step (their frees are not
reported: a step frees none of them with `zero_grad(set_to_none=True)` and in-place optimizer states).

Known limitations: CPU only (CUDA runs read the CUDA allocator's own counters, `runner.measure_cuda`); no categories
or phases (the tracker's pass gives those); `torch.profiler` is imported lazily and its event tree
(`kineto_results.experimental_event_tree`) is a private API, guarded below.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["allocator_peak_above_start"]


def allocator_peak_above_start(step: Callable[[], Any]) -> int:
    """Bytes the CPU allocator held above what it held when `step` began, at the step's highest point (0 when the
    step allocated nothing). `step` runs once, outside any dispatch mode."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError as exc:  # pragma: no cover - depends on the installed torch
        raise ImportError(f"the allocator check needs torch.profiler's event tree, which torch {torch.__version__} "
                          "does not provide") from exc
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # kineto prints a "profiler_start" / "profiler_stop" line to fd 2 on each
        prof.start()
    try:
        step()
    finally:
        with _stderr_silenced():
            prof.stop()
    events = [(node.start_time_ns, node.typed[1]) for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu"]
    return peak_above_start([(a.alloc_size, a.total_allocated) for _, a in sorted(events, key=lambda e: e[0])])


def peak_above_start(events: Iterable[tuple[int, int]]) -> int:
    """`events`: (alloc_size, total_allocated after it) in time order; negative sizes are frees. Each total is the
    reporter's own running count (taken under its lock), so the peak is the largest total less the total before the
    first event, and the order of events in between does not matter."""
    events = list(events)
    if not events:
        return 0
    start = events[0][1] - events[0][0]
    return max(0, max(total for _, total in events) - start)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at the null device for the block (C++ writes bypass `sys.stderr`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _walk(nodes: Iterable[Any]) -> Iterable[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)

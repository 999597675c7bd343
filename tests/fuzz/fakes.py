"""What the fuzz suite puts in place of the expensive or dangerous parts of a run (`patched()`):

- the profiler's measurement: `lora_planner.profiler.runner.MEASURE[mode]` and `measure_ranks` become
  `FakeMeasure`, which answers at once (no torch model is built) with a measurement consistent with itself,
  or raises an out-of-memory / other error when the case asks for it; `run_profile`'s validation, the
  record it builds and `append_record` stay real;
- `torch.set_num_threads`: a value no machine has (> `MAX_SANE_THREADS`) raises `InterpreterCrash`, as
  torch would crash the interpreter (100,000 segfaults at exit on torch 2.13); smaller values are only
  recorded, so no case changes the thread count of the test process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .checks import InterpreterCrash

MAX_SANE_THREADS = 4096
MIB = 2**20


class FakeMeasure:
    def __init__(self) -> None:
        self.behaviour = "ok"  # ok | oom | error
        self.calls = 0

    def __call__(self, request: Any) -> Any:
        import torch

        from lora_planner.profiler.runner import Measurement

        self.calls += 1
        if self.behaviour == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        if self.behaviour == "error":
            raise RuntimeError("fake failure")
        peak = (1 + len(request.key) % 7) * MIB
        breakdown = {"weights": peak // 2, "gradients": 0, "optimizer_states": 0, "activations": peak - peak // 2,
                     "temporaries": 0}
        return Measurement(peak_bytes=peak, peak_phase="backward", breakdown_bytes=breakdown, step1_peak_bytes=peak,
                           steady_peak_bytes=peak if request.steps > 1 else None,
                           step_times_s=(0.01,) * request.steps)


class ThreadGuard:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.asked: list[Any] = []

    def __call__(self, n: Any) -> None:
        self.asked.append(n)
        if isinstance(n, int) and not isinstance(n, bool) and MAX_SANE_THREADS < n < 2**63:
            raise InterpreterCrash(f"torch.set_num_threads({n}) would crash the interpreter")
        if not isinstance(n, int) or n < 1 or n >= 2**63:
            self.real(n)  # what torch says about it (an exception the CLI must not let escape)


@contextlib.contextmanager
def patched(behaviour: str = "ok") -> Iterator[FakeMeasure]:
    import torch

    from lora_planner.profiler import runner

    fake = FakeMeasure()
    fake.behaviour = behaviour
    saved_measure = dict(runner.MEASURE)
    saved_ranks = runner.measure_ranks
    saved_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    runner.MEASURE.update({mode: fake for mode in runner.MEASURE})
    runner.measure_ranks = fake
    torch.set_num_threads = ThreadGuard(saved_threads)
    try:  # `lora-plan serve` parses its options and returns instead of serving
        from lora_planner.web import app
        saved_serve = app.serve
        app.serve = lambda host, port, open_browser: None
    except ImportError:  # no web extra: serve answers its one-line error
        app = None
    try:
        yield fake
    finally:
        if app is not None:
            app.serve = saved_serve
        runner.MEASURE.clear()
        runner.MEASURE.update(saved_measure)
        runner.measure_ranks = saved_ranks
        torch.set_num_threads = saved_threads
        saved_threads(threads)

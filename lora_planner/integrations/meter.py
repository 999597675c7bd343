"""Predicted vs measured on the user's own run: the phase meter every integration drives (issue 14).

A run's step is cut into the planner's three coarse phases, by events the integrations raise:

    forward_begin(batch) -> forward_end() -> optimizer_begin() -> optimizer_end()
    [forward ............] [backward ......] [optimizer_step ..]

At each boundary the device's counters are read and reset (`torch.cuda.max_memory_allocated` /
`max_memory_reserved` since the last `reset_peak_memory_stats`, after a `synchronize`), so each phase has its own
peak; gradient accumulation runs several forward / backward pairs per step, and each phase keeps its largest. The
counters are a seam (`Counters`): `TorchCudaCounters` on a GPU, `TrackerCounters` (the profiler's exact live-tensor
tracker standing in for the allocator) on CPU, which is how the tests run a real `Trainer` without a GPU.

At train start the meter builds the plan from the live model and arguments (`integrations.live`), prints it, and
warns when the predicted peak on the device exceeds the device's memory; at the first batch it plans again at the
batch's real shape. After step `steps` (k) it prints predicted vs measured per phase, appends one record in the
profiler's JSONL schema (`profiler.runner.base_record` + `measured`, `mode` "cuda" or "cpu", `source`
"integration") so `lora-plan calibrate` / `report` read it like a profile run, and removes its hooks: nothing runs
after step k. Any error inside the meter becomes one warning and switches it off; it never raises into training.

What "measured" is here: the allocator's peak of everything on the device, the model included (no baseline is
subtracted: a user's run has no "before the model" moment), so another model on the same device (a reference model,
an evaluation copy) is measured too; the planner counts one model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, Protocol

PHASES = ("forward", "backward", "optimizer_step")
# the planner's phases -> the coarse phases the meter measures (profiler.runner.COARSE_PHASE's grouping)
COARSE = {"forward_start": "forward", "forward_end": "forward", "backward_start": "backward",
          "backward_layers": "backward", "backward_end": "backward", "optimizer_step": "optimizer_step"}
GIB = 2**30


class Counters(Protocol):
    """The slice of `torch.cuda` the meter reads (`profiler.runner.CudaApi` plus the device's size)."""

    device: str

    def synchronize(self) -> None: ...
    def reset_peak_memory_stats(self) -> None: ...
    def max_memory_allocated(self) -> int: ...
    def max_memory_reserved(self) -> int: ...
    def total_memory(self) -> int | None: ...


class TorchCudaCounters:
    """The real counters of the current CUDA device."""

    device = "cuda"

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda

    def synchronize(self) -> None:
        self._cuda.synchronize()

    def reset_peak_memory_stats(self) -> None:
        self._cuda.reset_peak_memory_stats()

    def max_memory_allocated(self) -> int:
        return self._cuda.max_memory_allocated()

    def max_memory_reserved(self) -> int:
        return self._cuda.max_memory_reserved()

    def total_memory(self) -> int | None:
        return self._cuda.get_device_properties(self._cuda.current_device()).total_memory


def default_counters() -> Counters | None:
    """The CUDA device's counters, or None where there is no GPU (the meter then only prints the plan)."""
    import torch

    return TorchCudaCounters() if torch.cuda.is_available() else None


def gib(n: int | float) -> str:
    """Bytes with a binary unit: GiB from 1 GiB, MiB below (a tiny test model still reads in numbers)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.2f} MiB"


class PhaseMeter:
    """See the module docstring. `out`: the JSONL file the record is appended to (None: printed only); `log`: where
    the lines go (stderr by default)."""

    def __init__(self, counters: Counters | None = None, steps: int = 3, out: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.counters = counters if counters is not None else default_counters()
        self.steps, self.out = steps, out
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.setup = None  # integrations.live.LiveSetup
        self.training = None  # the TrainingSpec at the batch's shape
        self.done = False
        self.measured: list[dict[str, int]] = []  # per step: phase -> peak bytes
        self.reserved: list[int] = []
        self.record: dict[str, Any] | None = None
        self._phase: str | None = None
        self._step: dict[str, int] | None = None
        self._reserved = 0  # the open step's largest reserved bytes
        self._handles: list[Any] = []

    # ---- events ---------------------------------------------------------------------------------------------

    def start(self, model: Any, args: Any = None) -> None:
        """Train start: plan from the live model and arguments, print it, warn if it cannot fit the device."""
        with self._guard("planning the run"):
            from lora_planner.integrations.live import live_setup

            device = self.counters.device if self.counters is not None else "cuda"
            self.setup = live_setup(model, args, device)
            assumed = "" if "seq_len" in self.setup.settings else \
                f"; {self.setup.training.seq_len:,} tokens assumed until the first batch"
            self._announce(self.setup.training, "the arguments' batch" + assumed)
            if self.counters is None:
                self.log("lora-plan: no GPU: the plan is printed, nothing is measured")
                self.close()

    def watch(self, model: Any) -> None:
        """Install the forward hooks that raise forward_begin / forward_end (removed after step k)."""
        with self._guard("installing hooks"):
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(lambda *_: self.forward_end()))

    def watch_optimizer(self, optimizer: Any) -> None:
        """Install optimizer step hooks (plain loops) that raise optimizer_begin / optimizer_end."""
        with self._guard("installing hooks"):
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.optimizer_begin()))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.optimizer_end()))

    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        batch = kwargs if kwargs.get("input_ids") is not None else (
            args[0] if args and hasattr(args[0], "get") else {"input_ids": args[0] if args else None})
        self.forward_begin(batch)

    def forward_begin(self, batch: Any = None) -> None:
        if self.done or self.setup is None:
            return
        with self._guard("reading the counters"):
            if self._step is None:
                self._step = dict.fromkeys(PHASES, 0)
                if self.training is None and batch is not None:
                    self.training = self.setup.at_batch(batch)
                    if self.training != self.setup.training:
                        self._announce(self.training, "the first batch")
                self.counters.synchronize()
                self.counters.reset_peak_memory_stats()
            self._switch("forward")

    def forward_end(self) -> None:
        if not self.done and self._step is not None:
            with self._guard("reading the counters"):
                self._switch("backward")

    def optimizer_begin(self) -> None:
        if not self.done and self._step is not None:
            with self._guard("reading the counters"):
                self._switch("optimizer_step")

    def optimizer_end(self) -> None:
        if self.done or self._step is None:
            return
        with self._guard("reading the counters"):
            self._switch(None)
            self.measured.append(self._step)
            self.reserved.append(self._reserved)
            self._step, self._reserved = None, 0
            if len(self.measured) >= self.steps:
                self._finish()

    # ---- internals ------------------------------------------------------------------------------------------

    def _switch(self, phase: str | None) -> None:
        """Close the open phase (its peak since the last reset), open `phase`."""
        c = self.counters
        if self._phase is not None:
            c.synchronize()
            self._step[self._phase] = max(self._step[self._phase], c.max_memory_allocated())
            self._reserved = max(self._reserved, c.max_memory_reserved())
        c.reset_peak_memory_stats()
        self._phase = phase

    def _announce(self, training: Any, shape: str) -> None:
        from lora_planner.memory import estimate_memory

        est = estimate_memory(self.setup.spec, training)
        t = training
        line = (f"lora-plan: {self.setup.label} {t.method}, batch {t.batch_size} x {t.seq_len} tokens ({shape}): "
                f"predicted peak {gib(est.peak_allocated_bytes)} allocated at {est.peak_phase}, "
                f"{gib(est.peak_device_bytes)} on the device")
        total = self.counters.total_memory() if self.counters is not None else None
        self.log(line + (f" of {gib(total)}" if total else ""))
        if self.setup.not_modelled:
            self.log("lora-plan: not modelled: " + "; ".join(self.setup.not_modelled))
        if total and est.peak_device_bytes > total:
            warnings.warn(f"lora-plan: the predicted peak ({gib(est.peak_device_bytes)}) exceeds this device's "
                          f"{gib(total)}: the first step is likely to run out of memory "
                          "(`lora-plan --from` your config with --gpu shows the smallest edit that fits)", stacklevel=3)

    def predicted_phases(self) -> dict[str, int]:
        from lora_planner.memory import estimate_memory

        est = estimate_memory(self.setup.spec, self.training or self.setup.training)
        out = dict.fromkeys(PHASES, 0)
        for p in est.phases:
            out[COARSE[p.phase]] = max(out[COARSE[p.phase]], p.breakdown.total_bytes)
        return out

    def _finish(self) -> None:
        from lora_planner.profiler.records import append_record, check_record
        from lora_planner.profiler.runner import ProfileRequest, base_record

        self.close()
        t = self.training or self.setup.training
        mode = "cuda" if self.counters.device == "cuda" else "cpu"
        record = base_record(ProfileRequest(self.setup.label, self.setup.spec, t, backend="hf", mode=mode,
                                            steps=self.steps))
        peaks = [max(step.values()) for step in self.measured]
        last = self.measured[-1]
        peak = max(peaks)
        phase = max(PHASES, key=lambda name: max(step[name] for step in self.measured))
        record.update(status="ok", source="integration", measured={
            "peak_bytes": peak, "peak_phase": phase, "breakdown_bytes": None, "step1_peak_bytes": peaks[0],
            "steady_peak_bytes": max(peaks[1:]) if len(peaks) > 1 else None,
            "reserved_peak_bytes": max(self.reserved),
            "phases": {name: {"peak_bytes": last[name]} for name in PHASES}},
            relative_error=record["predicted"]["peak_bytes"] / peak - 1,
            not_modelled=list(self.setup.not_modelled))
        reason = check_record(record)
        if reason:
            raise ValueError(f"the record does not validate ({reason})")
        self.record = record
        predicted = self.predicted_phases()
        self.log(f"lora-plan: predicted vs measured, {self.setup.label} {t.method}, batch {t.batch_size} x "
                 f"{t.seq_len} ({mode}, step {len(self.measured)} of {self.steps}):")
        for name in PHASES:
            p, m = predicted[name], last[name]
            self.log(f"  {name:<15} predicted {gib(p):>11}  measured {gib(m):>11}  "
                     f"{(p / m - 1) * 100 if m else 0:+.2f} %")
        self.log(f"  {'peak':<15} predicted {gib(record['predicted']['peak_bytes']):>11}  measured {gib(peak):>11}  "
                 f"{record['relative_error'] * 100:+.2f} %  (reserved {gib(max(self.reserved))})")
        if self.out:
            append_record(self.out, record)
            self.log(f"lora-plan: record appended to {self.out} (lora-plan calibrate --runs {self.out})")

    def close(self) -> None:
        """Remove every hook; the meter does nothing from here on."""
        self.done = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _guard(self, what: str) -> Any:
        return _Guard(self, what)


class _Guard:
    """Any error inside the meter: one warning, the meter switched off, training goes on."""

    def __init__(self, meter: PhaseMeter, what: str) -> None:
        self.meter, self.what = meter, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        self.meter.close()
        warnings.warn(f"lora-plan: stopped {self.what}: {type(err).__name__}: {str(err)[:300]} (training goes on; "
                      "nothing more is measured)", stacklevel=3)
        return True

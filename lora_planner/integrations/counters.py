"""The exact CPU tracker standing in for the CUDA allocator's counters (`integrations.meter.Counters`).

`TrackerCounters` is the profiler's `LiveTensorTracker` (a dispatch mode that sees every storage an op makes and
frees) with the four counters the meter reads: `memory_allocated` is the live bytes, `max_memory_allocated` the
peak since the last `reset_peak_memory_stats`, `max_memory_reserved` the same (no caching allocator), and
`synchronize` does nothing. Enter it around training, after `register_model(model)` (weights made before the mode
are otherwise counted only when an op first reads them, as the tracker adopts unknown inputs). The tests drive a
real `transformers.Trainer`, TRL's `SFTTrainer`, Lightning and a plain loop through it on CPU, so what the meter
does with the numbers is checked without a GPU.
"""

from __future__ import annotations

from typing import Any

from lora_planner.profiler.tracker import LiveTensorTracker


class TrackerCounters(LiveTensorTracker):
    device = "cpu"

    def __init__(self, total_memory_bytes: int | None = None) -> None:
        super().__init__()
        self.total_memory_bytes = total_memory_bytes
        self._since_reset = 0

    def _bump_peak(self) -> None:
        super()._bump_peak()
        self._since_reset = max(self._since_reset, self.live_bytes)

    def register_model(self, model: Any) -> None:
        """Count the model's parameters and buffers from now on, as the device counts them from their allocation."""
        self.register(list(model.parameters()) + list(model.buffers()), "weights")

    def synchronize(self) -> None:
        return None

    def reset_peak_memory_stats(self) -> None:
        self._since_reset = self.live_bytes

    def memory_allocated(self) -> int:
        return self.live_bytes

    def max_memory_allocated(self) -> int:
        return max(self._since_reset, self.live_bytes)

    def max_memory_reserved(self) -> int:
        return self.max_memory_allocated()

    def total_memory(self) -> int | None:
        return self.total_memory_bytes

"""`PhaseMeter` (`lora_planner.integrations.meter`) with scripted counters: each phase's peak is the counter read at
its end, gradient accumulation keeps each phase's largest, the step's reserved peak is kept across resets, and the
units read."""

from __future__ import annotations

import pytest

from lora_planner.integrations.meter import PhaseMeter, gib


class Scripted:
    """Counters whose max_memory_allocated returns the next scripted value; reserved = allocated + 100."""

    device = "cpu"

    def __init__(self, values):
        self.values, self.resets = list(values), 0
        self.last = 0

    def synchronize(self):
        return None

    def reset_peak_memory_stats(self):
        self.resets += 1

    def max_memory_allocated(self):
        self.last = self.values.pop(0)
        return self.last

    def max_memory_reserved(self):
        return self.last + 100

    def total_memory(self):
        return None


class _Setup:
    training = None

    def at_batch(self, batch):
        return None


def test_phases_and_accumulation_by_hand():
    """Two micro-batches (forward 10 then 30, backward 20 then 25), then the optimizer (5): forward 30, backward 25,
    optimizer 5; reserved is the step's largest reading + 100."""
    meter = PhaseMeter(Scripted([10, 20, 30, 25, 5]), steps=2, log=lambda line: None)
    meter.setup = _Setup()
    meter.forward_begin()
    meter.forward_end()      # closes forward: 10
    meter.forward_begin()    # closes backward: 20
    meter.forward_end()      # closes forward: 30
    meter.optimizer_begin()  # closes backward: 25
    meter.optimizer_end()    # closes the optimizer: 5
    assert meter.measured == [{"forward": 30, "backward": 25, "optimizer_step": 5}] and meter.reserved == [130]
    assert not meter.done  # step 2 of 2 still to come


def test_events_before_the_plan_do_nothing():
    meter = PhaseMeter(Scripted([]), steps=1, log=lambda line: None)
    meter.forward_begin()
    meter.forward_end()
    meter.optimizer_end()
    assert meter.measured == []


@pytest.mark.parametrize("n, text", [(0, "0.00 MiB"), (1536 * 1024, "1.50 MiB"), (3 * 2**30, "3.00 GiB")])
def test_units(n, text):
    assert gib(n) == text


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps"):
        PhaseMeter(Scripted([]), steps=0)

"""`plan_check`: the phase meter (`integrations.meter`) around a plain PyTorch loop. The model's forward hooks and the
optimizer's step hooks (`Optimizer.register_step_pre_hook` / `register_step_post_hook`) raise the events, so the
loop itself does not change:

    with plan_check(model, optimizer, steps=3, out="runs.jsonl"):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

`args` (optional) is anything with the Trainer's field names (`TrainingArguments`, a dict): its batch size, optimizer
name, checkpointing flags. The shape is read off each batch's `input_ids`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lora_planner.integrations.meter import Counters, PhaseMeter


@contextlib.contextmanager
def plan_check(model: Any, optimizer: Any, args: Any = None, steps: int = 3, out: str | None = None,
               counters: Counters | None = None, log: Any = None) -> Iterator[PhaseMeter]:
    meter = PhaseMeter(counters, steps, out, log)
    if isinstance(args, dict):
        args = _Args(args)
    meter.start(model, args)
    if not meter.done:
        meter.watch(model)
        meter.watch_optimizer(optimizer)
    try:
        yield meter
    finally:
        meter.close()


class _Args:
    """A dict of the Trainer's fields, read as `TrainingArguments` are (`to_dict`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = dict(data)
        self.bf16, self.fp16 = bool(data.get("bf16")), bool(data.get("fp16"))

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

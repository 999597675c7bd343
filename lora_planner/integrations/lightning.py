"""`LoraPlanLightningCallback`: the phase meter (`integrations.meter`) as a Lightning `Callback`. Lightning 2.x calls,
per batch (automatic optimization, `loops/optimization/automatic.py`: the forward and backward run inside
`optimizer.step(closure)`, `zero_grad` before the backward): `on_train_batch_start` (forward begins),
`on_before_backward` (forward over, the loss made), `on_before_optimizer_step` (after the closure), and
`on_train_batch_end` (the step is over). The transformers / PEFT model is `model=`, or the
first submodule of the LightningModule with a transformers `config`. Batches are mappings with `input_ids`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lora_planner.integrations.meter import Counters, PhaseMeter


class LoraPlanLightningCallback(Callback):
    def __init__(self, model: Any = None, args: Any = None, steps: int = 3, out: str | None = None,
                 counters: Counters | None = None, log: Any = None) -> None:
        self.model, self.args = model, args
        self.meter = PhaseMeter(counters, steps, out, log)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = self.model or next((m for m in pl_module.modules() if hasattr(getattr(m, "config", None), "to_dict")),
                                   None)
        if model is None:
            self.meter.close()
            return
        if isinstance(self.args, dict):
            from lora_planner.integrations.loop import _Args

            self.args = _Args(self.args)
        self.meter.start(model, self.args)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.meter.done:
            self.meter.forward_begin(batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if not self.meter.done:
            self.meter.forward_end()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self.meter.done:
            self.meter.optimizer_begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.meter.done:
            self.meter.optimizer_end()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.meter.close()

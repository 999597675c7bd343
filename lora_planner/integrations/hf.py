"""`LoraPlanCallback`: the phase meter (`integrations.meter`) as a `transformers.TrainerCallback`, so every Trainer
and the TRL trainers built on it (SFTTrainer, DPOTrainer, GRPOTrainer, ...) report predicted vs measured:

    from lora_planner.integrations import LoraPlanCallback
    trainer = SFTTrainer(model=..., args=SFTConfig(...), peft_config=LoraConfig(...),
                         callbacks=[LoraPlanCallback(steps=3, out="runs.jsonl")])

Events (transformers 5.24 `trainer.py` `_inner_training_loop`): `on_train_begin` (the model and arguments: the plan,
the hooks); the model's forward pre-hook / hook (forward, then backward from the forward's end: the loss is inside
the model's forward, gradient clipping inside backward); `on_pre_optimizer_step` / `on_optimizer_step` (the
optimizer's step). After step k the hooks are removed and every callback returns at once."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from lora_planner.integrations.meter import Counters, PhaseMeter


class LoraPlanCallback(TrainerCallback):
    def __init__(self, steps: int = 3, out: str | None = None, counters: Counters | None = None,
                 log: Any = None) -> None:
        self.meter = PhaseMeter(counters, steps, out, log)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.meter.done or model is None:
            return
        self.meter.start(model, args)
        if not self.meter.done:
            self.meter.watch(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.meter.done:
            self.meter.optimizer_begin()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.meter.done:
            self.meter.optimizer_end()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meter.close()  # fewer than k steps ran: nothing is written

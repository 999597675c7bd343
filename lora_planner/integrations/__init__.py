"""Predicted vs measured on the user's own run (issue 14): the plan built from the live model, PEFT config and
arguments, printed at train start (with a warning when it cannot fit the device), the device's counters read per
phase on steps 1..k, one profile record appended, the hooks removed.

| entry point                    | module                        | for                                       |
|--------------------------------|-------------------------------|-------------------------------------------|
| `LoraPlanCallback`             | `integrations.hf`             | transformers' Trainer, TRL's trainers     |
| `LoraPlanLightningCallback`    | `integrations.lightning`      | Lightning 2.x                             |
| `plan_check(model, optimizer)` | `integrations.loop`           | a plain PyTorch loop                      |
| `PhaseMeter`                   | `integrations.meter`          | what the three drive; the counters' seam  |
| `live_setup`                   | `integrations.live`           | the plan's settings read off the run      |
| `TrackerCounters`              | `integrations.counters`       | the exact CPU tracker as the counters     |

Each is imported on first use, so `import lora_planner.integrations` needs neither transformers nor Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"LoraPlanCallback": "hf", "LoraPlanLightningCallback": "lightning", "plan_check": "loop",
          "PhaseMeter": "meter", "live_setup": "live", "TrackerCounters": "counters"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lora_planner.integrations' has no attribute {name!r}")
    return getattr(import_module(f"lora_planner.integrations.{_WHERE[name]}"), name)

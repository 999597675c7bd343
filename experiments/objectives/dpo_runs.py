"""DPO planned vs measured per phase (issue 17): real TRL 1.16 `DPOTrainer` steps of a tiny Llama on CPU under the
exact tracker (`lora_planner.profiler.trl_steps`), against `lora-plan --objective dpo --device cpu`.

    python experiments/objectives/dpo_runs.py   # writes reports/objectives/dpo_validation.{md,json}, ~1 min
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.objectives.report import write_validation  # noqa: E402
from lora_planner.config_reader import spec_from_config  # noqa: E402
from lora_planner.memory import estimate_memory  # noqa: E402
from lora_planner.profiler.trl_steps import (  # noqa: E402
    dpo_trainer, measure_trl_steps, phase_errors, planned_phases, reference_planned_training, tiny_llama_config,
)

RUNS = [  # (method, pairs, bf16 autocast, checkpointing, intermediate size)
    ("lora", 1, False, True, 176), ("lora", 2, False, True, 176), ("lora", 4, False, True, 176),
    ("lora", 2, True, True, 176), ("lora", 1, True, False, 176), ("lora", 2, False, False, 176),
    ("lora", 2, False, True, 12288), ("full", 2, False, True, 176), ("full", 2, True, True, 176),
    ("full", 1, True, False, 176), ("full", 2, True, True, 12288),
]
PHASES = ("forward", "reference", "backward", "optimizer_step")


def main() -> None:
    rows = []
    for method, pairs, amp, ckpt, inter in RUNS:
        cfg = tiny_llama_config(inter)
        with tempfile.TemporaryDirectory() as out:
            measured = measure_trl_steps(dpo_trainer(out, cfg, pairs, amp, ckpt, method), steps=3)
        training = reference_planned_training(measured, "dpo", method, amp, ckpt, pairs)
        planned = planned_phases(estimate_memory(spec_from_config(cfg, "tiny"), training))
        rows.append({"method": method, "pairs": pairs, "amp": amp, "checkpointing": ckpt, "intermediate_size": inter,
                     "batch_shape": list(measured["batch_shape"]),
                     "phases": phase_errors(measured, planned, PHASES)})
        print(rows[-1], flush=True)
    print(write_validation("dpo_validation", rows, ["method", "pairs", "rows x tokens", "autocast", "checkpointing",
                                                     "MLP width"], _cells, PHASES))


def _cells(r: dict) -> list[str]:
    return [r["method"], str(r["pairs"]), f"{r['batch_shape'][0]} x {r['batch_shape'][1]}",
            "bf16" if r["amp"] else "off", "on" if r["checkpointing"] else "off", str(r["intermediate_size"])]


if __name__ == "__main__":
    main()

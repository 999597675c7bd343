"""KTO planned vs measured per phase (issue 17): real TRL 1.16 `KTOTrainer` steps of a tiny Llama on CPU under the
exact tracker (`lora_planner.profiler.trl_steps`), against `lora-plan --objective kto --device cpu`: the policy's KL
pass, the forward, the reference passes (KL and main rows), backward and the optimizer step.

    python experiments/objectives/kto_runs.py   # writes reports/objectives/kto_validation.{md,json}, ~1 min
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
    kto_trainer, measure_trl_steps, phase_errors, planned_phases, reference_planned_training, tiny_llama_config,
)

RUNS = [  # (method, examples a micro-batch, bf16 autocast, checkpointing)
    ("lora", 4, False, True), ("lora", 4, True, True), ("lora", 4, True, False), ("lora", 8, False, True),
    ("lora", 2, True, True), ("full", 4, False, True), ("full", 4, True, True), ("full", 2, True, False),
]
PHASES = ("kl", "forward", "reference", "backward", "optimizer_step")


def main() -> None:
    rows = []
    cfg = tiny_llama_config()
    for method, batch, amp, ckpt in RUNS:
        with tempfile.TemporaryDirectory() as out:
            measured = measure_trl_steps(kto_trainer(out, cfg, batch, amp, ckpt, method), steps=3)
        training = reference_planned_training(measured, "kto", method, amp, ckpt, batch)
        planned = planned_phases(estimate_memory(spec_from_config(cfg, "tiny"), training))
        rows.append({"method": method, "batch": batch, "amp": amp, "checkpointing": ckpt,
                     "batch_shape": list(measured["batch_shape"]),
                     "phases": phase_errors(measured, planned, PHASES)})
        print(rows[-1], flush=True)
    print(write_validation("kto_validation", rows, ["method", "examples", "rows x tokens", "autocast", "checkpointing"],
                           _cells, PHASES))


def _cells(r: dict) -> list[str]:
    return [r["method"], str(r["batch"]), f"{r['batch_shape'][0]} x {r['batch_shape'][1]}",
            "bf16" if r["amp"] else "off", "on" if r["checkpointing"] else "off"]


if __name__ == "__main__":
    main()

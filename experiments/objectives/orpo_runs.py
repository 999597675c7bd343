"""ORPO, SimPO and CPO planned vs measured per phase (issue 17): real TRL 1.16 `ORPOTrainer` and `CPOTrainer`
(`trl.experimental`) steps of a tiny Llama on CPU under the exact tracker (`lora_planner.profiler.trl_steps`), against
`lora-plan --objective orpo|simpo|cpo --device cpu`: the forward (with the loss code over the whole logits), backward
and the optimizer step.

    python experiments/objectives/orpo_runs.py   # writes reports/objectives/orpo_validation.{md,json}, ~1 min
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
    cpo_trainer, measure_trl_steps, phase_errors, planned_phases, reference_planned_training, tiny_llama_config,
)

RUNS = [  # (objective, cpo_alpha, method, pairs a micro-batch, bf16 autocast, checkpointing)
    ("orpo", 1.0, "lora", 4, False, True), ("orpo", 1.0, "lora", 4, True, True), ("orpo", 1.0, "lora", 4, True, False),
    ("orpo", 1.0, "lora", 8, True, True), ("orpo", 1.0, "lora", 1, True, True), ("orpo", 1.0, "full", 4, False, True),
    ("orpo", 1.0, "full", 4, True, True), ("orpo", 1.0, "full", 2, True, False),
    ("simpo", 1.0, "lora", 4, True, True), ("simpo", 0.0, "lora", 4, True, True), ("simpo", 0.0, "lora", 4, False, True),
    ("simpo", 0.0, "full", 2, True, False), ("cpo", 1.0, "lora", 4, True, True),
]
PHASES = ("forward", "backward", "optimizer_step")


def main() -> None:
    rows = []
    cfg = tiny_llama_config()
    for objective, alpha, method, pairs, amp, ckpt in RUNS:
        with tempfile.TemporaryDirectory() as out:
            measured = measure_trl_steps(cpo_trainer(out, cfg, pairs, amp, ckpt, method, objective, alpha), steps=3)
        fields = {} if objective == "orpo" else {"cpo_alpha": alpha}
        training = reference_planned_training(measured, objective, method, amp, ckpt, pairs, **fields)
        planned = planned_phases(estimate_memory(spec_from_config(cfg, "tiny"), training))
        rows.append({"objective": objective, "cpo_alpha": alpha, "method": method, "pairs": pairs, "amp": amp,
                     "checkpointing": ckpt, "batch_shape": list(measured["batch_shape"]),
                     "phases": phase_errors(measured, planned, PHASES)})
        print(rows[-1], flush=True)
    print(write_validation("orpo_validation", rows, ["trainer", "method", "pairs", "rows x tokens", "autocast",
                                                     "checkpointing"], _cells, PHASES))


def _cells(r: dict) -> list[str]:
    trainer = "ORPOTrainer" if r["objective"] == "orpo" else \
        f"CPOTrainer ({'simpo' if r['objective'] == 'simpo' else 'sigmoid'}, cpo_alpha {r['cpo_alpha']:g})"
    return [trainer, r["method"], str(r["pairs"]), f"{r['batch_shape'][0]} x {r['batch_shape'][1]}",
            "bf16" if r["amp"] else "off", "on" if r["checkpointing"] else "off"]


if __name__ == "__main__":
    main()

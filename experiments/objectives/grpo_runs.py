"""GRPO planned vs measured per phase (issue 17): real TRL 1.16 `GRPOTrainer` steps (transformers' `generate`) of a
tiny Llama on CPU under the exact tracker (`lora_planner.profiler.trl_steps`), against `lora-plan --objective grpo
--device cpu`: the generation round, the scoring passes (old policy / reference), the training forward, backward and
optimizer step.

    python experiments/objectives/grpo_runs.py   # writes reports/objectives/grpo_validation.{md,json}, ~5 min
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lora_planner.config_reader import spec_from_config  # noqa: E402
from lora_planner.memory import estimate_memory  # noqa: E402
from experiments.objectives.report import write_validation  # noqa: E402
from lora_planner.profiler.trl_steps import (  # noqa: E402
    grpo_planned_training, grpo_trainer, measure_trl_steps, phase_errors, planned_phases, tiny_llama_config,
)

# (method, per-device batch (completions), num_generations, max_completion_length, bf16 autocast, checkpointing,
#  beta, more GRPOConfig fields)
RUNS = [
    ("lora", 8, 4, 64, False, True, 0.0, {}),
    ("lora", 8, 4, 64, True, True, 0.0, {}),
    ("lora", 8, 4, 64, True, False, 0.0, {}),
    ("lora", 16, 4, 200, False, True, 0.0, {}),
    ("lora", 8, 4, 64, False, True, 0.04, {}),
    ("lora", 12, 3, 150, True, True, 0.04, {}),
    ("lora", 8, 4, 64, False, True, 0.0, {"num_iterations": 2}),
    ("lora", 8, 4, 64, True, True, 0.0, {"steps_per_generation": 2}),
    ("full", 8, 4, 64, False, True, 0.0, {}),
    ("full", 8, 4, 64, True, True, 0.0, {}),
    ("full", 16, 4, 200, True, True, 0.0, {}),
    ("full", 8, 4, 64, True, True, 0.04, {}),
]
PHASES = ("generation", "scoring", "forward", "backward", "optimizer_step")


def main() -> None:
    rows = []
    cfg = tiny_llama_config()
    for method, batch, gens, completion, amp, ckpt, beta, config in RUNS:
        with tempfile.TemporaryDirectory() as out:
            measured = measure_trl_steps(grpo_trainer(out, cfg, batch, gens, completion, amp, ckpt, method, beta,
                                                      **config), steps=3)
        training = grpo_planned_training(measured, method, amp, ckpt, gens, beta, **config)
        planned = planned_phases(estimate_memory(spec_from_config(cfg, "tiny"), training))
        rows.append({"method": method, "batch": batch, "num_generations": gens, "max_completion_length": completion,
                     "amp": amp, "checkpointing": ckpt, "beta": beta, "config": config,
                     "batch_shape": list(measured["batch_shape"]),
                     "phases": phase_errors(measured, planned, PHASES)})
        print(rows[-1], flush=True)
    print(write_validation("grpo_validation", rows, ["method", "rows x (prompt + completion)", "G", "autocast",
                                                      "ckpt", "beta", "other"], _cells, PHASES))


def _cells(r: dict) -> list[str]:
    rows, total, lc = r["batch_shape"]
    return [r["method"], f"{rows} x ({total - lc} + {lc})", str(r["num_generations"]), "bf16" if r["amp"] else "off",
            "on" if r["checkpointing"] else "off", f"{r['beta']:g}",
            ", ".join(f"{k} {v}" for k, v in r["config"].items()) or "-"]


if __name__ == "__main__":
    main()

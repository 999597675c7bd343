"""Speed of the analytic planner: cold CLI latency and grid throughput of the Python API.

    python experiments/bench_planner.py            # prints a table, writes reports/bench_planner.json

Targets: the API evaluates >= 20,000 configs/s (issue 2); the CLI answers cold in <= 0.08 s (issue 11), measured
beside `python -c pass` in the same run, with bytecode cached as on a user's machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

from lora_planner.catalog import resolve_model
from lora_planner.memory import estimate_memory
from lora_planner.specs import LoraSpec, TrainingSpec

ROOT = Path(__file__).resolve().parents[1]


# As a user's machine runs it: bytecode cached in __pycache__ (this sandbox sets PYTHONDONTWRITEBYTECODE=1, which
# recompiles every module on every start and adds ~40 ms).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cold_seconds(commands: dict[str, list[str]], rounds: int = 15) -> dict[str, dict[str, float]]:
    """Wall time of a fresh interpreter running each command (imports included): median and minimum over
    `rounds`, the commands interleaved round by round so that a change in the machine's load hits them all
    alike, after one warm-up run each (which also writes the bytecode cache)."""
    for command in commands.values():
        subprocess.run(command, check=True, capture_output=True, env=ENV)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=ENV)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lora_planner.cli", *argv]


def grid() -> list[TrainingSpec]:
    return [TrainingSpec(method=method, batch_size=batch, seq_len=seq, grad_checkpointing=ckpt, lora=LoraSpec(r=r))
            for method, r, batch, seq, ckpt in product(("full", "lora", "qlora"), (1, 2, 4, 8, 16, 32, 64, 128, 256),
                                                       (1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (False, True))]


def configs_per_second(model: str, passes: int) -> float:
    spec, configs = resolve_model(model), grid()
    start = time.perf_counter()
    for _ in range(passes):
        for training in configs:
            estimate_memory(spec, training)
    return passes * len(configs) / (time.perf_counter() - start)


def main() -> None:
    load_before = os.getloadavg()[0]
    cold = cold_seconds({
        "python_pass": [sys.executable, "-c", "pass"],  # the interpreter alone, same run
        "cli_human": cli("--model", "llama-7b", "--r", "8"),  # the table, as a user types it
        "cli_json": cli("--model", "llama-7b", "--r", "8", "--json"),
        "cli_version": cli("--version"),  # interpreter + package import, no planning
    })
    results = {
        **{f"{name}_{stat}": value for name, stats in cold.items() for stat, value in stats.items()},
        "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after the cold runs (2 cores)
        "grid_size": len(grid()),
        "api_first_pass_configs_per_s": configs_per_second("llama-3-8b", 1),
        "api_warm_configs_per_s": configs_per_second("llama-3-8b", 5),
    }
    for key, value in results.items():
        print(f"{key:32s} {value:,.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    out = ROOT / "reports" / "bench_planner.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

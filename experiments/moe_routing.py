"""How much does the routing move an MoE training step's peak? Real CPU steps, measured by the exact tracker.

For each MoE family's tiny config (cpu_validation.toml's: 8 experts, top-2, 2 x 32 tokens) and each experts
implementation, two routings of the same model:
- "natural": the random initialisation's router (its per-expert counts recorded by the profiler's router hook);
- "skewed": every router weight zeroed, so every token's probabilities tie and `topk` sends all of them to the same
  k experts: the worst case the planner's `--routing worst` bounds.
The table gives the measured peaks, the planner's predictions with balanced routing (the CLI's estimate), with the
measured per-expert counts (`--routing FILE`) and with the worst case, and the spread the routing makes.

    .venv/bin/python experiments/moe_routing.py            # ~2 minutes on 2 CPU cores
writes reports/validation/moe_routing.md (and prints it).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_planner.memory import estimate_memory  # noqa: E402
from lora_planner.profiler.runner import (  # noqa: E402
    ProfileRequest, RouterCounts, _loss_fn, _tracked, batch_factory, build_model, build_optimizer,
)
from lora_planner.specs import LoraSpec, TrainingSpec  # noqa: E402
from lora_planner.sweep import load_grid  # noqa: E402

FAMILIES = ("tiny-mixtral", "tiny-qwen2_moe", "tiny-qwen3_moe", "tiny-olmoe", "tiny-gpt_oss", "tiny-deepseek_v3")
SETTINGS = {"LoRA q,v": dict(method="lora"), "LoRA all-linear": dict(method="lora",
                                                                      lora=LoraSpec(r=8, target_modules=("all-linear",)))}


def measure(spec, training: TrainingSpec, skewed: bool) -> tuple[int, list[list[int]] | None]:
    request = ProfileRequest(spec.name, spec, training, backend="hf", mode="cpu", steps=2)
    torch.manual_seed(0)
    model = build_model(request, "cpu")
    if skewed:
        with torch.no_grad():
            for name, module in model.named_modules():
                if type(module).__name__.endswith(("Router", "TopkRouter")):
                    for param in module.parameters(recurse=False):
                        param.zero_()
    optimizer = build_optimizer(model, training)
    counts = RouterCounts(model, spec.num_experts)
    result = _tracked(model, batch_factory(spec, training, "cpu", 0), optimizer, 2, _loss_fn(training, "cpu"))
    return result.peak_bytes, counts.rows()


def main() -> None:
    grid = load_grid(ROOT / "experiments" / "grids" / "cpu_validation.toml")
    specs = {run.model: run.spec for run in grid.runs if run.spec.is_moe}
    rows = ["| model | experts | setting | routing | busiest expert (tokens) | measured peak (B) | planned: balanced | "
            "planned: these counts | planned: worst | measured spread vs natural |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for label in FAMILIES:
        if label not in specs:
            continue
        spec = specs[label]
        for impl in ("grouped_mm", "eager"):
            for setting, kw in SETTINGS.items():
                training = TrainingSpec(device="cpu", batch_size=2, seq_len=32, experts_implementation=impl, **kw)
                natural = None
                for routing in ("natural", "skewed"):
                    peak, counts = measure(spec, training, routing == "skewed")
                    natural = natural or peak
                    plan = {name: estimate_memory(spec, replace(training, routing=r)).peak_allocated_bytes
                            for name, r in (("balanced", "balanced"), ("counts", tuple(map(tuple, counts))),
                                            ("worst", "worst"))}
                    busiest = max(max(row) for row in counts)
                    rows.append(f"| {label} | {impl} | {setting} | {routing} | {busiest} | {peak:,} | "
                                f"{plan['balanced'] / peak - 1:+.2%} | {plan['counts'] / peak - 1:+.2%} | "
                                f"{plan['worst'] / peak - 1:+.2%} | {peak / natural - 1:+.2%} |")
                    print(rows[-1], flush=True)
    text = (__doc__.split("\n\n")[0] + "\n\nPlanned columns: the planner's peak relative to the measured one.\n\n"
            + "\n".join(rows) + "\n")
    out = ROOT / "reports" / "validation" / "moe_routing.md"
    out.write_text("# MoE routing and the step's peak\n\n" + text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Chart and summary of the capacity experiment (`experiments/capacity/run.py`): accuracy on the memorised facts
against the LoRA rank, one line per number of facts N, full fine-tuning as a dashed level, and the rank where the
rule (`lora_planner.rank_evidence`, margin 1) expects LoRA to stop being capacity-bound marked on each line.

    python experiments/capacity/chart.py [--runs reports/capacity/runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BITS_PER_PARAM = 2.0  # lora_planner.rank_evidence.BITS_PER_PARAM


def predicted_rank(data_bits: int, params_per_rank: float) -> int:
    """The rule at margin 1: the smallest power of two with params x 2 bits >= the data's bits."""
    wanted = max(1, math.ceil(data_bits / BITS_PER_PARAM / params_per_rank))
    return 1 << math.ceil(math.log2(wanted))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=str(ROOT / "reports" / "capacity" / "runs.jsonl"))
    args = parser.parse_args()
    every = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    runs = [r for r in every if r.get("task", "memorise") == "memorise"]
    best: dict[tuple, dict] = {}  # each configuration's best learning rate and warmup (accuracy, then loss)
    for row in runs:
        k = (row["method"], row["r"], row["facts"])
        if k not in best or (row["accuracy"], -row["final_loss_nats"]) > (best[k]["accuracy"],
                                                                        -best[k]["final_loss_nats"]):
            best[k] = row
    rows = list(best.values())
    out = Path(args.runs).parent
    lora = [r for r in rows if r["method"] == "lora"]
    per_rank = {r["r"]: r["trainable_params"] / r["r"] for r in lora}
    ppr = sum(per_rank.values()) / len(per_rank)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    lines = ["| facts N | data bits | full FT accuracy | LoRA accuracy by rank (best LR) | rule's rank (margin 1) | "
             "smallest rank within 5 points of full FT |", "|---|---:|---:|---|---:|---:|"]
    for i, n in enumerate(sorted({r["facts"] for r in rows})):
        color = f"C{i}"
        mine = sorted((r for r in lora if r["facts"] == n), key=lambda r: r["r"])
        full = next((r for r in rows if r["method"] == "full" and r["facts"] == n), None)
        ranks, acc = [r["r"] for r in mine], [r["accuracy"] for r in mine]
        ax.plot(ranks, acc, "o-", color=color, label=f"N = {n:,} facts ({8 * n:,} bits)")
        if full:
            ax.axhline(full["accuracy"], color=color, linestyle="--", linewidth=1)
        rule = predicted_rank(8 * n, ppr)
        ax.axvline(rule, color=color, linestyle=":", linewidth=1)
        reached = next((r["r"] for r in mine if full and r["accuracy"] >= full["accuracy"] - 0.05), None)
        lines.append(f"| {n:,} | {8 * n:,} | {full['accuracy']:.3f} | "
                     + ", ".join(f"r{r['r']}: {r['accuracy']:.3f}" for r in mine)
                     + f" | {rule} | {reached if reached is not None else 'none tried'} |")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r (all linear layers, alpha = 2r)")
    ax.set_ylabel("accuracy on the memorised facts")
    ax.set_title("Capacity: LoRA rank vs facts memorised (tiny Llama, CPU)\n"
                 "dashed: full fine-tuning; dotted: the rule's rank (params x 2 bits = data bits)", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=130)
    lines += _schedule_table(runs) + _copy_table(every)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'capacity.png'} and {out / 'summary.md'} ({ppr:,.0f} LoRA parameters per unit of rank)")


def _schedule_table(runs: list[dict]) -> list[str]:
    """Every LoRA run at the largest N, by learning rate and warmup: whether the optimisation, not the rank, held it."""
    n = max(r["facts"] for r in runs)
    mine = sorted((r for r in runs if r["facts"] == n and r["method"] == "lora"),
                  key=lambda r: (r["r"], r["lr"], r.get("warmup", 0)))
    if not mine:
        return []
    rows = [f"| {r['r']} | {r['lr']:g} | {r.get('warmup', 0)} | {r['steps']:,} | {r['accuracy']:.3f} | "
            f"{r['final_loss_nats']:.3f} |" for r in mine]
    return ["", f"LoRA at N = {n:,} facts, every learning rate and warmup tried:", "",
            "| r | LoRA learning rate | warmup steps | steps | accuracy | final loss (nats) |",
            "|---:|---:|---:|---:|---:|---:|", *rows]


def _copy_table(every: list[dict]) -> list[str]:
    """The rule task ("copy": the value is the first key's token): what a rank needs when the data is not random."""
    copy = sorted((r for r in every if r.get("task") == "copy"), key=lambda r: (r["facts"], r["method"] != "full",
                                                                                 r["r"] or 0, r["lr"]))
    if not copy:
        return []
    rows = [f"| {r['facts']:,} | {r['method']}{'' if r['r'] is None else ' r ' + str(r['r'])} | "
            f"{r['trainable_params']:,} | {r['lr']:g} | {r['steps']:,} | {r['accuracy']:.3f} |" for r in copy]
    return ["", "A rule instead of facts (the value copies the first key: the rows' 8 bits each are not information "
            "to store):", "", "| rows N | method | trainable params | learning rate | steps | accuracy |",
            "|---:|---|---:|---:|---:|---:|", *rows]


if __name__ == "__main__":
    main()

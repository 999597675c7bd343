"""The seed's rules of thumb, checked against measured runs and the planner.

1. "LoRA needs (1+4m)x the weights" and "full fine-tuning needs 4x": measured peaks vs the rule.
2. "LoRA's forward pass is unchanged, its backward pass smaller": measured phase snapshots of full and
   LoRA runs under the same settings (`measured.phases`, recorded by `lora-plan sweep`).
3. "LoRA allows a larger batch": the largest micro-batch that fits a 24 GiB and an 80 GiB budget,
   full vs LoRA vs QLoRA (planner).
4. "Train ~5 % of the parameters": the rank that reaches m = 5 % per model (`params.rank_for_trainable_fraction`),
   and where that rank is wider than the layers it adapts.

Each function returns a DataFrame and the sentences that state the verdict with numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from math import ceil
from typing import Any

import pandas as pd

from lora_planner.catalog import resolve_model
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.params import count_params, lora_params, max_rank, rank_for_trainable_fraction
from lora_planner.search import largest_fitting
from lora_planner.report.charts import MIN_TIMED_FLOPS, pair_full_lora, timed_pairs
from lora_planner.specs import LoraSpec, TrainingSpec

GIB = 2**30
MIB = 2**20


def human_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


# ---------------------------------------------------------------------------------------------- 1. seed rule


def seed_rule_claim(frame: pd.DataFrame, method: str, tolerance: float = 0.10,
                    reference_model: str = "llama-3-8b") -> tuple[pd.DataFrame, list[str]]:
    """Measured runs of `method` grouped by (mode, model): the seed rule's error range and how much of
    the peak is activations + temporaries (the terms the rule leaves out)."""
    rule = "(1+4m)x" if method != "full" else "4x"
    ok = frame[(frame["status"] == "ok") & (frame["method"] == method) & frame["seed_rule_error"].notna()]
    if ok.empty:
        return pd.DataFrame(), [f"No measured {method} runs with a rebuildable model: the {rule} rule is not checked."]
    rows = []
    for (mode, model), group in ok.groupby(["mode", "model"], sort=True):
        err, share, peak = group["seed_rule_error"], group["meas_act_temp_share"], group["measured_peak_bytes"]
        rows.append({"mode": mode, "model": model, "runs": len(group),
                     "measured peak": _span(peak.min(), peak.max(), human_bytes),
                     "seed rule error": _span(err.min(), err.max(), _pct),
                     "within 10 %": f"{int((err.abs() <= tolerance).sum())}/{len(group)}",
                     "acts + temps share": _span(share.min(), share.max(), lambda x: f"{100 * x:.0f} %")})
    within = ok[ok["seed_rule_error"].abs() <= tolerance]
    worst = ok.loc[ok["seed_rule_error"].abs().idxmax()]
    lines = [f"The {rule} rule is within +-{100 * tolerance:.0f} % of the measured peak in {len(within)} of {len(ok)} "
             f"measured {method} runs (median error {_pct(ok['seed_rule_error'].median())})."]
    if len(within):
        lines.append(f"Where it holds, activations + temporaries are at most "
                     f"{100 * within['meas_act_temp_share'].max():.0f} % of the peak "
                     f"(median {100 * within['meas_act_temp_share'].median():.0f} %).")
    outside = ok[ok["seed_rule_error"].abs() > tolerance]
    if len(outside):
        lines.append(f"Where it misses, they are {100 * outside['meas_act_temp_share'].min():.0f} - "
                     f"{100 * outside['meas_act_temp_share'].max():.0f} % of the peak; the worst miss is "
                     f"{_pct(worst['seed_rule_error'])} ({worst['model']}, {worst['mode']}, {worst['precision']}, "
                     f"batch {worst['batch_size']} x {worst['seq_len']}"
                     f"{', checkpointing' if worst['grad_checkpointing'] else ''}: measured "
                     f"{human_bytes(worst['measured_peak_bytes'])}, rule {human_bytes(worst['seed_rule_bytes'])}, "
                     f"activations + temporaries {100 * worst['meas_act_temp_share']:.0f} % of the peak).")
    if method == "full" and (ok["device"] == "cpu").any():
        spec = resolve_model(reference_model)
        training = TrainingSpec(method="full", dtype="bf16", device="cuda", batch_size=1, seq_len=512)
        cuda = estimate_memory(spec, training)
        lines.append(f"CPU and fake runs use PyTorch's CPU default, the for-loop AdamW, whose step scratch is two "
                     f"copies of the largest tensor; on CUDA the default foreach AdamW materialises a copy of every "
                     f"parameter, so a GPU's full fine-tune peaks higher and the rule is further off: for "
                     f"{spec.name} at batch 1 x 512 on CUDA the planner puts the 4x rule at "
                     f"{_pct(cuda.seed_rule_bytes / cuda.peak_allocated_bytes - 1)} of the peak allocated.")
    return pd.DataFrame(rows), lines


def _span(low: float, high: float, fmt: Any) -> str:
    return fmt(low) if fmt(low) == fmt(high) else f"{fmt(low)} .. {fmt(high)}"


# ---------------------------------------------------------------------------------------------- 2. phases


def phase_claim(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Full vs LoRA under the same settings, from the steady-state step's phase snapshots."""
    if "forward_end_activations" not in frame or frame["forward_end_activations"].notna().sum() == 0:
        return pd.DataFrame(), ["These records hold no phase snapshots (`measured.phases`, written by "
                                "`lora-plan sweep`); only each run's overall peak and its phase are measured, so "
                                "the claim is not checked here."]
    pairs = pair_full_lora(frame[frame["forward_end_activations"].notna()], "forward_end_activations")
    if pairs.empty:
        return pd.DataFrame(), ["No full / LoRA pairs with phase snapshots under the same settings."]
    # One row per model, mode, batch x sequence and checkpointing: the hf backend, bf16 when measured.
    shown = pairs.assign(_hf=pairs["backend"] != "hf", _bf16=pairs["precision"] != "bf16")
    shown = shown.sort_values(["_hf", "_bf16"], kind="stable").drop_duplicates(
        ["model", "mode", "batch_size", "seq_len", "grad_checkpointing"]).sort_index()
    rows = []
    for p in shown.itertuples():
        rows.append({
            "model": p.model, "run": f"{p.backend}/{p.mode} {p.precision}",
            "B x S": f"{p.batch_size} x {p.seq_len}{' ckpt' if p.grad_checkpointing else ''}",
            "adapter": f"r={int(p.r_lora)} {p.target_lora}",
            "saved at forward end: full": human_bytes(p.forward_end_activations_full),
            "saved: LoRA": human_bytes(p.forward_end_activations_lora),
            "backward peak: full": human_bytes(p.backward_peak_bytes_full),
            "backward peak: LoRA": human_bytes(p.backward_peak_bytes_lora),
            "grads at backward end: full": human_bytes(p.backward_end_gradients_full),
            "grads: LoRA": human_bytes(p.backward_end_gradients_lora),
            "step time LoRA / full": (f"{p.min_step_time_s_lora / p.min_step_time_s_full:.2f}"
                                      if p.full_step_flops_full >= MIN_TIMED_FLOPS and pd.notna(p.min_step_time_s_full)
                                      and pd.notna(p.min_step_time_s_lora) else "-"),
        })
    table = pd.DataFrame(rows)
    fwd = pairs["forward_end_activations_lora"] / pairs["forward_end_activations_full"]
    grads = pairs["backward_end_gradients_lora"] / pairs["backward_end_gradients_full"]
    bwd = pairs["backward_peak_bytes_lora"] / pairs["backward_peak_bytes_full"]
    timed = timed_pairs(frame)
    lines = [
        f"Forward: the tensors saved for backward at the end of the forward pass are {fwd.min():.2f} - "
        f"{fwd.max():.2f} x full fine-tuning's under LoRA (median {fwd.median():.2f}, {len(pairs)} pairs). So the "
        "forward pass is not unchanged in memory, though close: frozen linears save no input for a weight "
        "gradient, while each adapter saves its own (fp32 on a 16-bit base) copy of its input; the logits and the "
        "loss's fp32 tensors, often the largest, are the same.",
        f"Backward: the gradients alive at the end of backward are {100 * grads.min():.2g} - {100 * grads.max():.2g} % "
        f"of full's (LoRA keeps gradients for the adapters only), and the backward phase's peak is {bwd.min():.2f} - "
        f"{bwd.max():.2f} x full's (median {bwd.median():.2f}; weights and optimizer states included). The claim "
        "holds for the backward pass.",
    ]
    if len(timed):
        ratio = timed["ratio"]
        lines.append(f"Time: only whole steps are timed (forward and backward are not timed apart). Where a full "
                     f"step does at least {MIN_TIMED_FLOPS / 1e9:g} GFLOP ({len(timed)} pairs; smaller steps time "
                     f"per-op overhead), LoRA's fastest step takes {ratio.min():.2f} - {ratio.max():.2f} x full's "
                     f"(median {ratio.median():.2f}).")
    else:
        lines.append("Time: no pair has a timed full step long enough to compare (fake mode runs no kernels; tiny "
                     "models' steps are per-op overhead); forward and backward are never timed apart.")
    return table, lines


# ---------------------------------------------------------------------------------------------- 3. batch


def max_batch(spec: Any, training: TrainingSpec, budget_bytes: int, limit: int = 4096) -> int:
    """Largest micro-batch whose predicted peak on the device fits `budget_bytes` (0: not even 1)."""
    def peak(batch: int) -> int:
        return estimate_memory(spec, replace(training, batch_size=batch)).peak_device_bytes

    return largest_fitting(peak, budget_bytes, limit)


def batch_claim(models: tuple[str, ...] = ("llama-3.2-1b", "qwen2.5-1.5b", "llama-3.2-3b", "mistral-7b", "llama-3-8b"),
                seq_lens: tuple[int, ...] = (512, 2048), budgets: tuple[int, ...] = (24 * GIB, 80 * GIB)
                ) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    base = TrainingSpec(method="full", dtype="bf16", device="cuda", lora=LoraSpec(r=8))
    for name in models:
        spec = resolve_model(name)
        for seq in seq_lens:
            for budget in budgets:
                row: dict[str, Any] = {"model": name, "seq len": seq, "budget": f"{budget / GIB:.0f} GiB"}
                for method in ("full", "lora", "qlora"):
                    row[method] = max_batch(spec, replace(base, method=method, seq_len=seq), budget)
                rows.append(row)
    table = pd.DataFrame(rows)
    larger = table[table["lora"] > table["full"]]
    only_lora = table[(table["full"] == 0) & (table["lora"] > 0)]
    lines = [f"LoRA fits a larger micro-batch than full fine-tuning in {len(larger)} of {len(table)} cases "
             f"(planner; bf16, AdamW, r=8 on PEFT's default targets, CUDA overhead included); in {len(only_lora)} "
             "of them full fine-tuning does not fit at all.",
             "The gain is not proportional to the memory saved on weights: once the weights fit, each extra sequence "
             "costs about the same activations and logits under both methods (LoRA keeps no input for the frozen "
             "linears but keeps its adapters' own), so the batch grows by the freed memory divided by the "
             "per-sequence cost."]
    return table, lines


# ---------------------------------------------------------------------------------------------- 4. 5 %


def _needed_rank(spec: Any, fraction: float, targets: tuple[str, ...] | None) -> int:
    per_rank = lora_params(spec, 1, targets).trainable_params
    base = count_params(spec).total
    return max(1, ceil(fraction * base / (per_rank * (1 - fraction))))


def fraction_claim(models: tuple[str, ...] = ("gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "tinyllama-1.1b", "phi-2",
                                              "llama-3.2-3b", "mistral-7b", "llama-3-8b", "llama-2-70b"),
                   fraction: float = 0.05) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    for name in models:
        spec = resolve_model(name)
        row: dict[str, Any] = {"model": name, "parameters": f"{count_params(spec).total / 1e9:.2f} B",
                               "hidden": spec.hidden_size}
        for label, targets in (("default targets", None), ("all-linear", ("all-linear",))):
            limit = max_rank(spec, targets)
            try:
                r = rank_for_trainable_fraction(spec, fraction, targets)
                row[f"r for 5 %: {label}"] = str(r)
            except PlannerInputError:
                r = _needed_rank(spec, fraction, targets)
                row[f"r for 5 %: {label}"] = f"{r} > max {limit}"
            row[f"max r: {label}"] = limit
        rows.append(row)
    table = pd.DataFrame(rows)
    impossible = table[table["r for 5 %: default targets"].str.contains(">")]
    linear = [int(str(v).split()[0]) for v in table["r for 5 %: all-linear"]]
    settings = [(lora_params(resolve_model(name), r, targets).trainable_fraction, name)
                for name in models for r, targets in ((8, None), (64, ("all-linear",)))
                if r <= max_rank(resolve_model(name), targets)]
    typical = [m for m, _ in settings]
    lines = [f"m = 5 % is far from the usual LoRA setting. With PEFT's default targets it needs r = "
             f"{min(int(str(v).split()[0]) for v in table['r for 5 %: default targets'])} - "
             f"{max(int(str(v).split()[0]) for v in table['r for 5 %: default targets'])}, wider than the targeted "
             f"matrices themselves (r > min(in, out), where a low-rank factorisation stops being low-rank) in "
             f"{len(impossible)} of {len(table)} models; with all-linear targets it needs r = {min(linear)} - "
             f"{max(linear)}.",
             f"The usual settings (r = 8 on the default targets up to r = 64 on all-linear) train m = "
             f"{100 * min(typical):.2g} - {100 * max(typical):.2g} % of these models' parameters (median "
             f"{100 * statistics.median(typical):.2g} %), so the rule's gradient-and-optimizer term 4m x weights is "
             f"{400 * min(typical):.2g} - {400 * max(typical):.2g} % of the weights (the largest for "
             f"{max(settings)[1]}); \"5 %\" describes the high end of that range, not a typical adapter."]
    return table, lines

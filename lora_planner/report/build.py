"""`lora-plan report`: PNG charts and a Markdown report from profile records (+ the planner for one model).

The report reads well on its own: what was measured and how, the error summary, the seed's claims
with numbers, the planner's charts for the chosen model, speed, and every run. File names are fixed
(`report.md`, `parity.png`, ...) so a regenerated report replaces the previous one.

Input and output are checked before the work: the records (`report.runs.load_runs`: each file once, bad
lines named and skipped), then `--out` (`files.check_output_dir`: a folder that can be written).
"""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from lora_planner import __version__
from lora_planner.catalog import resolve_model
from lora_planner.errors import PlannerInputError
from lora_planner.files import check_output_dir
from lora_planner.gpus import GPUS
from lora_planner.memory import estimate_memory
from lora_planner.report import charts, claims
from lora_planner.report.calibrate import fit_calibration
from lora_planner.report.markdown import bullet_list, md_table
from lora_planner.report.runs import Runs, load_runs
from lora_planner.report.tables import (
    breakdown_frame, error_summary, rank_frame, runs_frame, scaling_frame, seed_rule_frame,
)
from lora_planner.specs import LoraSpec, TrainingSpec

GIB = 2**30
CAPACITY_GPUS = ("rtx-4090", "a100-40gb", "h100-80gb")
MODE_TEXT = {
    "cpu": "real training steps on CPU, every tensor counted by the exact live-tensor tracker",
    "fake": "the real transformers + peft step traced under FakeTensorMode (no memory used), counted by the same "
            "tracker: what a CPU step of the full-size model keeps alive",
    "cuda": "real steps on a GPU, measured by the caching allocator (max_memory_allocated above the baseline)",
}


@dataclass
class ReportResult:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    runs: Runs | None = None


def _gpu_capacities() -> dict[str, int]:
    return {f"{name} ({GPUS[name].memory_bytes / GIB:.0f} GiB)": GPUS[name].memory_bytes for name in CAPACITY_GPUS}


def _pct(x: Any, digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _gib(n: Any) -> str:
    return claims.human_bytes(n)


def _settings_text(t: TrainingSpec, with_batch: bool = True) -> str:
    parts = [f"{t.dtype} weights", f"AdamW ({t.resolved_optimizer_impl})", f"{t.device}"]
    if with_batch:
        parts.insert(0, f"batch {t.batch_size} x {t.seq_len} tokens")
    parts.append(f"LoRA r={t.lora.r} on PEFT's default targets")
    return ", ".join(parts)


def per_run_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in frame.itertuples():
        rows.append({
            "model": r.model, "run": f"{r.backend}/{r.mode}",
            "method": r.method if r.method == "full" else f"{r.method} r={int(r.r)} {r.target}",
            "precision": r.precision, "B x S": f"{r.batch_size} x {r.seq_len}",
            "ckpt": "yes" if r.grad_checkpointing else "", "attn/opt": f"{r.attention}/{r.optimizer_impl}",
            "predicted": _gib(r.predicted_peak_bytes),
            "measured": _gib(r.measured_peak_bytes) if r.status == "ok" else r.status,
            "error %": f"{100 * r.relative_error:+.3f}" if r.status == "ok" else "-",
            "phase pred / meas": f"{r.predicted_coarse_phase} / {r.measured_phase}" if r.status == "ok" else "-",
        })
    return pd.DataFrame(rows)


def _calibration_section(runs: Runs, command: str) -> list[str]:
    """What `lora-plan calibrate` makes of these runs (30 % held out, seed 0)."""
    calib = fit_calibration(runs.records, holdout=0.3, seed=0, sources=runs.paths)
    ev = calib["evaluation"]
    rows = []
    for key, f in calib["activation_factors"].items():
        group = ev["by_group"].get(key, {})
        rows.append({"family / method": key, "activation factor": f["factor"], "training runs": f["n_train"],
                     "held-out |err| % before": (group.get("before") or {}).get("median_abs_pct"),
                     "after": (group.get("after") or {}).get("median_abs_pct"), "note": f["note"] or ""})
    sources = " ".join(f"--runs {shlex.quote(p)}" for p in runs.paths)
    lines = ["### Calibration on these runs", "",
             f"`lora-plan calibrate {sources} --out calib.json` fits one multiplicative correction of the activation "
             f"term per family and method ({calib['n_train']} training runs, {calib['n_heldout']} held out at random, "
             f"seed 0). On the {ev['on']}: median |error| {_pct(ev['before']['median_abs_pct'], 3)} % -> "
             f"{_pct(ev['after']['median_abs_pct'], 3)} %, max {_pct(ev['before']['max_abs_pct'], 3)} % -> "
             f"{_pct(ev['after']['max_abs_pct'], 3)} %. Factors at 1.000 mean the memory model needs no correction "
             "for these runs; a factor away from 1 is a rule of the activation model to look at. "
             f"{_sentence(calib['device_overhead']['note'])}", "",
             md_table(pd.DataFrame(rows), formats={"activation factor": "{:.4f}", "held-out |err| % before": "{:.3f}",
                                                   "after": "{:.3f}"}), ""]
    return lines


def _largest_fitting(frame: pd.DataFrame, axis: str, capacities: dict[str, int]) -> str:
    """'on an rtx-4090 (24 GiB) full fine-tuning fits up to 4, LoRA up to 16, ...' for the smallest and
    largest capacity."""
    parts = []
    for name, nbytes in sorted(capacities.items(), key=lambda kv: kv[1])[::2]:
        fits = []
        for method, group in frame.groupby("method", sort=False):
            ok = group[group["peak_device_bytes"] <= nbytes][axis]
            reach = f"up to {int(ok.max()):,}" if len(ok) else "not at all"
            fits.append(f"{charts.METHOD_TITLES[method]} {reach}")
        parts.append(f"on {name.split(' (')[0]} ({nbytes / GIB:.0f} GiB) " + ", ".join(fits))
    return "; ".join(parts) + " (of the values charted)"


def _planned(spec: Any, training: TrainingSpec, axis: str, values: tuple[int, ...]) -> tuple[int, ...]:
    """The values of `axis` the planner accepts for `spec`: a learned position table (gpt2: 1,024) caps the
    sequence lengths charted."""
    accepted = []
    for value in values:
        try:
            estimate_memory(spec, replace(training, **{axis: value}))
        except PlannerInputError:
            continue
        accepted.append(value)
    return tuple(accepted)


def _sentence(text: str | None) -> str:
    return f"{text[0].upper()}{text[1:]}." if text else ""


def build_report(run_paths: list[str], out_dir: str | Path, model: str = "llama-3-8b",
                 command: str | None = None) -> ReportResult:
    """Write `report.md` and its PNGs into `out_dir`. Bad input lines are listed, never fatal; no
    usable record at all is a `PlannerInputError`."""
    spec = resolve_model(model)
    runs = load_runs(run_paths, require="any")
    out = check_output_dir(out_dir, "out")  # before any chart: a bad --out is said now, not after the work
    result = ReportResult(out_dir=out, runs=runs)
    files = result.files
    frame = runs_frame(runs.records)
    ok = frame[frame["status"] == "ok"]
    capacities = _gpu_capacities()

    def image(alt: str, fig: Any, name: str) -> list[str]:
        fig.savefig(out / name)
        files.append(out / name)
        return [f"![{alt}]({name})", ""]

    command = command or "lora-plan report " + " ".join(f"--runs {shlex.quote(p)}" for p in run_paths) + \
        f" --out {shlex.quote(str(out_dir))} --model {model}"

    md: list[str] = ["# Validation report: predicted vs measured memory of a training step", ""]
    md.append(f"Generated by `{command}` (lora_planner {__version__}, "
              f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d')}). Memory in GiB = 2^30 bytes "
              "(KiB / MiB for the tiny models).")
    md.append("")
    src_rows = []
    for path in runs.paths:
        mine = frame[frame["source"].str.startswith(f"{path}:")]
        counts = mine["status"].value_counts()
        src_rows.append({"file": path, "records": len(mine), "ok": int(counts.get("ok", 0)),
                         "oom": int(counts.get("oom", 0)), "error": int(counts.get("error", 0)),
                         "bad lines": sum(1 for p in runs.problems if p.path == path),
                         "modes": ", ".join(sorted(mine["mode"].unique())),
                         "models": len(mine["model"].unique())})
    md += [md_table(pd.DataFrame(src_rows)), ""]

    # ------------------------------------------------------------------ summary
    md += ["## Summary", ""]
    if len(ok):
        within5 = int((ok["abs_pct_error"] <= 5).sum())
        within1 = int((ok["abs_pct_error"] <= 1).sum())
        worst = ok.loc[ok["abs_pct_error"].idxmax()]
        phase_match = ok[ok["measured_phase"].notna()]
        same_phase = int((phase_match["measured_phase"] == phase_match["predicted_coarse_phase"]).sum())
        md.append(f"{len(ok)} measured runs of {ok['model'].nunique()} models ({ok['family'].nunique()} families). "
                  f"The planner's peak is within +-1 % of the measured peak in {within1} and within +-5 % in "
                  f"{within5} of them; the median absolute error is {_pct(ok['abs_pct_error'].median(), 3)} %, the "
                  f"largest {_pct(worst['abs_pct_error'], 3)} % ({worst['model']}, {worst['backend']}/{worst['mode']}, "
                  f"{worst['method']}, {worst['precision']}, batch {worst['batch_size']} x {worst['seq_len']}). "
                  f"The predicted phase of the peak (forward / backward / optimizer step) is the measured one in "
                  f"{same_phase} of {len(phase_match)} runs.")
    else:
        md.append("No run in these files has a measurement (every record is oom or error): there is nothing to "
                  "compare; the runs are listed below.")
    not_ok = frame[frame["status"] != "ok"]
    if len(not_ok):
        counts = ", ".join(f"{n} {status}" for status, n in not_ok["status"].value_counts().items())
        md.append(f"{len(not_ok)} run(s) did not finish ({counts}); they are listed under *Runs that did not finish*.")
    md.append("")
    md += ["Error by backend, measurement mode and method (|error| = |predicted / measured - 1|):", "",
           md_table(error_summary(frame), formats={"median |err| %": "{:.3f}", "max |err| %": "{:.3f}",
                                                   "median err %": "{:+.3f}"}), ""]
    if len(ok) and ok["family"].nunique() > 1:
        md += ["By family and mode:", "",
               md_table(error_summary(frame, by=("family", "mode")),
                        formats={"median |err| %": "{:.3f}", "max |err| %": "{:.3f}", "median err %": "{:+.3f}"}), ""]
    if len(ok):
        md += image("predicted vs measured", charts.parity_chart(frame), "parity.png")

    if len(ok) >= 2:
        md += _calibration_section(runs, command)

    md += ["### What was measured", ""]
    md.append(bullet_list([f"**{mode}**: {MODE_TEXT.get(mode, mode)} ({n} runs)."
                           for mode, n in frame["mode"].value_counts().sort_index().items()] + [
        "Each run does `steps` training steps (step 1 creates the optimizer state); the measured peak is the largest "
        "of them, and the planner predicts the steady-state step's peak (which bounds step 1).",
        "The planner's prediction in each record is for the same device as the measurement (cpu for cpu and fake "
        "runs: no CUDA overhead, PyTorch's CPU default for-loop AdamW and CPU attention kernels).",
        "Random weights and random token ids; nothing is downloaded. Inline tiny configs are stored in each record "
        "(`sweep.model_source`).",
    ]))
    md.append("")

    # ------------------------------------------------------------------ seed claims
    md += ["## The seed's claims, checked", ""]
    for number, (method, title) in enumerate((("lora", "LoRA needs (1 + 4m) x the weights"),
                                              ("full", "Full fine-tuning needs 4 x the weights")), start=1):
        table, lines = claims.seed_rule_claim(frame, method)
        md += [f"### {number}. {title}", "", " ".join(lines), ""]
        if not table.empty:
            md += [md_table(table), ""]
    if len(ok) and ok["seed_rule_error"].notna().any():
        md += image("seed rule vs measured", charts.seed_rule_measured_chart(frame), "seed_rule_measured.png")
    seed_training = TrainingSpec(method="lora", dtype="bf16", device="cuda", batch_size=1, lora=LoraSpec(r=8))
    seed_frame = seed_rule_frame(spec, seed_training, _planned(spec, seed_training, "seq_len",
                                                               (128, 256, 512, 1024, 2048, 4096)))
    md.append(f"The same comparison from the planner for {spec.name} (batch 1, bf16, CUDA) as the sequence grows: the "
              "rule is close only while the logits and activations are small next to the weights.")
    md += [""] + image("seed rule vs planner", charts.seed_rule_chart(
        seed_frame, spec.name, _settings_text(seed_training, False) + ", batch 1"), "seed_rule.png")

    table, lines = claims.phase_claim(frame)
    md += ["### 3. \"LoRA leaves the forward pass unchanged and makes the backward pass smaller\"", "",
           bullet_list(lines), ""]
    if not table.empty:
        md += ["Full and LoRA runs under the same settings, one row per model, mode, batch and checkpointing (hf "
               "backend, bf16 where measured; steady-state step; *saved* = activations alive at the end of the "
               "forward pass, *backward peak* = the backward phase's peak, *grads* = gradients alive when backward "
               "ends; step times only where a full step does at least 1 GFLOP):", "", md_table(table), ""]

    table, lines = claims.batch_claim()
    md += ["### 4. \"LoRA allows a larger batch\"", "", " ".join(lines), "",
           "Largest micro-batch whose predicted peak on the device (CUDA context and allocator reserve included) "
           "fits the budget (0: batch 1 does not fit); the budgets are exactly 24 and 80 GiB (an H100-80GB reports "
           "79.6 GiB, so the charts below, which use the catalog GPUs, can show one batch less):", "",
           md_table(table), ""]

    table, lines = claims.fraction_claim()
    md += ["### 5. \"Train about 5 % of the parameters\"", "", " ".join(lines), "",
           "Rank r at which m = trainable / all parameters reaches 5 % (PEFT's count), and the largest rank the "
           "targeted matrices allow (min(in, out) of the narrowest one):", "", md_table(table), ""]

    # ------------------------------------------------------------------ analytic charts
    base = TrainingSpec(method="lora", dtype="bf16", device="cuda", batch_size=4, seq_len=512, lora=LoraSpec(r=8))
    md += [f"## {spec.name}: the planner's view", "",
           f"Computed by the planner alone (no measurement) for {spec.name}; GPU capacities are the catalog's "
           "`memory.total` of an RTX 4090, an A100-40GB and an H100-80GB.", ""]
    bd = breakdown_frame(spec, base).set_index("method", drop=False)
    md.append(f"**Breakdown** ({_settings_text(base)}): " + "; ".join(
        f"{charts.METHOD_TITLES[m]} peaks at {_gib(row.peak_device_bytes)} on the device "
        f"({charts.PHASE_TITLES.get(row.peak_phase, row.peak_phase)}; activations {_gib(row.activations_bytes)}, "
        f"temporaries "
        f"{_gib(row.temporaries_bytes)}, seed rule {_gib(row.seed_rule_bytes)})" for m, row in bd.iterrows()) + ".")
    md += [""] + image("breakdown", charts.breakdown_chart(bd.reset_index(drop=True), spec.name, _settings_text(base)),
                       "breakdown.png")
    ranks = rank_frame(spec, base)
    lora_ranks = ranks[ranks["method"] == "lora"].sort_values("r")
    if len(lora_ranks):
        low, high = lora_ranks.iloc[0], lora_ranks.iloc[-1]
        md.append(f"**Rank**: from r = {low.r} to r = {high.r} LoRA's peak grows from {_gib(low.peak_device_bytes)} "
                  f"to {_gib(high.peak_device_bytes)} (trainable fraction {100 * low.trainable_fraction:.3g} % -> "
                  f"{100 * high.trainable_fraction:.3g} %): the rank barely matters next to the activations and "
                  "logits, which the (1+4m)x rule (dashed) leaves out.")
    md += [""] + image("peak vs rank", charts.rank_chart(ranks, capacities, spec.name,
                                                         _settings_text(base).replace(" r=8", "")), "rank.png")
    batch = scaling_frame(spec, base, "batch_size", (1, 2, 4, 8, 16, 32, 64))
    md.append("**Batch size** (512 tokens per sequence): " + _largest_fitting(batch, "batch_size", capacities) + ".")
    md += [""] + image("peak vs batch", charts.scaling_chart(batch, "batch_size", capacities, spec.name,
                                                             _settings_text(base, False) + ", 512 tokens"), "batch.png")
    seq_base = replace(base, batch_size=1, seq_len=512)
    seq = scaling_frame(spec, seq_base, "seq_len",
                        _planned(spec, seq_base, "seq_len", (256, 512, 1024, 2048, 4096, 8192, 16384)))
    md.append("**Sequence length** (batch 1): " + _largest_fitting(seq, "seq_len", capacities) + ". Full "
              "fine-tuning stays flat while its peak is the optimizer step, then grows with the activations.")
    seq_chart = charts.scaling_chart(seq, "seq_len", capacities, spec.name,
                                     _settings_text(seq_base, False) + ", batch 1")
    md += [""] + image("peak vs sequence", seq_chart, "seq.png")

    # ------------------------------------------------------------------ speed
    md += ["## Speed: full fine-tuning vs LoRA", ""]
    pairs = charts.timed_pairs(frame)
    flop_source = ok["flop_source"].dropna().iloc[0] if len(ok) and ok["flop_source"].notna().any() else \
        "FLOP approximation (6N full, 4N + 6n LoRA)"
    if len(pairs):
        ratio = pairs["ratio"]
        md.append(f"{len(pairs)} timed pairs of full and LoRA runs under the same settings whose full step does at "
                  f"least {charts.MIN_TIMED_FLOPS / 1e9:g} GFLOP (6N x tokens; smaller steps time per-op overhead): "
                  "LoRA's step time (the fastest of each run's timed steps) is "
                  f"{ratio.min():.2f} - {ratio.max():.2f} x full's (median {ratio.median():.2f}); the {flop_source} "
                  f"gives {pairs['flop_ratio_lora'].min():.2f} - {pairs['flop_ratio_lora'].max():.2f}. The standard "
                  "approximation, for comparison: forward 2N FLOPs per token, backward 4N for full fine-tuning "
                  "(input and weight gradients) and 2N + LoRA's own for LoRA (no frozen-weight gradients), so about "
                  "2/3 (3/4 with checkpointing, which recomputes the forward). These are CPU timings (the sweep's "
                  "torch threads are in each record's `sweep.torch_threads`); GPU timings come from "
                  "`experiments/grids/gpu.toml`.")
        md += [""] + image("speed", charts.speed_chart(frame, flop_source), "speed.png")
    else:
        md += [f"No timed full / LoRA pairs of at least {charts.MIN_TIMED_FLOPS / 1e9:g} GFLOP per full step in these "
               "runs (fake mode runs no kernels; cpu and cuda runs are timed).", ""]

    # ------------------------------------------------------------------ runs
    if len(not_ok):
        rows = [{"model": r.model, "run": f"{r.backend}/{r.mode}", "method": r.method, "B x S":
                 f"{r.batch_size} x {r.seq_len}", "status": r.status, "error": str(r.error or "")[:160]}
                for r in not_ok.itertuples()]
        md += ["## Runs that did not finish", "", md_table(pd.DataFrame(rows)), ""]
    md += ["## Every run: predicted vs measured peak allocated", "",
           "*phase* is where the peak falls (forward / backward / optimizer_step), predicted and measured.", "",
           md_table(per_run_table(frame)), ""]
    if runs.problems:
        md += ["## Input lines skipped", "", bullet_list([f"`{p.path}` line {p.line_number}: {p.reason}"
                                                        for p in runs.problems]), ""]
    md += ["## Regenerate", "", "```bash", command, "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    files.append(report)
    return result


def report_command(args: Any) -> int:
    """`lora-plan report --runs runs.jsonl [--runs more.jsonl] --out reports/NAME/ [--model llama-3-8b]`."""
    result = build_report(list(args.runs), args.out, model=args.model)
    assert result.runs is not None
    for note in result.runs.notes:
        print(f"lora-plan: note: {note}", file=sys.stderr)
    for problem in result.runs.problems:
        print(f"lora-plan: skipped {problem}", file=sys.stderr)
    print(f"report: {len(result.runs.records)} record(s) from {len(result.runs.paths)} file(s)"
          f"{f', {len(result.runs.problems)} bad line(s) skipped' if result.runs.problems else ''}")
    for path in result.files:
        print(f"  wrote {path}")
    return 0

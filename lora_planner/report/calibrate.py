"""Fit the planner's free constants to measured runs, and apply them to an estimate (pure Python).

What is fitted (`fit_calibration`):

- **Activation factors**, one per (family, method): the planner's activation term is multiplied by k.
  With p the predicted peak, a the predicted activations at the predicted peak and m the measured
  peak, the model is m ~ (p - a) + k a, so k minimises sum((m - (p - a) - k a)^2) over the training
  records of the group: k = sum(a (m - p + a)) / sum(a^2). A group whose activations are under
  `MIN_ACTIVATION_SHARE` of its predicted peaks keeps k = 1 (its peak does not depend on them, e.g.
  full fine-tuning peaking in the optimizer step); k is clipped to [0.25, 4].
- **Device overhead**, only from cuda records: `allocator_fraction` by least squares through the
  origin on reserved - allocated vs allocated (`measured.reserved_peak_bytes`, `measured.peak_bytes`),
  `cuda_context_bytes` as the median memory held outside the allocator (`measured.non_allocator_bytes`,
  which `lora-plan sweep` records for cuda runs). Without such records the defaults stay.

The ok records of each (family, method) are split at random (`seed`) into a training part and a
held-out part (`holdout`; at least one run of a group trains). **A fitted factor is applied only when
it lowers its group's held-out error**: the median absolute % error must drop and the max must not
rise; otherwise it stays 1 and calib.json says why (`decision`, `note`). A group with no held-out run
cannot be checked and stays at 1 too; if the applied factors together raised the held-out median,
none would be applied. The held-out runs' errors before and after (median, max) go into calib.json.
`lora-plan calibrate` writes nothing when no run could be held out, or when nothing was fitted (no
factor applied, no cuda records): it says why instead.
The linearisation above is exact for the records (their predicted peak phase is kept); applying the
factors to a new estimate (`apply_calibration`) scales the activations of every phase and takes the
peak again, so the peak phase may change.

A calib.json is user input: `load_calibration` / `check_calibration` validate it (kind, schema version, each
factor a finite number within `FACTOR_BOUNDS` under a known family/method key, the device constants within the
bounds of `--cuda-context` / `--allocator-overhead`) and name the key at fault in one line, and
`apply_calibration` / `calibrated_overhead` apply only a checked document, so no file can make a device peak
negative or a "fits" verdict out of a string.

Everything here is pure Python (`lora-plan estimate --calibration` imports it).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import replace
from math import ceil
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.files import read_json_file
from lora_planner.gpus import GPUS
from lora_planner.memory import (
    MAX_ALLOCATOR_FRACTION, MAX_CUDA_CONTEXT_BYTES, DeviceOverhead, MemoryEstimate, PhaseMemory,
)
from lora_planner.planner import Plan, fits_on
from lora_planner.specs import FAMILIES, METHODS

CALIBRATION_SCHEMA_VERSION = 1
CALIBRATION_KIND = "lora_planner.calibration"
MIN_ACTIVATION_SHARE = 0.02
FACTOR_BOUNDS = (0.25, 4.0)
GIB = 2**30


def group_key(family: str, method: str) -> str:
    return f"{family}/{method}"


def _activation_terms(record: dict[str, Any]) -> tuple[float, float, float]:
    """(predicted peak p, predicted activations a at that peak, measured peak m) of an ok record."""
    predicted = record["predicted"]
    return (float(predicted["peak_bytes"]), float(predicted["breakdown_bytes"].get("activations", 0)),
            float(record["measured"]["peak_bytes"]))


def fit_activation_factor(records: Iterable[dict[str, Any]]) -> tuple[float, str | None]:
    """Least-squares k for m ~ (p - a) + k a, or (1.0, why not) when the data cannot determine it."""
    terms = [_activation_terms(r) for r in records]
    if not terms:
        return 1.0, "no training records"
    sum_aa = sum(a * a for _, a, _ in terms)
    share = sum(a for _, a, _ in terms) / sum(p for p, _, _ in terms)
    if sum_aa == 0 or share < MIN_ACTIVATION_SHARE:
        return 1.0, f"activations are {100 * share:.2g}% of the predicted peaks (< {100 * MIN_ACTIVATION_SHARE:g}%)"
    k = sum(a * (m - p + a) for p, a, m in terms) / sum_aa
    low, high = FACTOR_BOUNDS
    if not low <= k <= high:
        return min(max(k, low), high), f"least squares gave {k:.3g}, clipped to [{low:g}, {high:g}]"
    return k, None


def _calibrated_peak(record: dict[str, Any], factor: float) -> float:
    p, a, _ = _activation_terms(record)
    return p - a + factor * a


def error_stats(errors: list[float]) -> dict[str, Any]:
    """Median and max absolute % error of relative errors (predicted / measured - 1)."""
    if not errors:
        return {"n": 0, "median_abs_pct": None, "max_abs_pct": None}
    absolute = [100 * abs(e) for e in errors]
    return {"n": len(errors), "median_abs_pct": statistics.median(absolute), "max_abs_pct": max(absolute)}


def split_records(records: list[dict[str, Any]], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out): a seeded shuffle of the records sorted by key and origin, then per
    (family, method) group the first round(holdout x group size) are held out, so every group with two
    or more runs can check its own factor; at least one run of each group trains."""
    ordered = sorted(records, key=lambda r: (r["key"], r.get("_source", ""), r.get("timestamp", "")))
    random.Random(seed).shuffle(ordered)
    sizes: dict[str, int] = {}
    for r in ordered:
        sizes[_group(r)] = sizes.get(_group(r), 0) + 1
    quota = {key: min(round(holdout * n), n - 1) for key, n in sizes.items()}
    train, held = [], []
    for r in ordered:
        key = _group(r)
        if quota[key] > 0:
            quota[key] -= 1
            held.append(r)
        else:
            train.append(r)
    return train, held


def _group(record: dict[str, Any]) -> str:
    return group_key(record["family"], record["settings"]["method"])


def _fit_device_overhead(records: list[dict[str, Any]]) -> dict[str, Any]:
    cuda = [r for r in records if r.get("device") == "cuda" or r.get("mode") == "cuda"]
    reserved = [r for r in cuda if isinstance(r["measured"].get("reserved_peak_bytes"), (int, float))]
    outside = [r["measured"]["non_allocator_bytes"] for r in cuda
               if isinstance(r["measured"].get("non_allocator_bytes"), (int, float))]
    result: dict[str, Any] = {"n_cuda_records": len(cuda), "cuda_context_bytes": None, "allocator_fraction": None}
    notes = []
    if reserved:
        num = sum((r["measured"]["reserved_peak_bytes"] - r["measured"]["peak_bytes"]) * r["measured"]["peak_bytes"]
                  for r in reserved)
        den = sum(r["measured"]["peak_bytes"] ** 2 for r in reserved)
        result["allocator_fraction"] = max(0.0, num / den) if den else None
    else:
        notes.append("no cuda records with reserved memory: allocator_fraction keeps the planner's default")
    if outside:
        result["cuda_context_bytes"] = int(statistics.median(outside))
    else:
        notes.append("no cuda records with memory outside the allocator: cuda_context_bytes keeps the planner's "
                     "default")
    if not cuda:
        notes = ["no cuda records: the device overhead keeps the planner's defaults (CUDA context, allocator reserve)"]
    result["note"] = "; ".join(notes) or None
    return result


def _errors(records: list[dict[str, Any]], factor: float) -> list[float]:
    return [_calibrated_peak(r, factor) / _activation_terms(r)[2] - 1 for r in records]


def lowers_error(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """The acceptance rule: the median |error| drops and the max |error| does not rise."""
    if not before["n"]:
        return False
    return after["median_abs_pct"] < before["median_abs_pct"] and after["max_abs_pct"] <= before["max_abs_pct"]


def _decide(fitted: float, fit_note: str | None, held: list[dict[str, Any]]) -> tuple[float, str, str | None]:
    """(applied factor, decision, note) for a group's least-squares factor and its held-out runs."""
    if fitted == 1.0:
        return 1.0, "not fitted", fit_note
    if not held:
        return 1.0, "unchecked", f"least squares gave {fitted:.4f} but no run of this group is held out to check it"
    before, after = error_stats(_errors(held, 1.0)), error_stats(_errors(held, fitted))
    if lowers_error(before, after):
        return fitted, "applied", fit_note
    return 1.0, "rejected", (f"least squares gave {fitted:.4f}, which does not lower the held-out error (median "
                             f"{before['median_abs_pct']:.2f}% -> {after['median_abs_pct']:.2f}%, max "
                             f"{before['max_abs_pct']:.2f}% -> {after['max_abs_pct']:.2f}%)")


def fit_calibration(records: list[dict[str, Any]], holdout: float = 0.3, seed: int = 0,
                    sources: list[str] | None = None) -> dict[str, Any]:
    """The calib.json document for these records (only status-ok records are used). Every group's
    factor says whether it is applied (`decision`: applied, rejected, unchecked, not fitted) and why."""
    if not 0 <= holdout < 1:
        raise PlannerInputError("holdout", f"must be in [0, 1), got {holdout}", "pass e.g. --holdout 0.3")
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise PlannerInputError("runs", "no measured (status ok) records to calibrate on",
                                "run `lora-plan sweep GRID --out runs.jsonl` first")
    train, held = split_records(ok, holdout, seed)
    factors: dict[str, Any] = {}
    for key in sorted({_group(r) for r in ok}):
        family, method = key.split("/")
        members = [r for r in train if _group(r) == key]
        held_members = [r for r in held if _group(r) == key]
        fitted, fit_note = fit_activation_factor(members)
        factor, decision, note = _decide(fitted, fit_note, held_members)
        factors[key] = {"family": family, "method": method, "factor": factor, "fitted_factor": fitted,
                        "decision": decision, "n_train": len(members), "n_heldout": len(held_members),
                        "train_error_before": error_stats(_errors(members, 1.0)),
                        "train_error_after": error_stats(_errors(members, fitted)),
                        "heldout_error_before": error_stats(_errors(held_members, 1.0)),
                        "heldout_error_after": error_stats(_errors(held_members, fitted)),
                        "note": note}

    def errors(records_: list[dict[str, Any]], calibrated: bool) -> list[float]:
        return [e for r in records_ for e in _errors([r], factors[_group(r)]["factor"] if calibrated else 1.0)]

    applied = [f for f in factors.values() if f["decision"] == "applied"]
    if applied and not lowers_error(error_stats(errors(held, False)), error_stats(errors(held, True))):
        for f in applied:  # each lowered its own group's error, but together they raise the median
            f.update(factor=1.0, decision="rejected",
                     note="lowered its group's held-out error, but the applied factors together do not lower "
                          "the held-out error of all runs")
        applied = []
    device = _fit_device_overhead(train)
    fitted_device = [n for n in ("cuda_context_bytes", "allocator_fraction") if device[n] is not None]
    if not held:
        status = "no held-out runs"
        summary = (f"{len(ok)} measured run(s) leave none to hold out at holdout {holdout:g}: no factor can be "
                   "checked, so none is applied")
    elif applied or fitted_device:
        status = "calibrated"
        summary = (f"{len(applied)} of {len(factors)} activation factor(s) applied (each lowers its group's "
                   f"held-out error)" + (f"; device overhead fitted ({', '.join(fitted_device)})"
                                          if fitted_device else ""))
    else:
        status = "nothing to apply"
        summary = ("no activation factor lowers the held-out error and no cuda record gives device constants: "
                   "the uncalibrated planner stands")

    by_group = {}
    for key in factors:
        members = [r for r in held if _group(r) == key]
        if members:
            by_group[key] = {"before": error_stats(errors(members, False)), "after": error_stats(errors(members, True))}
    modes: dict[str, int] = {}
    for r in ok:
        modes[r["mode"]] = modes.get(r["mode"], 0) + 1
    return {
        "schema_version": CALIBRATION_SCHEMA_VERSION,
        "kind": CALIBRATION_KIND,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources or [],
        "status": status,
        "summary": summary,
        "rule": "a factor is applied only when it lowers its group's held-out median |error| without raising the max",
        "n_records": len(ok),
        "fitted_on_modes": modes,
        "holdout": holdout,
        "seed": seed,
        "n_train": len(train),
        "n_heldout": len(held),
        "activation_factors": factors,
        "device_overhead": device,
        "evaluation": {
            "on": "held-out runs" if held else "no held-out runs",
            "before": error_stats(errors(held, False)),
            "after": error_stats(errors(held, True)),
            "by_group": by_group,
            "heldout_keys": [r["key"] for r in held],
        },
    }


# ---------------------------------------------------------------------------------------------- applying


_RECALIBRATE = "recalibrate with `lora-plan calibrate --runs runs.jsonl --out calib.json`"
_PASS_A_CALIB = "pass a file written by `lora-plan calibrate --out calib.json`"


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and check a calib.json like any user input (`check_calibration`): one-line `PlannerInputError`
    naming the file and the key when it is not a valid one."""
    path = Path(path)
    calib = read_json_file(path, "calibration", _PASS_A_CALIB)
    return check_calibration(calib, str(path))


def _is_number(value: Any) -> bool:
    """A finite JSON number; bools are not numbers."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_calibration(calib: Any, source: str = "calibration file") -> dict[str, Any]:
    """`calib` if it is a calibration document the planner can apply, else a `PlannerInputError` (field
    `calibration`) naming `source`, the key and the fix. What is checked (everything `apply_calibration`,
    `calibrated_overhead` and `calibration_summary` read):

    - `kind` is `CALIBRATION_KIND` and `schema_version` the integer `CALIBRATION_SCHEMA_VERSION`;
    - `activation_factors` maps "family/method" keys (a known family and method) to objects whose `factor` is a
      finite number within `FACTOR_BOUNDS` (what `fit_activation_factor` clips to; 1 = not applied);
    - `device_overhead.cuda_context_bytes` is null or an integer in [0, 1 TiB) and
      `device_overhead.allocator_fraction` null or a finite number in [0, 10): the bounds `--cuda-context` and
      `--allocator-overhead` have (`lora_planner.memory.DeviceOverhead`), so no calibration can make a device
      peak negative;
    - the display fields (`fitted_on_modes`, `evaluation.before/after.median_abs_pct`) have their types.
    """
    def bad(key: str, problem: str, fix: str = _RECALIBRATE) -> PlannerInputError:
        return PlannerInputError("calibration", f"{source}: {key} {problem}", fix)

    if not isinstance(calib, dict) or calib.get("kind") != CALIBRATION_KIND:
        raise PlannerInputError("calibration", f"{source} is not a lora-plan calibration file (kind is not "
                                               f"{CALIBRATION_KIND!r})", _PASS_A_CALIB)
    version = calib.get("schema_version")
    if isinstance(version, bool) or version != CALIBRATION_SCHEMA_VERSION:
        raise bad("schema_version", f"is {_shown(version)}, not {CALIBRATION_SCHEMA_VERSION}",
                  f"{_RECALIBRATE} with this version (schema {CALIBRATION_SCHEMA_VERSION})")
    factors = calib.get("activation_factors")
    if not isinstance(factors, dict):
        raise bad("activation_factors", f"must be an object mapping family/method to a factor, got {_shown(factors)}")
    low, high = FACTOR_BOUNDS
    for key, entry in factors.items():
        family, _, method = key.partition("/") if isinstance(key, str) else ("", "", "")
        if family not in FAMILIES or method not in METHODS:
            raise bad(f"activation_factors[{key!r}]", f"is not a family/method key (families: {', '.join(FAMILIES)}; "
                                                      f"methods: {', '.join(METHODS)})")
        factor = entry.get("factor") if isinstance(entry, dict) else None
        if not _is_number(factor) or not low <= factor <= high:
            raise bad(f"activation_factors[{key!r}].factor", f"must be a positive factor, a finite number in "
                                                             f"[{low:g}, {high:g}], got {_shown(factor)}")
        for name, expected in (("family", family), ("method", method)):
            if name in entry and entry[name] != expected:
                raise bad(f"activation_factors[{key!r}].{name}", f"is {_shown(entry[name])}, but the key says "
                                                                 f"{expected!r}")
    device = calib.get("device_overhead", {})
    if not isinstance(device, dict):
        raise bad("device_overhead", f"must be an object, got {_shown(device)}")
    context = device.get("cuda_context_bytes")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                or not 0 <= context < MAX_CUDA_CONTEXT_BYTES):
        raise bad("device_overhead.cuda_context_bytes", f"must be null or a whole number of bytes in [0, 1 TiB), got "
                                                        f"{_shown(context)}")
    fraction = device.get("allocator_fraction")
    if fraction is not None and (not _is_number(fraction) or not 0 <= fraction < MAX_ALLOCATOR_FRACTION):
        raise bad("device_overhead.allocator_fraction", f"must be null or a number in [0, {MAX_ALLOCATOR_FRACTION:g}) "
                                                        f"(as --allocator-overhead), got {_shown(fraction)}")
    modes = calib.get("fitted_on_modes", {})
    if not isinstance(modes, dict) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in modes.values()):
        raise bad("fitted_on_modes", f"must map modes to run counts, got {_shown(modes)}")
    evaluation = calib.get("evaluation", {})
    if not isinstance(evaluation, dict):
        raise bad("evaluation", f"must be an object, got {_shown(evaluation)}")
    for part in ("before", "after"):
        stats = evaluation.get(part, {})
        if not isinstance(stats, dict):
            raise bad(f"evaluation.{part}", f"must be an object, got {_shown(stats)}")
        median = stats.get("median_abs_pct")
        if median is not None and (not _is_number(median) or median < 0):
            raise bad(f"evaluation.{part}.median_abs_pct", f"must be null or a non-negative number, got "
                                                           f"{_shown(median)}")
    if not isinstance(evaluation.get("on", ""), str):
        raise bad("evaluation.on", f"must be a string, got {_shown(evaluation.get('on'))}")
    return calib


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def activation_factor(calib: dict[str, Any], family: str, method: str) -> float:
    """The factor for (family, method); QLoRA uses LoRA's when it has none of its own (same adapters
    and activations, only the base weights differ); 1 when nothing was fitted. `calib` is checked first."""
    factors = check_calibration(calib)["activation_factors"]
    for key in (group_key(family, method), group_key(family, "lora") if method == "qlora" else None):
        if key in factors:
            return float(factors[key]["factor"])
    return 1.0


def calibrated_overhead(calib: dict[str, Any], base: DeviceOverhead | None = None) -> DeviceOverhead:
    """`base` (the planner's defaults) with the fitted device constants where cuda records gave them (`calib` is
    checked first; `DeviceOverhead` checks the result again)."""
    base = base or DeviceOverhead()
    device = check_calibration(calib).get("device_overhead") or {}
    context, fraction = device.get("cuda_context_bytes"), device.get("allocator_fraction")
    return DeviceOverhead(cuda_context_bytes=context if context is not None else base.cuda_context_bytes,
                          allocator_fraction=fraction if fraction is not None else base.allocator_fraction)


def apply_calibration(estimate: MemoryEstimate, calib: dict[str, Any], family: str, device: str,
                      overhead: DeviceOverhead | None = None) -> MemoryEstimate:
    """`estimate` with its activation term scaled by the (family, method) factor in every phase, the
    peak taken again, and the device overhead recomputed with the calibrated constants (only a checked
    `calib` is applied: `check_calibration`)."""
    k = activation_factor(calib, family, estimate.method)
    phases = tuple(PhaseMemory(p.phase, replace(p.breakdown, activations_bytes=ceil(p.breakdown.activations_bytes * k)))
                   for p in estimate.phases)
    peak = max(p.breakdown.total_bytes for p in phases)
    overhead = calibrated_overhead(calib, overhead)
    return replace(estimate, phases=phases, device_overhead_bytes=overhead.bytes_for(peak, device))


def calibrate_plan(plan: Plan, calib: dict[str, Any]) -> Plan:
    """Every method of `plan` calibrated, with its fit against the budget and the GPUs recomputed."""
    overhead = calibrated_overhead(calib, plan.overhead)
    methods = {}
    for method, mp in plan.methods.items():
        estimate = apply_calibration(mp.estimate, calib, plan.spec.family, plan.training.device, plan.overhead)
        fits = None if plan.budget is None else estimate.peak_device_bytes <= plan.budget.memory_bytes
        gpus = fits_on(estimate.peak_device_bytes, GPUS, plan.training.compute_dtype)
        methods[method] = replace(mp, estimate=estimate, fits=fits, fits_on=gpus)
    return replace(plan, methods=methods, overhead=overhead)


def calibration_summary(calib: dict[str, Any], plan: Plan, path: str) -> dict[str, Any]:
    """What `--json` adds under "calibration", with a one-line `note` for the human output."""
    family = plan.spec.family
    factors = {m: activation_factor(calib, family, m) for m in plan.methods}
    device = calib.get("device_overhead") or {}
    fitted_device = [name for name in ("cuda_context_bytes", "allocator_fraction") if device.get(name) is not None]
    evaluation = calib.get("evaluation", {})
    before, after = evaluation.get("before", {}), evaluation.get("after", {})
    modes = ", ".join(f"{n} {mode}" for mode, n in sorted(calib.get("fitted_on_modes", {}).items()))
    parts = [f"activations x{factors[m]:.3f} ({family}/{m})" for m in plan.methods]
    parts.append("device overhead " + ("fitted (" + ", ".join(fitted_device) + ")" if fitted_device
                                       else "at the defaults (no cuda records)"))
    note = f"calibrated with {path}: " + "; ".join(parts) + f"; fitted on {modes} records"
    if before.get("median_abs_pct") is not None and after.get("median_abs_pct") is not None:
        note += (f"; {evaluation.get('on', 'held-out runs')}: median |error| {before['median_abs_pct']:.2f}% -> "
                 f"{after['median_abs_pct']:.2f}%")
    return {"path": path, "activation_factors": factors, "device_overhead_fitted": fitted_device,
            "fitted_on_modes": calib.get("fitted_on_modes", {}), "evaluation": {"before": before, "after": after},
            "note": note}


def calibrate_plan_from_file(plan: Plan, path: str) -> tuple[Plan, dict[str, Any]]:
    """`lora-plan estimate --calibration calib.json`: the calibrated plan and what to say about it."""
    calib = load_calibration(path)
    return calibrate_plan(plan, calib), calibration_summary(calib, plan, path)


# ---------------------------------------------------------------------------------------------- command


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def format_calibration(calib: dict[str, Any]) -> list[str]:
    """Plain-text lines: each factor (applied or not, and why), the device overhead, the held-out error
    before/after and the verdict."""
    lines = [f"calibration from {calib['n_records']} measured run(s) ({calib['n_train']} training, "
             f"{calib['n_heldout']} held out, seed {calib['seed']})"]
    lines.append(f"  {'family/method':<16} {'factor':>7} {'fitted':>7} {'train':>5} {'held':>4}  decision")
    for key, f in calib["activation_factors"].items():
        fitted = f.get("fitted_factor", f["factor"])
        why = f": {f['note']}" if f.get("note") else ""
        lines.append(f"  {key:<16} {f['factor']:>7.4f} {fitted:>7.4f} {f['n_train']:>5} {f.get('n_heldout', 0):>4}  "
                     f"{f.get('decision', 'applied')}{why}")
    device = calib["device_overhead"]
    if device["n_cuda_records"]:
        context = device["cuda_context_bytes"]
        fraction = device["allocator_fraction"]
        lines.append(f"  device overhead from {device['n_cuda_records']} cuda run(s): context "
                     f"{'-' if context is None else f'{context / 2**20:.0f} MiB'}, allocator fraction "
                     f"{'-' if fraction is None else f'{fraction:.4f}'}")
    if device.get("note"):
        lines.append(f"  {device['note']}")
    ev = calib["evaluation"]
    if ev["before"]["n"]:
        lines.append(f"  {ev['on']}: median |error| {_pct(ev['before']['median_abs_pct'])} -> "
                     f"{_pct(ev['after']['median_abs_pct'])}, max |error| {_pct(ev['before']['max_abs_pct'])} -> "
                     f"{_pct(ev['after']['max_abs_pct'])} ({ev['before']['n']} run(s), with the applied factors)")
    if calib.get("summary"):
        lines.append(f"  {calib['summary']}")
    return lines


def calibrate_command(args: Any) -> int:
    """`lora-plan calibrate --runs runs.jsonl [--runs more.jsonl] --out calib.json [--holdout 0.3 --seed 0]`.

    Writes calib.json only when the held-out runs confirm something: with no run to hold out, or
    nothing applied, it says why (one-line error, exit 2) and writes nothing. `--out` is checked before
    the runs are read (`files.check_output_file`); the empty file that check creates is removed again
    when nothing is written."""
    import os
    import sys

    from lora_planner.files import check_output_file, dumps_strict
    from lora_planner.report.runs import load_runs

    out = Path(args.out)
    new_file = not os.path.lexists(out)
    check_output_file(out, "out")
    try:
        runs = load_runs(args.runs, require="ok")
        for note in runs.notes:
            print(f"lora-plan: note: {note}", file=sys.stderr)
        for problem in runs.problems:
            print(f"lora-plan: skipped {problem}", file=sys.stderr)
        calib = fit_calibration(runs.records, holdout=args.holdout, seed=args.seed, sources=runs.paths)
        if calib["status"] == "no held-out runs":
            raise PlannerInputError("runs", f"{calib['n_records']} measured run(s) leave none to hold out at "
                                            f"--holdout {args.holdout:g}, so no fit can be checked and {out} was "
                                            "not written",
                                    "measure two or more runs per family/method and keep --holdout above 0 "
                                    "(default 0.3)")
        for line in format_calibration(calib):
            print(line)
        if calib["status"] == "nothing to apply":
            ev = calib["evaluation"]
            median = _pct(ev["before"]["median_abs_pct"])
            raise PlannerInputError("runs", f"the fit does not lower the held-out error of these runs (median "
                                            f"{median} uncalibrated), so {out} was not written",
                                    "keep the uncalibrated planner, or measure more runs to fit a correction")
        try:
            out.write_text(dumps_strict(calib, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            raise PlannerInputError("out", f"cannot write {out} ({err.strerror or err})",
                                    "pass a writable path") from None
    except BaseException:
        if new_file and out.is_file() and out.stat().st_size == 0:
            out.unlink()
        raise
    print(f"written to {out}; use it with `lora-plan estimate ... --calibration {out}`")
    return 0

"""Profile records and planner grids as pandas DataFrames, and the error summaries of a report.

`runs_frame` flattens records (one row per run, bytes as ints, errors as fractions); `error_summary`
groups measured runs. The analytic frames (`breakdown_frame`, `rank_frame`, `scaling_frame`,
`seed_rule_frame`) are computed from the planner alone for one model and one set of settings.

FLOPs: `flop_ratio` uses the planner's FLOP model (`lora_planner.throughput.step_flops`) when the
checkout has one, else `approximate_flop_ratio`, the standard approximation of a training step, which
counts 2N FLOPs per token for the forward pass and 4N for the backward pass of a full fine-tune
(input gradients 2N + weight gradients 2N), N = parameters that take part in a matmul (embedding
lookups excluded; a tied lm_head counted). LoRA skips the frozen weights' gradients: forward 2N +
2n, backward 2N + 4n (n = adapter parameters), so LoRA / full ~ (4N + 6n) / 6N ~ 2/3; with
gradient checkpointing both recompute the forward: (6N + 8n) / 8N ~ 3/4. Attention-score FLOPs
(which grow with the sequence and which LoRA does not reduce) are left out, so the true ratio is
closer to 1 at long sequences.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any

import pandas as pd

from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import CATEGORIES, estimate_memory
from lora_planner.params import count_params, lora_params, max_rank
from lora_planner.specs import LoraSpec, ModelSpec, TrainingSpec

GIB = 2**30
PHASES = ("forward", "backward", "optimizer_step", "zero_grad")


# ---------------------------------------------------------------------------------------------- records


def spec_for_record(record: dict[str, Any]) -> ModelSpec | None:
    """The model of a record: the sweep's inline config or catalog name, else the record's `model` as a
    catalog name or config path; None when it cannot be rebuilt."""
    source = (record.get("sweep") or {}).get("model_source") or {}
    try:
        if isinstance(source.get("config"), dict):
            return _spec_from_config_cached(_freeze(source["config"]), record["model"])
        if isinstance(source.get("catalog"), str):
            return resolve_model(source["catalog"])
        return resolve_model(record["model"])
    except (PlannerInputError, OSError, TypeError, ValueError):
        return None


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@lru_cache(maxsize=256)
def _spec_from_config_cached(frozen: tuple, name: str) -> ModelSpec:
    def thaw(value: Any) -> Any:
        if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                      for v in value):
            return {k: thaw(v) for k, v in value}
        return value

    return spec_from_config(thaw(frozen), name=name)


def record_targets(record: dict[str, Any]) -> tuple[str, ...] | None:
    sweep_target = (record.get("sweep") or {}).get("target")
    if isinstance(sweep_target, str):
        return None if sweep_target == "default" else tuple(sweep_target.split(","))
    if "targets_asked" in record["settings"]:  # records since layer-specific targets were modelled
        asked = record["settings"]["targets_asked"]
        return tuple(str(t) for t in asked) if asked else None
    paths = record["settings"].get("target_modules") or []
    names = tuple(dict.fromkeys(str(p).rsplit(".", 1)[-1] for p in paths))
    return names or None


def training_for_record(record: dict[str, Any]) -> TrainingSpec | None:
    s = record["settings"]
    try:
        layers = s.get("layers_to_transform")
        saved = s.get("modules_to_save")
        lora = LoraSpec(r=s.get("r") or 8, alpha=s.get("alpha"), target_modules=record_targets(record),
                        adapter_dtype=s.get("adapter_dtype", "fp32"),
                        layers_to_transform=tuple(layers) if layers else None,
                        use_rslora=bool(s.get("use_rslora")), use_dora=bool(s.get("use_dora")),
                        modules_to_save=tuple(saved) if saved else None, bias=s.get("bias") or "none") \
            if s["method"] != "full" else LoraSpec()
        loss = {"loss": s.get("loss", "hf")} | ({"loss_chunks": s["loss_chunks"]} if s.get("loss_chunks") else {}) \
            | ({"loss_chunk_tokens": s["loss_chunk_tokens"]} if s.get("loss_chunk_tokens") else {}) \
            | ({"loss_target_gib": s.get("loss_target_gib")} if s.get("loss", "hf").startswith("unsloth") else {})
        return TrainingSpec(method=s["method"], dtype=s.get("dtype", "bf16"), amp=s.get("amp"),
                            optimizer=s.get("optimizer", "adamw"), optimizer_impl=s.get("optimizer_impl"),
                            batch_size=s["batch_size"], seq_len=s["seq_len"],
                            grad_checkpointing=bool(s.get("grad_checkpointing")), device=record.get("device", "cpu"),
                            use_reentrant=bool(s.get("use_reentrant")),
                            attention=s.get("attention", "sdpa"), lora=lora, padding=bool(s.get("padding")),
                            packing=bool(s.get("packing")), load_in_8bit=bool(s.get("load_in_8bit")),
                            kbit_prep=s.get("kbit_prep") is not False, double_quant=s.get("double_quant") is not False,
                            quant_type=s.get("quant_type") or "nf4",
                            bnb_4bit_compute_dtype=s.get("bnb_4bit_compute_dtype"), **loss)
    except (PlannerInputError, TypeError, KeyError):
        return None


def matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in a matmul per token (embedding lookups excluded, a tied head counted)."""
    groups = count_params(spec).by_group
    head = spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else groups["lm_head"]
    return groups["attention"] + groups["mlp"] + head


def approximate_flop_ratio(spec: ModelSpec, training: TrainingSpec) -> float:
    """LoRA / full training FLOPs per token under the standard approximation (module docstring)."""
    n = matmul_params(spec)
    adapters = lora_params(spec, training.lora.r, training.lora.target_modules,
                           training.lora.layers_to_transform).trainable_params
    if training.grad_checkpointing:
        return (6 * n + 8 * adapters) / (8 * n)
    return (4 * n + 6 * adapters) / (6 * n)


def flop_ratio(spec: ModelSpec, training: TrainingSpec) -> tuple[float, str]:
    """LoRA / full FLOPs of a step and where the number comes from: the planner's FLOP model
    (`lora_planner.throughput.step_flops`) when this checkout has it, else the approximation."""
    try:
        from lora_planner.throughput import step_flops

        lora = step_flops(spec, replace(training, method="lora")).total
        full = step_flops(spec, replace(training, method="full")).total
        return lora / full, "FLOP model (lora_planner.throughput)"
    except (ImportError, AttributeError, TypeError):
        return approximate_flop_ratio(spec, training), "FLOP approximation (6N full, 4N + 6n LoRA)"


def _precision(settings: dict[str, Any], sweep: dict[str, Any]) -> str:
    if isinstance(sweep.get("precision"), str):
        return sweep["precision"]
    return f"amp-{settings['amp']}" if settings.get("amp") else str(settings.get("dtype"))


def _target_label(record: dict[str, Any]) -> str:
    if record["settings"]["method"] == "full":
        return "-"
    targets = record_targets(record)
    return "default" if targets is None else ",".join(targets)


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (any status). Bytes are ints, `relative_error` = predicted / measured - 1."""
    rows = []
    for record in records:
        s, pred = record["settings"], record["predicted"]
        sweep = record.get("sweep") or {}
        measured = record.get("measured") or {}
        ok = record["status"] == "ok"
        row: dict[str, Any] = {
            "source": record.get("_source"), "key": record["key"], "grid": sweep.get("grid"),
            "model": record["model"], "family": record["family"], "backend": record["backend"],
            "mode": record["mode"], "device": record.get("device"), "method": s["method"],
            "r": s.get("r") if s["method"] != "full" else None, "target": _target_label(record),
            "precision": _precision(s, sweep), "optimizer": s.get("optimizer"),
            "optimizer_impl": s.get("optimizer_impl"),
            "batch_size": s["batch_size"], "seq_len": s["seq_len"], "tokens": s["batch_size"] * s["seq_len"],
            "grad_checkpointing": bool(s.get("grad_checkpointing")), "attention": s.get("attention"),
            "status": record["status"], "error": record.get("error"),
            "predicted_peak_bytes": pred["peak_bytes"], "predicted_phase": pred.get("peak_phase"),
            "predicted_coarse_phase": pred.get("coarse_phase"),
            "predicted_device_bytes": pred.get("peak_device_bytes"),
            "measured_peak_bytes": measured.get("peak_bytes") if ok else None,
            "measured_phase": measured.get("peak_phase") if ok else None,
            "step1_peak_bytes": measured.get("step1_peak_bytes") if ok else None,
            "steady_peak_bytes": measured.get("steady_peak_bytes") if ok else None,
            "reserved_peak_bytes": measured.get("reserved_peak_bytes") if ok else None,
            "relative_error": record.get("relative_error") if ok else None,
            "median_step_time_s": record.get("median_step_time_s") if ok else None,
            "tokens_per_s": record.get("tokens_per_s") if ok else None,
            "min_step_time_s": min(record["step_times_s"]) if ok and record.get("step_times_s") else None,
        }
        for category in CATEGORIES:
            row[f"pred_{category}"] = pred["breakdown_bytes"].get(category)
            breakdown = measured.get("breakdown_bytes") if ok else None
            row[f"meas_{category}"] = breakdown.get(category) if isinstance(breakdown, dict) else None
        phases = measured.get("phases") if ok else None
        for phase in PHASES:
            snap = phases.get(phase) if isinstance(phases, dict) else None
            row[f"{phase}_peak_bytes"] = snap.get("peak_bytes") if isinstance(snap, dict) else None
            row[f"{phase}_end_bytes"] = snap.get("end_bytes") if isinstance(snap, dict) else None
            end = snap.get("end_breakdown") if isinstance(snap, dict) else None
            row[f"{phase}_end_activations"] = end.get("activations") if isinstance(end, dict) else None
            row[f"{phase}_end_gradients"] = end.get("gradients") if isinstance(end, dict) else None
        spec, training = spec_for_record(record), training_for_record(record)
        row.update(seed_rule_bytes=None, trainable_fraction=None, flop_ratio=None, flop_source=None,
                   total_params=None, full_step_flops=None)
        if spec is not None and training is not None:
            try:
                estimate = estimate_memory(spec, training)
                row.update(seed_rule_bytes=estimate.seed_rule_bytes, trainable_fraction=estimate.trainable_fraction,
                           total_params=estimate.total_params,
                           full_step_flops=6 * matmul_params(spec) * training.tokens)
                if training.method != "full":
                    row["flop_ratio"], row["flop_source"] = flop_ratio(spec, training)
            except PlannerInputError:
                pass
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["abs_pct_error"] = 100 * frame["relative_error"].astype(float).abs()
        measured = frame["measured_peak_bytes"].astype(float)
        frame["seed_rule_error"] = frame["seed_rule_bytes"].astype(float) / measured - 1
        acts = frame["meas_activations"].astype(float) + frame["meas_temporaries"].astype(float)
        frame["meas_act_temp_share"] = acts / measured
        frame["best_tokens_per_s"] = frame["tokens"] / frame["min_step_time_s"].astype(float)
    return frame


def error_summary(frame: pd.DataFrame, by: tuple[str, ...] = ("backend", "mode", "method")) -> pd.DataFrame:
    """Per group: runs, ok / oom / error counts, median and max |predicted / measured - 1| (%), the share
    within +-1 % and +-5 %, and the median signed error (%)."""
    rows = []
    for keys, group in frame.groupby(list(by), dropna=False, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        ok = group[group["status"] == "ok"]
        errors = ok["abs_pct_error"].astype(float)
        row = dict(zip(by, keys))
        row.update({
            "runs": len(group), "ok": len(ok), "oom": int((group["status"] == "oom").sum()),
            "error": int((group["status"] == "error").sum()),
            "median |err| %": errors.median() if len(ok) else None,
            "max |err| %": errors.max() if len(ok) else None,
            "within 1 %": f"{int((errors <= 1).sum())}/{len(ok)}",
            "within 5 %": f"{int((errors <= 5).sum())}/{len(ok)}",
            "median err %": 100 * ok["relative_error"].astype(float).median() if len(ok) else None,
        })
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- planner


def _estimate_row(spec: ModelSpec, training: TrainingSpec, **extra: Any) -> dict[str, Any]:
    e = estimate_memory(spec, training)
    row = {"method": training.method, **extra, "peak_allocated_bytes": e.peak_allocated_bytes,
           "peak_device_bytes": e.peak_device_bytes, "device_overhead_bytes": e.device_overhead_bytes,
           "seed_rule_bytes": e.seed_rule_bytes, "peak_phase": e.peak_phase,
           "trainable_fraction": e.trainable_fraction, "trainable_params": e.trainable_params}
    row.update({f"{c}_bytes": v for c, v in e.peak.breakdown.as_dict().items()})
    return row


def breakdown_frame(spec: ModelSpec, training: TrainingSpec, methods: tuple[str, ...] = ("full", "lora", "qlora")
                    ) -> pd.DataFrame:
    """The peak's breakdown by category for each method under the same settings."""
    return pd.DataFrame([_estimate_row(spec, replace(training, method=m)) for m in methods])


def rank_frame(spec: ModelSpec, training: TrainingSpec, ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
               methods: tuple[str, ...] = ("lora", "qlora")) -> pd.DataFrame:
    """Peak vs LoRA rank (ranks wider than a targeted layer are left out), plus full fine-tuning's
    peak as a constant row per rank for reference."""
    limit = max_rank(spec, training.lora.target_modules)
    rows = []
    for r in ranks:
        if r > limit:
            continue
        for method in methods:
            t = replace(training, method=method, lora=replace(training.lora, r=r, alpha=None))
            rows.append(_estimate_row(spec, t, r=r))
        rows.append(_estimate_row(spec, replace(training, method="full"), r=r))
    return pd.DataFrame(rows)


def scaling_frame(spec: ModelSpec, training: TrainingSpec, axis: str, values: tuple[int, ...],
                  methods: tuple[str, ...] = ("full", "lora", "qlora")) -> pd.DataFrame:
    """Peak vs batch size or sequence length (`axis` is "batch_size" or "seq_len")."""
    if axis not in ("batch_size", "seq_len"):
        raise ValueError(f"axis must be batch_size or seq_len, got {axis!r}")
    rows = []
    for value in values:
        for method in methods:
            rows.append(_estimate_row(spec, replace(training, method=method, **{axis: value}), **{axis: value}))
    return pd.DataFrame(rows)


def seed_rule_frame(spec: ModelSpec, training: TrainingSpec,
                    seq_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096),
                    methods: tuple[str, ...] = ("full", "lora", "qlora")) -> pd.DataFrame:
    """The seed's rule against the planner's peak allocated memory as the sequence grows."""
    frame = scaling_frame(spec, training, "seq_len", seq_lens, methods)
    frame["seed_rule_error"] = frame["seed_rule_bytes"] / frame["peak_allocated_bytes"] - 1
    return frame

"""Synthetic profile records for report and calibration tests (the shape `profiler.runner.run_profile` writes)."""

from __future__ import annotations

from typing import Any

MIB = 2**20


def make_record(key: str, *, family: str = "llama", model: str = "llama-3.2-1b", method: str = "lora",
                predicted: int = 100 * MIB, activations: int = 40 * MIB, measured: int | None = None,
                mode: str = "cpu", backend: str = "hf", status: str = "ok", batch_size: int = 1, seq_len: int = 256,
                reserved: int | None = None, non_allocator: int | None = None, step_time: float | None = None,
                grad_checkpointing: bool = False) -> dict[str, Any]:
    breakdown = {"weights": predicted - activations, "gradients": 0, "optimizer_states": 0,
                 "activations": activations, "temporaries": 0}
    record: dict[str, Any] = {
        "schema_version": 1, "key": key, "timestamp": "2025-01-01T00:00:00+00:00", "model": model, "family": family,
        "backend": backend, "mode": mode, "device": "cuda" if mode == "cuda" else "cpu",
        "settings": {"method": method, "r": None if method == "full" else 8, "alpha": None if method == "full" else 16,
                     "target_modules": [], "adapter_dtype": "fp32", "dtype": "bf16", "amp": None,
                     "optimizer": "adamw", "optimizer_impl": "for-loop", "batch_size": batch_size, "seq_len": seq_len,
                     "grad_checkpointing": grad_checkpointing, "attention": "sdpa", "steps": 3},
        "predicted": {"peak_bytes": predicted, "peak_phase": "backward_start", "coarse_phase": "backward",
                      "breakdown_bytes": breakdown, "device_overhead_bytes": 0, "peak_device_bytes": predicted},
        "status": status,
    }
    if status == "ok":
        measured = predicted if measured is None else measured
        record["measured"] = {"peak_bytes": measured, "peak_phase": "backward", "breakdown_bytes": breakdown,
                              "step1_peak_bytes": measured, "steady_peak_bytes": measured,
                              "reserved_peak_bytes": reserved}
        if non_allocator is not None:
            record["measured"]["non_allocator_bytes"] = non_allocator
        record["relative_error"] = predicted / measured - 1
        record["step_times_s"] = [step_time] * 3 if step_time else []
        record["median_step_time_s"] = step_time
        record["tokens_per_s"] = batch_size * seq_len / step_time if step_time else None
    else:
        record["error"] = "RuntimeError: CUDA out of memory" if status == "oom" else "ValueError: boom"
    return record


def biased_records(n: int, factor: float, family: str = "llama", method: str = "lora", prefix: str = "b",
                   noise: float = 0.0, **extra: Any) -> list[dict[str, Any]]:
    """n records whose true activations are `factor` x the predicted ones (deterministic +-noise)."""
    records = []
    for i in range(n):
        activations = (20 + 7 * i) * MIB
        predicted = activations + (60 + 3 * i) * MIB
        wiggle = noise * (1 if i % 2 else -1) * predicted
        measured = int(predicted - activations + factor * activations + wiggle)
        records.append(make_record(f"{prefix}{i}", family=family, method=method, predicted=predicted,
                                   activations=activations, measured=measured, **extra))
    return records

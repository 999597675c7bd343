"""A DeepSpeed config JSON (DeepSpeed 0.18 `runtime/zero/config.py`, `runtime/zero/offload_config.py`): the ZeRO
stage as the strategy, CPU offload of the optimizer / parameters and its pinning, the bucket and prefetch sizes the
engine allocates (`lora_planner.parallel.deepspeed.DeepSpeedZeroConfig`; "auto", as the Hugging Face Trainer's
configs write them, is filled from the model's hidden size as the Trainer fills it), the micro-batch and the 16-bit
mode. A training config's `deepspeed` key naming such a file (or holding the dict) is read the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_planner.from_files.fields import Collected, bad, flag, get, mapping, positive

KEYS = frozenset({"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size",
                  "zero_allow_untested_optimizer"})
# DeepSpeedZeroConfig's fields (lora_planner.parallel.deepspeed), as DeepSpeed spells them
ZERO_SIZES = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold", "stage3_max_live_parameters")
ZERO_FLAGS = ("overlap_comm", "contiguous_gradients")
# Fields DeepSpeed reads that change memory and the planner does not model
UNMODELLED = {"zero_optimization.zero_quantized_weights": "ZeRO++ quantized weights",
              "zero_optimization.zero_hpz_partition_size": "ZeRO++ hierarchical partitioning",
              "zero_optimization.mics_shard_size": "MiCS sharding",
              "activation_checkpointing.partition_activations": "DeepSpeed's own activation partitioning",
              "activation_checkpointing.cpu_checkpointing": "DeepSpeed's own activation CPU checkpointing"}
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "offload": lambda v, d: [("zero_optimization.offload_optimizer.device", "cpu")] if v == "optimizer" else None,
    "batch_size": lambda v, d: [("train_micro_batch_size_per_gpu", v)]
    if d.get("train_micro_batch_size_per_gpu") not in (None, "auto") else None,
    "grad_accumulation": lambda v, d: [("gradient_accumulation_steps", v)]
    if d.get("gradient_accumulation_steps") not in (None, "auto") else None,
}


def detect(data: dict[str, Any]) -> bool:
    return bool(set(data) & KEYS)


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    into(out, data, "")
    return out


def include(out: Collected, key: str, value: Any) -> None:
    """A training config's `deepspeed` (`key`): a dict, or a path to the JSON (relative to that config's folder or
    to the working directory); a file not there is listed as not modelled."""
    if isinstance(value, dict):
        into(out, value, f"{key}.")
        return
    if not isinstance(value, str) or not value:
        raise bad(out.path, key, "a path to a DeepSpeed JSON or its settings", value)
    found = next((p for p in (Path(out.path).parent / value, Path(value)) if p.is_file()), None)
    if found is None:
        out.note(f"{key} {value!r} (the file is not there: pass --from it, or --strategy / --offload)")
        return
    from lora_planner.from_files import load  # the JSON reader with its one-line errors

    data = load(str(found))
    if not isinstance(data, dict):
        raise bad(str(found), "(top level)", "a mapping of DeepSpeed settings", type(data).__name__)
    into(out, data, f"{key} -> {found}: ")


def into(out: Collected, data: dict[str, Any], prefix: str) -> None:
    """DeepSpeed's fields into `out`, keys named `prefix` + DeepSpeed's dotted name."""
    path = out.path
    zero = mapping(path, prefix + "zero_optimization", data.get("zero_optimization"))
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise bad(path, prefix + "zero_optimization.stage", "0, 1, 2 or 3", stage)
    if stage:
        out.set("strategy", prefix + "zero_optimization.stage", f"deepspeed-zero{stage}")
    else:
        out.note(f"{prefix}zero_optimization.stage 0 (DeepSpeed's plain data parallelism: planned as DDP with --gpus)")
    offload = {}
    for part in ("offload_optimizer", "offload_param"):
        section = mapping(path, f"{prefix}zero_optimization.{part}", zero.get(part))
        device = section.get("device", "none")
        if device == "nvme":
            out.note(f"{prefix}zero_optimization.{part}.device nvme (NVMe offload: planned without offload)")
        elif device == "cpu":
            offload[part] = section
        elif device not in ("none", None):
            raise bad(path, f"{prefix}zero_optimization.{part}.device", "none, cpu or nvme", device)
    if "offload_param" in offload:
        out.set("offload", prefix + "zero_optimization.offload_param.device", "params")
    elif "offload_optimizer" in offload:
        out.set("offload", prefix + "zero_optimization.offload_optimizer.device", "optimizer")
    pins = {part: s["pin_memory"] for part, s in offload.items() if "pin_memory" in s}
    if pins:
        part, pin = next(iter(pins.items()))
        out.set("offload_pin_memory", f"{prefix}zero_optimization.{part}.pin_memory",
                flag(path, f"{prefix}zero_optimization.{part}.pin_memory", pin))
    pairs: list[tuple[str, Any]] = []
    for key in ZERO_SIZES:
        if key in zero and zero[key] != "auto":
            pairs.append((key, _size(path, f"{prefix}zero_optimization.{key}", zero[key])))
        elif zero.get(key) == "auto":
            pairs.append((key, "auto"))
    for key in ZERO_FLAGS:
        if zero.get(key) is not None:
            pairs.append((key, flag(path, f"{prefix}zero_optimization.{key}", zero[key])))
    if pairs:
        out.set("zero_config", prefix + "zero_optimization", tuple(pairs))
    micro = data.get("train_micro_batch_size_per_gpu")
    if micro not in (None, "auto"):
        out.set("batch_size", prefix + "train_micro_batch_size_per_gpu",
                positive(path, prefix + "train_micro_batch_size_per_gpu", micro))
    accumulation = data.get("gradient_accumulation_steps")
    if accumulation not in (None, "auto"):
        out.set("grad_accumulation", prefix + "gradient_accumulation_steps",
                positive(path, prefix + "gradient_accumulation_steps", accumulation))
    for mode, name in (("bf16", "bf16"), ("fp16", "fp16")):
        if get(data, f"{mode}.enabled") is True:
            out.set("dtype", f"{prefix}{mode}.enabled", name)
            out.set("amp", f"{prefix}{mode}.enabled", None)  # DeepSpeed's 16-bit mode is no autocast
    for key, what in UNMODELLED.items():
        if get(data, key):
            out.note(f"{prefix}{key} ({what}: not modelled)")


def _size(path: str, key: str, value: Any) -> int:
    """An element count: an integer, or a float such as 5e8 (DeepSpeed's configs write both)."""
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise bad(path, key, 'an element count (e.g. 5e8) or "auto"', value)

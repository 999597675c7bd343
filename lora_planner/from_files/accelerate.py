"""An accelerate config YAML (`accelerate launch --config_file FILE`; accelerate 1.x `commands/config/
config_args.py` `ClusterConfig`, written by `accelerate config`). The mapping:

- `num_processes` -> `--gpus`, and with `num_machines` the ranks per node (`--gpus-per-node`);
- `distributed_type`: `MULTI_GPU` -> DDP; `FSDP` -> `fsdp_config.fsdp_sharding_strategy` (`FULL_SHARD` -> fsdp,
  `SHARD_GRAD_OP` -> fsdp-grad-op; FSDP1 (`fsdp_version` 1) planned as FSDP2, which the planner models),
  `fsdp_offload_params` -> `--offload params`, `fsdp_activation_checkpointing` -> checkpointing; `DEEPSPEED` ->
  `deepspeed_config.zero_stage`, `offload_optimizer_device`, `offload_param_device`, or the JSON named by
  `deepspeed_config_file` (`lora_planner.from_files.deepspeed`);
- `mixed_precision` is autocast over whatever dtype the model is loaded in: listed, not set."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files import deepspeed as ds
from lora_planner.from_files.fields import Collected, bad, flag, mapping, positive

KEYS = frozenset({"distributed_type", "compute_environment", "num_processes", "fsdp_config", "deepspeed_config"})
SHARDING = {"FULL_SHARD": "fsdp", "1": "fsdp", "SHARD_GRAD_OP": "fsdp-grad-op", "2": "fsdp-grad-op"}
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "grad_checkpointing": lambda v, d: [("fsdp_config.fsdp_activation_checkpointing", v)]
    if str(d.get("distributed_type", "")).upper() == "FSDP" else None,
    "offload": lambda v, d: [("deepspeed_config.offload_optimizer_device", "cpu")]
    if str(d.get("distributed_type", "")).upper() == "DEEPSPEED" and v == "optimizer" else None,
}


def detect(data: dict[str, Any]) -> bool:
    return "distributed_type" in data or "compute_environment" in data


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    processes = data.get("num_processes")
    if processes is not None:
        out.set("gpus", "num_processes", positive(path, "num_processes", processes))
        machines = positive(path, "num_machines", data.get("num_machines") or 1)
        if machines > 1:
            out.set("gpus_per_node", "num_machines", max(1, processes // machines))
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind == "MULTI_GPU":
        out.set("strategy", "distributed_type", "ddp")
    elif kind == "FSDP":
        _fsdp(out, mapping(path, "fsdp_config", data.get("fsdp_config")))
    elif kind == "DEEPSPEED":
        _deepspeed(out, mapping(path, "deepspeed_config", data.get("deepspeed_config")))
    elif kind not in ("NO", "MULTI_CPU"):
        out.note(f"distributed_type {kind} (not modelled: planned on one GPU unless --gpus / --strategy)")
    mixed = data.get("mixed_precision")
    if mixed not in (None, "no"):
        out.note(f"mixed_precision {mixed} (autocast over the dtype the model is loaded in, which this file does not "
                 "say: planned at --dtype; pass --dtype fp32 --amp bf16 for an fp32 model)")
    return out


def _fsdp(out: Collected, fsdp: dict[str, Any]) -> None:
    path = out.path
    sharding = str(fsdp.get("fsdp_sharding_strategy", fsdp.get("fsdp_reshard_after_forward", "FULL_SHARD")))
    if sharding in ("True", "true"):
        sharding = "FULL_SHARD"
    elif sharding in ("False", "false"):
        sharding = "SHARD_GRAD_OP"
    if sharding not in SHARDING:
        out.note(f"fsdp_config.fsdp_sharding_strategy {sharding} (only FULL_SHARD and SHARD_GRAD_OP are modelled: "
                 "planned as FULL_SHARD)")
    out.set("strategy", "fsdp_config.fsdp_sharding_strategy", SHARDING.get(sharding, "fsdp"))
    if fsdp.get("fsdp_version", 1) != 2:
        out.note("fsdp_config.fsdp_version 1 (FSDP1's flat parameters: planned as FSDP2, fsdp_version: 2)")
    if fsdp.get("fsdp_offload_params"):
        out.set("offload", "fsdp_config.fsdp_offload_params", "params")
    if fsdp.get("fsdp_activation_checkpointing") is not None:
        out.set("grad_checkpointing", "fsdp_config.fsdp_activation_checkpointing",
                flag(path, "fsdp_config.fsdp_activation_checkpointing", fsdp["fsdp_activation_checkpointing"]))


def _deepspeed(out: Collected, config: dict[str, Any]) -> None:
    if config.get("deepspeed_config_file"):
        ds.include(out, "deepspeed_config.deepspeed_config_file", config["deepspeed_config_file"])
        return
    stage = config.get("zero_stage", 2)
    if stage not in (0, 1, 2, 3):
        raise bad(out.path, "deepspeed_config.zero_stage", "0, 1, 2 or 3", stage)
    if stage:
        out.set("strategy", "deepspeed_config.zero_stage", f"deepspeed-zero{stage}")
    devices = {part: config.get(f"offload_{part}_device", "none") for part in ("optimizer", "param")}
    for part, device in devices.items():
        if device == "nvme":
            out.note(f"deepspeed_config.offload_{part}_device nvme (NVMe offload: planned without offload)")
        elif device not in ("none", "cpu", None):
            raise bad(out.path, f"deepspeed_config.offload_{part}_device", "none, cpu or nvme", device)
    if devices["param"] == "cpu":
        out.set("offload", "deepspeed_config.offload_param_device", "params")
    elif devices["optimizer"] == "cpu":
        out.set("offload", "deepspeed_config.offload_optimizer_device", "optimizer")
    if config.get("gradient_accumulation_steps") not in (None, "auto"):
        out.set("grad_accumulation", "deepspeed_config.gradient_accumulation_steps",
                positive(out.path, "deepspeed_config.gradient_accumulation_steps",
                         config["gradient_accumulation_steps"]))

"""A PEFT adapter config (`adapter_config.json`, or a `LoraConfig` written out as JSON or YAML): peft 0.21.2
`tuners/lora/config.py` `LoraConfig`'s fields, by the same names."""

from __future__ import annotations

from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.from_files.fields import Collected, flag, index_ranges, int_list, names, positive, typed

KEYS = frozenset({"peft_type", "lora_alpha", "target_modules", "use_dora", "lora_dropout", "use_rslora",
                  "modules_to_save", "layers_to_transform", "trainable_token_indices", "target_parameters"})


def detect(data: dict[str, Any]) -> bool:
    return bool(set(data) & KEYS) or data.get("peft_type") is not None


def read(path: str, data: dict[str, Any]) -> Collected:
    if data.get("peft_type") not in (None, "LORA"):
        raise PlannerInputError("from", f"{path}: peft_type {data['peft_type']!r} is not LoRA",
                                "pass a LoRA adapter config (peft_type LORA)")
    out = Collected(path)
    if data.get("base_model_name_or_path"):
        out.set("model", "base_model_name_or_path",
                typed(path, "base_model_name_or_path", data["base_model_name_or_path"], str, "a name"))
    lora_fields(out, data, r="r", alpha="lora_alpha", targets="target_modules", dora="use_dora",
                rslora="use_rslora", to_save="modules_to_save", layers="layers_to_transform", dropout="lora_dropout",
                rank_pattern="rank_pattern", alpha_pattern="alpha_pattern", tokens="trainable_token_indices",
                parameters="target_parameters")
    if data.get("bias") is not None:
        out.set("bias", "bias", data["bias"])
    return out


def lora_fields(out: Collected, data: dict[str, Any], **key: str) -> None:
    """LoraConfig's fields under the names a framework gives them (`key`: field -> the file's key; axolotl writes
    `lora_r`, `peft_use_dora`, ...); the same mapping for every reader."""
    path = out.path
    if data.get(key["r"]) is not None:
        out.set("r", key["r"], positive(path, key["r"], data[key["r"]]))
    if data.get(key["alpha"]) is not None:
        out.set("alpha", key["alpha"], float(typed(path, key["alpha"], data[key["alpha"]], (int, float), "a number")))
    targets = data.get(key["targets"])
    if isinstance(targets, str) and targets != "all-linear" and "," not in targets and not targets.isidentifier():
        out.note(f"{key['targets']} {targets!r} (a regular expression: pass --target with the module names)")
    elif targets:
        out.set("target", key["targets"], names(path, key["targets"], targets))
    if data.get(key.get("parameters", "")):
        out.set("target_parameters", key["parameters"], names(path, key["parameters"], data[key["parameters"]]))
    for field_, dest in (("dora", "use_dora"), ("rslora", "use_rslora")):
        if data.get(key[field_]) is not None:
            out.set(dest, key[field_], flag(path, key[field_], data[key[field_]]))
    if data.get(key["to_save"]):
        out.set("modules_to_save", key["to_save"], names(path, key["to_save"], data[key["to_save"]]))
    if data.get(key["layers"]) is not None:
        out.set("layers_to_transform", key["layers"], index_ranges(int_list(path, key["layers"], data[key["layers"]])))
    dropout = data.get(key["dropout"]) or 0
    if dropout:
        out.note(f"{key['dropout']} {dropout} (PEFT then keeps a dropout mask and a dropped copy of each adapted "
                 "input; planned without: under by those copies)")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if data.get(key[pattern]):
            out.note(f"{key[pattern]} (per-module ranks or alphas: planned at one rank and alpha everywhere)")
    tokens = data.get(key["tokens"])
    if tokens:
        out.set("trainable_token_indices", key["tokens"], token_indices(path, key["tokens"], tokens))


def token_indices(path: str, key: str, value: Any) -> str:
    """PEFT's trainable_token_indices (a list of ids, or {module: ids}) -> the CLI's spelling."""
    if isinstance(value, dict):
        return ";".join(f"{module}:{index_ranges(int_list(path, key, ids))}" for module, ids in value.items())
    return index_ranges(int_list(path, key, value))

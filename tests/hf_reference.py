"""Reference models for the tests: real `transformers` / `peft` models built on the meta device.

Everything is built from a config dict (never downloaded): `AutoConfig.for_model(model_type, **config)`
then `AutoModelForCausalLM.from_config` under `torch.device("meta")`, so even a 70B model costs no memory
and takes milliseconds. These are the ground truth the planner's arithmetic is checked against.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # e.g. Gemma's "legacy hidden_act=gelu" notice

LINEAR_TYPES = (nn.Linear, Conv1D)

# `model.layers.17.mlp.up_proj` / `transformer.h.3.attn.c_attn`: the per-layer part of a module path.
_LAYER = re.compile(r"\.(layers|h)\.(\d+)(?=\.|$)")


def hf_config(config: dict[str, Any]):
    """The `transformers` config object for a config.json dict (its `model_type` picks the class)."""
    kwargs = {key: value for key, value in config.items() if key != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kwargs)


def meta_model(config: dict[str, Any]) -> nn.Module:
    """A fresh `AutoModelForCausalLM` on the meta device (fresh each call: PEFT mutates it in place)."""
    cfg = hf_config(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def total_params(model: nn.Module) -> int:
    """What the planner's total must equal (`parameters()` counts a tied weight once)."""
    return sum(p.numel() for p in model.parameters())


def layer0_path(path: str) -> str:
    """`model.layers.17.mlp.up_proj` -> `model.layers.0.mlp.up_proj` (the inventory's representative)."""
    return _LAYER.sub(r".\1.0", path, count=1)


def layer_index(path: str) -> int | None:
    match = _LAYER.search(path)
    return int(match.group(2)) if match else None


def params_by_module(model: nn.Module) -> dict[str, int]:
    """Parameter count per module path, layers folded onto layer 0 (so each key sums over all layers).

    Uses `named_parameters()` (deduplicated), so a tied lm_head owns nothing.
    """
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        module_path = layer0_path(name.rsplit(".", 1)[0])
        counts[module_path] = counts.get(module_path, 0) + param.numel()
    return counts


def module_instances(model: nn.Module) -> dict[str, int]:
    """How many modules fold onto each layer-0 path (1 for modules outside the layer stack)."""
    counts: dict[str, int] = {}
    for path, _ in model.named_modules():
        if path:
            key = layer0_path(path)
            counts[key] = counts.get(key, 0) + 1
    return counts


def peft_targets(targets: tuple[str, ...]) -> str | list[str]:
    """The planner's target tuple as `LoraConfig(target_modules=...)` takes it."""
    return "all-linear" if targets == ("all-linear",) else list(targets)


def peft_lora_counts(config: dict[str, Any], r: int, targets: tuple[str, ...],
                     layers_to_transform: tuple[int, ...] | None = None) -> tuple[int, int]:
    """(trainable, all) from `PeftModel.get_nb_trainable_parameters()` for LoRA rank r, alpha 2r."""
    model = meta_model(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=peft_targets(targets),
                      layers_to_transform=list(layers_to_transform) if layers_to_transform else None)
    # Under the meta default device the adapters are created on meta too (else PEFT allocates and
    # initialises them on the CPU first: gigabytes for a 70B model at r = 64).
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # Conv1D fan_in_fan_out notice, meta-device notices
        peft_model = get_peft_model(model, lora)
    assert all(p.device.type == "meta" for p in peft_model.parameters())
    trainable, total = peft_model.get_nb_trainable_parameters()
    return int(trainable), int(total)

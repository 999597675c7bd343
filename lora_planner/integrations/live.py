"""The plan of a live run: the planner's settings read off the model, its PEFT config and the trainer's arguments,
with no re-typing (issue 14).

What is read, and from where:
- the architecture: the base model's `config` (`spec_from_config`, the same reader as `--model config.json`);
- the method and adapter: the PEFT model's `peft_config["default"]` (`lora_planner.from_files.peft`, the reader of
  `--from adapter_config.json`), a 4-bit / 8-bit base from the config's `quantization_config`
  (`from_files.model_config`), full fine-tuning when there is no adapter;
- what PEFT and the trainer did to the weights: the frozen base weights' dtype (`--dtype`), the adapters' dtype
  (fp32 or the base's: `--adapter-dtype`), fp32 embeddings on a quantized base (kbit preparation), the model's
  gradient checkpointing and `config._attn_implementation`;
- the trainer's arguments (`TrainingArguments` / TRL's `SFTConfig`, or any object with `to_dict()`):
  `from_files.training_args`, the reader of `--from sft_config.yaml`; a TRL config brings the `trl-sft` preset;
- the batch actually run: its `input_ids` shape, an attention mask with zeros (`--padding`), or one packed row with
  `position_ids` and no mask (`--packing`).

Settings are applied exactly as `--from` applies a file's (`lora_planner.stacks.apply_stack` over the CLI's
defaults), then turned into a `TrainingSpec` by the CLI's own `_training_from_args`: one path from settings to plan.

Known limitations: adapters other than LoRA, several adapters, `rank_pattern`, and a model whose config the planner
cannot read are refused with the reason (the callers turn that into a warning, never an exception in training).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.specs import ModelSpec, TrainingSpec

DTYPE_OF = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


@dataclass(frozen=True)
class LiveSetup:
    """What the run is, as the planner sees it: `spec` and `training`, the model's label, the settings read (argparse
    dests, for the record) and what they leave out."""

    label: str
    spec: ModelSpec
    training: TrainingSpec
    settings: dict[str, Any]
    not_modelled: tuple[str, ...]

    def at_batch(self, batch: Any) -> TrainingSpec:
        """`training` at the shape of `batch` (a mapping with `input_ids`): rows x tokens, padded or packed."""
        return replace(self.training, **batch_shape(batch))


def batch_shape(batch: Any) -> dict[str, Any]:
    """{batch_size, seq_len, padding, packing} of a transformers-style batch."""
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if ids is None or getattr(ids, "ndim", 0) != 2:
        raise PlannerInputError("batch", "no 2-D input_ids in the batch", "pass batches with input_ids")
    rows, tokens = (int(n) for n in ids.shape)
    mask = batch.get("attention_mask")
    padded = mask is not None and bool((mask == 0).any())
    packed = mask is None and batch.get("position_ids") is not None and rows == 1 and \
        bool((batch["position_ids"][0, 1:] == 0).any())
    return {"batch_size": rows, "seq_len": tokens, "padding": padded, "packing": packed}


def live_setup(model: Any, args: Any = None, device: str = "cuda") -> LiveSetup:
    """The plan's settings for `model` (a PEFT model or a plain transformers model) trained with `args`."""
    from lora_planner.cli import _training_from_args
    from lora_planner.cli_args import build_parser
    from lora_planner.config_reader import spec_from_config
    from lora_planner.from_files import model_config, peft, training_args
    from lora_planner.stacks import Stack, apply_stack, resolve_stack

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    label = str(config.get("_name_or_path") or config.get("model_type") or "model")
    spec = spec_from_config(config, name=label)
    settings: dict[str, Any] = {}
    notes: list[str] = []
    stack = None
    if args is not None:
        data = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
        got = training_args.read("training arguments", data)
        settings.update(got.settings)
        notes += got.notes
        stack = got.stack or ("trl-sft" if type(args).__module__.startswith("trl") else "hf-trainer")
    peft_configs = getattr(model, "peft_config", None) or {}
    if len(peft_configs) > 1:
        raise PlannerInputError("model", f"{len(peft_configs)} adapters", "plan one adapter at a time")
    if peft_configs:
        lora = next(iter(peft_configs.values()))
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.to_dict().items()}
        data["peft_type"] = str(getattr(data.get("peft_type"), "value", data.get("peft_type")))
        got = peft.read("PEFT config", data)
        settings.update({k: v for k, v in got.settings.items() if k != "model"})
        notes += got.notes
        settings["method"] = "lora"
    else:
        settings["method"] = "full"
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant:
        got = model_config.read("model config", {"quantization_config": quant, "num_hidden_layers": 0,
                                                 "architectures": []})
        settings.update({k: v for k, v in got.settings.items() if k not in ("model", "dtype")})
        notes += got.notes
    settings.update(_weights(base, model, settings, config))
    mixed = "bf16" if args is not None and getattr(args, "bf16", False) else \
        "fp16" if args is not None and getattr(args, "fp16", False) else None
    settings["amp"] = mixed if settings.get("dtype") == "fp32" else None  # autocast over 16-bit weights: nothing
    notes = [n for n in notes if not n.startswith(("bf16=true", "fp16=true"))]  # the live weights say the dtype
    if getattr(base, "is_gradient_checkpointing", False):
        settings["grad_checkpointing"] = True
    attention = getattr(base.config, "_attn_implementation", None)
    if attention:
        settings["attention"] = attention
    settings["device"] = device
    ns = build_parser("estimate").parse_args(["estimate"])
    if stack:
        apply_stack(resolve_stack(stack), ns, set(settings))
    apply_stack(Stack("live", "", settings), ns, set())
    training = _training_from_args(ns, settings["method"])
    return LiveSetup(label, spec, training, settings, tuple(notes))


def _weights(base: Any, model: Any, settings: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The dtypes PEFT and the trainer left: the frozen base weights', the adapters', and a quantized base's fp32
    embeddings (kbit preparation)."""
    out: dict[str, Any] = {}
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point]
    if frozen:
        counts: dict[str, int] = {}
        for p in frozen:
            counts[str(p.dtype)] = counts.get(str(p.dtype), 0) + p.numel()
        out["dtype"] = DTYPE_OF.get(max(counts, key=counts.get), "fp32")
    adapters = [p for n, p in model.named_parameters() if "lora_A" in n]
    if adapters:
        out["adapter_dtype"] = "fp32" if adapters[0].dtype == _fp32() else "base"
    if settings.get("method") == "qlora" or settings.get("quant") == "int8":
        embeddings = base.get_input_embeddings().weight
        out["kbit_prep"] = embeddings.dtype == _fp32()
        if out["kbit_prep"]:  # it made the non-quantized weights fp32: the load dtype is the config's
            loaded = DTYPE_OF.get(f"torch.{config.get('dtype') or config.get('torch_dtype')}")
            out.pop("dtype")
            if loaded:
                out["dtype"] = loaded
    return out


def _fp32() -> Any:
    import torch

    return torch.float32

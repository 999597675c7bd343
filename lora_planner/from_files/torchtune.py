"""A torchtune recipe YAML (`tune run lora_finetune_single_device --config FILE`; torchtune's
`recipes/configs/llama3_1/8B_lora_single_device.yaml` and `recipes/lora_finetune_single_device.py` for the fields).
Unset fields take the `torchtune` preset. The mapping:

- `model._component_`: `lora_*` builders -> LoRA, `qlora_*` -> QLoRA (torchao NF4, planned as bitsandbytes NF4),
  a plain builder -> full fine-tuning; the builder's name is looked up in the catalog (`llama3_1_8b` ->
  llama-3.1-8b), else `checkpointer.checkpoint_dir`'s config.json when it is there;
- `lora_attn_modules` (torchtune's `output_proj` is transformers' `o_proj`), `apply_lora_to_mlp` (w1 / w2 / w3:
  gate / down / up), `apply_lora_to_output` (lm_head), `lora_rank`, `lora_alpha`, `use_dora`;
- `batch_size`, `tokenizer.max_seq_len`, `dataset.packed`, `dtype`, `enable_activation_checkpointing`,
  `enable_activation_offloading`, `gradient_accumulation_steps`;
- `optimizer._component_` (torch AdamW with `fused`, bitsandbytes' 8-bit / paged AdamW, SGD) and
  `loss._component_` (`CEWithChunkedOutputLoss` -> `--loss chunked:8`, `LinearCrossEntropyLoss` -> `--loss linear`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_planner.from_files.fields import Collected, bad, flag, get, mapping, positive, typed

STACK = "torchtune"
MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP = ("gate_proj", "up_proj", "down_proj")
OPTIMIZERS = {"torch.optim.AdamW": "adamw_torch", "torch.optim.SGD": "sgd",
              "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit",
              "bitsandbytes.optim.PagedAdamW": "paged_adamw_32bit", "bitsandbytes.optim.AdamW8bit": "adamw_8bit",
              "bitsandbytes.optim.PagedAdamW32bit": "paged_adamw_32bit"}
LOSSES = {"CEWithChunkedOutputLoss": "chunked:8", "LinearCrossEntropyLoss": "linear"}
DTYPES = {"bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}
# llama3_1_8b -> llama-3.1-8b, qwen2_5_7b_base -> qwen2.5-7b, qwen3_8b_base -> qwen3-8b
BUILDER = re.compile(r"(?P<name>[a-z]+?)(?P<major>\d+)?(?:_(?P<minor>\d))?_(?P<size>\d+(?:_\d+)?b)"
                     r"(?:_(?:base|instruct))?")
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "grad_checkpointing": lambda v, d: [("enable_activation_checkpointing", v)],
    "optimizer": lambda v, d: [("optimizer._component_", c) for c, name in OPTIMIZERS.items() if name == v][:1] or None,
    "batch_size": lambda v, d: [("batch_size", v)],
    "grad_accumulation": lambda v, d: [("gradient_accumulation_steps", v)],
    "seq_len": lambda v, d: [("tokenizer.max_seq_len", v)],
    "method": lambda v, d: [("model._component_", get(d, "model._component_", "").replace(".lora_", ".qlora_"))]
    if v == "qlora" else None,
}


def detect(data: dict[str, Any]) -> bool:
    return isinstance(data.get("model"), dict) and "_component_" in data["model"]


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    model = data["model"]
    builder = str(model["_component_"]).rsplit(".", 1)[-1]
    kind = "qlora" if builder.startswith("qlora_") else "lora" if builder.startswith("lora_") else "full"
    out.set("method", "model._component_", kind)
    _model_name(out, data, builder.removeprefix("qlora_").removeprefix("lora_"))
    if kind != "full":
        _adapter(out, model)
    for key, dest in (("batch_size", "batch_size"), ("gradient_accumulation_steps", "grad_accumulation")):
        if data.get(key) is not None:
            out.set(dest, key, positive(path, key, data[key]))
    length = get(data, "tokenizer.max_seq_len")
    if length is not None:
        out.set("seq_len", "tokenizer.max_seq_len", positive(path, "tokenizer.max_seq_len", length))
    else:
        out.note("tokenizer.max_seq_len null (no truncation: the longest example decides; planned at --seq-len, "
                 "pass --lengths for the dataset's worst batch)")
    if get(data, "dataset.packed"):
        out.set("packing", "dataset.packed", True)
    if data.get("dtype") is not None:
        if data["dtype"] not in DTYPES:
            raise bad(path, "dtype", "bf16, fp32 or fp16", data["dtype"])
        out.set("dtype", "dtype", DTYPES[data["dtype"]])
    if data.get("enable_activation_checkpointing") is not None:
        out.set("grad_checkpointing", "enable_activation_checkpointing",
                flag(path, "enable_activation_checkpointing", data["enable_activation_checkpointing"]))
    if data.get("enable_activation_offloading"):
        out.set("activation_offload", "enable_activation_offloading", "torchtune")
    _optimizer(out, data)
    loss = str(get(data, "loss._component_", "")).rsplit(".", 1)[-1]
    if loss in LOSSES:
        out.set("loss", "loss._component_", LOSSES[loss])
    elif loss:
        out.note(f"loss._component_ {loss} (not modelled: planned as --loss)")
    for key, why in (("compile", "compiled graphs keep other tensors: planned eager"),
                     ("optimizer_in_bwd", "the optimizer stepped inside backward: planned after it")):
        if data.get(key):
            out.note(f"{key} ({why})")
    return out


def _model_name(out: Collected, data: dict[str, Any], builder: str) -> None:
    from lora_planner.catalog import catalog_name

    match = BUILDER.fullmatch(builder)
    if match:
        version = ".".join(p for p in (match["major"], match["minor"]) if p)
        sep = "-" if match["name"] in ("llama", "mistral", "gemma", "phi") else ""
        name = f"{match['name']}{sep}{version}-{match['size'].replace('_', '.')}" if version else \
            f"{match['name']}-{match['size'].replace('_', '.')}"
        found = catalog_name(name)
        if found is not None:
            out.set("model", "model._component_", found)
            return
    folder = get(data, "checkpointer.checkpoint_dir")
    config = Path(out.path).parent / str(folder) / "config.json" if folder else None
    if config is not None and config.is_file():
        out.set("model", "checkpointer.checkpoint_dir", str(config))
    else:
        out.note(f"model._component_ {builder} (not in the catalog and no config.json in checkpoint_dir: pass "
                 "--model)")


def _adapter(out: Collected, model: dict[str, Any]) -> None:
    path = out.path
    attn = model.get("lora_attn_modules") or []
    if not isinstance(attn, list) or any(m not in MODULES for m in attn):
        raise bad(path, "model.lora_attn_modules", f"a list of {', '.join(MODULES)}", attn)
    targets = [MODULES[m] for m in attn]
    if model.get("apply_lora_to_mlp"):
        targets += MLP
    if model.get("apply_lora_to_output"):
        targets.append("lm_head")
    if targets:
        out.set("target", "model.lora_attn_modules", ",".join(targets))
    if model.get("lora_rank") is not None:
        out.set("r", "model.lora_rank", positive(path, "model.lora_rank", model["lora_rank"]))
    if model.get("lora_alpha") is not None:
        out.set("alpha", "model.lora_alpha", float(typed(path, "model.lora_alpha", model["lora_alpha"], (int, float),
                                                         "a number")))
    if model.get("use_dora"):
        out.set("use_dora", "model.use_dora", True)
    if model.get("lora_dropout"):
        out.note(f"model.lora_dropout {model['lora_dropout']} (a dropped copy of each adapted input: planned without)")


def _optimizer(out: Collected, data: dict[str, Any]) -> None:
    optimizer = mapping(out.path, "optimizer", data.get("optimizer"))
    component = optimizer.get("_component_")
    if component is None:
        return
    if component not in OPTIMIZERS:
        out.note(f"optimizer._component_ {component} (not modelled: planned as --optimizer)")
        return
    name = OPTIMIZERS[component]
    out.set("optimizer", "optimizer._component_", "adamw_torch_fused" if name == "adamw_torch" and
            optimizer.get("fused") else name)

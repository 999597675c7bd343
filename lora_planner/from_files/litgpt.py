"""A litgpt finetune YAML (`litgpt finetune_lora --config FILE`; litgpt `litgpt/finetune/lora.py` `setup`'s
arguments, `config_hub/finetune/*/lora.yaml`). Unset fields take the `litgpt` preset. The mapping:

- `checkpoint_dir` (checkpoints/<org>/<name>) -> the model, by repo id, else its config.json when it is there;
- `precision`: `bf16-true` / `16-true` / `32-true` load in that dtype, `*-mixed` autocasts over fp32 weights;
- `quantize`: `bnb.nf4` / `bnb.fp4` (no double quantization), `-dq` with it -> QLoRA; `bnb.int8-training` ->
  LoRA on an LLM.int8 base;
- `lora_r`, `lora_alpha`, `lora_dropout`, and `lora_query` / `lora_key` / `lora_value` / `lora_projection` /
  `lora_mlp` / `lora_head` -> q / k / v / o_proj, the MLP's three linears, lm_head;
- `train.micro_batch_size`, `train.max_seq_length`, `train.global_batch_size` (with `devices`: the accumulation),
  `devices` (> 1: data parallel, Lightning Fabric's default DDP), `optimizer` (a name or `class_path`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_planner.from_files.fields import Collected, bad, flag, get, positive, typed

STACK = "litgpt"
KEYS = frozenset({"checkpoint_dir", "precision", "quantize", "lora_query", "lora_value", "lora_mlp", "lora_head",
                  "train", "devices"})
TARGETS = (("lora_query", ("q_proj",)), ("lora_key", ("k_proj",)), ("lora_value", ("v_proj",)),
           ("lora_projection", ("o_proj",)), ("lora_mlp", ("gate_proj", "up_proj", "down_proj")),
           ("lora_head", ("lm_head",)))
PRECISIONS = {"bf16-true": ("bf16", None), "16-true": ("fp16", None), "32-true": ("fp32", None),
              "bf16-mixed": ("fp32", "bf16"), "16-mixed": ("fp32", "fp16"), "32": ("fp32", None)}
OPTIMIZERS = {"adamw": "adamw_torch", "torch.optim.adamw": "adamw_torch", "sgd": "sgd", "torch.optim.sgd": "sgd",
              "bitsandbytes.optim.pagedadamw": "paged_adamw_32bit", "bitsandbytes.optim.adamw8bit": "adamw_8bit",
              "bitsandbytes.optim.pagedadamw8bit": "paged_adamw_8bit"}
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "optimizer": lambda v, d: [("optimizer.class_path" if isinstance(d.get("optimizer"), dict) else "optimizer",
                                EIGHT_BIT_CLASSES[v])] if v in EIGHT_BIT_CLASSES else None,
    "batch_size": lambda v, d: [("train.micro_batch_size", v)],
    "grad_accumulation": lambda v, d: [] if get(d, "train.global_batch_size") else None,  # derived from it
    "seq_len": lambda v, d: [("train.max_seq_length", v)],
    "method": lambda v, d: [("quantize", "bnb.nf4")] if v == "qlora" else None,
}
EIGHT_BIT_CLASSES = {"adamw_8bit": "bitsandbytes.optim.AdamW8bit",
                     "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit"}


def detect(data: dict[str, Any]) -> bool:
    return "checkpoint_dir" in data or ("lora_query" in data and "lora_r" in data) or \
        (isinstance(data.get("train"), dict) and "precision" in data)


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    _model(out, data.get("checkpoint_dir"))
    precision = data.get("precision")
    if precision is not None:
        if precision not in PRECISIONS:
            raise bad(path, "precision", "one of " + ", ".join(PRECISIONS), precision)
        out.set("dtype", "precision", PRECISIONS[precision][0])
        out.set("amp", "precision", PRECISIONS[precision][1])
    _quantize(out, data.get("quantize"))
    if "method" not in out.settings:  # finetune_lora's config has lora_r; finetune_full's none
        out.set("method", "lora_r", "lora" if "lora_r" in data else "full")
    if "lora_r" in data:
        out.set("r", "lora_r", positive(path, "lora_r", data["lora_r"]))
    if data.get("lora_alpha") is not None:
        out.set("alpha", "lora_alpha", float(typed(path, "lora_alpha", data["lora_alpha"], (int, float), "a number")))
    if any(key in data for key, _ in TARGETS):
        targets = [m for key, modules in TARGETS if flag(path, key, data.get(key, False)) for m in modules]
        if not targets:
            raise bad(path, "lora_query", "true for at least one of lora_query ... lora_head", False)
        out.set("target", "lora_query", ",".join(targets))
    if data.get("lora_dropout"):
        out.note(f"lora_dropout {data['lora_dropout']} (a dropped copy of each adapted input: planned without)")
    devices = data.get("devices", 1)
    if devices not in ("auto", None):
        out.set("gpus", "devices", positive(path, "devices", devices))
    for key, dest in (("train.micro_batch_size", "batch_size"), ("train.max_seq_length", "seq_len")):
        if get(data, key) is not None:
            out.set(dest, key, positive(path, key, get(data, key)))
    micro, total = get(data, "train.micro_batch_size"), get(data, "train.global_batch_size")
    if micro and total:
        # litgpt: gradient_accumulation_iters = global_batch_size // devices // micro_batch_size
        ranks = out.settings.get("gpus", 1)
        out.set("grad_accumulation", "train.global_batch_size", max(1, total // ranks // micro))
    _optimizer(out, data.get("optimizer"))
    return out


def _model(out: Collected, folder: Any) -> None:
    if not folder:
        return
    from lora_planner.catalog import catalog_name

    parts = Path(str(folder)).parts
    repo = "/".join(parts[-2:])
    found = catalog_name(repo) or catalog_name(repo.replace("/Meta-Llama-", "/Llama-"))
    config = Path(out.path).parent / str(folder) / "config.json"
    if found is not None:
        out.set("model", "checkpoint_dir", found)
    elif config.is_file():
        out.set("model", "checkpoint_dir", str(config))
    else:
        out.note(f"checkpoint_dir {folder} (not in the catalog and no config.json there: pass --model)")


def _quantize(out: Collected, quantize: Any) -> None:
    if quantize is None:
        return
    text = str(quantize)
    if text == "bnb.int8-training":
        out.set("method", "quantize", "lora")
        out.set("quant", "quantize", "int8")
    elif text in ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"):
        out.set("method", "quantize", "qlora")
        out.set("quant_type", "quantize", text[4:7])
        out.set("double_quant", "quantize", text.endswith("-dq"))
    else:
        raise bad(out.path, "quantize", "bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8-training", quantize)


def _optimizer(out: Collected, optimizer: Any) -> None:
    if optimizer is None:
        return
    name = optimizer.get("class_path") if isinstance(optimizer, dict) else optimizer
    key = str(name).lower()
    if key in OPTIMIZERS:
        out.set("optimizer", "optimizer.class_path" if isinstance(optimizer, dict) else "optimizer", OPTIMIZERS[key])
    else:
        out.note(f"optimizer {name} (not modelled: planned as --optimizer)")

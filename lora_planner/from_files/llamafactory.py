"""A LLaMA-Factory YAML (`llamafactory-cli train FILE`; LLaMA-Factory ff6d4d1 `src/llamafactory/hparams/`
`model_args.py`, `finetuning_args.py`, `data_args.py`, and transformers' Seq2SeqTrainingArguments for the rest).
Unset fields take the `llamafactory` preset. What it derives, as it derives it:

- `finetuning_type: lora` with `quantization_bit: 4` -> QLoRA (bitsandbytes NF4 unless `quantization_type`, double
  quantization unless `double_quantization: false`, compute dtype the load dtype: `model_utils/quantization.py`);
  `quantization_bit: 8` -> LoRA on an LLM.int8 base; `full` -> full fine-tuning with the trainable weights upcast to
  fp32 (`model/adapter.py`, `cast_trainable_params_to_fp32`) under bf16 / fp16 autocast, unless `pure_bf16`;
- `lora_alpha` defaults to 2 x `lora_rank`; `lora_target: all` is every linear but the output layer
  (`find_all_linear_modules`);
- gradient checkpointing is on unless `disable_gradient_checkpointing`, reentrant unless `use_reentrant_gc: false`
  (`model_utils/checkpointing.py`); `use_unsloth_gc` offloads it as Unsloth does;
- `flash_attn`: auto (transformers' default, sdpa), sdpa, fa2 (flash_attention_2), disabled (eager);
- `cutoff_len` is the sequence length; `packing` / `neat_packing` pack (`neat_packing` with a block-diagonal
  mask)."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files.fields import Collected, flag, positive, typed
from lora_planner.from_files.peft import lora_fields
from lora_planner.from_files.training_args import trainer_fields

STACK = "llamafactory"
KEYS = frozenset({"finetuning_type", "stage", "lora_rank", "lora_target", "cutoff_len", "template",
                  "quantization_bit", "model_name_or_path"})
ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "grad_checkpointing": lambda v, d: [("disable_gradient_checkpointing", not v)],
    "liger": lambda v, d: [("enable_liger_kernel", v)],
    "optimizer": lambda v, d: [("optim", v)],
    "batch_size": lambda v, d: [("per_device_train_batch_size", v)],
    "grad_accumulation": lambda v, d: [("gradient_accumulation_steps", v)],
    "seq_len": lambda v, d: [("cutoff_len", v)],
    "method": lambda v, d: [("quantization_bit", 4)] if v == "qlora" else None,
}


def detect(data: dict[str, Any]) -> bool:
    return len(set(data) & KEYS) >= 2 or "finetuning_type" in data or "lora_rank" in data


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    trainer_fields(out, data)
    if data.get("model_name_or_path"):
        out.set("model", "model_name_or_path", typed(path, "model_name_or_path", data["model_name_or_path"], str,
                                                     "a model name"))
    _method(out, data)
    if out.settings.get("method") in ("lora", "qlora"):
        target = data.get("lora_target", "all")
        data = {**data, "lora_target": "all-linear" if target == "all" else target}
        lora_fields(out, data, r="lora_rank", alpha="lora_alpha", targets="lora_target", dora="use_dora",
                    rslora="use_rslora", to_save="additional_target", layers="-", dropout="lora_dropout",
                    rank_pattern="-", alpha_pattern="-", tokens="-")
        if "alpha" not in out.settings and "r" in out.settings:
            out.set("alpha", "lora_rank", float(2 * out.settings["r"]))  # lora_alpha: None -> lora_rank * 2
    if data.get("cutoff_len") is not None:
        out.set("seq_len", "cutoff_len", positive(path, "cutoff_len", data["cutoff_len"]))
    if data.get("packing") or data.get("neat_packing"):
        out.set("packing", "neat_packing" if data.get("neat_packing") else "packing", True)
    if data.get("disable_gradient_checkpointing") is not None:
        off = flag(path, "disable_gradient_checkpointing", data["disable_gradient_checkpointing"])
        out.set("grad_checkpointing", "disable_gradient_checkpointing", not off)
    if data.get("use_reentrant_gc") is not None:
        out.set("use_reentrant", "use_reentrant_gc", flag(path, "use_reentrant_gc", data["use_reentrant_gc"]))
    if data.get("use_unsloth_gc"):
        out.set("activation_offload", "use_unsloth_gc", "unsloth")
    if data.get("enable_liger_kernel") is not None:
        out.set("liger", "enable_liger_kernel", flag(path, "enable_liger_kernel", data["enable_liger_kernel"]))
    flash = data.get("flash_attn", "auto")
    if flash in ATTENTION:
        out.set("attention", "flash_attn", ATTENTION[flash])
    else:
        out.note(f"flash_attn {flash!r} (not modelled: planned as sdpa)")
    for key, why in (("use_unsloth", "Unsloth's kernels: planned as transformers' layers (--stack unsloth)"),
                     ("upcast_layernorm", "norm weights in fp32: planned in the load dtype"),
                     ("upcast_lmhead_output", "the output layer's logits upcast to fp32 by a hook: planned without"),
                     ("use_badam", "BAdam's block-wise optimizer: planned as --optimizer"),
                     ("use_galore", "GaLore's projected optimizer states: planned as --optimizer"),
                     ("use_apollo", "APOLLO's optimizer states: planned as --optimizer")):
        if data.get(key):
            out.note(f"{key} ({why})")
    if data.get("stage") not in (None, "sft", "pt"):
        out.note(f"stage {data['stage']!r} (a reward / preference / RL objective: planned as SFT, issue 17)")
    return out


def _method(out: Collected, data: dict[str, Any]) -> None:
    path, kind, bits = out.path, data.get("finetuning_type", "lora"), data.get("quantization_bit")
    if bits is not None and bits not in (4, 8):
        out.note(f"quantization_bit {bits!r} (bitsandbytes takes 4 or 8: planned unquantized)")
        bits = None
    method = data.get("quantization_method", "bnb")
    if bits is not None and method != "bnb":
        out.note(f"quantization_method {method!r} (only bitsandbytes is modelled: planned unquantized)")
        bits = None
    if kind == "lora":
        out.set("method", "finetuning_type", "qlora" if bits == 4 else "lora")
        if bits == 8:
            out.set("quant", "quantization_bit", "int8")
        if bits == 4:
            kind4 = data.get("quantization_type", "nf4")
            out.set("quant_type", "quantization_type", typed(path, "quantization_type", kind4, str, "nf4 or fp4"))
            if data.get("double_quantization") is not None:
                out.set("double_quant", "double_quantization",
                        flag(path, "double_quantization", data["double_quantization"]))
    elif kind == "full":
        out.set("method", "finetuning_type", "full")
        mixed = "fp16" if data.get("fp16") else "bf16"
        if not data.get("pure_bf16"):
            out.set("dtype", "finetuning_type", "fp32")
            out.set("amp", "bf16" if mixed == "bf16" else "fp16", mixed)
    else:
        out.note(f"finetuning_type {kind!r} (only lora and full are planned: planned as --method)")
    if data.get("fp16") and "dtype" not in out.settings:
        out.set("dtype", "fp16", "fp16")

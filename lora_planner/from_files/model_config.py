"""A model's `config.json` (the model itself: `--model` is the file) with its `quantization_config`, or a
`BitsAndBytesConfig` alone (transformers 5.24 `utils/quantization_config.py` `BitsAndBytesConfig`):

- `load_in_4bit` -> QLoRA's base (`--method qlora`) with `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant` and
  `bnb_4bit_compute_dtype`; `load_in_8bit` -> `--quant int8`;
- `dtype` / `torch_dtype` -> `--dtype`: transformers 5 loads a checkpoint in its own dtype (`dtype="auto"` is the
  default of `from_pretrained`);
- another `quant_method` (a pre-quantized GPTQ / AWQ / FP8 / MXFP4 checkpoint) is listed as not modelled."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files.fields import Collected, bad, dtype, flag, mapping

BNB_KEYS = frozenset({"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
                      "bnb_4bit_use_double_quant"})


BNB_PREFIXES = ("load_in_", "bnb_4bit_", "llm_int8_", "quant_method", "_load_in_")


def detect(data: dict[str, Any]) -> bool:
    """A model config (its architecture's sizes), or a BitsAndBytesConfig alone (nothing but its fields)."""
    model = "architectures" in data or ("model_type" in data and "num_hidden_layers" in data)
    return model or (bool(set(data) & BNB_KEYS) and all(k.startswith(BNB_PREFIXES) for k in data))


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    if "architectures" in data or "num_hidden_layers" in data:
        out.set("model", "model_type", path)
        loaded = dtype(path, "dtype", data.get("dtype", data.get("torch_dtype")))
        if loaded is not None:
            out.set("dtype", "dtype" if "dtype" in data else "torch_dtype", loaded)
        quant = mapping(path, "quantization_config", data.get("quantization_config"))
        if quant:
            quantization(out, quant, "quantization_config.")
    else:
        quantization(out, data, "")
    return out


def quantization(out: Collected, q: dict[str, Any], prefix: str) -> None:
    """A BitsAndBytesConfig's fields (keys named `prefix` + its name)."""
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        out.note(f"{prefix}quant_method {method!r} (a pre-quantized checkpoint: planned at --dtype, not modelled)")
        return
    path = out.path
    four = flag(path, prefix + "load_in_4bit", q.get("load_in_4bit", False))
    eight = flag(path, prefix + "load_in_8bit", q.get("load_in_8bit", False))
    if four and eight:
        raise bad(path, prefix + "load_in_4bit", "false when load_in_8bit is true (one of them)", True)
    if four:
        out.set("method", prefix + "load_in_4bit", "qlora")
        kind = q.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's own default
        if kind not in ("nf4", "fp4"):
            raise bad(path, prefix + "bnb_4bit_quant_type", "nf4 or fp4", kind)
        out.set("quant_type", prefix + "bnb_4bit_quant_type", kind)
        out.set("double_quant", prefix + "bnb_4bit_use_double_quant",
                flag(path, prefix + "bnb_4bit_use_double_quant", q.get("bnb_4bit_use_double_quant", False)))
        compute = dtype(path, prefix + "bnb_4bit_compute_dtype", q.get("bnb_4bit_compute_dtype", "float32"))
        out.set("bnb_4bit_compute_dtype", prefix + "bnb_4bit_compute_dtype", compute or "fp32")
    elif eight:
        out.set("quant", prefix + "load_in_8bit", "int8")
        out.set("method", prefix + "load_in_8bit", "lora")
    if q.get("llm_int8_skip_modules"):
        out.note(f"{prefix}llm_int8_skip_modules (modules kept in 16 bits beyond lm_head: planned quantized)")

"""transformers' `TrainingArguments` and TRL's `SFTConfig` / `DPOConfig` / `GRPOConfig`, as JSON or YAML
(transformers 5.24 `training_args.py`, TRL 1.16 `trainer/sft_config.py`), by their field names.

The same YAML often carries TRL's `ModelConfig` too (`trl sft --config FILE` reads both; TRL
`trainer/model_config.py`, `trainer/utils.py` `get_quantization_config`): `model_name_or_path`, `dtype`,
`attn_implementation`, `use_peft` with `lora_r` / `lora_alpha` / `lora_target_modules` / `lora_modules_to_save` /
`use_rslora` / `use_dora`, and `load_in_4bit` (`bnb_4bit_quant_type`, `use_bnb_nested_quant`, the compute dtype the
model's dtype) / `load_in_8bit`.

An SFT-only field (`max_length` with `packing`, `dataset_text_field`, `completion_only_loss`, ...) makes it TRL's
SFTTrainer: the `trl-sft` preset fills what the file does not say. The model's dtype comes from
`model_init_kwargs` (TRL) when the file has it. `deepspeed` naming a JSON file next to this one reads that file too
(`lora_planner.from_files.deepspeed`)."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files.fields import Collected, dtype, flag, mapping, positive, typed

KEYS = frozenset({"use_peft", "per_device_train_batch_size", "gradient_checkpointing", "optim", "output_dir",
                  "gradient_accumulation_steps", "max_length", "max_seq_length", "packing", "padding_free",
                  "use_liger_kernel", "learning_rate"})
SFT_KEYS = frozenset({"packing", "padding_free", "dataset_text_field", "completion_only_loss", "assistant_only_loss",
                      "max_seq_length", "packing_strategy", "dataset_kwargs"})
MODEL_CONFIG_KEYS = frozenset({"use_peft", "lora_r", "load_in_4bit", "load_in_8bit", "model_name_or_path",
                               "attn_implementation", "use_bnb_nested_quant"})
RL_KEYS = frozenset({"beta", "num_generations", "max_completion_length", "max_prompt_length",
                     "use_vllm", "precompute_ref_log_probs"})
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "grad_checkpointing": lambda v, d: [("gradient_checkpointing", v)],
    "liger": lambda v, d: [("use_liger_kernel", v)],
    "optimizer": lambda v, d: [("optim", v)],
    "batch_size": lambda v, d: [("per_device_train_batch_size", v)],
    "grad_accumulation": lambda v, d: [("gradient_accumulation_steps", v)],
    "seq_len": lambda v, d: [("max_seq_length" if "max_seq_length" in d else "max_length", v)],
    "method": lambda v, d: [("load_in_4bit", True)] if v == "qlora" and d.get("use_peft") else None,
}


def detect(data: dict[str, Any]) -> bool:
    return bool(set(data) & KEYS)


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path, stack="trl-sft" if set(data) & (SFT_KEYS | MODEL_CONFIG_KEYS) else None)
    trainer_fields(out, data)
    _model_config(out, data)
    init = mapping(path, "model_init_kwargs", data.get("model_init_kwargs"))
    loaded = dtype(path, "model_init_kwargs.dtype", init.get("dtype", init.get("torch_dtype")))
    if loaded is None and data.get("dtype") is not None:  # ModelConfig's
        loaded = dtype(path, "dtype", data["dtype"])
    if loaded is not None:
        out.set("dtype", "dtype" if "dtype" in data else "model_init_kwargs.dtype", loaded)
        # autocast over fp32 weights; over 16-bit ones it changes nothing: the dtype and autocast come together
        out.set("amp", "bf16" if data.get("bf16") else "fp16", _mixed(data) if loaded == "fp32" else None)
    elif _mixed(data):
        out.note(f"{_mixed(data)}=true (mixed precision over the dtype the model is loaded in, which the file does "
                 "not say: planned at --dtype; pass --dtype fp32 --amp bf16 for an fp32 model)")
    if set(data) & RL_KEYS:
        out.note("a preference / RL trainer's fields (beta, num_generations, ...): the objective is planned as SFT "
                 "(issue 17)")
    return out


def _model_config(out: Collected, data: dict[str, Any]) -> None:
    """TRL's ModelConfig fields (module docstring)."""
    path = out.path
    if data.get("model_name_or_path"):
        out.set("model", "model_name_or_path", typed(path, "model_name_or_path", data["model_name_or_path"], str,
                                                     "a model name"))
    if data.get("attn_implementation"):
        out.set("attention", "attn_implementation", typed(path, "attn_implementation", data["attn_implementation"],
                                                          str, "an attention implementation"))
    four, eight = data.get("load_in_4bit"), data.get("load_in_8bit")
    if data.get("use_peft"):
        from lora_planner.from_files.peft import lora_fields

        out.set("method", "use_peft", "qlora" if four else "lora")
        lora_fields(out, {"lora_r": 16, "lora_alpha": 32, **data}, r="lora_r", alpha="lora_alpha",
                    targets="lora_target_modules", dora="use_dora", rslora="use_rslora", to_save="lora_modules_to_save",
                    layers="-", dropout="lora_dropout", rank_pattern="-", alpha_pattern="-", tokens="-",
                    parameters="lora_target_parameters")
        if four:
            out.set("quant_type", "bnb_4bit_quant_type", data.get("bnb_4bit_quant_type", "nf4"))
            out.set("double_quant", "use_bnb_nested_quant", bool(data.get("use_bnb_nested_quant", False)))
        elif eight:
            out.set("quant", "load_in_8bit", "int8")
    elif four or eight:
        out.note("load_in_4bit / load_in_8bit without use_peft (a quantized base needs adapters: planned unquantized)")


def _mixed(data: dict[str, Any]) -> str | None:
    return "bf16" if data.get("bf16") else "fp16" if data.get("fp16") else None


def trainer_fields(out: Collected, data: dict[str, Any]) -> None:
    """The TrainingArguments fields other frameworks pass through unchanged (LLaMA-Factory, axolotl's `optimizer`
    aside): batch, accumulation, checkpointing, optimizer, sequence length, packing, Liger, compile, DeepSpeed /
    FSDP."""
    path = out.path
    if data.get("per_device_train_batch_size") is not None:
        out.set("batch_size", "per_device_train_batch_size",
                positive(path, "per_device_train_batch_size", data["per_device_train_batch_size"]))
    if data.get("gradient_accumulation_steps") is not None:
        out.set("grad_accumulation", "gradient_accumulation_steps",
                positive(path, "gradient_accumulation_steps", data["gradient_accumulation_steps"]))
    if data.get("gradient_checkpointing") is not None:
        out.set("grad_checkpointing", "gradient_checkpointing",
                flag(path, "gradient_checkpointing", data["gradient_checkpointing"]))
    kwargs = mapping(path, "gradient_checkpointing_kwargs", data.get("gradient_checkpointing_kwargs"))
    if kwargs.get("use_reentrant") is not None and out.settings.get("grad_checkpointing"):
        out.set("use_reentrant", "gradient_checkpointing_kwargs.use_reentrant",
                flag(path, "gradient_checkpointing_kwargs.use_reentrant", kwargs["use_reentrant"]))
    if data.get("optim"):
        out.set("optimizer", "optim", typed(path, "optim", data["optim"], str, "an optimizer name"))
    for key in ("max_length", "max_seq_length"):
        if data.get(key) is not None:
            out.set("seq_len", key, positive(path, key, data[key]))
    for key in ("packing", "padding_free"):
        if data.get(key):
            out.set("packing", key, True)
    if data.get("use_liger_kernel") is not None:
        out.set("liger", "use_liger_kernel", flag(path, "use_liger_kernel", data["use_liger_kernel"]))
    if data.get("torch_compile"):
        out.note("torch_compile (compiled graphs keep other tensors: planned eager)")
    if data.get("fsdp"):
        out.note("fsdp (transformers' FSDP settings: pass --gpus N --strategy fsdp, or --from an accelerate config)")

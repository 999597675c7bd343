"""An axolotl YAML (axolotl 067b021: `src/axolotl/utils/schemas/{config,peft,training}.py` for the fields and their
defaults, `utils/config/__init__.py` for what it derives, `loaders/model.py` / `loaders/adapter.py` for what it
builds). Unset fields take the `axolotl` preset (its schema defaults). What axolotl derives, as it derives it:

- the load dtype: bf16 (true or "auto", the default) or `bfloat16` -> bf16; else 8-bit, fp16 or `float16` -> fp16;
  else fp32 (`normalize_config`), without autocast over 16-bit weights;
- `adapter: qlora` with `load_in_4bit` -> QLoRA; `adapter: lora` with `load_in_8bit` -> LoRA on an LLM.int8 base;
  no adapter -> full fine-tuning; a quantized base gets `prepare_model_for_kbit_training`, then its embeddings,
  norms and lm_head are cast back to the load dtype (`_convert_embedding_modules_dtype`): planned without kbit
  preparation, as the preset says;
- `gradient_checkpointing: true` without kwargs -> reentrant checkpointing (`normalize_config`);
- `lora_target_linear` -> every linear but the output layer (`find_all_linear_names`, PEFT's all-linear);
- Liger (`liger_*` with its plugin) -> `--liger` when the fused linear cross-entropy is on with the kernels, its loss
  alone otherwise; the Cut Cross-Entropy plugin -> `--loss cce`;
- `activation_offloading: true` (and the deprecated `gradient_checkpointing: offload`) -> TRL's port of torchtune's
  OffloadActivations (`--activation-offloading torchtune`)."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files.fields import Collected, flag, names, positive, typed
from lora_planner.from_files.peft import lora_fields

STACK = "axolotl"
KEYS = frozenset({"base_model", "sequence_len", "micro_batch_size", "lora_r", "adapter", "sample_packing",
                  "lora_target_linear", "datasets"})
ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "flex_attention": "flex_attention",
             "eager_attention": "eager"}
LIGER_KERNELS = ("liger_rope", "liger_rms_norm", "liger_glu_activation")
# How the smallest edit to fit (`lora_planner.fit_edit`) writes an option in this framework's file: option ->
# (value, the file's data) -> [(key, value)], or None where this file cannot say it.
EDITS = {
    "grad_checkpointing": lambda v, d: [("gradient_checkpointing", v)],
    "liger": lambda v, d: [("plugins", [*(d.get("plugins") or []), "axolotl.integrations.liger.LigerPlugin"])]
    + [(k, True) for k in (*LIGER_KERNELS, "liger_fused_linear_cross_entropy")],
    "optimizer": lambda v, d: [("optimizer", v)],
    "batch_size": lambda v, d: [("micro_batch_size", v)],
    "grad_accumulation": lambda v, d: [("gradient_accumulation_steps", v)],
    "seq_len": lambda v, d: [("sequence_len", v)],
    "method": lambda v, d: [("adapter", "qlora"), ("load_in_4bit", True)] if v == "qlora" else None,
}


def detect(data: dict[str, Any]) -> bool:
    return len(set(data) & KEYS) >= 2 or bool(set(data) & {"base_model", "micro_batch_size", "sequence_len"})


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    if data.get("base_model"):
        out.set("model", "base_model", typed(path, "base_model", data["base_model"], str, "a model name"))
    _method(out, data)
    _dtype(out, data)
    lora_fields(out, data, r="lora_r", alpha="lora_alpha", targets="lora_target_modules", dora="peft_use_dora",
                rslora="peft_use_rslora", to_save="lora_modules_to_save", layers="peft_layers_to_transform",
                dropout="lora_dropout", rank_pattern="lora_rank_pattern", alpha_pattern="lora_alpha_pattern",
                tokens="peft_trainable_token_indices", parameters="lora_target_parameters")
    if data.get("lora_target_linear"):
        out.set("target", "lora_target_linear", "all-linear")
    for key, dest in (("micro_batch_size", "batch_size"), ("sequence_len", "seq_len"),
                      ("gradient_accumulation_steps", "grad_accumulation")):
        if data.get(key) is not None:
            out.set(dest, key, positive(path, key, data[key]))
    if data.get("sample_packing") is not None:
        out.set("packing", "sample_packing", flag(path, "sample_packing", data["sample_packing"]))
        if data["sample_packing"]:
            out.set("padding", "sample_packing", False)
    if data.get("optimizer"):
        out.set("optimizer", "optimizer", typed(path, "optimizer", data["optimizer"], str, "an optimizer name"))
    _checkpointing(out, data)
    _attention(out, data)
    _loss(out, data)
    limit = data.get("gpu_memory_limit")
    if limit is not None:  # loaders/model.py: an integer is GiB
        out.set("gpu_mem", "gpu_memory_limit", f"{limit}GiB" if isinstance(limit, int) else str(limit))
    for key, why in (("torch_compile", "compiled graphs keep other tensors: planned eager"),
                     ("tiled_mlp", "the MLP in sequence tiles: planned whole"),
                     ("chunked_cross_entropy", "axolotl's chunked loss: planned as --loss"),
                     ("layer_offloading", "layer parameters in host RAM: planned on the GPU"),
                     ("fsdp_config", "FSDP: pass --gpus N --strategy fsdp"),
                     ("rl", "a preference / RL objective: planned as SFT (issue 17)")):
        if data.get(key):
            out.note(f"{key} ({why})")
    return out


def _method(out: Collected, data: dict[str, Any]) -> None:
    adapter = data.get("adapter")
    four = flag(out.path, "load_in_4bit", data.get("load_in_4bit") or False)
    eight = flag(out.path, "load_in_8bit", data.get("load_in_8bit") or False)
    if adapter in (None, ""):
        out.set("method", "adapter", "full")
    elif adapter == "qlora" or (adapter == "lora" and four):
        out.set("method", "adapter", "qlora")
    elif adapter == "lora":
        out.set("method", "adapter", "lora")
        if eight:
            out.set("quant", "load_in_8bit", "int8")
    else:
        out.note(f"adapter {adapter!r} (only lora / qlora are planned: planned as --method)")
        return
    if data.get("bnb_config_kwargs"):
        out.note("bnb_config_kwargs (bitsandbytes settings: planned as axolotl's NF4 with double quantization)")


def _dtype(out: Collected, data: dict[str, Any]) -> None:
    bf16 = data.get("bf16", "auto")
    if bf16 in (True, "auto", "full") or data.get("bfloat16"):
        loaded, key = "bf16", "bf16" if "bf16" in data or not data.get("bfloat16") else "bfloat16"
    elif data.get("load_in_8bit") or data.get("fp16") or data.get("float16"):
        loaded, key = "fp16", "fp16" if data.get("fp16") else "float16" if data.get("float16") else "load_in_8bit"
    else:
        loaded, key = "fp32", "bf16"
    out.set("dtype", key, loaded)
    out.set("amp", key, "bf16" if loaded == "fp32" and data.get("bf16") else None)


def _checkpointing(out: Collected, data: dict[str, Any]) -> None:
    path, gc = out.path, data.get("gradient_checkpointing")
    offload = data.get("activation_offloading")
    if gc == "offload":
        gc, offload = True, True
    elif gc == "offload_disk":
        gc = True
        out.note("gradient_checkpointing offload_disk (activations on disk: planned without offload)")
    if gc is not None:
        out.set("grad_checkpointing", "gradient_checkpointing", flag(path, "gradient_checkpointing", gc))
    kwargs = data.get("gradient_checkpointing_kwargs")
    if gc:
        reentrant = kwargs.get("use_reentrant") if isinstance(kwargs, dict) else None
        if kwargs is None and not data.get("rl") and not data.get("unfrozen_parameters"):
            reentrant = True  # normalize_config
        if reentrant is not None:
            out.set("use_reentrant", "gradient_checkpointing_kwargs.use_reentrant",
                    flag(path, "gradient_checkpointing_kwargs.use_reentrant", reentrant))
    if offload is True:
        out.set("activation_offload", "activation_offloading", "torchtune")
    elif offload:
        out.note(f"activation_offloading {offload!r} (planned without activation offload)")


def _attention(out: Collected, data: dict[str, Any]) -> None:
    implementation = data.get("attn_implementation")
    if implementation is None:
        implementation = next((value for key, value in ATTENTION.items() if data.get(key)), None)
    if implementation in ("xformers", "sage", "fp8") or (isinstance(implementation, str) and "/" in implementation):
        out.note(f"attention {implementation!r} (not modelled: planned as sdpa)")
    elif implementation is not None:
        out.set("attention", "attn_implementation", typed(out.path, "attn_implementation", implementation, str,
                                                          "an attention implementation"))


def _loss(out: Collected, data: dict[str, Any]) -> None:
    plugins = names(out.path, "plugins", data["plugins"]) if data.get("plugins") else ""
    if "LigerPlugin" in plugins:
        kernels = [k for k in LIGER_KERNELS if data.get(k)]
        if data.get("liger_fused_linear_cross_entropy") and kernels:
            out.set("liger", "liger_fused_linear_cross_entropy", True)
            if len(kernels) < len(LIGER_KERNELS):
                out.note("liger kernels " + ", ".join(sorted(set(LIGER_KERNELS) - set(kernels))) + " off (planned "
                         "with every Liger kernel on)")
        elif data.get("liger_fused_linear_cross_entropy"):
            out.set("loss", "liger_fused_linear_cross_entropy", "fused-linear")
        elif kernels:
            out.note("Liger kernels without its fused loss (planned as transformers' layers)")
    if "CutCrossEntropyPlugin" in plugins and data.get("cut_cross_entropy", True):
        out.set("loss", "cut_cross_entropy", "cce")

"""The `hf` backend: the real `transformers` model class for a `ModelSpec`, plus PEFT LoRA.

Users train with these classes, so this is the reference the planner is held to. Nothing is downloaded:
the model is built from a config (random init), on a real device, or on the meta device to be
materialised later under FakeTensorMode (see `lora_planner.profiler.runner.measure_fake`).

Traps handled here (each one silently gives wrong numbers otherwise):
- transformers 5 `from_config` ignores `torch.set_default_dtype`; the dtype is passed explicitly;
- `to_empty()` from meta unties tied embeddings; `materialize` re-ties them and checks the count;
- PEFT's `get_peft_model` on a meta model leaves adapters on meta; they are materialised with the rest.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from lora_planner.errors import PlannerInputError
from lora_planner.families import family_rules
from lora_planner.params import ALL_LINEAR, PEFT_DEFAULT_TARGETS, count_params
from lora_planner.specs import ModelSpec, TrainingSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peft_token_indices(pairs: tuple[tuple[str, tuple[int, ...]], ...] | None) -> Any:
    """`LoraSpec.trainable_token_indices` as PEFT's `trainable_token_indices`: a list, or a dict by module name."""
    if not pairs:
        return None
    if len(pairs) == 1 and pairs[0][0] == "":
        return list(pairs[0][1])
    return {name: list(indices) for name, indices in pairs}


def require_hf() -> tuple[Any, Any]:
    """Import transformers and peft, or say how to get them."""
    # bitsandbytes (imported by peft when installed) logs a warning at import on AVX512-BF16 CPUs when the optional
    # `kernels` package is missing; its pure-PyTorch CPU path is what runs (and what was measured): not news.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import peft
        import transformers
    except ImportError as err:
        raise PlannerInputError("backend", f"the hf backend needs transformers and peft ({err.name} is missing)",
                                'pip install -e ".[profile]" or use --backend builtin') from None
    transformers.utils.logging.set_verbosity_error()
    # Construction-time notices (deprecated names, Conv1D fan_in_fan_out) are not the user's concern here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers)\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(peft|transformers)\.")
    return transformers, peft


def hf_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """The `config.json` fields of `spec` under each family's own key names."""
    from lora_planner import traced

    if traced.is_traced(spec.family):  # the config it was traced from, at the spec's depth
        return traced.reduced_config(traced.profile_of(spec.family), spec.num_layers)
    common = {"model_type": spec.family, "vocab_size": spec.vocab_size, "tie_word_embeddings": spec.tie_word_embeddings,
              "use_cache": False}
    if spec.family == "gpt2":
        return {**common, "n_embd": spec.hidden_size, "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "n_inner": spec.intermediate_size, "n_positions": spec.max_position_embeddings,
                "activation_function": spec.hidden_act, "resid_pdrop": spec.dropout,
                "embd_pdrop": spec.embedding_dropout, "attn_pdrop": spec.attention_dropout}
    if spec.family == "gpt_neox":
        return {**common, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
                "max_position_embeddings": spec.max_position_embeddings, "hidden_act": spec.hidden_act,
                "rotary_pct": spec.partial_rotary_factor, "use_parallel_residual": spec.parallel_residual,
                "attention_bias": spec.attention_bias, "hidden_dropout": spec.dropout,
                "attention_dropout": spec.attention_dropout}
    if spec.family == "bloom":
        return {**common, "hidden_size": spec.hidden_size, "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "hidden_dropout": spec.dropout, "attention_dropout": spec.attention_dropout}
    config = {**common, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
              "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
              "max_position_embeddings": spec.max_position_embeddings, "hidden_act": spec.hidden_act,
              "attention_dropout": spec.attention_dropout}
    if spec.family in ("llama", "gemma", "qwen3", "olmo2"):
        config["attention_bias"] = spec.attention_out_bias
    if spec.family == "llama":
        config["mlp_bias"] = spec.mlp_bias
    if spec.family == "phi":
        config.update(partial_rotary_factor=spec.partial_rotary_factor, qk_layernorm=spec.qk_layernorm,
                      resid_pdrop=spec.dropout, embd_pdrop=spec.embedding_dropout)
    if spec.family == "phi3":
        config.update(partial_rotary_factor=spec.partial_rotary_factor, resid_pdrop=spec.dropout,
                      sliding_window=spec.sliding_window, pad_token_id=None)  # 32000 by default: above tiny vocabs
    if spec.family == "starcoder2":
        config.update(use_bias=spec.attention_bias, residual_dropout=spec.dropout,
                      embedding_dropout=spec.embedding_dropout, sliding_window=spec.sliding_window)
    if spec.family == "granite":
        config.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    if spec.family == "smollm3":  # NoPE layers by SmolLM3Config's default interval (they change no size)
        config.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias, pad_token_id=None,
                      use_sliding_window=spec.sliding_window is not None, sliding_window=spec.sliding_window,
                      layer_types=list(spec.layer_types) if spec.layer_types else None)
    if spec.family == "mistral":  # MistralConfig's window is 4096 unless given (null: none)
        config["sliding_window"] = spec.sliding_window
    if spec.family in ("qwen2", "qwen3"):  # the window's layers as the reader derived them (`layer_types`)
        config.update(use_sliding_window=spec.sliding_window is not None, sliding_window=spec.sliding_window,
                      layer_types=list(spec.layer_types) if spec.layer_types else None)
    if spec.is_moe:
        config.update(_moe_config(spec))
        if spec.output_router_logits:
            config["output_router_logits"] = True
    if spec.family in ("gemma2", "gemma3_text"):
        config.update(hidden_activation=spec.hidden_act, attention_bias=spec.attention_bias,
                      sliding_window=spec.sliding_window, layer_types=list(spec.layer_types or ()) or None,
                      final_logit_softcapping=spec.final_logit_softcapping,
                      attn_logit_softcapping=spec.attn_logit_softcapping)
    return config


def _moe_config(spec: ModelSpec) -> dict[str, Any]:
    """The MoE keys of a config.json for `spec` (`lora_planner.config_reader._moe_fields` read backwards)."""
    experts = {"num_experts_per_tok": spec.num_experts_per_tok}
    if spec.family == "mixtral":
        return {**experts, "num_local_experts": spec.num_experts, "sliding_window": spec.sliding_window}
    if spec.family == "gpt_oss":  # layer_types: GptOssConfig's alternation, as the reader derived it
        return {**experts, "num_local_experts": spec.num_experts, "sliding_window": spec.sliding_window,
                "layer_types": list(spec.layer_types or ()) or None, "attention_bias": spec.attention_bias}
    if spec.family in ("deepseek_v2", "deepseek_v3"):  # `config_reader._deepseek_fields` read backwards
        width = spec.moe_intermediate_size
        config = {**experts, "n_routed_experts": spec.num_experts, "moe_intermediate_size": width,
                  "n_shared_experts": spec.shared_expert_intermediate_size // width,
                  "first_k_dense_replace": len(spec.dense_layers), "q_lora_rank": spec.q_lora_rank or None,
                  "kv_lora_rank": spec.kv_lora_rank, "qk_nope_head_dim": spec.qk_nope_head_dim,
                  "qk_rope_head_dim": spec.head_dim, "v_head_dim": spec.v_head_dim,
                  "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias, "head_dim": spec.head_dim}
        if spec.family == "deepseek_v3":
            return {**config, "n_group": spec.router_groups, "topk_group": spec.router_topk_groups,
                    "norm_topk_prob": spec.norm_topk_prob}
        grouped = spec.router_groups > 0
        return {**config, "topk_method": "group_limited_greedy" if grouped else "greedy",
                **({"n_group": spec.router_groups, "topk_group": spec.router_topk_groups} if grouped else {})}
    experts.update(num_experts=spec.num_experts, norm_topk_prob=spec.norm_topk_prob)
    if spec.family == "olmoe":
        return {**experts, "attention_bias": spec.attention_bias}
    experts.update(moe_intermediate_size=spec.moe_intermediate_size, mlp_only_layers=list(spec.dense_layers),
                   decoder_sparse_step=1, use_sliding_window=spec.sliding_window is not None,
                   sliding_window=spec.sliding_window)
    if spec.family == "qwen2_moe":
        return {**experts, "qkv_bias": spec.attention_bias, "layer_types": list(spec.layer_types or ()) or None,
                "shared_expert_intermediate_size": spec.shared_expert_intermediate_size}
    return {**experts, "attention_bias": spec.attention_bias}


def build_hf_model(spec: ModelSpec, training: TrainingSpec, device: str) -> nn.Module:
    """The transformers model (and PEFT adapters for LoRA) for `spec`, with random weights on `device`
    ("cpu", "cuda" or "meta"), in training mode with the training's dtype, attention and checkpointing."""
    transformers, _ = require_hf()
    config = transformers.AutoConfig.for_model(**hf_config_dict(spec))
    dtype = TORCH_DTYPES["fp32" if training.amp else training.dtype]
    # BLOOM has only eager (ALiBi); Gemma 2 refuses an explicit "sdpa" and runs eager by default (Family.sdpa)
    attention = "eager" if spec.family == "bloom" or not family_rules(spec.family).sdpa else training.attention
    if spec.is_moe:  # transformers reads it off the config (`PreTrainedModel._check_and_adjust_experts_implementation`)
        config._experts_implementation = training.experts_implementation
    if training.quantized:
        model = _quantized_model(config, training, device, attention)
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if training.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": training.use_reentrant})
    if training.method != "full":
        model = _apply_peft_lora(model, spec, training)
    model.train()
    return model


def require_bitsandbytes(device: str) -> None:
    """QLoRA replays need real NF4 weights: bitsandbytes (its CPU backend, or CUDA), never meta/fake."""
    if device == "meta":
        raise PlannerInputError("mode", "QLoRA cannot be replayed under fake tensors (bitsandbytes packs real "
                                        "4-bit weights)", "use --mode cpu (bitsandbytes' CPU backend) or cuda")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PlannerInputError("method", "profiling QLoRA needs bitsandbytes",
                                "pip install bitsandbytes (its CPU backend runs NF4 here)") from None


def _quantized_model(config: Any, training: TrainingSpec, device: str, attention: str) -> nn.Module:
    """The model as QLoRA loads it: random weights saved, then reloaded through `from_pretrained` with
    bitsandbytes NF4 (double quantization, the training dtype as compute dtype; QLoRA paper, Sec. 3), or LLM.int8
    (`load_in_8bit`, transformers' defaults: threshold 6.0, no fp16 weights kept) and,
    with `kbit_prep`, PEFT's `prepare_model_for_kbit_training` as PEFT's QLoRA recipe calls it
    (`use_gradient_checkpointing` = the run's checkpointing, non-reentrant)."""
    import tempfile

    transformers, peft = require_hf()
    require_bitsandbytes(device)
    compute = TORCH_DTYPES[training.compute_dtype]
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True) if training.load_in_8bit else \
        transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=training.quant_type,
                                        bnb_4bit_use_double_quant=training.double_quant,
                                        bnb_4bit_compute_dtype=TORCH_DTYPES[training.matmul_4bit_dtype])
    with tempfile.TemporaryDirectory(prefix="lora-plan-qlora-") as folder:
        transformers.AutoModelForCausalLM.from_config(config, dtype=compute).save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=compute, quantization_config=quant, device_map=device, attn_implementation=attention)
    if training.kbit_prep:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": training.use_reentrant})
    return model


def _apply_peft_lora(model: nn.Module, spec: ModelSpec, training: TrainingSpec) -> nn.Module:
    _, peft = require_hf()
    lora = training.lora
    targets = lora.target_modules or PEFT_DEFAULT_TARGETS[spec.family]
    target_modules: Any = ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.effective_alpha, target_modules=target_modules,
                             lora_dropout=0.0, bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                             modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
                             trainable_token_indices=peft_token_indices(lora.trainable_token_indices),
                             layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform else None,
                             target_parameters=list(lora.target_parameters) if lora.target_parameters else None)
    device = next(model.parameters()).device
    with torch.device(device):  # on meta, keep PEFT from initialising adapters on the CPU first
        peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=lora.adapter_dtype == "fp32")
    if training.grad_checkpointing:
        peft_model.enable_input_require_grads()  # what Trainer / prepare_model_for_kbit_training do
    return peft_model


def materialize(model: nn.Module, spec: ModelSpec, device: str = "cpu") -> nn.Module:
    """Give a meta-built model real (or fake, under FakeTensorMode) storage and fresh values.

    `to_empty` breaks weight tying; re-tie, then check the parameter count so a silent phantom
    lm_head (Llama-3.2-1B would gain 262.7M parameters) cannot slip through.
    """
    model.to_empty(device=device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if spec.tie_word_embeddings and hasattr(base, "tie_weights"):
        base.tie_weights()
    _reset_rotary_buffers(base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    expected = count_params(spec).total
    if base_params != expected:
        raise RuntimeError(f"materialised model has {base_params} base parameters, expected {expected}")
    return model


def _reset_rotary_buffers(model: nn.Module) -> None:
    """RoPE's inv_freq buffers are computed at construction; after to_empty they are garbage."""
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and hasattr(module, "rope_init_fn") and hasattr(module, "config"):
            fresh, _ = module.rope_init_fn(module.config, inv.device)
            with torch.no_grad():
                inv.copy_(fresh.to(inv.dtype))
                if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                    module.original_inv_freq.copy_(fresh.to(inv.dtype))

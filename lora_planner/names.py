"""The spellings users bring, mapped to the planner's own names (pure; no torch, no transformers).

People copy their settings from a Hugging Face `TrainingArguments` / TRL `SFTConfig` / PEFT script, so
`--optimizer adamw_torch_fused`, `--dtype bfloat16` and `--attention flash_attention_2` must mean what
they mean there. Every function here returns the planner's canonical value, or raises a one-line
`PlannerInputError` that either says why the name is refused or suggests close names.

Optimizers: the table `HF_OPTIMIZERS` covers every `transformers.training_args.OptimizerNames` value of
the pinned transformers (5.24.0) and follows `transformers/trainer_optimizer.py`, whose
`_OPTIMIZER_HANDLERS` (called by `Trainer.get_optimizer_cls_and_kwargs`) builds each one:
- `_get_adamw_torch`: `torch.optim.AdamW(lr, betas, eps)`, plus `fused=True` for `adamw_torch_fused`
  only, so `adamw_torch` gets PyTorch's default implementation for the device;
- `_get_sgd` / `_get_adagrad` / `_get_rmsprop`: the `torch.optim` class with PyTorch's defaults (SGD
  without momentum, RMSprop not centered and without momentum) and no foreach / fused flag;
- `_get_adafactor`: `transformers.optimization.Adafactor(scale_parameter=False, relative_step=False)`,
  not `torch.optim.Adafactor` (the planner's `torch_adafactor`);
- `_get_bitsandbytes_optimizer`: bitsandbytes `AdamW` / `Lion` / `RMSprop` / `AdEMAMix` with
  `optim_bits = 8 if "8bit" in name else 32` and `is_paged = "paged" in name`.
"""

from __future__ import annotations

from typing import NamedTuple

from lora_planner.errors import PlannerInputError

TRANSFORMERS_VERSION = "5.24"  # the pinned transformers whose TrainingArguments defaults are followed

# The planner's own optimizer names (`specs.Optimizer`): one per state layout it models.
PLANNER_OPTIMIZERS: tuple[str, ...] = (
    "adamw",  # torch.optim.AdamW
    "sgd", "sgd_momentum",  # torch.optim.SGD, momentum 0 (its default and the Trainer's) / 0.9
    "adagrad", "rmsprop",  # torch.optim.Adagrad / RMSprop with their defaults
    "adafactor",  # transformers.optimization.Adafactor as the Trainer builds it
    "torch_adafactor",  # torch.optim.Adafactor
    "adamw8bit", "paged_adamw8bit", "paged_adamw32bit",  # bitsandbytes AdamW
    "lion8bit", "lion32bit", "paged_lion8bit", "paged_lion32bit",  # bitsandbytes Lion
    "rmsprop8bit", "rmsprop32bit",  # bitsandbytes RMSprop
    "ademamix8bit", "ademamix32bit", "paged_ademamix8bit", "paged_ademamix32bit",  # bitsandbytes AdEMAMix
)
# torch.optim classes: their foreach / for-loop / fused implementations differ in scratch memory.
TORCH_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "sgd_momentum", "adagrad", "rmsprop", "torch_adafactor")
# torch.optim classes that take `fused=True` (torch 2.13 signatures; RMSprop and Adafactor do not).
FUSED_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "sgd_momentum", "adagrad")


class Refused(NamedTuple):  # not a dataclass: each costs ~0.6 ms of the CLI's cold start
    """An `OptimizerNames` value the planner does not model, and why (one line)."""

    reason: str


# The default implementation of a torch optimizer on the device (`torch.optim.optimizer.
# _default_to_fused_or_foreach`: foreach when every parameter is on CUDA, never fused by default).
DEVICE_DEFAULT = "device-default"

_LOW_RANK = "projects gradients to a low rank set by optim_args/optim_target_modules (projection state not modelled)"
HF_OPTIMIZERS: dict[str, tuple[str, str | None] | Refused] = {
    "adamw_torch": ("adamw", DEVICE_DEFAULT),
    "adamw_torch_fused": ("adamw", "fused"),
    "adamw_torch_xla": Refused("torch_xla's syncfree AdamW runs on TPU / XLA devices, which the planner does not model"),
    "adamw_torch_npu_fused": Refused("torch_npu's fused AdamW runs on Ascend NPUs, which the planner does not model"),
    "adafactor": ("adafactor", None),
    "adamw_anyprecision": Refused("torchdistx's AnyPrecisionAdamW (state dtypes from optim_args) is not modelled"),
    "adamw_torch_4bit": Refused("torchao's 4-bit AdamW keeps quantized-state tensor subclasses, not modelled"),
    "adamw_torch_8bit": Refused("torchao's 8-bit AdamW keeps quantized-state tensor subclasses, not modelled"),
    "ademamix": ("ademamix32bit", None),
    "sgd": ("sgd", DEVICE_DEFAULT),
    "adagrad": ("adagrad", DEVICE_DEFAULT),
    "adamw_bnb_8bit": ("adamw8bit", None),
    "adamw_8bit": ("adamw8bit", None),
    "ademamix_8bit": ("ademamix8bit", None),
    "lion_8bit": ("lion8bit", None),
    "lion_32bit": ("lion32bit", None),
    "paged_adamw_32bit": ("paged_adamw32bit", None),
    "paged_adamw_8bit": ("paged_adamw8bit", None),
    "paged_ademamix_32bit": ("paged_ademamix32bit", None),
    "paged_ademamix_8bit": ("paged_ademamix8bit", None),
    "paged_lion_32bit": ("paged_lion32bit", None),
    "paged_lion_8bit": ("paged_lion8bit", None),
    "rmsprop": ("rmsprop", DEVICE_DEFAULT),
    "rmsprop_bnb": ("rmsprop32bit", None),  # no "8bit" in the name: optim_bits 32
    "rmsprop_bnb_8bit": ("rmsprop8bit", None),
    "rmsprop_bnb_32bit": ("rmsprop32bit", None),
    "galore_adamw": Refused(f"GaLore {_LOW_RANK}"),
    "galore_adamw_8bit": Refused(f"GaLore {_LOW_RANK}"),
    "galore_adafactor": Refused(f"GaLore {_LOW_RANK}"),
    "galore_adamw_layerwise": Refused(f"layer-wise GaLore {_LOW_RANK} and steps inside backward"),
    "galore_adamw_8bit_layerwise": Refused(f"layer-wise GaLore {_LOW_RANK} and steps inside backward"),
    "galore_adafactor_layerwise": Refused(f"layer-wise GaLore {_LOW_RANK} and steps inside backward"),
    "lomo": Refused("LOMO fuses the update into backward and keeps no gradients; the planner's phases assume a "
                    "separate optimizer step"),
    "adalomo": Refused("AdaLomo fuses the update into backward and keeps no gradients; the planner's phases assume "
                       "a separate optimizer step"),
    "grokadamw": Refused("GrokAdamW keeps an extra gradient EMA whose layout has not been measured"),
    "schedule_free_radam": Refused("schedule-free optimizers keep extra iterate sequences (z, x) not modelled"),
    "schedule_free_adamw": Refused("schedule-free optimizers keep extra iterate sequences (z, x) not modelled"),
    "schedule_free_sgd": Refused("schedule-free optimizers keep extra iterate sequences (z, x) not modelled"),
    "apollo_adamw": Refused(f"APOLLO {_LOW_RANK}"),
    "apollo_adamw_layerwise": Refused(f"layer-wise APOLLO {_LOW_RANK} and steps inside backward"),
    "stable_adamw": Refused("torch-optimi's StableAdamW adds Kahan-summation buffers for 16-bit weights, not modelled"),
}

# Older planner spellings people may still type.
_OPTIMIZER_ALIASES = {"adamw_8bit_bnb": "adamw8bit", "paged_adamw": "paged_adamw32bit", "lion": "lion32bit"}


def resolve_optimizer(name: str, device: str = "cuda") -> tuple[str, str | None]:
    """(planner optimizer, implementation or None) for a planner or Hugging Face optimizer name.

    The implementation is None when the name leaves it to the planner's default for that optimizer
    (`default_optimizer_impl`); Hugging Face names that leave it to PyTorch resolve to PyTorch's
    default on `device` (foreach on cuda, for-loop on cpu).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in PLANNER_OPTIMIZERS:
        return key, None
    key = _OPTIMIZER_ALIASES.get(key, key)
    entry = HF_OPTIMIZERS.get(key)
    if isinstance(entry, Refused):
        raise PlannerInputError("optimizer", f"{name!r} is not modelled: {entry.reason}",
                                "pick a modelled optimizer, e.g. adamw_torch_fused, adamw_8bit or adafactor")
    if entry is None:
        known = [*PLANNER_OPTIMIZERS, *HF_OPTIMIZERS]
        import difflib  # lazily: only on this path (cold start, issue 11)
        close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(PLANNER_OPTIMIZERS)}"
        raise PlannerInputError("optimizer", f"unknown optimizer {name!r}",
                                f"{hint} (Hugging Face OptimizerNames spellings work too)")
    optimizer, impl = entry
    return optimizer, (torch_device_default_impl(device) if impl == DEVICE_DEFAULT else impl)


def torch_device_default_impl(device: str) -> str:
    """PyTorch's implementation when none is asked for: foreach on CUDA, the for-loop one on CPU."""
    return "foreach" if device == "cuda" else "for-loop"


def default_optimizer_impl(optimizer: str, device: str) -> tuple[str, str]:
    """(implementation, why) for an optimizer whose implementation was not given.

    AdamW: the Trainer's default `optim` is `adamw_torch_fused` on torch >= 2.8 whatever the device
    (transformers/training_args.py, `default_optim`; fused AdamW runs on CPU since torch 2.4). The other
    torch optimizers are built without a flag, so PyTorch picks. bitsandbytes' kernels update each tensor
    in place (reported as fused); transformers' Adafactor is a per-tensor Python loop.
    """
    if optimizer == "adamw":
        return "fused", (f"adamw_torch_fused, the transformers {TRANSFORMERS_VERSION} TrainingArguments default "
                         "on torch >= 2.8")
    if optimizer in TORCH_OPTIMIZERS:
        impl = torch_device_default_impl(device)
        return impl, f"PyTorch's default on {device}"
    if optimizer == "adafactor":
        return "for-loop", "transformers' Adafactor steps one tensor at a time"
    return "fused", "bitsandbytes updates each tensor in place"


def optimizer_impls(optimizer: str) -> tuple[str, ...]:
    """The implementations `--optimizer-impl` may name: torch's RMSprop and Adafactor have no fused one;
    bitsandbytes and transformers' Adafactor have a single implementation, so the flag changes nothing
    there (accepted, as PyTorch-style sweeps pass it for every optimizer)."""
    if optimizer in TORCH_OPTIMIZERS and optimizer not in FUSED_OPTIMIZERS:
        return ("foreach", "for-loop")
    return ("foreach", "for-loop", "fused")


# ---------------------------------------------------------------------------------------------- dtypes

# torch / Hugging Face (`torch_dtype`, `bnb_4bit_compute_dtype`) spellings -> the planner's.
DTYPE_SPELLINGS: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32", "f32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16", "f16": "fp16",
}


def resolve_dtype(name: object, field: str = "dtype") -> str:
    """'bfloat16', 'torch.float16', 'fp32', ... -> 'bf16' / 'fp16' / 'fp32'."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in DTYPE_SPELLINGS:
        return DTYPE_SPELLINGS[key]
    import difflib  # lazily: only on this path (cold start, issue 11)
    close = difflib.get_close_matches(str(key), list(DTYPE_SPELLINGS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PlannerInputError(field, f"unknown dtype {name!r}", f"{hint}use bf16, fp16 or fp32 (or bfloat16, float16, "
                                                             "float32)")


# ---------------------------------------------------------------------------------------------- attention

# transformers' `attn_implementation` values the planner does not model yet, and why.
REFUSED_ATTENTIONS: dict[str, str] = {
    "flash_attention_3": "the FlashAttention-3 (Hopper) kernel is not modelled yet",
}
# Other spellings of the modelled ones (the flash-attn package's own name, a dash for the underscore).
ATTENTION_ALIASES: dict[str, str] = {"fa2": "flash_attention_2", "flash-attention-2": "flash_attention_2",
                                     "flash_attn_2": "flash_attention_2", "flash-attn": "flash_attention_2",
                                     "flash_attn": "flash_attention_2", "flex": "flex_attention",
                                     "flex-attention": "flex_attention", "flexattention": "flex_attention"}
MODELLED_ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def resolve_attention(name: object) -> str:
    """'sdpa', 'eager', 'flash_attention_2' or 'flex_attention' (transformers' `attn_implementation` spelling, or an
    alias); refuses
    the kernels not modelled."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = ATTENTION_ALIASES.get(key, key)
    if key in MODELLED_ATTENTIONS:
        return key
    if key in REFUSED_ATTENTIONS:
        raise PlannerInputError("attention", f"{name!r} is not modelled: {REFUSED_ATTENTIONS[key]}",
                                "use --attention flash_attention_2 or sdpa (on CUDA it dispatches to a flash kernel "
                                "for 16-bit inputs)")
    import difflib  # lazily: only on this path (cold start, issue 11)
    close = difflib.get_close_matches(str(key), [*MODELLED_ATTENTIONS, *REFUSED_ATTENTIONS], n=2, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PlannerInputError("attention", f"unknown attention {name!r}",
                            f"{hint}use sdpa, eager, flash_attention_2 or flex_attention")

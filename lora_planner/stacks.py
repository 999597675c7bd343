"""`--stack`: the defaults each fine-tuning framework trains with, as the planner's options (pure data).

Each preset sets what the framework does when the user leaves a key out (its own defaults, read from its source at
the versions below), so that `lora-plan --stack trl-sft --model ...` plans what `SFTTrainer(model=..., args=
SFTConfig(), peft_config=LoraConfig(...))` runs. Any flag given explicitly wins over the preset (`apply_stack`). What a
framework does that the planner cannot express yet is listed with each preset and printed with the plan, with the
direction it moves the estimate.

Sources (file:line at the version named):
- hf-trainer: transformers 5.24 `training_args.py` (optim `adamw_torch_fused` 805-815, per_device_train_batch_size 8
  at 777, bf16 / fp16 off 874-885, gradient checkpointing off 908-937), PEFT 0.21.2 `tuners/lora/config.py` (r 8,
  lora_alpha 8: 632, 652).
- trl-sft: TRL 1.16.0 `trainer/sft_config.py` (max_length 1024, packing off, padding_free off, gradient checkpointing
  on, non-reentrant), `trainer/sft_trainer.py` (the fused LM head loss `add_fused_lm_head`, 1142-1147, `--loss trl`; no
  `prepare_model_for_kbit_training`), `trainer/model_config.py` (r 16, alpha 32), `trainer/utils.py`
  `create_model_from_path` (a model named by path loads in float32; `bf16=True` then autocasts).
- trl-dpo: TRL 1.16.0 `trainer/dpo_config.py` (max_length 1024 at 195-201, precompute_ref_log_probs off, loss_type
  sigmoid, beta 0.1), `trainer/base_config.py` (gradient checkpointing on 62-67, bf16 on 68-75), `trainer/dpo_trainer.py`
  (pairs as two rows, right-padded to the longest, 146-207; the fused LM head, 954-960; the reference pass with the
  adapters disabled, 1320-1347), `trainer/model_config.py` (r 16, alpha 32), `trainer/utils.py` `create_model_from_path`
  (float32); `--objective dpo` (`lora_planner.objectives`).
- trl-grpo: TRL 1.16.0 `trainer/grpo_config.py` (num_generations 8 at 480-486, max_completion_length 512 at 494-497,
  beta 0.0 at 681-688, use_vllm False at 587-593), `trainer/base_config.py` (gradient checkpointing on, bf16 on),
  `trainer/model_config.py` (r 16, alpha 32), `trainer/utils.py` `create_model_from_path` (float32: the KV cache of a
  LoRA policy's generation is then fp32); `--objective grpo` (`lora_planner.generation`).
- trl-orpo / trl-cpo: TRL 1.16.0 `experimental/orpo/orpo_config.py` / `experimental/cpo/cpo_config.py` (max_length
  1024, beta 0.1; CPO: loss_type sigmoid, cpo_alpha 1.0), `trainer/base_config.py` (gradient checkpointing on, bf16 on),
  `experimental/orpo/orpo_trainer.py` l.171-196 (a model named by path loads with `from_pretrained(model)`: the
  checkpoint's dtype), the pairs padded to the batch's longest (`DPODataCollatorWithPadding`); `--objective orpo|cpo`
  (`lora_planner.loss_preference`).
- torchtune: `recipes/configs/llama3_1/8B_lora_single_device.yaml` (lora_attn_modules q_proj, v_proj, output_proj,
  apply_lora_to_mlp, r 8, alpha 16, batch_size 2, enable_activation_checkpointing true, dtype bf16, AdamW fused),
  `CEWithChunkedOutputLoss(num_output_chunks=8)` in 0.6.1 (main switched to `LinearCrossEntropyLoss`).
- litgpt: `config_hub/finetune/llama-3.1-8b/lora.yaml` (r 32, alpha 16, q / v, max_seq_length 512, micro_batch_size 1,
  bf16-true), `litgpt/utils.py` `chunked_cross_entropy` (128-token lm_head chunks; Lightning Fabric's
  `_FabricModule.forward` converts every logits chunk to fp32, and the loop keeps them: `--loss litgpt`).
- unsloth 2026.10.9: `FastLanguageModel.from_pretrained` (load_in_4bit, flash-attn when installed),
  `get_peft_model` (r 16, alpha 16, the seven projections, use_gradient_checkpointing="unsloth": offloaded,
  `lora_planner.activation_offload`), unsloth-zoo's fused cross-entropy (`--loss unsloth`, compiled), its
  TRL patch (adamw_8bit, per_device_train_batch_size 4, max_seq_length 2048, padding-free).
- axolotl (067b021): `src/axolotl/utils/schemas/*` (optimizer adamw_torch_fused, sequence_len 512,
  micro_batch_size 1, gradient_checkpointing off, sdpa; QLoRA: kbit preparation, then embeddings, norms and lm_head
  cast back to the load dtype).
- llamafactory (ff6d4d1): `src/llamafactory/hparams/{model,finetuning,data}_args.py` (lora_rank 8, lora_alpha 2 x
  rank, lora_target all, cutoff_len 2048, gradient checkpointing on unless disable_gradient_checkpointing, reentrant
  unless use_reentrant_gc=False), `model/adapter.py` (trainable parameters upcast to fp32), no kbit preparation
  (`model/model_utils/checkpointing.py` `prepare_model_for_training` instead), transformers' Trainer otherwise.
Read in the research notes of issues 13 and 14; the frameworks move fast, so each preset names its version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_planner.errors import PlannerInputError


@dataclass(frozen=True)
class Stack:
    """A framework's defaults: `settings` maps the CLI's option names (argparse dests) to values; `notes` what the
    planner cannot express yet, with the way it moves the plan."""

    name: str
    version: str
    settings: dict[str, Any]
    notes: tuple[str, ...] = ()


# ORPO / CPO load a model named by path in the checkpoint's dtype, then train it under bf16=True
BF16_CHECKPOINT = ("the checkpoint's dtype (from_pretrained's 'auto'), taken as bf16, under bf16=True autocast: "
                   "planned as bf16 weights without autocast, but for the logits' fp32 conversion")
STACKS: dict[str, Stack] = {s.name: s for s in (
    Stack("hf-trainer", "transformers 5.24 Trainer + PEFT 0.21.2",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=False, adapter_dtype="fp32",
               r=8, alpha=8.0, dtype="bf16", amp=None, batch_size=8, padding=True, packing=False, loss="hf",
               liger=False)),
    Stack("trl-sft", "TRL 1.16.0 SFTTrainer + SFTConfig",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=32.0, dtype="fp32", amp="bf16", seq_len=1024, batch_size=8, padding=True, packing=False,
               kbit_prep=False, loss="trl", liger=False),
          ("QLoRA: TRL casts the adapters to bf16, planned in fp32 (over by the adapters' bytes)",)),
    Stack("trl-dpo", "TRL 1.16.0 DPOTrainer + DPOConfig",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=32.0, dtype="fp32", amp="bf16", seq_len=1024, batch_size=8, padding=True, packing=False,
               kbit_prep=False, loss="trl", liger=False, objective="dpo"),
          ("every position counted as scored; on CUDA the fused head scores only the completions' tokens (over by "
           "their hidden rows and statistics)",)),
    Stack("trl-grpo", "TRL 1.16.0 GRPOTrainer + GRPOConfig",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=32.0, dtype="fp32", amp="bf16", batch_size=8, padding=True, packing=False,
               kbit_prep=False, loss="trl", liger=False, objective="grpo"),
          ("every completion counted at --max-completion-length tokens (TRL pads the round to its longest)",
           "reward models on the GPU are not counted (callable rewards)")),
    Stack("trl-orpo", "TRL 1.16.0 ORPOTrainer + ORPOConfig (trl.experimental)",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=32.0, dtype="bf16", amp=None, seq_len=1024, batch_size=8, padding=True, packing=False,
               kbit_prep=False, loss="hf", liger=False, objective="orpo"),
          (BF16_CHECKPOINT,)),
    Stack("trl-cpo", "TRL 1.16.0 CPOTrainer + CPOConfig (trl.experimental)",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=32.0, dtype="bf16", amp=None, seq_len=1024, batch_size=8, padding=True, packing=False,
               kbit_prep=False, loss="hf", liger=False, objective="cpo"),
          (BF16_CHECKPOINT,
           "SimPO: pass --objective simpo (and --cpo-alpha 0 for pure SimPO; TRL's default keeps the NLL term)")),
    Stack("torchtune", "torchtune 0.6.1 llama3_1/8B_lora_single_device",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, adapter_dtype="base",
               r=8, alpha=16.0, target="q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", dtype="bf16", amp=None,
               batch_size=2, padding=True, packing=False, kbit_prep=False, loss="chunked:8", liger=False),
          ("torchtune main uses LinearCrossEntropyLoss (the ignored rows dropped, 8 row chunks): pass --loss linear",
           "QLoRA: torchtune quantizes with torchao's NF4, planned as bitsandbytes NF4")),
    Stack("litgpt", "litgpt config_hub llama-3.1-8b lora.yaml",
          dict(optimizer="adamw_torch", attention="sdpa", grad_checkpointing=False, adapter_dtype="base",
               r=32, alpha=16.0, target="q_proj,v_proj", dtype="bf16", amp=None, seq_len=512, batch_size=1,
               padding=True, packing=False, kbit_prep=False, loss="litgpt", liger=False, double_quant=False),
          ("QLoRA: litgpt (`--quantize bnb.nf4`, no double quantization: planned) quantizes lm_head too, planned "
           "as PEFT's QLoRA with lm_head in 16-bit",)),
    Stack("unsloth", "unsloth 2026.10.9",
          dict(optimizer="adamw_8bit", attention="flash_attention_2", grad_checkpointing=True, adapter_dtype="fp32",
               r=16, alpha=16.0, target="all-linear", dtype="bf16", amp=None, seq_len=2048, batch_size=4,
               padding=False, packing=True, kbit_prep=False, loss="unsloth", liger=False,
               activation_offload="unsloth"),
          ("unsloth's Triton RMSNorm / RoPE / SwiGLU / LoRA kernels: planned as the HF layers",
           "unsloth loads in 4 bits by default: pass --method qlora")),
    Stack("axolotl", "axolotl 067b021 (schema defaults)",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=False, adapter_dtype="fp32",
               dtype="bf16", amp=None, seq_len=512, batch_size=1, padding=True, packing=False, kbit_prep=False,
               loss="hf", liger=False),
          ("axolotl's example configs set flash-attention, sample packing, checkpointing (often reentrant: "
           "--use-reentrant), often "
           "lora_modules_to_save and the cut_cross_entropy plugin: pass them as flags (--loss cce for the plugin)",)),
    Stack("llamafactory", "LLaMA-Factory ff6d4d1 (argument defaults)",
          dict(optimizer="adamw_torch_fused", attention="sdpa", grad_checkpointing=True, use_reentrant=True,
               adapter_dtype="fp32", r=8, alpha=16.0, target="all-linear", dtype="bf16", amp=None, seq_len=2048,
               batch_size=8, padding=True, packing=False, kbit_prep=False, loss="hf", liger=False)),
)}


def resolve_stack(name: str) -> Stack:
    key = name.strip().lower().replace("_", "-")
    if key not in STACKS:
        raise PlannerInputError("stack", f"unknown stack {name!r}", f"use one of {', '.join(STACKS)}")
    return STACKS[key]


# Options that exclude each other: one given explicitly replaces the preset's choice of the other too (`--packing`
# over a preset that pads).
EXCLUSIVE = {"padding": "packing", "packing": "padding"}


def apply_stack(stack: Stack, args: Any, explicit: set[str]) -> list[str]:
    """Set every preset option the user did not give explicitly (`explicit`: argparse dests named on the command
    line) and that `args` has, nor one it excludes (`EXCLUSIVE`); returns the options set, as `--flag value` text."""
    applied = []
    for dest, value in stack.settings.items():
        if dest in explicit or EXCLUSIVE.get(dest) in explicit or not hasattr(args, dest):
            continue
        setattr(args, dest, value)
        flag = "--" + dest.replace("_", "-")
        applied.append(flag if value is True else f"{flag} off" if value is False or value is None else
                       f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return applied


def stack_note(stack: Stack, applied: list[str]) -> str:
    """The plan's note: which framework, what it set, what it does that the plan does not."""
    text = f"stack {stack.name} ({stack.version}): {', '.join(applied) or 'every setting given explicitly'}"
    if stack.notes:
        text += "; not modelled: " + "; ".join(stack.notes)
    return text

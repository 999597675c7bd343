"""Every subcommand's options, in one light module: building the parser (and `--help`) imports none of the
subcommands' machinery, so `lora-plan --model llama-7b` loads only what the estimate needs.

Option values are checked by `lora_planner.cli_types` (a test requires it of every option); the shared
defaults come from `lora_planner.defaults`; `lora_planner.cli` dispatches to each subcommand's runner.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from lora_planner import __version__
from lora_planner.catalog import model_names
from lora_planner.cli_options import (
    add_budget_arguments, add_collate_arguments, add_cpo_alpha_argument, add_grpo_arguments, add_liger_argument, add_loss_argument,
    add_overhead_arguments, add_precompute_argument, add_seq_len_argument, add_stack_argument,
)
from lora_planner.cli_types import (
    MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_TRAIN_TOKENS, Number, Text, count, fraction, option_error, positive_number,
)
from lora_planner.defaults import DEFAULT_BATCH_SIZE, DEFAULT_GLOBAL_BATCH, DEFAULT_MODEL, DEFAULT_R
from lora_planner.errors import PlannerInputError
from lora_planner.specs import (
    ATTENTIONS, DEVICES, DTYPES, FAMILIES, MAX_BATCH_SIZE, MAX_GLOBAL_BATCH, MAX_GPUS, MAX_R, OPTIMIZER_IMPLS,
    OPTIMIZERS, STRATEGIES,
)


class WholeWordsHelpFormatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only: textwrap's default also breaks at hyphens, which cuts option names in two
    (`--grad-` / `checkpointing`), and a reader cannot copy a flag that is not whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap  # lazily: only --help wraps text

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error on two or more lines; we want one line naming the option and exit code 2.
    Option names must be typed whole (`--mod` is not `--model`): abbreviations are how a typo silently sets
    another option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", WholeWordsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        parsed = option_error(message)
        if parsed is None:
            raise PlannerInputError("arguments", message, f"see `{self.prog} --help`")
        field, problem, fix = parsed
        raise PlannerInputError(field, problem, fix or f"see `{self.prog} --help`")


def add_planner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Text("model", "--model llama-3.1-8b"), default=DEFAULT_MODEL,
                   help=f"catalog name ({', '.join(model_names())}), a Hugging Face repo id of one of them, "
                        f"or a path to a config.json (default: {DEFAULT_MODEL})")
    p.add_argument("--method", type=Text("method", "--method full,lora"), default="full,lora,qlora",
                   help="comma list of full, lora, qlora (default: all)")
    p.add_argument("--from", dest="from_files", action="append", type=Text("from", "--from adapter_config.json"),
                   default=None, help="read settings from a file you already have (repeatable; later files win, flags "
                                      "win over files): a PEFT adapter_config.json / LoraConfig, transformers' "
                                      "TrainingArguments or TRL's SFTConfig as JSON or YAML, an axolotl, "
                                      "LLaMA-Factory, torchtune or litgpt YAML, a DeepSpeed JSON, an accelerate "
                                      "config, a model's config.json / BitsAndBytesConfig")
    p.set_defaults(zero_config=None)  # DeepSpeed's zero_optimization sizes: only --from a DeepSpeed JSON sets them
    p.add_argument("--r", type=count("r", "--r 8", MAX_R), default=DEFAULT_R,
                   help=f"LoRA rank (default {DEFAULT_R}, PEFT's)")
    p.add_argument("--alpha", type=positive_number("alpha", "--alpha 16"), default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--use-rslora", action="store_true",
                   help="PEFT's use_rslora: scale the update by alpha / sqrt(r) instead of alpha / r (no memory change)")
    p.add_argument("--modules-to-save", type=Text("modules-to-save", "--modules-to-save embed_tokens,lm_head"),
                   default=None,
                   help="PEFT's modules_to_save: modules trained in full beside the adapters, e.g. "
                        "embed_tokens,lm_head for new tokens (a trainable copy each, the original kept frozen)")
    p.add_argument("--bias", choices=("none", "lora_only", "all"), default="none",
                   help="PEFT's bias: which base biases train beside the adapters (lora_only: the adapted layers'; "
                        "all: every bias, norms' included); they get gradients and optimizer state, and under "
                        "bias=all the first layer keeps what an input gradient would (default none)")
    p.add_argument("--trainable-token-indices",
                   type=Text("trainable-token-indices", "--trainable-token-indices 128000-128255"), default=None,
                   help="PEFT's trainable_token_indices: train only these rows of the embeddings (e.g. new tokens), "
                        "ids and ranges such as 128000-128255 (the input embeddings, and a tied lm_head with them), or "
                        "per module: embed_tokens:128000-128255;lm_head:128000-128255")
    p.add_argument("--dora", "--use-dora", dest="use_dora", action="store_true",
                   help="PEFT's use_dora (DoRA): a trainable magnitude per adapted linear, and in every forward the "
                        "weight norm of W + BA (out x in transients) and the base output kept for backward")
    p.add_argument("--target", type=Text("target", "--target q_proj,v_proj"), default=None,
                   help="LoRA target modules, comma list of PEFT names, or all-linear "
                        "(default: PEFT's default for the family, e.g. q_proj,v_proj)")
    p.add_argument("--offload", choices=("none", "optimizer", "params"), default="none",
                   help="model states in host RAM: optimizer = DeepSpeed ZeRO-Offload (offload_optimizer: fp32 master, "
                        "its gradient and the optimizer states, stepped on the CPU; ZeRO-1/2/3, one GPU allowed); "
                        "params = also the parameters (ZeRO-3 offload_param, FSDP2 CPUOffloadPolicy); needs "
                        "--strategy; the host RAM per rank and per node is shown (default none)")
    p.add_argument("--activation-offloading", dest="activation_offload", choices=("none", "torchtune", "unsloth"),
                   default="none",
                   help="checkpointed layer inputs in pinned host RAM: torchtune = its recipes' "
                        "enable_activation_offloading (OffloadActivations: every saved tensor of 1 KiB or more, the "
                        "last 5 kept on the GPU), unsloth = use_gradient_checkpointing=\"unsloth\" (each layer's input "
                        "through two 16-bit GPU buffers); implies --grad-checkpointing; modelled from their source "
                        "(default none)")
    p.add_argument("--no-offload-pin-memory", dest="offload_pin_memory", action="store_false",
                   help="with --offload: pageable host buffers (DeepSpeed pin_memory=false, CPUOffloadPolicy("
                        "pin_memory=False)) instead of page-locked ones")
    p.add_argument("--gpus-per-node", type=count("gpus-per-node", "--gpus-per-node 8", MAX_GPUS), default=None,
                   help="with --offload: ranks sharing one host's RAM (default: every rank on one node, at most 8)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="QLoRA: bitsandbytes' bnb_4bit_use_double_quant=False, an fp32 absmax per 64 weights instead "
                        "of the double-quantized 8-bit one (0.5625 instead of ~0.516 bytes per weight)")
    p.add_argument("--quant", type=Text("quant", "--quant int8"), default="none",
                   help="the LoRA base's quantization: none, or int8 (bitsandbytes LLM.int8, transformers' "
                        "load_in_8bit=True; with kbit preparation as for QLoRA); with the default --method, plans LoRA "
                        "only (QLoRA's 4-bit base is --method qlora)")
    p.add_argument("--load-in-8bit", dest="quant", action="store_const", const="int8",
                   help="transformers' spelling of --quant int8")
    p.add_argument("--bnb-4bit-compute-dtype", type=Text("bnb-4bit-compute-dtype", "--bnb-4bit-compute-dtype bf16"),
                   default=None, help="QLoRA: bitsandbytes' bnb_4bit_compute_dtype, the dtype the 4-bit matmuls run in "
                                      "(default: --dtype, as the QLoRA recipe sets it; transformers' own default is "
                                      "fp32)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4",
                   help="QLoRA: bitsandbytes' bnb_4bit_quant_type (the same bytes either way) (default nf4)")
    p.add_argument("--adapter-dtype", choices=("fp32", "base"), default="fp32",
                   help="LoRA weights in fp32 (PEFT's default) or in the base dtype")
    p.add_argument("--layers-to-transform", type=Text("layers-to-transform", "--layers-to-transform 0-3"),
                   default=None,
                   help="PEFT's layers_to_transform: adapt the targets only in these layers, e.g. 0,1,2 or 24-31")
    p.add_argument("--target-parameters", type=Text("target-parameters", "--target-parameters mlp.experts.down_proj"),
                   default=None,
                   help="PEFT's target_parameters: MoE expert / router weights to adapt (comma list, e.g. "
                        "mlp.experts.gate_up_proj,mlp.experts.down_proj); all-linear already adds them where "
                        "PEFT's transformers-v5 MoE conversion does (Mixtral, Qwen3-MoE, OLMoE, DeepSeek)")
    p.add_argument("--experts-implementation", type=Text("experts-implementation", "--experts-implementation eager"),
                   default="grouped_mm",
                   help="MoE models: transformers' experts_implementation, grouped_mm (its default) or eager (a "
                        "loop over the experts)")
    p.add_argument("--routing", type=Text("routing", "--routing worst"), default="balanced",
                   help="MoE models, eager experts: the routing that sizes the busiest expert's buffers: balanced "
                        "(tokens x k / experts each; default), worst (one expert set takes every token), or a JSON "
                        "file of per-layer tokens per expert (e.g. the profiler's router counts)")
    add_loss_argument(p)
    add_liger_argument(p)
    add_collate_arguments(p)
    add_stack_argument(p)
    p.add_argument("--no-kbit-prep", dest="kbit_prep", action="store_false",
                   help="QLoRA without PEFT's prepare_model_for_kbit_training (which PEFT's QLoRA recipe calls, "
                        "casting embeddings, norms and lm_head to fp32; TRL 1.16's SFTTrainer does not)")
    p.add_argument("--dtype", type=Text("dtype", "--dtype bf16"), default=None,
                   help=f"weight dtype: {'|'.join(DTYPES)}, or bfloat16|float16|float32 (default bf16; fp32 with "
                        "--amp)")
    p.add_argument("--amp", type=Text("amp", "--amp bf16"), default=None,
                   help="autocast mixed precision: bf16|fp16 or bfloat16|float16 (fp32 master weights)")
    p.add_argument("--optimizer", type=Text("optimizer", "--optimizer adamw"), default="adamw",
                   help=f"{'|'.join(OPTIMIZERS)}, or any Hugging Face TrainingArguments optim name (adamw_torch, "
                        "adamw_torch_fused, adamw_8bit, paged_adamw_32bit, lion_8bit, adafactor, sgd, ...; the ones "
                        "not modelled are refused with the reason) (default adamw, fused: the Trainer's default "
                        "adamw_torch_fused)")
    p.add_argument("--optimizer-impl", type=Text("optimizer-impl", "--optimizer-impl fused"), default=None,
                   help=f"{'|'.join(OPTIMIZER_IMPLS)} (default: fused for adamw, as the Hugging Face Trainer's "
                        "adamw_torch_fused on torch >= 2.8; PyTorch's for the other torch optimizers: foreach on "
                        "cuda, for-loop on cpu)")
    p.add_argument("--batch-size", type=count("batch-size", "--batch-size 4", MAX_BATCH_SIZE),
                   default=DEFAULT_BATCH_SIZE,
                   help=f"micro-batch size (default {DEFAULT_BATCH_SIZE})")
    add_seq_len_argument(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--use-reentrant", action="store_true",
                   help="reentrant checkpointing (gradient_checkpointing_kwargs={'use_reentrant': True}, what "
                        "prepare_model_for_kbit_training asks for) instead of transformers' and TRL's non-reentrant "
                        "default; implies --grad-checkpointing")
    p.add_argument("--attention", type=Text("attention", "--attention sdpa"), default="sdpa",
                   help=f"{'|'.join(ATTENTIONS)}, transformers' attn_implementation (default sdpa, transformers' "
                        "default; flash_attention_2 is modelled from flash-attn's source)")
    p.add_argument("--device", type=Text("device", "--device cuda"), default="cuda",
                   help=f"{'|'.join(DEVICES)} (default cuda)")
    p.add_argument("--gpus", type=count("gpus", "--gpus 8", MAX_GPUS), default=1,
                   help="data-parallel GPUs; --batch-size is per GPU (default 1)")
    p.add_argument("--strategy", type=Text("strategy", "--strategy fsdp"), default=None,
                   help=f"how GPUs share model states, one engine each: {'|'.join(STRATEGIES)}; zero1|zero2|zero3 "
                        "are DeepSpeed's stages (deepspeed-zeroN), fsdp is FSDP2 FULL_SHARD, fsdp-grad-op "
                        "SHARD_GRAD_OP, ddp-zero1 DDP + ZeroRedundancyOptimizer (default with --gpus: ddp)")
    add_budget_arguments(p)
    add_overhead_arguments(p)
    p.add_argument("--mfu", type=fraction("mfu", "--mfu 0.4", zero=False, one=True), default=0.4,
                   help="model-FLOPs utilisation assumed for step times (default 0.4)")
    p.add_argument("--train-tokens", type=Number("train-tokens", 1, MAX_TRAIN_TOKENS, "--train-tokens 1e9"),
                   default=None, help="also show the time to train on this many tokens, e.g. 1e9")


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    add_planner_options(p)
    p.add_argument("--objective", type=Text("objective", "--objective dpo"), default="sft",
                   help="what the step trains for, as TRL's trainers: sft (default; every trainer's causal-LM step) or "
                        "dpo (DPOTrainer: each of --batch-size pairs is two rows, prompt + chosen and prompt + "
                        "rejected, of --seq-len tokens; TRL's fused LM head; a reference pass, the adapters disabled "
                        "(LoRA) between the forward and backward), kto (KTOTrainer: --batch-size single examples, a "
                        "no-grad KL pass first, reference passes over the KL and main rows), grpo (GRPOTrainer: a "
                        "generation round, scoring passes and the training step; --batch-size counts completions), "
                        "orpo (ORPOTrainer), simpo or cpo (CPOTrainer, loss_type simpo or sigmoid): pairs as two "
                        "rows, the loss computed from the whole logits (fp32 under autocast), no reference")
    add_precompute_argument(p)
    add_cpo_alpha_argument(p)
    add_grpo_arguments(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--detail", action="store_true", help="also show every phase of each method")
    p.add_argument("--calibration", type=Text("calibration", "--calibration calib.json"), default=None,
                   help="apply a calib.json from `lora-plan calibrate` (default: the uncalibrated planner)")


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    add_planner_options(p)
    p.set_defaults(method="full,lora")
    p.add_argument("--backend", type=Text("backend", "--backend hf"), default="hf",
                   help="hf (transformers + peft, default) or builtin")
    p.add_argument("--mode", type=Text("mode", "--mode cpu"), default="auto",
                   help="auto (cuda if present, else cpu for small models, else fake), cuda, cpu or fake")
    p.add_argument("--steps", type=count("steps", "--steps 3", MAX_STEPS), default=3,
                   help="measured steps per run (default 3; step 1 creates the optimizer state)")
    p.add_argument("--out", type=Text("out", "--out runs.jsonl"), default="runs.jsonl",
                   help="JSONL file the records are appended to")
    p.add_argument("--resume", action="store_true", help="skip runs already recorded in --out")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--threads", type=count("threads", "--threads 1", MAX_THREADS), default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier and often faster on a busy machine")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `lora-plan`; with `command`, only that subcommand's (building all eight costs ~4 ms of a
    cold start that must stay under 0.08 s; `--help` and `--version` build them all)."""
    parser = OneLineParser(prog="lora-plan", description="Will a full / LoRA / QLoRA fine-tune fit, and why.")
    parser.add_argument("--version", action="version", version=f"lora-plan {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    for name, (help_text, add_arguments) in SUBCOMMAND_ARGUMENTS.items():
        if command is None or name == command:
            add_arguments(sub.add_parser(name, help=help_text))
    return parser


@functools.lru_cache(maxsize=None)
def cached_parser(command: str | None = None) -> argparse.ArgumentParser:
    """`build_parser(command)`, built once per process (parsing does not change a parser; the web page parses every
    request)."""
    return build_parser(command)


def add_recommend_arguments(p: argparse.ArgumentParser) -> None:
    """The `recommend` subcommand's options (registered by `lora_planner.cli`)."""
    p.add_argument("--model", type=Text("model", "--model llama-3.1-8b"), required=True,
                   help=f"catalog name ({', '.join(model_names())}), a Hugging Face repo id of one of them, "
                        "or a path to a config.json")
    add_budget_arguments(p)  # --gpu and / or --gpu-mem (one is required), --headroom
    p.add_argument("--gpus", type=count("gpus", "--gpus 8", MAX_GPUS), default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--strategy", type=Text("strategy", "--strategy fsdp"), default=None,
                   help=f"{', '.join(STRATEGIES)} (zero1|zero2|zero3: DeepSpeed's stages) (default with --gpus: "
                        "the first of ddp, ddp-zero1, fsdp that gives the best configuration)")
    add_seq_len_argument(p)
    add_loss_argument(p)
    add_liger_argument(p)
    add_collate_arguments(p)
    add_stack_argument(p)
    p.add_argument("--global-batch", type=count("global-batch", "--global-batch 32", MAX_GLOBAL_BATCH),
                   default=DEFAULT_GLOBAL_BATCH,
                   help="sequences per optimizer step = micro-batch x GPUs x accumulation steps "
                        f"(default {DEFAULT_GLOBAL_BATCH})")
    p.add_argument("--methods", "--method", dest="methods", type=Text("methods", "--methods lora,qlora"), default=None,
                   help="allowed methods, comma list of full, lora, qlora (default: all that apply)")
    p.add_argument("--target", type=Text("target", "--target q_proj,v_proj"), default=None,
                   help="LoRA target modules, comma list of PEFT names, or all-linear "
                        "(default: PEFT's default for the family, e.g. q_proj,v_proj)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--r", type=count("r", "--r 8", MAX_R), default=None,
                      help=f"LoRA rank (default {DEFAULT_R}, lower only if needed)")
    rank.add_argument("--trainable-fraction", type=fraction("trainable-fraction", "--trainable-fraction 0.05",
                                                            zero=False, one=False), default=None,
                      help="choose r so that the adapters train this fraction of the model, e.g. 0.05")
    p.add_argument("--alpha", type=positive_number("alpha", "--alpha 16"), default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--adapter-dtype", choices=("fp32", "base"), default="fp32",
                   help="LoRA weights in fp32 (PEFT's default) or in the base dtype")
    p.add_argument("--calibration", type=Text("calibration", "--calibration calib.json"), default=None,
                   help="a calib.json from `lora-plan calibrate`: every prediction of the search applies it")
    p.add_argument("--min-micro-batch", type=count("min-micro-batch", "--min-micro-batch 4", MAX_BATCH_SIZE),
                   default=1,
                   help="smallest micro-batch to accept; checkpointing is turned on only if it does not fit "
                        "without (default 1)")
    p.add_argument("--dtype", type=Text("dtype", "--dtype bf16"), default=None,
                   help=f"weight dtype: {'|'.join(DTYPES)} (default bf16; fp32 with --amp)")
    p.add_argument("--amp", type=Text("amp", "--amp bf16"), default=None,
                   help="autocast mixed precision: bf16|fp16 (fp32 master weights)")
    p.add_argument("--optimizer", type=Text("optimizer", "--optimizer adamw"), default="adamw",
                   help=f"{'|'.join(OPTIMIZERS)} (default adamw)")
    p.add_argument("--optimizer-impl", type=Text("optimizer-impl", "--optimizer-impl fused"), default=None,
                   help=f"{'|'.join(OPTIMIZER_IMPLS)} (default: PyTorch's, foreach on cuda, for-loop on cpu)")
    p.add_argument("--attention", type=Text("attention", "--attention sdpa"), default="sdpa",
                   help=f"{'|'.join(ATTENTIONS)} (default sdpa)")
    p.add_argument("--device", type=Text("device", "--device cuda"), default="cuda",
                   help=f"{'|'.join(DEVICES)} (default cuda)")
    add_overhead_arguments(p)
    p.add_argument("--verify", action="store_true",
                   help="replay the recommended step and the next micro-batch under fake tensors (needs torch)")
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.add_argument("--train-tokens", type=Number("train-tokens", 1, MAX_TRAIN_TOKENS, "--train-tokens 1e7"),
                   default=None, help="the unique training tokens: the rank then comes from the data and the "
                                      "published evidence (lora_planner.rank_evidence; targets all-linear unless "
                                      "--target), instead of the default rank")
    p.add_argument("--examples", type=Number("examples", 1, MAX_TRAIN_TOKENS, "--examples 50000"), default=None,
                   help="the training examples (x --seq-len tokens for sft / continued-pretraining; episodes for rl, "
                        "pairs for preference): the rank from the data, as --train-tokens")
    p.add_argument("--objective", type=Text("objective", "--objective sft"), default=None,
                   help="sft (default), rl, continued-pretraining or preference: how much a token or an episode "
                        "teaches, and what the evidence says for it, with --train-tokens or --examples; dpo or "
                        "preference also search DPO's step (TRL's DPOTrainer: --global-batch and the micro-batch "
                        "count pairs, two rows each, and its reference pass); grpo or rl search GRPO's (TRL's "
                        "GRPOTrainer: they count completions; a generation round, then the training step); orpo, "
                        "simpo or cpo search ORPOTrainer's or CPOTrainer's (pairs, the whole logits in fp32)")
    add_precompute_argument(p)
    add_cpo_alpha_argument(p)
    add_grpo_arguments(p, accumulation=False)
    p.add_argument("--capacity-margin", type=positive_number("capacity-margin", "--capacity-margin 2"), default=None,
                   help="trainable parameters x 2 bits over the data's bits (default 2)")
    p.add_argument("--explain", action="store_true",
                   help="print the evidence chain behind the rank, targets, alpha and learning rate, with citations")


def add_sweep_arguments(p: Any) -> None:
    """The `lora-plan sweep` subcommand's arguments (an argparse parser)."""
    p.add_argument("grid", type=Text("grid", "experiments/grids/cpu_validation.toml"),
                   help="TOML grid file (see experiments/grids/ and the lora_planner.sweep docstring)")
    p.add_argument("--out", type=Text("out", "--out runs.jsonl"), required=True,
                   help="JSONL file each record is appended to as its run finishes")
    p.add_argument("--resume", action="store_true", help="skip runs whose key is already in --out")
    p.add_argument("--limit", type=count("limit", "--limit 10"), default=None,
                   help="run at most N of the remaining runs")
    p.add_argument("--dry-run", action="store_true", help="list the grid's runs without running them")
    p.add_argument("--threads", type=count("threads", "--threads 1", MAX_THREADS), default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier step times on a shared machine")


def add_calibrate_arguments(p: Any) -> None:
    """`lora-plan calibrate` arguments (an argparse parser)."""
    p.add_argument("--runs", action="append", type=Text("runs", "--runs runs.jsonl"), required=True,
                   help="JSONL profile records (repeatable)")
    p.add_argument("--out", type=Text("out", "--out calib.json"), required=True,
                   help="calibration file to write, e.g. calib.json")
    p.add_argument("--holdout", type=fraction("holdout", "--holdout 0.3", zero=True, one=False), default=0.3,
                   help="fraction of each family/method's measured runs held out to check its factor (default 0.3); "
                        "a factor is applied only when it lowers their error, and nothing is written when no run "
                        "can be held out or nothing is applied")
    p.add_argument("--seed", type=count("seed", "--seed 0", MAX_SEED, low=0), default=0,
                   help="seed of the held-out split (default 0)")


def add_report_arguments(p: Any) -> None:
    """`lora-plan report` arguments (an argparse parser)."""
    p.add_argument("--runs", action="append", type=Text("runs", "--runs runs.jsonl"), required=True,
                   help="JSONL profile records (repeatable)")
    p.add_argument("--out", type=Text("out", "--out reports/cpu"), required=True,
                   help="folder for report.md and its PNG charts")
    p.add_argument("--model", type=Text("model", "--model llama-3-8b"), default="llama-3-8b",
                   help="model of the planner's own charts (breakdown, rank, batch, sequence; default llama-3-8b)")


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.add_argument("--family", type=Text("family", "--family llama"), default=None,
                   help=f"only this family: {', '.join(FAMILIES)}")


# Each subcommand: its help line and the function declaring its options, in the order `--help` lists them.
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`lora-plan serve`'s options (`lora_planner.web`)."""
    p.add_argument("--host", type=Text("host", "--host 127.0.0.1"), default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=count("port", "--port 8000", 65535), default=8000, help="port (default 8000)")
    p.add_argument("--open", dest="open_browser", action="store_true", help="open the page in the default browser")


SUBCOMMAND_ARGUMENTS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "estimate": ("predict the peak memory of one training step (default)", add_estimate_arguments),
    "profile": ("run real training steps (full vs LoRA) and compare with the prediction", add_profile_arguments),
    "recommend": ("choose method, rank, alpha, micro-batch and checkpointing for a GPU", add_recommend_arguments),
    "sweep": ("run a TOML grid of profile runs into a JSONL file (resumable)", add_sweep_arguments),
    "calibrate": ("fit the planner's free constants to measured runs", add_calibrate_arguments),
    "report": ("charts and a Markdown report from profile records", add_report_arguments),
    "models": ("list the model catalog (sizes, context, repo ids)", add_models_arguments),
    "serve": ("a local web page over the planner (needs the web extra)", add_serve_arguments),
}

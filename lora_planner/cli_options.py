"""Command-line options that `estimate` (and `profile`) and `recommend` share, defined once so that their
names, defaults (`lora_planner.defaults`) and meaning cannot drift apart."""

from __future__ import annotations

import argparse

from lora_planner.cli_types import Number, Text, count, fraction
from lora_planner.defaults import (
    DEFAULT_ALLOCATOR_OVERHEAD, DEFAULT_CUDA_CONTEXT, DEFAULT_HEADROOM, DEFAULT_SEQ_LEN,
)
from lora_planner.errors import PlannerInputError
from lora_planner.gpus import GPUS, parse_memory_size
from lora_planner.memory import MAX_ALLOCATOR_FRACTION, DeviceOverhead
from lora_planner.planner import Budget, budget_from_options, usable_bytes
from lora_planner.specs import MAX_GENERATIONS, MAX_SEQ_LEN, GrpoSpec

ALLOCATOR_OVERHEAD = Number("allocator-overhead", 0.0, MAX_ALLOCATOR_FRACTION, "--allocator-overhead 0.05",
                            high_open=True)


def add_seq_len_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=count("seq-len", "--seq-len 2048", MAX_SEQ_LEN), default=DEFAULT_SEQ_LEN,
                   help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}, TRL's SFT max_length)")


def add_loss_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", type=Text("loss", "--loss chunked:8"), default="hf",
                   help="the training loss: hf (transformers' ForCausalLMLoss: the whole logits, their fp32 copy and "
                        "log_softmax at once; default), chunked[:N] (torchtune's CEWithChunkedOutputLoss: the output "
                        "layer and the fp32 upcast one of N sequence chunks at a time, N = 8 by default), linear[:N] "
                        "(torchtune main's LinearCrossEntropyLoss: the ignored rows dropped, then N row chunks; "
                        "measured), litgpt[:TOKENS] (litgpt under Fabric: the output layer over 128-token chunks, "
                        "every chunk copied to fp32 and the list kept from step to step; measured), "
                        "fused-linear (alias liger: Liger's fused linear cross-entropy, what use_liger_kernel=True "
                        "runs: no logits kept, gradients computed in forward; modelled from its source), cce "
                        "(Apple's Cut Cross-Entropy, axolotl's cut_cross_entropy plugin: no logits ever, the hidden "
                        "state kept, its gradient made in backward; modelled from its source) or trl (TRL 1.16's fused "
                        "LM head, SFTTrainer's default: 4,096 x 32,768 tiles, the valid rows kept; modelled from its "
                        "source)")


def add_stack_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", type=Text("stack", "--stack trl-sft"), default=None,
                   help="the defaults a framework trains with: hf-trainer, trl-sft, trl-dpo, trl-grpo, trl-orpo, "
                        "trl-cpo, torchtune, litgpt, unsloth, llamafactory or "
                        "axolotl (optimizer, loss, attention, checkpointing, adapter dtype, kbit preparation, rank, "
                        "batch, sequence, collator); flags given explicitly win; the plan prints what was set and "
                        "what the framework does that is not modelled")


def add_precompute_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precompute-ref-log-probs", action="store_true",
                   help="with --objective dpo or kto: the reference log-probs computed over the dataset before "
                        "training (precompute_ref_log_probs): no reference pass in the step")


def add_cpo_alpha_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpo-alpha", type=Number("cpo-alpha", 0.0, float("inf"), "--cpo-alpha 0"), default=1.0,
                   help="with --objective simpo or cpo: CPOConfig's cpo_alpha, the chosen rows' NLL term's weight "
                        "(TRL's default 1.0, for SimPO too); 0 drops the term and its log_softmax (pure SimPO)")


def add_grpo_arguments(p: argparse.ArgumentParser, accumulation: bool = True) -> None:
    """GRPOConfig's fields that change a GRPO step's memory (`specs.GrpoSpec`), with TRL's names and defaults
    (`accumulation` False: the command has its own, `recommend`'s global batch)."""
    g = p.add_argument_group("GRPO (--objective grpo, TRL 1.16 GRPOTrainer)")
    g.add_argument("--num-generations", type=count("num-generations", "--num-generations 8", MAX_GENERATIONS, low=2),
                   default=8, help="completions per prompt (default 8); " + (
                       "--batch-size counts completions" if accumulation else
                       "the micro-batch and --global-batch count completions"))
    g.add_argument("--max-completion-length", type=count("max-completion-length", "--max-completion-length 1024",
                                                         MAX_SEQ_LEN), default=512,
                   help="tokens generated per completion (default 512)")
    g.add_argument("--max-prompt-length", type=count("max-prompt-length", "--max-prompt-length 512", MAX_SEQ_LEN),
                   default=None, help="the longest prompt's tokens (GRPOConfig does not truncate prompts; default: "
                                      "--seq-len minus the completion when --seq-len is given, else 512): a row is "
                                      "prompt + completion")
    g.add_argument("--beta", type=Number("beta", 0.0, 1e6, "--beta 0.04"), default=0.0,
                   help="KL coefficient (default 0.0, TRL's: no reference model); above 0 a reference pass runs")
    g.add_argument("--num-iterations", type=count("num-iterations", "--num-iterations 2"), default=1,
                   help="times each generation round is trained on (default 1)")
    g.add_argument("--steps-per-generation", type=count("steps-per-generation", "--steps-per-generation 4"),
                   default=None, help="micro-batches one generation round feeds (default: the accumulation steps)")
    g.add_argument("--generation-batch-size", type=count("generation-batch-size", "--generation-batch-size 64"),
                   default=None, help="completions generated per round (instead of --steps-per-generation)")
    if accumulation:
        g.add_argument("--gradient-accumulation-steps", type=count("gradient-accumulation-steps",
                                                                   "--gradient-accumulation-steps 4"), default=1,
                       help="micro-batches per optimizer step (default 1)")
    g.add_argument("--use-vllm", nargs="?", const="colocate", default=None, type=Text("use-vllm", "--use-vllm server"),
                   help="generate with vLLM: colocate (the default mode: in the training process, reserving "
                        "--vllm-gpu-memory-utilization of the GPU) or server (on other GPUs)")
    g.add_argument("--vllm-gpu-memory-utilization", type=fraction("vllm-gpu-memory-utilization",
                                                                  "--vllm-gpu-memory-utilization 0.3", zero=False,
                                                                  one=False), default=0.3,
                   help="colocated vLLM's share of the GPU's memory (default 0.3)")
    g.add_argument("--vllm-enable-sleep-mode", action="store_true",
                   help="colocated vLLM releases its weights and KV cache between generations")
    g.add_argument("--temperature", type=Number("temperature", 0.0, 1e6, "--temperature 1.0", low_open=True),
                   default=1.0, help="sampling temperature (default 1.0; another value adds a logits processor)")


def add_liger_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--liger", action="store_true",
                   help="transformers' use_liger_kernel=True: Liger's RMSNorm, RoPE and SwiGLU / GEGLU kernels on the "
                        "families it patches and its fused linear cross-entropy as the loss (modelled from Liger's "
                        "source; a family Liger does not patch is planned as it is, and the plan says so)")


def add_collate_arguments(p: argparse.ArgumentParser) -> None:
    """--padding / --packing: the batch as the collator builds it (default: every row full, no mask)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--padding", action="store_true",
                       help="rows of different lengths padded to --seq-len with an attention mask (transformers' and "
                            "TRL's default collator when lengths differ): SDPA then gets a (b, 1, s, s) mask and k / v "
                            "repeated to every head in each layer")
    group.add_argument("--packing", action="store_true",
                       help="padding-free packing as TRL's packing / padding_free (bfd): the micro-batch's sequences "
                            "in one row of micro-batch x --seq-len tokens with position_ids, no padding; SDPA and "
                            "eager attention then build a block-diagonal mask over the whole row (its S^2 terms grow "
                            "with the row), flash_attention_2 runs varlen with none")
    p.add_argument("--lengths", type=Text("lengths", "--lengths lengths.json"), default=None,
                   help="the dataset's tokenized example lengths (a JSON list, or a CSV / text file with one per "
                        "line): plan the worst micro-batch the collator can build from them (the longest example "
                        "padded with the micro-batch's other rows, shorter, or with --packing the micro-batch's full bins), which "
                        "sets --seq-len and --padding, and say which batch it is")
    p.add_argument("--max-seq-len", type=count("max-seq-len", "--max-seq-len 4096", MAX_SEQ_LEN), default=None,
                   help="with --lengths: the truncation length (TRL's SFTConfig max_length; with --packing, the bin "
                        "size); without: the same as --seq-len")


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """--gpu, --gpu-mem (either, or both: that GPU with another memory size) and --headroom."""
    p.add_argument("--gpu", type=Text("gpu", "--gpu a100-80gb"), default=None,
                   help=f"GPU to fit in: {', '.join(GPUS)}; with --gpu-mem, its FLOP/s, bandwidth and bf16 support "
                        "and the memory of --gpu-mem (e.g. a 94 GB H100 NVL, a MIG slice)")
    p.add_argument("--gpu-mem", type=Text("gpu-mem", "--gpu-mem 24GiB"), default=None,
                   help="memory per GPU, e.g. 24GiB (binary, 2^30 bytes) or 80GB (decimal, 10^9 bytes: 74.51 GiB)")
    p.add_argument("--headroom", type=fraction("headroom", "--headroom 0.1", zero=True, one=False),
                   default=DEFAULT_HEADROOM,
                   help=f"fraction of each GPU's memory kept free: usable = budget x (1 - headroom), in [0, 1) "
                        f"(default {DEFAULT_HEADROOM:g})")


def add_overhead_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-context", type=Text("cuda-context", "--cuda-context 512MiB"), default=DEFAULT_CUDA_CONTEXT,
                   help=f"CUDA context + library workspaces outside the allocator (default {DEFAULT_CUDA_CONTEXT})")
    p.add_argument("--allocator-overhead", type=ALLOCATOR_OVERHEAD, default=DEFAULT_ALLOCATOR_OVERHEAD,
                   help="caching-allocator reserve as a fraction of the allocated peak "
                        f"(default {DEFAULT_ALLOCATOR_OVERHEAD:g})")


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    """The budget of --gpu / --gpu-mem (None if neither), with --headroom checked."""
    usable_bytes(1, args.headroom)  # one-line error for a headroom outside [0, 1)
    return budget_from_options(args.gpu, args.gpu_mem)


def overhead_from_args(args: argparse.Namespace) -> DeviceOverhead:
    return DeviceOverhead(cuda_context_bytes=parse_memory_size(args.cuda_context, "cuda-context"),
                          allocator_fraction=args.allocator_overhead)


def grpo_from_args(args: argparse.Namespace) -> GrpoSpec:
    """GRPOConfig's settings (`specs.GrpoSpec`) of the options; a colocated vLLM's share is of the --gpu's memory."""
    backend = "transformers"
    if getattr(args, "use_vllm", None) is not None:
        mode = str(args.use_vllm).strip().lower()
        if mode not in ("colocate", "server"):
            raise PlannerInputError("use-vllm", f"unknown vLLM mode {args.use_vllm!r}",
                                    "pass --use-vllm (colocate) or --use-vllm server")
        backend = f"vllm-{mode}"
    budget = budget_from_args(args) if backend == "vllm-colocate" else None
    return GrpoSpec(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                    gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
                    steps_per_generation=args.steps_per_generation, num_iterations=args.num_iterations,
                    generation_batch_size=args.generation_batch_size,
                    beta=args.beta, generation_backend=backend,
                    vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                    vllm_enable_sleep_mode=args.vllm_enable_sleep_mode, temperature=args.temperature,
                    vllm_gpu_memory_bytes=budget.memory_bytes if budget else None)

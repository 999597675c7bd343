"""One call that answers "will it fit?" for several methods at once, and its stable JSON shape (pure).

`make_plan` ties the pieces together: the model spec, exact parameter counts, one `MemoryEstimate` per
method (full / LoRA / QLoRA) under the same settings, and the GPU budget. `plan_to_dict` is the
`--json` output (`schema_version` 1; keys are only ever added).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lora_planner.defaults import DEFAULT_HEADROOM
from lora_planner.errors import PlannerInputError
from lora_planner.gpus import GIB, GPUS, GpuSpec, memory_size_echo, parse_memory_size, resolve_gpu
from lora_planner.loss import loss_kind, unsloth_chunks
from lora_planner.memory import DeviceOverhead, MemoryEstimate, estimate_memory, estimate_memory_cached
from lora_planner.families import family_rules
from lora_planner.params import PEFT_DEFAULT_TARGETS, ParamCounts, count_params, target_description
from lora_planner.specs import REGISTERED_FAMILIES, UNSLOTH_LOSSES, ModelSpec, TrainingSpec
from lora_planner.throughput import DEFAULT_MFU, ThroughputEstimate, estimate_throughput

REFERENCE_GPU = "h100-80gb"  # step times need a GPU's FLOP/s; this one when the budget names none

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """The memory a run must fit in (per GPU): a catalog GPU, a size given by hand (`name` None), or both
    (`--gpu NAME --gpu-mem SIZE`: the memory from the size, FLOP/s, bandwidth and bf16 support from the
    GPU, e.g. a 94 GB H100 NVL or a MIG slice). `memory_text` is the size as the user typed it."""

    memory_bytes: int
    name: str | None = None
    supports_bf16: bool = True
    memory_text: str | None = None


def budget_from_options(gpu: str | None, gpu_mem: str | None) -> Budget | None:
    """`--gpu` and / or `--gpu-mem` -> the budget (None when neither is given)."""
    if gpu_mem is not None:
        memory = parse_memory_size(gpu_mem, "gpu-mem")
    if gpu:
        spec = resolve_gpu(gpu)
        if gpu_mem is None:
            return Budget(memory_bytes=spec.memory_bytes, name=spec.name, supports_bf16=spec.supports_bf16)
        return Budget(memory_bytes=memory, name=spec.name, supports_bf16=spec.supports_bf16, memory_text=gpu_mem)
    if gpu_mem is not None:
        return Budget(memory_bytes=memory, memory_text=gpu_mem)
    return None


def gib_text(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def describe_budget(budget: Budget) -> str:
    """'rtx-4090, 23.99 GiB', '80 GB = 74.51 GiB', or 'h100-80gb with --gpu-mem 94 GB = 87.54 GiB (...)'."""
    if budget.memory_text is None:
        size = gib_text(budget.memory_bytes)
        return f"{budget.name}, {size}" if budget.name else size
    echo = memory_size_echo(budget.memory_text)
    if budget.name is None:
        return echo
    return (f"{budget.name} with --gpu-mem {echo} (memory from --gpu-mem; FLOP/s, bandwidth and bf16 support "
            f"from --gpu {budget.name})")


def usable_bytes(budget_bytes: int, headroom: float) -> int:
    """The memory a step may use on one GPU: budget x (1 - headroom), rounded down to a byte. The one
    definition `estimate`, `recommend`, `--verify` and `fits on` all use."""
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise PlannerInputError("headroom", f"must be a fraction in [0, 1), got {headroom!r}",
                                "pass e.g. 0.1 (keep 10% of the GPU free) or 0 (use all of it)")
    return math.floor(budget_bytes * (1 - headroom))


def fits(peak_device_bytes: int, usable: int) -> bool:
    """Whether a step fits: its predicted (or measured) peak on the device is at most the usable memory.
    A peak exactly at the usable memory fits."""
    return peak_device_bytes <= usable


def describe_usable(budget_bytes: int, headroom: float) -> str:
    """'usable = 23.99 GiB x (1 - 10 %) = 21.59 GiB': the same text in every subcommand."""
    return (f"usable = {gib_text(budget_bytes)} x (1 - {100 * headroom:g} %) = "
            f"{gib_text(usable_bytes(budget_bytes, headroom))}")


def plan_warnings(spec: ModelSpec, training: TrainingSpec, budget: Budget | None = None,
                  methods: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """What the user should know about these settings that is not an error (pure; shown by every output).
    `methods`: every method planned (default: the training's)."""
    warnings = []
    family = family_rules(spec.family)
    if spec.family in REGISTERED_FAMILIES:  # a traced profile (lora_planner.traced): say so, with its versions
        from lora_planner.traced import traced_note

        warnings.append(traced_note(spec.family, training.device))
    if training.lora.target_modules is None and not family.peft_has_default \
            and any(m != "full" for m in (methods or (training.method,))):
        warnings.append(f"PEFT has no default LoRA targets for {spec.family} (get_peft_model asks for "
                        f"target_modules): planned with {', '.join(family.peft_default_targets)}, this tool's "
                        "choice; pass --target to set them")
    limit = spec.max_position_embeddings
    if training.seq_len > limit:  # learned position tables (GPT-2) refuse it: params.check_sequence_length
        warnings.append(f"--seq-len {training.seq_len} is above {spec.name}'s max_position_embeddings {limit}: "
                        "the model saw no longer sequences in pre-training: use RoPE scaling (rope_scaling in "
                        "config.json) or expect worse quality; the memory estimate is for the length asked")
    if not family.sdpa and training.attention == "sdpa":
        why = NO_SDPA_REASONS.get(spec.family, "its attention is not SDPA's")
        warnings.append(f"transformers 5.24 has no SDPA attention for {spec.family} ({why}): "
                        "attn_implementation=\"sdpa\" raises, and by default the model runs eager attention, "
                        "which is what is planned (S x S scores per head kept for backward); pass --attention eager "
                        "to plan it without this note")
    if spec.sliding_window and training.seq_len > spec.sliding_window and not family.models_sliding_window:
        warnings.append(f"{spec.name} attends over a {spec.sliding_window}-token sliding window, shorter than "
                        f"--seq-len {training.seq_len}; transformers then builds an S x S mask and repeats k/v for "
                        "SDPA, which this estimate does not count")
    if spec.is_moe:
        warnings += moe_notes(spec, training, methods or (training.method,))
    if training.liger:
        if family.liger == "modelled":
            warnings.append("liger: Liger's RMSNorm (keeps its input and 1/rms, no fp32 copy), RoPE (in place) and "
                            "SwiGLU / GEGLU (keeps gate and up, gradients written into them) modelled from "
                            "Liger-Kernel's source (Triton, not measured here)")
        else:
            warnings.append(f"liger: Liger has no patch for {spec.family}: the Trainer applies none of its kernels "
                            "(`_apply_liger_kernel_to_instance` only logs), so the plan is without them")
    if loss_kind(spec, training) == "fused-linear":
        from lora_planner.loss_fused import flce_chunk_rows  # lazily: only for this loss
        from lora_planner.activations import make_flow

        rows = flce_chunk_rows(make_flow(spec, training))
        warnings.append(f"loss: Liger's fused linear cross-entropy modelled from its source (linkedin/Liger-Kernel "
                        "ops/fused_linear_cross_entropy.py; Triton, not measured here): no logits kept, the input "
                        f"gradient computed in forward, logits {rows} rows at a time (two chunks at once); a trained "
                        "lm_head's weight gradient is made in forward too")
    if loss_kind(spec, training) == "cce":
        warnings.append("loss: Apple's Cut Cross-Entropy (axolotl's cut_cross_entropy plugin) modelled from its source "
                        "(apple/ml-cross-entropy cce.py, cce_backward.py; Triton, not measured here): no logits at "
                        "any moment; the final hidden state kept for backward, its gradient made there")
    if loss_kind(spec, training) == "trl":
        warnings.append("loss: TRL 1.16's fused LM head (SFTTrainer's default) modelled from its source "
                        "(trl/kernels/chunked_logprob.py; Triton, not measured here): the valid rows of the final "
                        "hidden state kept, logits only as 4,096 x 32,768 tiles, the input gradient accumulated in "
                        "fp32")
    if training.attention == "flash_attention_2":
        warnings.append("attention: flash-attn 2 modelled from its source (Dao-AILab/flash-attention "
                        "flash_attn_interface.py, flash_api.cpp), not measured here: q, k, v at kv-head width, the "
                        "output, the fp32 log-sum-exp; no mask for sliding windows or soft-capping; o_proj's input is "
                        "a copy (the output keeps q's head-major order)")
    if training.attention == "flex_attention":
        warnings.append("attention: FlexAttention modelled from its source (torch 2.13 _higher_order_ops/"
                        "flex_attention.py, _inductor/kernel/flex/flex_attention.py; transformers' compiled call), not "
                        "measured here (it has no backward on the CPU): q, k, v at kv-head width, the output, the fp32 "
                        "log-sum-exp; the mask a BlockMask of 128 x 128 blocks (padding, packing, windows and "
                        "soft-capping inside it); o_proj's input is a copy (the output keeps q's head-major order)")
    if training.attention == "sdpa" and training.device == "cuda" and spec.family not in REGISTERED_FAMILIES \
            and family_rules(spec.family).sdpa:
        from lora_planner.activations import make_flow
        from lora_planner.families.rules import sdpa_kernel

        kernel, why = sdpa_kernel(make_flow(spec, training))
        if kernel == "math":  # (the kernel assumed is in the settings line: `sdpa_kernel_for`)
            warnings.append(f"attention: SDPA runs its math kernel ({why}): it keeps the S x S probabilities of every "
                            "layer like eager attention")
    if training.loss == "chunked":
        warnings.append(f"loss: torchtune's CEWithChunkedOutputLoss in {training.loss_chunks} sequence chunks (eager, "
                        "no torch.compile): every chunk's logits live until the loss returns, the fp32 upcast and "
                        "the loss gradients one chunk at a time (full fine-tuning: lm_head's weight gradient is "
                        "written once per chunk and summed)")
    if training.loss == "linear":
        warnings.append(f"loss: torchtune's LinearCrossEntropyLoss in {training.loss_chunks} row chunks (eager, no "
                        "torch.compile): the ignored rows dropped before the output layer (every target planned "
                        "valid), each chunk's logits and fp32 upcast one at a time, every chunk's log_softmax kept")
    if training.load_in_8bit:
        from lora_planner.activations import int8_checkpoint_held_bytes, make_flow

        held = int8_checkpoint_held_bytes(make_flow(spec, training)) * spec.num_layers
        warnings.append(
            "quant: an 8-bit base (bitsandbytes LLM.int8, measured on CPU): int8 weights with an fp32 scale per output "
            "row, dequantized per matmul; each 8-bit matmul keeps its input as a context attribute while it has a "
            "gradient node" + (f"; under non-reentrant checkpointing (transformers' and TRL's default) the layers' "
                               f"8-bit inputs stay through the forward: {held / GIB:.2f} GiB here, none with reentrant "
                               "checkpointing (--use-reentrant: prepare_model_for_kbit_training's own)"
                               if held else "") +
            "; on CUDA, MatMul8bitLt also keeps the outlier columns (inputs >= 6.0, data-dependent: planned none)")
    if training.loss in UNSLOTH_LOSSES:
        chunks = unsloth_chunks(spec, training)
        rule = "forced" if training.loss_target_gib is None else \
            f"Unsloth's rule for a {training.loss_target_gib:g} GiB target (min(half the free GPU memory, 4 GiB))"
        how = ("eager (UNSLOTH_FUSED_CE_COMPILE_DISABLE=1; measured on CPU): the chunk's fp32 upcast, log-softmax "
               "and gradients at once") if training.loss == "unsloth-eager" else \
            ("each chunk's step compiled, as by default (modelled from the code inductor generates: the chunk's "
             "logits, their gradient written in place, then the input gradient)")
        warnings.append(f"loss: Unsloth's fused cross-entropy in {chunks} row chunk{'s' if chunks > 1 else ''} "
                        f"({rule}), {how}; no logits kept, each chunk's loss and input gradient made in forward")
    if training.resolved_strategy is not None:
        from lora_planner.parallel.deepspeed import unmodelled_note

        notes = (unmodelled_note(spec, replace(training, method=m)) for m in (methods or (training.method,)))
        warnings += list(dict.fromkeys(n for n in notes if n))
    if budget is not None and not budget.supports_bf16 and training.compute_dtype == "bf16":
        warnings.append(f"{budget.name} has no bf16 support; use --dtype fp16 or --amp fp16")
    return tuple(warnings)


# Why transformers 5.24 refuses SDPA for a family (`Family.sdpa` False), for the plan's note.
NO_SDPA_REASONS = {"gemma2": "it cannot soft-cap attention scores",
                   "gpt_oss": "SDPA has no place for the attention sinks, an extra softmax column per head"}


def moe_notes(spec: ModelSpec, training: TrainingSpec, methods: tuple[str, ...]) -> list[str]:
    """What an MoE plan assumed, beside the answer: the experts implementation and routing, PEFT's MoE quirks under
    transformers 5 (`lora_planner.families.moe`, `lora_planner.params.peft_moe_conversion`), what QLoRA does to the
    experts."""
    from lora_planner.params import adapted_layers

    family = family_rules(spec.family)
    lora_methods = [m for m in methods if m != "full"]
    notes = []
    routing = training.routing if isinstance(training.routing, str) else "measured"
    how = {"grouped_mm": "grouped_mm (transformers' default): what the experts keep does not depend on the routing",
           "eager": f"eager (a loop over the experts): the busiest expert's buffers follow {routing} routing; what "
                    "the experts keep does not depend on it"}[training.experts_implementation]
    aux = ("on (config.json): the load-balancing loss keeps each MoE layer's router softmax" if spec.output_router_logits
           else "off (config.json): no load-balancing loss")
    notes.append(f"MoE: experts_implementation {how}; output_router_logits {aux}; expert parallelism is not modelled "
                 "(experts are sharded like any other parameter by --strategy)")
    if lora_methods and training.lora.target_modules is None and family.moe_conversion and family.peft_has_default:
        notes.append(f"PEFT 0.21.2 under transformers 5 finds no default LoRA targets for {spec.family} (its MoE "
                     f"conversion leaves target_modules empty: NoMatchingPeftModuleError); planned with its mapping's "
                     f"{', '.join(family.peft_default_targets)}: pass them as target_modules")
    if lora_methods:
        lora = training.lora
        adapted = adapted_layers(spec, lora.target_modules, lora.layers_to_transform, lora.target_parameters)
        experts = [m for m, _ in adapted if m.kind == "experts"]
        if experts:
            notes.append("LoRA on the experts (PEFT's target_parameters, lora.ParamWrapper): each forward folds "
                         "W + BA into a new expert-stack tensor that backward keeps, a second copy of every adapted "
                         "expert weight per layer (gradient checkpointing keeps one layer's at a time)")
    if spec.family == "gpt_oss":
        notes.append("gpt-oss checkpoints store the experts in MXFP4; transformers dequantizes them to the load dtype "
                     "for training (Mxfp4Config(dequantize=True), forced without triton kernels; the quantized path "
                     "cannot train): planned as --dtype weights")
    if "qlora" in methods:
        kbit = " and PEFT's prepare_model_for_kbit_training casts them to fp32" if training.kbit_prep else ""
        notes.append("QLoRA quantizes nn.Linear layers only: the fused expert tensors stay in --dtype" + kbit)
    return notes


@dataclass(frozen=True)
class MethodPlan:
    estimate: MemoryEstimate
    fits: bool | None  # None when no budget was given
    fits_on: tuple[str, ...]  # catalog GPUs that hold peak_device_bytes and run the compute dtype
    throughput: ThroughputEstimate


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    params: ParamCounts
    training: TrainingSpec  # the shared settings; `training.method` is the first method
    target_modules: tuple[str, ...]  # LoRA targets as asked (PEFT's default names when none were)
    methods: dict[str, MethodPlan]
    budget: Budget | None
    overhead: DeviceOverhead
    train_tokens: int | None = None  # show the time to train on this many tokens
    headroom: float = DEFAULT_HEADROOM  # usable = budget x (1 - headroom), for the budget and `fits on`
    warnings: tuple[str, ...] = ()  # `plan_warnings`: shown under the table and in --json
    adapted_modules: tuple[str, ...] = ()  # what the targets adapt, layer by layer (`target_description`)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.budget is None else usable_bytes(self.budget.memory_bytes, self.headroom)


def fits_on(peak_device_bytes: int, gpus: dict[str, GpuSpec], compute_dtype: str,
            headroom: float = DEFAULT_HEADROOM) -> tuple[str, ...]:
    """Catalog GPUs, smallest first, whose usable memory holds the peak and that can run the compute dtype
    (no bf16 on T4/V100)."""
    return tuple(name for name, gpu in sorted(gpus.items(), key=lambda kv: kv[1].memory_bytes)
                 if fits(peak_device_bytes, usable_bytes(gpu.memory_bytes, headroom))
                 and (compute_dtype != "bf16" or gpu.supports_bf16))


def refit(plan: Plan) -> Plan:
    """Every method's `fits` and `fits_on` recomputed from its estimate (after a calibration changed it)."""
    methods = {}
    for method, mp in plan.methods.items():
        peak = mp.estimate.peak_device_bytes
        methods[method] = replace(
            mp, fits=None if plan.usable_bytes is None else fits(peak, plan.usable_bytes),
            fits_on=fits_on(peak, GPUS, plan.training.compute_dtype, plan.headroom))
    return replace(plan, methods=methods)


def make_plan(spec: ModelSpec, training: TrainingSpec, methods: tuple[str, ...],
              budget: Budget | None = None, overhead: DeviceOverhead | None = None, mfu: float = DEFAULT_MFU,
              train_tokens: int | None = None, headroom: float = DEFAULT_HEADROOM) -> Plan:
    """Estimate every requested method under the same settings and compare each with the budget's usable
    memory (`usable_bytes`). Step times use the budget's GPU when it is a catalog GPU, else `REFERENCE_GPU`."""
    overhead = overhead or DeviceOverhead()
    usable = None if budget is None else usable_bytes(budget.memory_bytes, headroom)
    gpu = GPUS.get(budget.name or "", GPUS[REFERENCE_GPU]) if budget else GPUS[REFERENCE_GPU]
    plans: dict[str, MethodPlan] = {}
    for method in methods:
        method_training = training.evolve(method=method)
        estimate = estimate_memory_cached(spec, method_training, overhead)  # (the page's sweeps ask it again)
        fit = None if usable is None else fits(estimate.peak_device_bytes, usable)
        plans[method] = MethodPlan(estimate, fit,
                                   fits_on(estimate.peak_device_bytes, GPUS, training.compute_dtype, headroom),
                                   estimate_throughput(spec, method_training, gpu, mfu))
    lora = training.lora
    targets = lora.target_modules or PEFT_DEFAULT_TARGETS[spec.family]
    adapted = target_description(spec, lora.target_modules, lora.layers_to_transform, lora.target_parameters)
    bound = _worst_routing_note(spec, training, plans, overhead)
    return Plan(spec=spec, params=count_params(spec), training=replace(training, method=methods[0]),
                target_modules=targets, adapted_modules=adapted, methods=plans, budget=budget, overhead=overhead, train_tokens=train_tokens,
                headroom=headroom, warnings=plan_warnings(spec, training, budget, methods) + bound)


def _worst_routing_note(spec: ModelSpec, training: TrainingSpec, plans: dict[str, MethodPlan],
                        overhead: DeviceOverhead) -> tuple[str, ...]:
    """The eager experts loop under balanced routing (the estimate): the bound when one expert set takes every token
    (`--routing worst`), per method."""
    if not (spec.is_moe and training.experts_implementation == "eager" and training.routing == "balanced"):
        return ()
    worst = {m: estimate_memory(spec, replace(training, method=m, routing="worst"), overhead).peak_device_bytes
             for m in plans}
    parts = [f"{m} {gib_text(worst[m])} (+{gib_text(worst[m] - plans[m].estimate.peak_device_bytes)})"
             for m in plans]
    return ("worst-case routing (one expert set takes every token, --routing worst) bounds the peak on device at "
            + ", ".join(parts),)


def _traced_info(family: str) -> dict[str, Any] | None:
    if family not in REGISTERED_FAMILIES:
        return None
    from lora_planner.traced import traced_info

    return traced_info(family)


def sdpa_kernel_for(spec: ModelSpec, training: TrainingSpec) -> tuple[str, str] | None:
    """(SDPA's kernel on CUDA, why) for the output (`families.rules.sdpa_kernel`); None where SDPA does not run or the
    device is not CUDA."""
    if training.attention != "sdpa" or training.device != "cuda" or spec.family in REGISTERED_FAMILIES \
            or not family_rules(spec.family).sdpa:
        return None
    from lora_planner.activations import make_flow
    from lora_planner.families.rules import sdpa_kernel

    return sdpa_kernel(make_flow(spec, training))


def _host_dict(host: Any) -> dict[str, Any] | None:
    """`--offload`'s host RAM (`lora_planner.parallel.offload.HostMemory`) for --json; None without offload."""
    if host is None:
        return None
    return {"per_rank_bytes": host.total_bytes, "pinned_bytes": host.pinned_bytes,
            "pageable_bytes": host.pageable_bytes,
            "pinned_reserved_bytes": host.pinned_reserved_bytes, "ranks_per_node": host.ranks_per_node,
            "per_node_bytes": host.per_node_bytes,
            "buffers": [{"name": b.name, "bytes": b.nbytes, "pinned": b.pinned} for b in host.buffers]}


def grpo_inputs(t: TrainingSpec) -> dict[str, Any] | None:
    """GRPOConfig's settings as planned (`specs.GrpoSpec`), with the round's rows and the prompt's tokens."""
    if t.objective != "grpo":
        return None
    from dataclasses import asdict

    from lora_planner.generation import generation_rows, prompt_tokens

    g = t.grpo
    return {**asdict(g), "steps_per_generation": g.steps_per_round(t.batch_size), "rows_per_round": generation_rows(t),
            "prompts_per_round": generation_rows(t) // g.num_generations, "prompt_tokens": prompt_tokens(t),
            "old_log_prob_pass": g.old_log_prob_pass(t.batch_size), "reference_pass": g.reference_pass}


def _generation_dict(spec: ModelSpec, t: TrainingSpec) -> dict[str, int]:
    """A GRPO round's generation on the training GPU, bytes beyond the model states (`generation.GenerationMemory`)."""
    from lora_planner.activations import make_flow
    from lora_planner.generation import generation_memory

    g = generation_memory(make_flow(spec, t))
    return {"kv_cache_bytes": g.kv_cache_bytes, "held_bytes": g.held_bytes, "prefill_bytes": g.prefill_bytes,
            "decode_bytes": g.decode_bytes, "vllm_reserved_bytes": g.vllm_bytes, "weight_sync_bytes": g.sync_bytes}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The `--json` document. Memory is per GPU; tokens/s and training time are for all GPUs together."""
    t, spec = plan.training, plan.spec
    methods: dict[str, Any] = {}
    for method, mp in plan.methods.items():
        e = mp.estimate
        methods[method] = {
            "trainable_params": e.trainable_params,
            "trainable_fraction": e.trainable_fraction,
            "weights_at_dtype_bytes": e.weights_at_dtype_bytes,
            "seed_rule_bytes": e.seed_rule_bytes,
            "breakdown_bytes": e.peak.breakdown.as_dict(),
            "peak_allocated_bytes": e.peak_allocated_bytes,
            "per_gpu_peak_allocated_bytes": e.peak_allocated_bytes,
            "peak_phase": e.peak_phase,
            "device_overhead_bytes": e.device_overhead_bytes,
            "peak_device_bytes": e.peak_device_bytes,
            "fits": mp.fits,
            "fits_on": list(mp.fits_on),
            "phases": {p.phase: p.breakdown.as_dict() for p in e.phases},
            "host": _host_dict(e.host),
            "generation": _generation_dict(spec, replace(t, method=method)) if t.objective == "grpo" else None,
            "activations_per_layer_bytes": e.activations.layer_bytes,
            "flops_per_step": mp.throughput.flops.total,
            "step_time_s": mp.throughput.step_time_s,
            "tokens_per_s": mp.throughput.tokens_per_s * t.gpus,  # all GPUs, communication not modelled
            "throughput": {
                "gpu": mp.throughput.gpu, "mfu": mp.throughput.mfu,
                "forward_flops": mp.throughput.flops.forward, "backward_flops": mp.throughput.flops.backward,
                "recompute_flops": mp.throughput.flops.recompute, "compute_time_s": mp.throughput.compute_time_s,
                "memory_time_s": mp.throughput.memory_time_s,
                "scoring_flops": mp.throughput.flops.scoring, "prefill_flops": mp.throughput.flops.prefill,
                "train_time_s": mp.throughput.time_for_tokens_s(plan.train_tokens) / t.gpus if plan.train_tokens else None,
            },
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": spec.name,
            "family": spec.family,
            "total_params": plan.params.total,
            "active_params": plan.params.active,
            "params_by_group": dict(plan.params.by_group),
            "num_experts": spec.num_experts or None,
            "num_experts_per_tok": spec.num_experts_per_tok or None,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "vocab_size": spec.vocab_size,
            "sliding_window": spec.sliding_window,
            "traced": _traced_info(spec.family),  # None for built-in rules; else versions, date, cache file
        },
        "inputs": {
            "methods": list(plan.methods),
            "r": t.lora.r,
            "alpha": t.lora.effective_alpha,
            "use_rslora": t.lora.use_rslora,
            "use_dora": t.lora.use_dora,
            "modules_to_save": list(t.lora.modules_to_save) if t.lora.modules_to_save else None,
            "bias": t.lora.bias,
            # (module name, or "" for PEFT's list form: the input embeddings) -> how many rows train
            "trainable_token_indices": {name: len(ids) for name, ids in t.lora.trainable_token_indices}
            if t.lora.trainable_token_indices else None,
            "lora_scaling": t.lora.scaling,
            "target_modules": list(plan.target_modules),
            "layers_to_transform": list(t.lora.layers_to_transform) if t.lora.layers_to_transform else None,
            "adapted_modules": list(plan.adapted_modules),
            "kbit_prep": t.kbit_prep if "qlora" in plan.methods or t.load_in_8bit else None,
            "load_in_8bit": t.load_in_8bit,
            "double_quant": t.double_quant if "qlora" in plan.methods else None,
            "sdpa_kernel": dict(zip(("kernel", "why"), sdpa_kernel_for(spec, t) or (None, None))),
            "offload": t.offload, "offload_pin_memory": t.offload_pin_memory if t.offload != "none" else None,
            "gpus_per_node": t.gpus_per_node,
            "quant_type": t.quant_type if "qlora" in plan.methods else None,
            "bnb_4bit_compute_dtype": t.matmul_4bit_dtype if "qlora" in plan.methods else None,
            "adapter_dtype": t.lora.adapter_dtype,
            "dtype": t.dtype,
            "amp": t.amp,
            "optimizer": t.optimizer,
            "optimizer_impl": t.resolved_optimizer_impl,
            "optimizer_impl_reason": t.optimizer_impl_reason,
            "batch_size": t.batch_size,
            "seq_len": t.seq_len,
            "grad_checkpointing": t.grad_checkpointing,
            "use_reentrant": t.use_reentrant,
            "activation_offload": t.activation_offload,
            "attention": t.attention,
            "loss": loss_kind(spec, t),
            "loss_chunks": t.loss_chunks if t.loss in ("chunked", "linear") else unsloth_chunks(spec, t)
            if t.loss in UNSLOTH_LOSSES else None,
            "loss_chunk_tokens": t.loss_chunk_tokens if t.loss == "litgpt" else None,
            "loss_target_gib": t.loss_target_gib if t.loss in UNSLOTH_LOSSES else None,
            "padding": t.padding,
            "packing": t.packing,
            "objective": t.objective, "precompute_ref_log_probs": t.precompute_ref_log_probs,
            "cpo_alpha": t.cpo_alpha if t.objective in ("simpo", "cpo") else None,
            "rows": t.rows[0],
            "grpo": grpo_inputs(t),
            "liger": t.liger,
            "target_parameters": list(t.lora.target_parameters) if t.lora.target_parameters else None,
            "experts_implementation": t.experts_implementation if spec.is_moe else None,
            "routing": (t.routing if isinstance(t.routing, str) else [list(r) for r in t.routing])
            if spec.is_moe else None,
            "device": t.device,
            "gpus": t.gpus,
            "strategy": t.resolved_strategy,
            "zero_config": dict(t.zero_config) or None,
            "gpu": plan.budget.name if plan.budget else None,
            "budget_bytes": plan.budget.memory_bytes if plan.budget else None,
            "gpu_mem": plan.budget.memory_text if plan.budget else None,
            "headroom": plan.headroom,
            "usable_bytes": plan.usable_bytes,
            "cuda_context_bytes": plan.overhead.cuda_context_bytes,
            "allocator_fraction": plan.overhead.allocator_fraction,
            "train_tokens": plan.train_tokens,
        },
        "methods": methods,
        "warnings": list(plan.warnings),
    }

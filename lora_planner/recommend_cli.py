"""`lora-plan recommend`'s input and output: the `--json` document, `--verify` (replaying the answer with
the profiler under fake tensors; imports torch only then) and the command's runner (its options are in
`lora_planner.cli_args`). The decision
itself is `lora_planner.recommend` (pure)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from typing import Any

from lora_planner.catalog import resolve_model
from lora_planner.cli_options import budget_from_args, grpo_from_args, overhead_from_args
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory, trainable_totals
from lora_planner.planner import SCHEMA_VERSION, fits, grpo_inputs
from lora_planner.recommend import (  # noqa: F401 (VERIFY_TOLERANCE: re-exported for callers)
    MAX_MICRO_BATCH, VERIFY_TOLERANCE, Candidate, Recommendation, RecommendRequest, Verification, VerifyRun,
    recommend_for_objective, training_for,
)
from lora_planner.rank_evidence import (
    DEFAULT_CAPACITY_MARGIN, SOURCES, Evidence, rank_from_evidence, resolve_objective,
)
from lora_planner.specs import (
    REGISTERED_FAMILIES, STRATEGY_NAMES, GrpoSpec, LoraSpec, ModelSpec, TrainingSpec, check_choice, parse_loss,
)


# ---------------------------------------------------------------------------------------------- JSON


def candidate_to_dict(c: Candidate, alpha: float | None = None) -> dict[str, Any]:
    return {
        "method": c.method,
        "r": c.r,
        "alpha": alpha if alpha is not None else (None if c.r is None else float(2 * c.r)),
        "micro_batch_size": c.micro_batch_size,
        "max_micro_batch_size": c.max_micro_batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "effective_global_batch": c.effective_global_batch,
        "gradient_checkpointing": c.grad_checkpointing,
        "predicted_peak_bytes": c.predicted_peak_bytes,
        "peak_phase": c.peak_phase,
    }


def recommendation_to_dict(rec: Recommendation, verification: Verification | None = None) -> dict[str, Any]:
    """The `--json` document (`schema_version` 1; keys are only ever added)."""
    req, c = rec.request, rec.choice
    t = req.training
    alpha_given = t.lora.alpha
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": req.spec.name,
        "method": c.method,
        "r": c.r,
        "alpha": rec.alpha,
        "target_modules": list(rec.target_modules),
        "micro_batch_size": c.micro_batch_size,
        "max_micro_batch_size": c.max_micro_batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "effective_global_batch": c.effective_global_batch,
        "gradient_checkpointing": c.grad_checkpointing,
        "loss": t.loss,
        "loss_chunks": t.loss_chunks if t.loss in ("chunked", "linear") else None,
        "objective": t.objective,  # the step searched (`objectives`): dpo counts the batches in pairs
        "precompute_ref_log_probs": t.precompute_ref_log_probs,
        "cpo_alpha": t.cpo_alpha if t.objective in ("simpo", "cpo") else None,
        # GRPO: GRPOConfig's settings of the recommended step (the round, lengths, scoring passes)
        "grpo": grpo_inputs(training_for(req, c.method, c.r, c.grad_checkpointing, c.micro_batch_size))
        if t.objective == "grpo" else None,
        "gpus": req.gpus,
        "strategy": (req.strategy or "ddp") if req.gpus > 1 else None,
        "predicted_peak_bytes": c.predicted_peak_bytes,
        "peak_phase": c.peak_phase,
        "budget_bytes": req.budget.memory_bytes,
        "usable_bytes": req.usable_bytes,
        "headroom": req.headroom,
        "needed_budget_bytes": rec.needed_budget_bytes,
        "fits": rec.fits,
        "reasons": list(rec.reasons),
        "warnings": list(rec.warnings),
        "alternatives": [{**candidate_to_dict(a, alpha_given if a.r is not None else None),
                          "recommended": a == c} for a in rec.alternatives],
        "inputs": {
            "gpu": req.budget.name, "gpu_mem": req.budget.memory_text, "gpus": req.gpus, "seq_len": t.seq_len,
            "global_batch": req.global_batch,
            "headroom": req.headroom, "min_micro_batch": req.min_micro_batch,
            "methods": list(req.methods) if req.methods is not None else None, "rank_source": rec.rank_source,
            "trainable_fraction": req.trainable_fraction, "implied_r": rec.implied_r,
            "dtype": t.dtype, "amp": t.amp, "optimizer": t.optimizer, "optimizer_impl": t.resolved_optimizer_impl,
            "attention": t.attention, "device": t.device, "adapter_dtype": t.lora.adapter_dtype,
            "cuda_context_bytes": req.overhead.cuda_context_bytes,
            "allocator_fraction": req.overhead.allocator_fraction,
        },
    }
    if verification is not None:
        doc["verify"] = verification_to_dict(verification)
    return doc


# ---------------------------------------------------------------------------------------------- --verify

VERIFY_STEPS = 2  # step 1 creates the optimizer state, step 2 is the steady state

VERIFY_NOTE = ("the check replays the Hugging Face training step under fake tensors (FakeTensorMode) and measures "
               "what the CPU kernels keep alive, allocating nothing; CUDA-specific memory (the CUDA context, the "
               "allocator's reserve, kernels that keep less than their CPU versions) is not measured: the "
               "planner's model of it is applied to carry the measurement to the device")
def verify(rec: Recommendation, model_name: str | None = None) -> Verification:
    """Replay the recommended step, and the first micro-batch predicted not to fit, under fake tensors
    (`lora_planner.profiler`, imported here: it needs torch) and measure their peaks."""
    req, c = rec.request, rec.choice
    common = dict(mode="fake", backend="hf", note=VERIFY_NOTE, usable_bytes=req.usable_bytes,
                  budget_bytes=req.budget.memory_bytes)
    if c.method == "qlora":
        return Verification(runs=(), skipped="QLoRA cannot be replayed under fake tensors (bitsandbytes packs real "
                                             "4-bit weights); measure it with `lora-plan profile --method qlora "
                                             "--mode cpu` on a small config or on a GPU", **common)
    if req.training.optimizer in ("adamw8bit", "paged_adamw8bit"):
        return Verification(runs=(), skipped=f"{req.training.optimizer} needs bitsandbytes on a CUDA GPU and cannot "
                                             "be profiled here", **common)
    try:
        from lora_planner.profiler.runner import ProfileRequest, run_profile
    except ImportError as err:
        return Verification(runs=(), skipped=f"profiling needs torch, transformers and peft ({err.name} is missing)",
                            **common)
    strategy = training_for(req, c.method, c.r, c.grad_checkpointing, c.micro_batch_size).resolved_strategy
    if strategy not in (None, "ddp"):
        return Verification(runs=(), skipped=f"--verify replays one GPU's step under fake tensors, and {strategy} "
                                             "divides model states over ranks, which takes real processes: measure "
                                             f"it with `lora-plan profile --gpus {req.gpus} --strategy {strategy} "
                                             "--mode cpu` on a small config", **common)
    micros = [("recommended", c.micro_batch_size)]
    if 0 < c.max_micro_batch_size < MAX_MICRO_BATCH:
        micros.append(("next micro-batch", c.max_micro_batch_size + 1))
    runs = []
    for label, micro in micros:
        device_step = training_for(req, c.method, c.r, c.grad_checkpointing, micro, rec.alpha)
        # One rank of DDP is one GPU's step plus the reducer's buckets (lora_planner.parallel.ddp): replay the
        # one-GPU step and add the buckets. Fake tensors are CPU tensors: replay on the CPU with the optimizer
        # implementation the device uses.
        one_gpu = replace(device_step, gpus=1, strategy=None, offload="none")
        cpu_step = replace(one_gpu, device="cpu", optimizer_impl=one_gpu.resolved_optimizer_impl)
        record = run_profile(ProfileRequest(model=model_name or req.spec.name, spec=req.spec, training=cpu_step,
                                            backend="hf", mode="fake", steps=VERIFY_STEPS))
        predicted = record["predicted"]["peak_bytes"]
        measured = record["measured"]["peak_bytes"] if record["status"] == "ok" else None
        on_device = estimate_memory(req.spec, one_gpu, req.overhead)
        extra = predicted - on_device.peak_allocated_bytes
        ddp = trainable_totals(req.spec, device_step)[1] if strategy == "ddp" else 0
        allocated = (measured if measured is not None else predicted) - extra + ddp
        added = ddp + req.overhead.bytes_for(allocated, req.training.device)
        runs.append(VerifyRun(label=label, micro_batch_size=micro, status=record["status"],
                              measured_peak_bytes=measured, predicted_peak_bytes=predicted,
                              cpu_kernel_extra_bytes=extra, added_bytes=added, error=record.get("error")))
    return Verification(runs=tuple(runs), **common)


def verification_to_dict(v: Verification) -> dict[str, Any]:
    return {
        "mode": v.mode, "backend": v.backend, "note": v.note, "skipped": v.skipped, "confirmed": v.confirmed,
        "tolerance": v.tolerance, "usable_bytes": v.usable_bytes, "budget_bytes": v.budget_bytes,
        "runs": [{"label": r.label, "micro_batch_size": r.micro_batch_size, "status": r.status,
                  "measured_peak_bytes": r.measured_peak_bytes, "predicted_peak_bytes": r.predicted_peak_bytes,
                  "relative_error": r.relative_error, "cpu_kernel_extra_bytes": r.cpu_kernel_extra_bytes,
                  "added_device_bytes": r.added_bytes, "device_bytes": r.device_bytes,
                  "fits_usable": v.fits(r),
                  "fits_budget": None if r.device_bytes is None else fits(r.device_bytes, v.budget_bytes),
                  "expected_to_fit": r.expected_to_fit,
                  "error": r.error} for r in v.runs],
    }


# ---------------------------------------------------------------------------------------------- command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _calibration_from_args(args: argparse.Namespace) -> dict | None:
    if not args.calibration:
        return None
    from lora_planner.report.calibrate import load_calibration

    return load_calibration(args.calibration)


def request_from_args(args: argparse.Namespace, spec: ModelSpec | None = None) -> RecommendRequest:
    """The search's request from parsed options (`spec`: the model already read, e.g. an uploaded config.json)."""
    if args.gpu is None and args.gpu_mem is None:
        raise PlannerInputError("arguments", "one of the arguments --gpu --gpu-mem is required",
                                "pass e.g. --gpu rtx-4090, --gpu-mem 24GiB, or both (that GPU with that memory)")
    budget = budget_from_args(args)
    spec = spec or resolve_model(args.model)
    target = _csv(args.target) if args.target is not None else None
    if args.target is not None and not target:
        raise PlannerInputError("target", "empty target list", "pass e.g. --target q_proj,v_proj or all-linear")
    evidence = _evidence(args, spec, target)
    auto_targets = evidence is not None and target is None
    if auto_targets:
        target = ("all-linear",)
    methods = None
    if args.methods is not None:
        methods = tuple(dict.fromkeys(_csv(args.methods)))
    elif spec.family in REGISTERED_FAMILIES:
        methods = ("full", "lora")  # traced profiles have no QLoRA (lora_planner.traced)
    overhead = overhead_from_args(args)
    dtype = args.dtype if args.dtype is not None else ("fp32" if args.amp else "bf16")
    objective = memory_objective(args)
    # DPO / KTO / GRPO run TRL's own fused head; ORPO / CPO compute their loss from the logits (transformers' head)
    loss = "trl" if objective in ("dpo", "kto", "grpo") and args.loss == "hf" else args.loss
    training = TrainingSpec(
        method="full", dtype=dtype, amp=args.amp, optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
        seq_len=args.seq_len, device=args.device, attention=args.attention,
        lora=LoraSpec(r=1, alpha=args.alpha, target_modules=target, adapter_dtype=args.adapter_dtype),
        **parse_loss(loss), padding=args.padding, packing=args.packing, liger=args.liger,
        objective=objective, precompute_ref_log_probs=args.precompute_ref_log_probs, cpo_alpha=args.cpo_alpha,
        **({"grpo": _grpo_for_recommend(args)} if objective == "grpo" else {}),
    )
    if args.strategy is not None and args.gpus == 1:
        raise PlannerInputError("strategy", f"{args.strategy} shares model states across GPUs, but --gpus is 1",
                                "pass --gpus N (N >= 2) with --strategy, or drop --strategy")
    if args.strategy is not None:
        check_choice("strategy", args.strategy, STRATEGY_NAMES)
    return RecommendRequest(spec=spec, budget=budget, training=training, gpus=args.gpus, strategy=args.strategy,
                            global_batch=args.global_batch, methods=methods, r=args.r,
                            trainable_fraction=args.trainable_fraction, headroom=args.headroom,
                            min_micro_batch=args.min_micro_batch, overhead=overhead,
                            calibration=_calibration_from_args(args), evidence=evidence,
                            evidence_targets_auto=auto_targets)


def memory_objective(args: argparse.Namespace) -> str:
    """The step `recommend` searches: DPO's (`lora_planner.objectives`) for `--objective dpo` or `preference` (TRL's
    preference trainer), ORPO's, SimPO's or CPO's for theirs, GRPO's (`lora_planner.generation`) for `grpo` or `rl`
    (TRL's RL trainer), else the SFT step
    (continued pretraining trains as one)."""
    text = (getattr(args, "objective", None) or "sft").strip().lower()
    if text == "kto":
        raise PlannerInputError("objective", "recommend does not search KTO's step yet (its micro-batch needs 2 "
                                             "examples or more)", "plan it: lora-plan --objective kto --batch-size N")
    return {"dpo": "dpo", "preference": "dpo", "grpo": "grpo", "rl": "grpo", "orpo": "orpo", "simpo": "simpo",
            "cpo": "cpo"}.get(text, "sft")


def _grpo_for_recommend(args: argparse.Namespace) -> GrpoSpec:
    """GRPOConfig's settings for the search: a round is the global batch's completions (TRL's default
    steps_per_generation = the accumulation steps) unless --generation-batch-size; the micro-batch is chosen."""
    if args.steps_per_generation is not None:
        raise PlannerInputError("steps-per-generation", "recommend chooses the micro-batch, so a round is given by its "
                                                        "rows", "pass --generation-batch-size instead")
    g = grpo_from_args(args)
    rows = args.generation_batch_size or math.ceil(args.global_batch / args.gpus)
    if rows % g.num_generations:
        raise PlannerInputError("generation-batch-size" if args.generation_batch_size else "global-batch",
                                f"a round of {rows} completions is not a whole number of groups of "
                                f"--num-generations {g.num_generations}",
                                f"pass a multiple of {g.num_generations}")
    return replace(g, generation_batch_size=rows)


def _evidence(args: argparse.Namespace, spec: ModelSpec, target: tuple[str, ...] | None) -> Evidence | None:
    """`--train-tokens` / `--examples` (+ `--objective`, `--capacity-margin`): the rank from the data and the evidence
    (`lora_planner.rank_evidence`); None when no data size is given."""
    tokens, examples = getattr(args, "train_tokens", None), getattr(args, "examples", None)
    if tokens is None and examples is None:
        for name in ("objective", "capacity_margin"):
            if getattr(args, name, None) is not None and not (name == "objective" and memory_objective(args) != "sft"):
                flag = "--" + name.replace("_", "-")
                raise PlannerInputError(name.replace("_", "-"), f"{flag} sizes the rank from the data, which needs "
                                        "its size", "pass --train-tokens N or --examples N with it")
        return None
    if tokens is not None and examples is not None:
        raise PlannerInputError("examples", "--train-tokens and --examples both given", "pass one of them")
    objective = resolve_objective(args.objective or "sft")
    per_token = objective in ("sft", "continued-pretraining")
    if per_token:
        amount = int(tokens) if tokens is not None else int(examples) * args.seq_len
    else:  # episodes / pairs; tokens are read as sequences of --seq-len
        amount = int(examples) if examples is not None else max(1, int(tokens) // args.seq_len)
    return rank_from_evidence(spec, objective, amount, args.capacity_margin or DEFAULT_CAPACITY_MARGIN,
                              target or ("all-linear",))


def recommend_document(args: argparse.Namespace, rec: Recommendation,
                       verification: Verification | None = None) -> dict[str, Any]:
    """`lora-plan recommend ... --json`: the recommendation's document with the preset and lengths it read."""
    note = getattr(args, "stack_note", None)
    doc = recommendation_to_dict(rec, verification)
    doc["stack"] = {"name": args.stack, "note": note} if note else None
    doc["lengths"] = getattr(args, "lengths_summary", None)
    ev = rec.request.evidence
    doc["evidence"] = None if ev is None else {
        "objective": ev.objective, "amount": ev.amount, "unit": ev.unit, "data_bits": ev.data_bits,
        "capacity_margin": ev.capacity_margin, "required_params": ev.required_params,
        "params_per_rank": ev.params_per_rank, "targets": list(ev.targets), "rank": ev.rank, "capped": ev.capped,
        "alpha": ev.alpha, "lr_ratio": ev.lr_ratio, "seed_rank": ev.seed_rank,
        "steps": [{"text": step.text, "sources": [SOURCES[k] for k in step.source.split("+")] if step.source else []}
                  for step in ev.steps]}
    return doc


def run_recommend_command(args: argparse.Namespace) -> int:
    """`lora-plan recommend`: compute (pure), optionally verify (torch), then print JSON or tables."""
    req = request_from_args(args)
    rec = recommend_for_objective(req)
    verification = verify(rec, args.model) if args.verify else None
    note = getattr(args, "stack_note", None)  # `--stack`: what the framework's preset set
    if args.json:
        print(json.dumps(recommend_document(args, rec, verification), indent=2))
        return 0
    from rich.console import Console  # only human output pays for rich

    from lora_planner.render_recommend import render_recommendation

    console = Console()
    render_recommendation(rec, console, verification, explain=getattr(args, "explain", False))
    for line in (note, getattr(args, "lengths_note", None)):
        if line:
            console.print(line, style="yellow", highlight=False)
    return 0

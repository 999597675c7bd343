"""One call that answers "will it fit?" for several methods at once, and its stable JSON shape (pure).

`make_plan` ties the pieces together: the model spec, exact parameter counts, one `MemoryEstimate` per
method (full / LoRA / QLoRA) under the same settings, and the GPU budget. `plan_to_dict` is the
`--json` output (`schema_version` 1; keys are only ever added).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lora_planner.catalog import GPUS, GpuSpec
from lora_planner.memory import DeviceOverhead, MemoryEstimate, estimate_memory
from lora_planner.params import ParamCounts, count_params, resolve_targets
from lora_planner.specs import ModelSpec, TrainingSpec
from lora_planner.throughput import DEFAULT_MFU, ThroughputEstimate, estimate_throughput

REFERENCE_GPU = "h100-80gb"  # step times need a GPU's FLOP/s; this one when the budget names none

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """The memory a run must fit in: a catalog GPU, or a size given by hand (`name` None)."""

    memory_bytes: int
    name: str | None = None
    supports_bf16: bool = True


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
    target_modules: tuple[str, ...]  # resolved LoRA target paths (layer 0 shown)
    methods: dict[str, MethodPlan]
    budget: Budget | None
    overhead: DeviceOverhead
    train_tokens: int | None = None  # show the time to train on this many tokens


def fits_on(peak_device_bytes: int, gpus: dict[str, GpuSpec], compute_dtype: str) -> tuple[str, ...]:
    """Catalog GPUs, smallest first, that hold the peak and can run the compute dtype (no bf16 on T4/V100)."""
    return tuple(name for name, gpu in sorted(gpus.items(), key=lambda kv: kv[1].memory_bytes)
                 if peak_device_bytes <= gpu.memory_bytes and (compute_dtype != "bf16" or gpu.supports_bf16))


def make_plan(spec: ModelSpec, training: TrainingSpec, methods: tuple[str, ...],
              budget: Budget | None = None, overhead: DeviceOverhead | None = None, mfu: float = DEFAULT_MFU,
              train_tokens: int | None = None) -> Plan:
    """Estimate every requested method under the same settings and compare each with the budget.
    Step times use the budget's GPU when it is a catalog GPU, else `REFERENCE_GPU`."""
    overhead = overhead or DeviceOverhead()
    gpu = GPUS.get(budget.name or "", GPUS[REFERENCE_GPU]) if budget else GPUS[REFERENCE_GPU]
    plans: dict[str, MethodPlan] = {}
    for method in methods:
        method_training = replace(training, method=method)
        estimate = estimate_memory(spec, method_training, overhead)
        fits = None if budget is None else estimate.peak_device_bytes <= budget.memory_bytes
        plans[method] = MethodPlan(estimate, fits, fits_on(estimate.peak_device_bytes, GPUS, training.compute_dtype),
                                   estimate_throughput(spec, method_training, gpu, mfu))
    targets = tuple(m.path for m in resolve_targets(spec, training.lora.target_modules))
    return Plan(spec=spec, params=count_params(spec), training=replace(training, method=methods[0]),
                target_modules=targets, methods=plans, budget=budget, overhead=overhead, train_tokens=train_tokens)


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
            "activations_per_layer_bytes": e.activations.layer_bytes,
            "flops_per_step": mp.throughput.flops.total,
            "step_time_s": mp.throughput.step_time_s,
            "tokens_per_s": mp.throughput.tokens_per_s * t.gpus,  # all GPUs, communication not modelled
            "throughput": {
                "gpu": mp.throughput.gpu, "mfu": mp.throughput.mfu,
                "forward_flops": mp.throughput.flops.forward, "backward_flops": mp.throughput.flops.backward,
                "recompute_flops": mp.throughput.flops.recompute, "compute_time_s": mp.throughput.compute_time_s,
                "memory_time_s": mp.throughput.memory_time_s,
                "train_time_s": mp.throughput.time_for_tokens_s(plan.train_tokens) / t.gpus if plan.train_tokens else None,
            },
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": spec.name,
            "family": spec.family,
            "total_params": plan.params.total,
            "params_by_group": dict(plan.params.by_group),
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "vocab_size": spec.vocab_size,
            "sliding_window": spec.sliding_window,
        },
        "inputs": {
            "methods": list(plan.methods),
            "r": t.lora.r,
            "alpha": t.lora.effective_alpha,
            "target_modules": list(plan.target_modules),
            "adapter_dtype": t.lora.adapter_dtype,
            "dtype": t.dtype,
            "amp": t.amp,
            "optimizer": t.optimizer,
            "optimizer_impl": t.resolved_optimizer_impl,
            "batch_size": t.batch_size,
            "seq_len": t.seq_len,
            "grad_checkpointing": t.grad_checkpointing,
            "attention": t.attention,
            "device": t.device,
            "gpus": t.gpus,
            "strategy": t.resolved_strategy,
            "gpu": plan.budget.name if plan.budget else None,
            "budget_bytes": plan.budget.memory_bytes if plan.budget else None,
            "cuda_context_bytes": plan.overhead.cuda_context_bytes,
            "allocator_fraction": plan.overhead.allocator_fraction,
            "train_tokens": plan.train_tokens,
        },
        "methods": methods,
    }

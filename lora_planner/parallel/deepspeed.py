"""DeepSpeed ZeRO stages 1, 2 and 3, per rank (pure).

Modelled on DeepSpeed 0.19.8's own source (github.com/deepspeedai/DeepSpeed; paths below are inside the
`deepspeed` package), with a client `torch.optim` optimizer and DeepSpeed's default ZeRO settings
(`DeepSpeedZeroConfig` below, from runtime/zero/config.py `DeepSpeedZeroConfig`):

- Mixed precision (runtime/engine.py `_configure_distributed_model` -> `_cast_module_mixed_precision`):
  with `bf16`/`fp16` enabled DeepSpeed casts *every* parameter to that dtype, LoRA adapters included
  (PEFT's fp32 adapters become 16-bit), and the optimizer steps an fp32 master copy of this rank's
  partition (stage_1_and_2.py `DeepSpeedZeroOptimizer.__init__`: `single_partition_of_fp32_groups`,
  a `.clone().to(master_weights_and_grads_dtype)` of the partition, made in fp32 training too;
  stage3.py `_create_fp32_partitions`). Only trainable parameters reach the optimizer, so under LoRA
  only the adapters are flattened, partitioned and given master weights, gradients and states.
  `grad_accum_dtype` defaults to the model dtype (engine.py `get_data_types`), so bf16 ZeRO-1 uses
  `DeepSpeedZeroOptimizer`, not `BF16_Optimizer` (engine.py `_do_optimizer_sanity_check`).
- Stages 1 and 2 (stage_1_and_2.py): the trainable parameters become views of one flat 16-bit buffer
  (`bit16_groups_flat`, padded to a multiple of 2 x ranks: `nccl_start_alignment_factor`); frozen
  parameters stay replicated. At the first gradient hook of each backward (`setup_buckets`) the
  optimizer allocates the gradient bucket: `reduce_bucket_size` elements of the gradient dtype
  (`ipg_buckets[...].buffer`, two of them with `overlap_comm`), whatever the model's size, released at
  the end of backward (`independent_gradient_partition_epilogue` -> `_release_ipg_buffers`). Stage 2
  (`partition_grads`) copies each gradient into the bucket as autograd makes it
  (`reduce_independent_p_g_buckets_and_remove_grads`) and keeps only this rank's partition
  (`grads_in_partition`); stage 1 keeps every gradient until backward ends (`reduce_gradients`). The
  reduction of a bucket flattens its used part (measured: one `aten.cat` of its gradients). In `step`
  the rank's gradients become one fp32 tensor of the partition (`single_grad_partition`) that the
  client optimizer steps beside its state for that one flat tensor.
- Stage 3 (stage3.py `DeepSpeedZeroOptimizer_Stage3`, partition_parameters.py, parameter_offload.py):
  every parameter is partitioned (`ds_tensor`, ceil(numel / ranks) elements, partition_parameters.py
  `_partition_param`) except *persistent* ones, `numel <= stage3_param_persistence_threshold` (1e5),
  which stay gathered on every rank beside their partition (parameter_offload.py
  `mark_persistent_parameters`; norms, biases, most LoRA adapters). Persistent for the whole run: the
  gradient bucket (`ipg_buckets[...].buffer`, `reduce_bucket_size` elements, allocated in `__init__`)
  and the flat partition of all trainable gradients (`grad_partitions_flat_buffer`). A module's
  parameters are all-gathered before its forward and backward into one flat buffer the parameters view
  (partition_parameters.py `_all_gather_params`), and the next module's are prefetched up to
  `stage3_prefetch_bucket_size` elements (partitioned_param_coordinator.py `fetch_sub_module`).

Validated against DeepSpeed itself where it runs here: 2 CPU ranks on gloo (`DS_ACCELERATOR=cpu`),
`lora_planner.profiler.distributed`, tests/test_parallel.py.

Known limitations: the gathered set under stage 3 is modelled as the largest module gathered plus the
next one prefetched (DeepSpeed's trace-based prefetch may hold more small modules at once, bounded by
`stage3_prefetch_bucket_size` and `stage3_max_live_parameters`); the partition is an even split (stage
1/2 pad the flat buffer only; DeepSpeed's `grads_in_partition` counts the parameters that straddle a
partition boundary whole); no CPU/NVMe offload, no ZeRO++ (hpZ, quantized weights), no MiCS; NCCL's
own buffers are not modelled; torch autocast (`--amp`) is not DeepSpeed's mixed precision and is
refused; QLoRA under stage 3 is refused (NF4 weights are not partitioned as plain tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.memory import MemoryBreakdown, PhaseMemory, StepComponents, step_components
from lora_planner.optimizers import TensorGroup, optimizer_scratch_bytes, optimizer_state_bytes
from lora_planner.params import buffer_numel, module_inventory, resolve_targets
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: `self.nccl_start_alignment_factor = 2`


@dataclass(frozen=True)
class DeepSpeedZeroConfig:
    """The `zero_optimization` settings that change memory, with DeepSpeed's defaults (runtime/zero/config.py
    `DeepSpeedZeroConfig`: `reduce_bucket_size` 5e8, `allgather_bucket_size` 5e8, `overlap_comm` None ->
    True for stage 3 only (`overlap_comm_valid`), `contiguous_gradients` True,
    `stage3_prefetch_bucket_size` 5e7, `stage3_param_persistence_threshold` 1e5,
    `stage3_max_live_parameters` 1e9). Sizes are element counts, not bytes."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000

    def overlap(self, stage: int) -> bool:
        return self.overlap_comm if self.overlap_comm is not None else stage == 3

    def as_dict(self, stage: int) -> dict[str, Any]:
        """The `zero_optimization` section of a DeepSpeed config for `stage` (what the profiler runs)."""
        return {"stage": stage, "reduce_bucket_size": self.reduce_bucket_size,
                "allgather_bucket_size": self.allgather_bucket_size, "overlap_comm": self.overlap(stage),
                "contiguous_gradients": self.contiguous_gradients,
                "stage3_prefetch_bucket_size": self.stage3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": self.stage3_param_persistence_threshold,
                "stage3_max_live_parameters": self.stage3_max_live_parameters}


DEFAULT_CONFIG = DeepSpeedZeroConfig()
STAGES = {"deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}


def deepspeed_config(training: TrainingSpec, zero: DeepSpeedZeroConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """The DeepSpeed config dict the planner's `training` stands for (the profiler passes it to
    `deepspeed.initialize`): micro-batch per GPU, no accumulation, `bf16`/`fp16` from `--dtype`."""
    _check(training)
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": training.batch_size, "gradient_accumulation_steps": 1,
                              "zero_optimization": zero.as_dict(STAGES[training.resolved_strategy]),
                              "steps_per_print": 2**31 - 1}
    if training.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif training.dtype == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def _check(training: TrainingSpec) -> None:
    if training.amp is not None:
        raise PlannerInputError("amp", "DeepSpeed's mixed precision is its bf16/fp16 mode (16-bit parameters, fp32 "
                                       "master partition), not torch autocast",
                                f"use --dtype {training.amp} without --amp with --strategy {training.resolved_strategy}")
    if training.method == "qlora" and training.resolved_strategy == "deepspeed-zero3":
        raise PlannerInputError("strategy", "QLoRA's NF4 weights under DeepSpeed ZeRO-3 are not modelled",
                                "use deepspeed-zero2 (frozen NF4 weights replicated) or fsdp")


def _parameters(spec: ModelSpec, training: TrainingSpec) -> list[tuple[int, int, bool]]:
    """Every parameter tensor as (numel, count, trainable): weights and biases of the base model (norm
    weight and bias apart), then LoRA's A (r x in) and B (out x r) per adapted module."""
    full = training.method == "full"
    out: list[tuple[int, int, bool]] = []
    for m in module_inventory(spec):
        if m.tied:
            continue
        if m.kind == "norm":
            out.append((m.out_features, m.count * (2 if m.bias else 1), full))
            continue
        out.append((m.in_features * m.out_features, m.count, full))
        if m.bias:
            out.append((m.out_features, m.count, full))
    if not full:
        r = training.lora.r
        for m in resolve_targets(spec, training.lora.target_modules):
            out += [(r * m.in_features, m.count, True), (m.out_features * r, m.count, True)]
    return out


def _modules_gathered(spec: ModelSpec, training: TrainingSpec, zero: DeepSpeedZeroConfig) -> int:
    """Elements of the two largest non-persistent modules (stage 3: the module running and the next one
    prefetched), each module's own parameters (DeepSpeed fetches per leaf module)."""
    threshold = zero.stage3_param_persistence_threshold
    r = training.lora.r
    adapted = {m.path for m in resolve_targets(spec, training.lora.target_modules)} if training.method != "full" else set()
    sizes = []
    for m in module_inventory(spec):
        if m.tied or m.kind == "norm":
            continue
        tensors = [m.in_features * m.out_features] + ([m.out_features] if m.bias else [])
        if m.path in adapted:
            tensors += [r * m.in_features, m.out_features * r]
        sizes.append(sum(t for t in tensors if t > threshold))
    largest = sorted(sizes, reverse=True)[:2]
    return sum(largest)


def phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents,
           zero: DeepSpeedZeroConfig = DEFAULT_CONFIG) -> tuple[PhaseMemory, ...]:
    """One rank under `deepspeed-zero1|2|3` (see the module docstring). `c` is ignored: DeepSpeed's
    components are rebuilt with its dtype rule (every parameter, adapters included, in `--dtype`)."""
    _check(training)
    stage = STAGES[training.resolved_strategy]
    n = training.gpus
    single = replace(training, gpus=1, strategy=None, lora=replace(training.lora, adapter_dtype="base"))
    c = step_components(spec, single)
    e = BYTES_PER_ELEMENT[training.dtype]
    params = _parameters(spec, training)
    trainable = sum(numel * count for numel, count, t in params if t)
    bucket = zero.reduce_bucket_size * e * (2 if zero.overlap(stage) and stage < 3 else 1)
    impl = training.resolved_optimizer_impl
    step_on_device = training.device == "cpu" or impl == "fused"

    if stage < 3:
        align = NCCL_START_ALIGNMENT_FACTOR * n
        flat = ceil(trainable / align) * align
        partition = flat // n
        weights = c.weights + (flat - trainable) * e + partition * FP32
        in_bucket = min(trainable, zero.reduce_bucket_size) * e  # the reduction's flat copy
        kept = partition * e if trainable > zero.reduce_bucket_size else 0  # grads_in_partition mid-backward
        persistent_grads = 0
    else:
        threshold = zero.stage3_param_persistence_threshold
        shard = sum(ceil(numel / n) * count for numel, count, _ in params)
        persistent = sum(numel * count for numel, count, _ in params if numel <= threshold)
        partition = sum(ceil(numel / n) * count for numel, count, t in params if t)
        buffers = buffer_numel(spec) * e
        weights = (shard + persistent) * e + buffers + partition * FP32
        gathered = _modules_gathered(spec, training, zero) * e
        persistent_grads = bucket + partition * e  # ipg bucket + grad_partitions_flat_buffer, from __init__
        in_bucket = kept = 0
    flat_group = (TensorGroup((partition,), 1, FP32),)
    states = optimizer_state_bytes(flat_group, training.optimizer, step_on_device)
    scratch = optimizer_scratch_bytes(flat_group, training.optimizer, impl)
    # step: the fp32 gradient of the partition, made from the 16-bit one (freed right after the cast)
    step_temporaries = max(scratch, partition * e if e != FP32 else 0)
    acts = c.activations

    def phase(name, weights_bytes, gradients, activations, temporaries) -> PhaseMemory:
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=weights_bytes, gradients_bytes=gradients,
                                                 optimizer_states_bytes=states, activations_bytes=activations,
                                                 temporaries_bytes=temporaries))

    if stage == 3:
        # Gathered modules on top of the partitions: the embedding at the start of forward, the largest
        # module and the one prefetched after it from then on.
        layers = c.layers_saved + acts.model_bytes + c.recomputed
        return (
            phase("forward_start", weights + gathered, persistent_grads, acts.batch_bytes, 0),
            phase("forward_end", weights + gathered, persistent_grads, c.saved, acts.loss_forward_scratch_bytes),
            phase("backward_start", weights + gathered, persistent_grads, c.saved, acts.loss_backward_scratch_bytes),
            phase("backward_layers", weights + gathered, persistent_grads + c.head_gradients, layers,
                  c.layer_scratch),
            phase("backward_end", weights + gathered, persistent_grads, c.end_activations + acts.batch_bytes,
                  c.end_scratch),
            phase("optimizer_step", weights, persistent_grads + partition * FP32, acts.batch_bytes, step_temporaries),
        )
    # Stages 1 and 2. Backward's layers: the bucket beside what autograd made so far (stage 1 keeps every
    # gradient; stage 2 has copied them into the bucket). Its end is the larger of the last op (stage 1:
    # every gradient beside the bucket) and the epilogue's reduction (the bucket, its flat copy).
    head = c.head_gradients if stage == 1 else 0
    last_op = (c.end_gradients if stage == 1 else 0) + bucket + kept
    end = phase("backward_end", weights, last_op, c.end_activations + acts.batch_bytes, c.end_scratch)
    epilogue = phase("backward_end", weights, bucket + in_bucket + kept, acts.batch_bytes, 0)
    return (
        phase("forward_start", weights, 0, acts.batch_bytes, 0),
        phase("forward_end", weights, 0, c.saved, acts.loss_forward_scratch_bytes),
        phase("backward_start", weights, 0, c.saved, acts.loss_backward_scratch_bytes),
        phase("backward_layers", weights, head + bucket + kept, c.layers_saved + acts.model_bytes + c.recomputed,
              c.layer_scratch),
        max(end, epilogue, key=lambda p: p.breakdown.total_bytes),
        phase("optimizer_step", weights, partition * FP32, acts.batch_bytes, step_temporaries),
    )

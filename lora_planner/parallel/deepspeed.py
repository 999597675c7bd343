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

Per rank (stages 1/2, stage_1_and_2.py): `grads_in_partition` (`copy_grads_in_partition`) is one buffer
of every parameter overlapping the rank's partition, whole, so ranks differ by the parameters straddling
their boundaries; it is laid out from `model.parameters()` order (`_trainable_order`). It lives from the
rank's first reduction to `step`, where the gradient norm (`scaled_global_norm` -> `get_grad_norm_direct`)
copies each gradient piece of the partition to fp64 (`get_norm_dtype`) beside it, then `step` flattens
the partition and casts it to fp32. A gradient larger than `reduce_bucket_size` bypasses the bucket and
stays in its own storage until the next hook reduces it (`extra_large_param_to_reduce`). The planner
predicts the busiest rank: each phase takes the rank that holds most (the largest `grads_in_partition`,
the largest fp64 piece; for stage 2's first reduction, the last rank, which backward reaches first).
Stage 3 (partition_parameters.py `_enable_mem_efficient_linear` -> runtime/zero/linear.py
`LinearFunctionForZeroStage3`) saves every linear's input, frozen ones under LoRA included.

Known limitations: the gathered set under stage 3 is modelled as the largest module gathered plus the
next one prefetched (DeepSpeed's trace-based prefetch may hold more small modules at once, bounded by
`stage3_prefetch_bucket_size` and `stage3_max_live_parameters`); stage 3's step is bounded by a 16-bit
-> fp32 copy of the partition (in fp32 DeepSpeed makes none: over-predicted, below the peak on the test
model); stage 2's first reduction is taken with every layer's saved tensors still live (on the test model
lm_head's input and the final norm's are already gone: +0.23 %); ZeRO-3's extra linear inputs are
modelled for Llama-like families only; `parameter_alignment` and `round_robin_gradients` (off by
default) are not modelled; CPU offload is `lora_planner.parallel.offload` (its host side) and the phases below (its
GPU side: no fp32 master, no optimizer state, no partition of gradients there; `temp_grad_buffer_for_gpu_offload`),
where a parameter larger than `reduce_bucket_size` (an embedding past 5e8 elements) is held by the reduction in one
more copy than the two counted (measured on CPU ranks: -10.8 % on a toy with a 50,000-element bucket, exact with
every parameter inside the bucket); no NVMe offload, no ZeRO++ (hpZ, quantized weights), no MiCS; NCCL's own
buffers are not modelled; torch autocast (`--amp`) is not DeepSpeed's mixed precision and is refused;
QLoRA under stage 3 is refused (NF4 weights are not partitioned as plain tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.step import MemoryBreakdown, PhaseMemory, StepComponents, step_components
from lora_planner.optimizers import TensorGroup, optimizer_scratch_bytes, optimizer_state_bytes
from lora_planner.families import family_rules
from lora_planner.params import (
    Module, adapted_layers, adapters_by_layer, buffer_bytes, is_per_layer, module_inventory, resolve_targets,
)
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4
NORM_BYTES = 8  # runtime/zero/utils.py `get_norm_dtype`: fp64 wherever the accelerator has it (CUDA, CPU)
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: `self.nccl_start_alignment_factor = 2`
# The layers whose frozen linears' inputs (what ZeRO-3's `zero3_linear_wrap` adds) this module can name: the
# Llama layer's (`lora_planner.families.llama`).
SAVING_LINEAR_MODELLED = frozenset({"llama", "mistral", "qwen2", "gemma"})


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
ZERO_KEYS = frozenset(DeepSpeedZeroConfig.__dataclass_fields__)
# What the Hugging Face Trainer writes over "auto" from the model's hidden size h (transformers 5.24
# integrations/deepspeed.py `HfTrainerDeepSpeedConfig.trainer_config_finalize`): reduce_bucket_size h^2; under
# stage 3 also stage3_prefetch_bucket_size int(0.9 h^2) and stage3_param_persistence_threshold 10 h.
HF_AUTO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
           "stage3_param_persistence_threshold": lambda h: 10 * h}


def zero_config_for(spec: ModelSpec, training: TrainingSpec) -> DeepSpeedZeroConfig:
    """`training.zero_config` over DeepSpeed's defaults, each "auto" resolved as the Hugging Face Trainer resolves it
    (`HF_AUTO`; an "auto" it leaves alone keeps DeepSpeed's default)."""
    if not training.zero_config:
        return DEFAULT_CONFIG
    stage = STAGES.get(training.resolved_strategy, 0)
    values: dict[str, Any] = {}
    for key, value in training.zero_config:
        if value == "auto":
            if key in HF_AUTO and (key == "reduce_bucket_size" or stage == 3):
                values[key] = HF_AUTO[key](spec.hidden_size)
        else:
            values[key] = value
    return replace(DEFAULT_CONFIG, **values)
STAGES = {"deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}


def deepspeed_config(training: TrainingSpec, zero: DeepSpeedZeroConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """The DeepSpeed config dict the planner's `training` stands for (the profiler passes it to
    `deepspeed.initialize`): micro-batch per GPU, no accumulation, `bf16`/`fp16` from `--dtype`."""
    _check(training)
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": training.batch_size, "gradient_accumulation_steps": 1,
                              "zero_optimization": zero.as_dict(STAGES[training.resolved_strategy]),
                              "steps_per_print": 2**31 - 1}
    if training.offload != "none":  # ZeRO-Offload (`lora_planner.parallel.offload`)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": training.offload_pin_memory}
        # the client torch optimizer steps the host partition (DeepSpeedCPUAdam keeps the same two moments)
        config["zero_force_ds_cpu_optimizer"] = False
        if training.offload == "params":
            config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": training.offload_pin_memory}
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
        out.append((m.weight_numel_each, m.count, full))
        if m.bias:
            out.append((m.experts * m.out_features, m.count, full))
    if not full:
        lora = training.lora
        for m in resolve_targets(spec, lora.target_modules, lora.layers_to_transform, lora.target_parameters):
            out += [(n, m.count, True) for n in _lora_tensors(m, lora.r)]
    return out


def _lora_tensors(m: Module, r: int) -> list[int]:
    """Elements of an adapted module's lora_A then lora_B: r x in and out x r; for an MoE expert stack, PEFT's
    ParamWrapper's (r E) x in and out x (r E) at its rank multiplier (`Module.lora_numel`)."""
    rank = r * m.lora_rank_scale * m.experts
    return [rank * m.in_features, m.out_features * rank]


def _modules_gathered(spec: ModelSpec, training: TrainingSpec, zero: DeepSpeedZeroConfig) -> int:
    """Elements of the two largest non-persistent modules (stage 3: the module running and the next one
    prefetched), each module's own parameters (DeepSpeed fetches per leaf module)."""
    threshold = zero.stage3_param_persistence_threshold
    r = training.lora.r
    lora = training.lora
    adapted = {m.path: m for m in resolve_targets(spec, lora.target_modules, lora.layers_to_transform,
                                                  lora.target_parameters)} if training.method != "full" else {}
    sizes = []
    for m in module_inventory(spec):
        if m.tied or m.kind == "norm":
            continue
        tensors = [m.weight_numel_each] + ([m.experts * m.out_features] if m.bias else [])
        if m.path in adapted:
            tensors += _lora_tensors(adapted[m.path], r)
        sizes.append(sum(t for t in tensors if t > threshold))
    largest = sorted(sizes, reverse=True)[:2]
    return sum(largest)


def _trainable_order(spec: ModelSpec, training: TrainingSpec) -> tuple[int, ...]:
    """Elements of every trainable parameter in `model.parameters()` order, the order stage 1/2 flatten
    them in (stage_1_and_2.py `__init__`: `round_robin_gradients` off, `parameter_alignment` off, so no
    padding between parameters): modules in registration order (`Family.norms_registered_last`), each module's
    weight then bias; under LoRA each adapted module's lora_A then lora_B (PEFT `LoraLayer`)."""
    full = training.method == "full"
    r = training.lora.r
    per_layer_adapters, outside = ((), frozenset()) if full else adapters_by_layer(
        spec, training.lora.target_modules, training.lora.layers_to_transform, training.lora.target_parameters)
    scaled = {} if full else {m.path: m for m, _ in adapted_layers(
        spec, training.lora.target_modules, training.lora.layers_to_transform, training.lora.target_parameters)}
    modules = [m for m in module_inventory(spec) if not m.tied]
    layer = [m for m in modules if is_per_layer(m)]
    # transformers registers some families' decoder-layer norms after attention and MLP (Llama's
    # `LlamaDecoderLayer.__init__`: self_attn, mlp, input_layernorm, post_attention_layernorm): `model.parameters()`,
    # the order ZeRO flattens, is not the forward order there (`Family.norms_registered_last`).
    if family_rules(spec.family).norms_registered_last:
        layer = [m for m in layer if m.kind != "norm"] + [m for m in layer if m.kind == "norm"]
    first = next((i for i, m in enumerate(modules) if is_per_layer(m)), len(modules))
    before = [m for m in modules[:first] if not is_per_layer(m)]
    after = [m for m in modules[first:] if not is_per_layer(m)]

    def tensors(m, adapted: bool) -> list[int]:
        if full:
            if m.kind == "norm":
                return [m.out_features] * (2 if m.bias else 1)
            return [m.weight_numel_each] + ([m.experts * m.out_features] if m.bias else [])
        return _lora_tensors(scaled.get(m.path, m), r) if adapted else []

    order = [n for m in before for n in tensors(m, m.path in outside)]
    for i in range(spec.num_layers):
        adapted = per_layer_adapters[i] if per_layer_adapters else frozenset()
        order += [n for m in layer if not m.layers or i in m.layers for n in tensors(m, m.path in adapted)]
    order += [n for m in after for n in tensors(m, m.path in outside)]
    return tuple(order)


@dataclass(frozen=True)
class RankPartition:
    """What one rank's stage 1/2 partition holds (stage_1_and_2.py `get_partition_info`)."""

    grads_in_partition_numel: int  # every parameter overlapping the partition, whole (`copy_grads_in_partition`)
    largest_piece_numel: int  # the largest part of one parameter inside the partition (the norm's fp64 copy)
    padding_numel: int  # zeros `get_flat_partition` appends on the last rank


def _rank_partitions(order: tuple[int, ...], ranks: int) -> tuple[int, tuple[RankPartition, ...]]:
    """(partition elements, each rank's `RankPartition`): the flat buffer padded to a multiple of
    2 x ranks and cut evenly; a parameter straddling a boundary belongs to both ranks whole."""
    total = sum(order)
    align = NCCL_START_ALIGNMENT_FACTOR * ranks
    size = ceil(total / align) * align // ranks
    out = []
    for k in range(ranks):
        start, end = k * size, (k + 1) * size
        whole = largest = 0
        offset = 0
        for numel in order:
            inside = min(offset + numel, end) - max(offset, start)
            if inside > 0:
                whole += numel
                largest = max(largest, inside)
            offset += numel
        out.append(RankPartition(whole, largest, max(0, end - max(total, start))))
    return size, tuple(out)


def _zero3_linear_inputs_bytes(spec: ModelSpec, training: TrainingSpec, c: StepComponents) -> tuple[int, int]:
    """(all layers', outside the layers) bytes of linear inputs that ZeRO-3 keeps and plain autograd would
    not. Stage 3 replaces `torch.nn.functional.linear` with `zero3_linear_wrap` (partition_parameters.py
    `_enable_mem_efficient_linear`, called by parameter_offload.py's `Init(module=...)`; `memory_efficient_linear`
    defaults to True), whose `LinearFunctionForZeroStage3.forward` (runtime/zero/linear.py) saves input,
    weight and bias for every linear, frozen ones included. Full fine-tuning keeps them anyway; under LoRA
    the frozen linears' inputs are added. Llama-like families (the names `activations` gives those inputs);
    elsewhere not modelled (module docstring)."""
    if training.method == "full" or spec.family not in SAVING_LINEAR_MODELLED:
        return 0, 0
    tokens, e = training.tokens, BYTES_PER_ELEMENT[training.compute_dtype]
    acts = c.activations
    inputs = {"input_layernorm.output": spec.hidden_size, "post_attention_layernorm.output": spec.hidden_size,
              "mlp.down_proj.input": spec.intermediate_size}
    layers = 0
    for count, saved in acts.layer_runs:
        names = {t.name for t in saved}
        missing = sum(n for name, n in inputs.items() if name not in names)
        if "attn.output" not in names and "self_attn.o_proj.input" not in names:  # o_proj reads SDPA's output
            missing += spec.q_size
        layers += count * missing * tokens * e
    outside = 0 if any(t.name == "lm_head.input" for t in acts.model) else tokens * spec.hidden_size * e
    return layers, outside


def unmodelled_note(spec: ModelSpec, training: TrainingSpec) -> str | None:
    """What this model leaves out for these settings, to show beside the answer (None: nothing)."""
    if (training.resolved_strategy == "deepspeed-zero3" and training.method != "full"
            and spec.family not in SAVING_LINEAR_MODELLED):
        return (f"deepspeed-zero3 keeps every linear's input (zero3_linear_wrap), frozen ones included; that is "
                f"modelled for Llama-style layers only, so this {spec.family} estimate is low by those inputs")
    return None


def phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents,
           zero: DeepSpeedZeroConfig | None = None) -> tuple[PhaseMemory, ...]:
    """The busiest rank under `deepspeed-zero1|2|3` (see the module docstring). `c` is ignored:
    DeepSpeed's components are rebuilt with its dtype rule (every parameter, adapters included, in
    `--dtype`). Where ranks differ (stage 1/2's partitions), each phase takes the rank that holds most."""
    _check(training)
    zero = zero or zero_config_for(spec, training)
    stage = STAGES[training.resolved_strategy]
    n = training.gpus
    single = replace(training, gpus=1, strategy=None, offload="none", lora=replace(training.lora, adapter_dtype="base"))
    c = step_components(spec, single)
    e = BYTES_PER_ELEMENT[training.dtype]
    params = _parameters(spec, training)
    trainable = sum(numel * count for numel, count, t in params if t)
    bucket = zero.reduce_bucket_size * e * (2 if zero.overlap(stage) and stage < 3 else 1)
    impl = training.resolved_optimizer_impl
    step_on_device = training.device == "cpu" or impl == "fused"
    acts = c.activations

    # ZeRO-Offload (`offload_optimizer`): the fp32 master partition, its gradient and the optimizer states live in
    # host RAM and the step runs there (`lora_planner.parallel.offload`); stage 3's `offload_param` moves the 16-bit
    # partitions there too
    offload = training.offload != "none"
    if stage < 3:
        order = _trainable_order(spec, training)
        partition, ranks = _rank_partitions(order, n)
        weights = c.weights + (partition * n - trainable) * e + partition * FP32
        if offload:  # no master on the GPU; `temp_grad_buffer_for_gpu_offload`, the largest parameter's size
            weights += max(order) * e - partition * FP32
    else:
        threshold = zero.stage3_param_persistence_threshold
        shard = sum(ceil(numel / n) * count for numel, count, _ in params)
        persistent = sum(numel * count for numel, count, _ in params if numel <= threshold)
        partition = sum(ceil(numel / n) * count for numel, count, t in params if t)
        buffers = buffer_bytes(spec, training.dtype)
        weights = (shard + persistent) * e + buffers + partition * FP32
        if offload:  # the master in host RAM; with offload_param the partitions too (persistent ones stay whole)
            weights -= partition * FP32 + (sum(ceil(numel / n) * count for numel, count, _ in params
                                               if numel > threshold) * e if training.offload == "params" else 0)
    flat_group = (TensorGroup((partition,), 1, FP32),)
    states = 0 if offload else optimizer_state_bytes(flat_group, training.optimizer, step_on_device)
    scratch = 0 if offload else optimizer_scratch_bytes(flat_group, training.optimizer, impl)

    def phase(name, weights_bytes, gradients, activations, temporaries) -> PhaseMemory:
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=weights_bytes, gradients_bytes=gradients,
                                                 optimizer_states_bytes=states, activations_bytes=activations,
                                                 temporaries_bytes=temporaries))

    if stage == 3:
        gathered = _modules_gathered(spec, training, zero) * e
        # ipg bucket + grad_partitions_flat_buffer, from __init__ (the latter in host RAM when offloading)
        persistent_grads = bucket + (0 if offload else partition * e)
        extra_layers, extra_outside = _zero3_linear_inputs_bytes(spec, training, c)
        saved = c.saved + extra_layers + extra_outside
        saved_at_backward_start = c.saved_at_backward_start + extra_layers + extra_outside
        layers = c.layers_activations + extra_layers + extra_outside
        layer_scratch = c.layer_scratch
        if offload:
            # stage3.py `partition_grads`: each reduced bucket's gradient partitions are copied into the host buffer
            # and back to the GPU (`grad_buffer.to(grad_partition.device)`), all of the bucket's kept in the list it
            # returns; at the boundary one of them is cast to fp32 before going to the host fp32 gradient
            largest = max(numel for numel, _, t in params if t)
            bucket_partition = ceil(max(largest, min(zero.reduce_bucket_size, trainable)) / n) * e
            layer_scratch += bucket_partition + (ceil(largest / n) * FP32 if e != FP32 else 0)
        # step: the fp32 gradient of the partition, made from the 16-bit one (freed right after the cast); offloaded,
        # each parameter's partition passes through the GPU at the boundary (reduce-scatter output, its copy, fp32)
        step_temporaries = max(scratch, partition * e if e != FP32 else 0)
        if offload:
            step_temporaries = max(ceil(numel / n) for numel, _, t in params if t) * (2 * e + FP32)
        # Gathered modules on top of the partitions: the embedding at the start of forward, the largest
        # module and the one prefetched after it from then on.
        return (
            phase("forward_start", weights + gathered, persistent_grads, acts.batch_bytes, 0),
            phase("forward_end", weights + gathered, persistent_grads, saved, acts.loss_forward_scratch_bytes),
            phase("backward_start", weights + gathered, persistent_grads, saved_at_backward_start,
                  acts.loss_backward_scratch_bytes),
            phase("backward_layers", weights + gathered, persistent_grads + c.head_gradients, layers,
                  layer_scratch),
            phase("backward_end", weights + gathered, persistent_grads, c.end_activations + acts.batch_bytes,
                  c.end_scratch),
            phase("optimizer_step", weights, persistent_grads + (0 if offload else partition * FP32), acts.batch_bytes,
                  step_temporaries),
        )
    # Stages 1 and 2. `grads_in_partition` (stage_1_and_2.py `copy_grads_in_partition`): one 16-bit buffer
    # of every parameter overlapping this rank's partition, whole, made at this rank's first reduction and
    # kept until `step` flattens it. Backward's layers: the bucket beside what autograd made so far (stage
    # 1 keeps every gradient; stage 2 has copied them into the bucket). Its end is the larger of the last
    # op (stage 1: every gradient beside the bucket) and the epilogue's reduction (the bucket, its flat
    # copy; stage_1_and_2.py `allreduce_bucket`: `self.flatten(bucket)`).
    # (offloaded, each gradient slice of the partition goes straight to the host's fp32 gradient instead)
    kept = 0 if offload else max(r.grads_in_partition_numel for r in ranks) * e
    last_rank_kept = 0 if offload else ranks[-1].grads_in_partition_numel * e
    mid_backward = trainable > zero.reduce_bucket_size  # a reduction before the epilogue
    in_bucket = min(trainable, zero.reduce_bucket_size) * e
    layers_acts = c.layers_activations
    head = c.head_gradients if stage == 1 else 0
    last_op = (c.end_gradients if stage == 1 else 0) + bucket + (kept if mid_backward else 0)
    end = phase("backward_end", weights, last_op, c.end_activations + acts.batch_bytes, c.end_scratch)
    # inside backward still: the loss value and backward's seed are alive
    epilogue = phase("backward_end", weights, bucket + in_bucket + kept, acts.batch_bytes + acts.loss_output_bytes,
                     acts.backward_seed_bytes)
    backward = [phase("backward_layers", weights, head + bucket + (last_rank_kept if mid_backward else 0),
                      layers_acts, c.layer_scratch)]
    head_pending = _head_extra_large_gradients(spec, training, zero) * e
    if stage == 2 and head_pending:
        # A gradient larger than the bucket stays in its own storage until the next gradient hook reduces
        # it (stage_1_and_2.py `reduce_independent_p_g_buckets_and_remove_grads`: `extra_large_param_to_reduce`);
        # the last rank's `grads_in_partition` is made then, before any layer's backward.
        # Offloaded, DeepSpeed clones it first (`_offload_gradient_safety_enabled`: `grad_reduc.detach().clone()`) and
        # the autograd gradient lives on beside the clone until the reduction (a further copy the reduction holds was
        # measured on CPU ranks and is not counted: module docstring).
        pending = head_pending * (2 if offload else 1)
        backward.append(phase("backward_layers", weights, bucket + last_rank_kept + pending, layers_acts, 0))
    # step (stage_1_and_2.py `step`): the gradient norm first (`scaled_global_norm` -> `get_grad_norm_direct`:
    # each gradient piece of the partition copied to fp64, one at a time, beside `grads_in_partition`), then
    # the partition flattened (`self.flatten(self.averaged_gradients[i])`, 16-bit) and cast to fp32 (no copy
    # in fp32); `free_grad_in_param_list` then drops `grads_in_partition` and the client optimizer steps.
    norm = max((r.grads_in_partition_numel + r.padding_numel) * e + r.largest_piece_numel * NORM_BYTES
               for r in ranks)
    flatten = max((r.grads_in_partition_numel + r.padding_numel) * e for r in ranks) + partition * e \
        + (partition * FP32 if e != FP32 else 0)
    if offload:  # the norm, the flat copy and the step all happen in host RAM; the GPU takes the new 16-bit values
        norm = flatten = 0
    return (
        phase("forward_start", weights, 0, acts.batch_bytes, 0),
        phase("forward_end", weights, 0, c.saved, acts.loss_forward_scratch_bytes),
        phase("backward_start", weights, 0, c.saved_at_backward_start, acts.loss_backward_scratch_bytes),
        max(backward, key=lambda p: p.breakdown.total_bytes),
        max(end, epilogue, key=lambda p: p.breakdown.total_bytes),
        max(phase("optimizer_step", weights, 0, acts.batch_bytes, max(norm, flatten)),
            phase("optimizer_step", weights, 0 if offload else partition * FP32, acts.batch_bytes, scratch),
            key=lambda p: p.breakdown.total_bytes),
    )


def _head_extra_large_gradients(spec: ModelSpec, training: TrainingSpec, zero: DeepSpeedZeroConfig) -> int:
    """Elements of the trainable parameters outside the decoder layers that backward reaches first (lm_head,
    the final norm) and that exceed `reduce_bucket_size`: their gradients are reduced from their own
    storage, not copied into the bucket."""
    if training.method != "full":
        return 0
    modules = [m for m in module_inventory(spec) if not m.tied]
    last_layer = max((i for i, m in enumerate(modules) if is_per_layer(m)), default=-1)
    return sum(m.params_each for m in modules[last_layer + 1:] if m.params_each > zero.reduce_bucket_size)

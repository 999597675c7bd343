"""Host RAM of CPU offload, per rank and per node (pure): what `--offload` moves off the GPU and where it lands.

The GPU side of each engine is in its own module (`deepspeed`, `fsdp`: the offloaded states leave their phases);
this module sizes the host side, each buffer as the engine allocates it, page-locked (pinned) or pageable.

DeepSpeed 0.19.8 ZeRO-Offload (`offload_optimizer: {device: cpu}`), stages 1 and 2 (runtime/zero/stage_1_and_2.py):
the fp32 master partition `single_partition_of_fp32_groups` (l.558-566), its fp32 gradient (l.933-941), the 16-bit
staging copy `param_buffer_of_bit16_for_cpu_offload_groups` (l.567-575) and `temp_grad_buffer_for_cpu_offload`
(the largest trainable parameter, l.653-658), pinned when `pin_memory` (the default, offload_config.py l.75); the
optimizer states, pageable (DeepSpeedCPUAdam `exp_avg` / `exp_avg_sq`, ops/adam/cpu_adam.py l.151-164). On the GPU
it keeps the 16-bit parameters whole and `temp_grad_buffer_for_gpu_offload` (l.659-661). Stage 3 (stage3.py): the
fp32 master (pageable, l.1157-1160), its gradient (pinned, l.1337-1342), the 16-bit gradient partitions
`grad_partitions_flat_buffer` (pinned, l.786-801), the optimizer states; with `offload_param` also the 16-bit
trainable partitions (always pinned, l.887-910) and the frozen ones (pinned when `pin_memory`,
partition_parameters.py l.1816-1847), parameters of at most `stage3_param_persistence_threshold` elements staying
whole on the GPU.

FSDP2 (torch 2.13 torch/distributed/fsdp/_fully_shard/, `CPUOffloadPolicy(pin_memory=True)`): every parameter's
shard (`_fsdp_param.py` `_init_sharded_param`, pinned when `pin_memory`), its gradient (the reduce-scatter output
copied back with `non_blocking=True`, which allocates it pinned: `_fsdp_collectives.py` l.707-743) and the optimizer
states (pageable; the optimizer steps on the CPU).

Every page-locked allocation goes through torch's caching host allocator, which rounds it up to a power of two
(`CachingHostAllocator.h`, `roundSize`): `pinned_reserved_bytes` is that footprint, up to 2x the buffers' own size.

Validated on CPU ranks (gloo, `DS_ACCELERATOR=cpu`, a tiny Llama): DeepSpeed's host buffers, enumerated from its
optimizer, equal these sizes byte for byte for LoRA and full fine-tuning, stages 2 and 3, with and without
`offload_param` (tests/test_offload.py pins those figures); FSDP2's shard, gradient and state sizes are the sharded
ones already held to measured ranks (tests/test_parallel.py). Not validated here (no GPU): which side of the PCIe
bus each buffer is on, the pinning itself and the allocator's rounding, which need CUDA.

Known limitations: gradient accumulation's host buffers (DeepSpeed `accumulated_grads_in_cpu`, FSDP2's pageable
temporary) are not counted (the planner steps every micro-batch); NVMe offload is not modelled (activation offloading's
host buffers are added from `lora_planner.activation_offload`); the host's own process memory (CUDA
context, the Python heap, the dataset) is not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from lora_planner.optimizers import TensorGroup, optimizer_state_bytes
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4


@dataclass(frozen=True)
class HostBuffer:
    name: str
    nbytes: int
    pinned: bool
    allocations: tuple[int, ...] = ()  # the sizes it is allocated in (pinned: each rounded up); () = one of nbytes

    @property
    def reserved_bytes(self) -> int:
        """What the buffer takes from the host: pinned allocations rounded up to a power of two."""
        if not self.pinned:
            return self.nbytes
        return sum(_pow2_ceil(size) for size in (self.allocations or (self.nbytes,)))


@dataclass(frozen=True)
class HostMemory:
    """One rank's host RAM under `--offload`, buffer by buffer; `ranks_per_node` of them share a node."""

    buffers: tuple[HostBuffer, ...]
    ranks_per_node: int

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b.pinned)

    @property
    def pageable_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if not b.pinned)

    @property
    def total_bytes(self) -> int:
        return self.pinned_bytes + self.pageable_bytes

    @property
    def pinned_reserved_bytes(self) -> int:
        return sum(b.reserved_bytes for b in self.buffers if b.pinned)

    @property
    def per_node_bytes(self) -> int:
        """The node's host RAM for its ranks' buffers, pinned ones as the allocator reserves them."""
        return self.ranks_per_node * (self.pinned_reserved_bytes + self.pageable_bytes)


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def host_memory(spec: ModelSpec, training: TrainingSpec) -> HostMemory | None:
    """The host buffers of one rank under `training.offload` and `training.activation_offload` (None without either,
    the latter's from `lora_planner.activation_offload`); `training.gpus_per_node` of them share a node (default: every
    rank on one node, at most 8)."""
    if training.offload == "none" and training.activation_offload == "none":
        return None
    per_node = training.gpus_per_node or min(training.gpus, 8)
    buffers: tuple[HostBuffer, ...] = ()
    if training.offload != "none":
        buffers = _deepspeed_buffers(spec, training) if training.resolved_strategy.startswith("deepspeed") else \
            _fsdp_buffers(spec, training)
    return HostMemory(buffers + _activation_offload_buffers(spec, training), per_node)


def _activation_offload_buffers(spec: ModelSpec, training: TrainingSpec) -> tuple[HostBuffer, ...]:
    """`--activation-offloading`'s pinned host blocks (`lora_planner.activation_offload.host_buffers`)."""
    if training.activation_offload == "none":
        return ()
    from lora_planner.activation_offload import flow_packs, host_buffers
    from lora_planner.activations import make_flow  # lazily, as the step does

    flow = make_flow(spec, training)
    elements = training.tokens * spec.hidden_size
    blocks = host_buffers(training.activation_offload, spec.num_layers, flow_packs(flow), elements * flow.e_stream,
                          elements)
    return tuple(HostBuffer(name, nbytes, True, allocations) for name, nbytes, allocations in blocks)


def _optimizer_states(training: TrainingSpec, numel: int) -> int:
    """The optimizer's states for `numel` fp32 elements stepped on the CPU: DeepSpeedCPUAdam's two moments for AdamW
    (what DeepSpeed builds for an Adam config under offload), else the torch optimizer's own."""
    if training.optimizer == "adamw":
        return 2 * numel * FP32
    return optimizer_state_bytes((TensorGroup((numel,), 1, FP32),), training.optimizer, True)


def _deepspeed_buffers(spec: ModelSpec, training: TrainingSpec) -> tuple[HostBuffer, ...]:
    from lora_planner.parallel.deepspeed import (  # the partition arithmetic the GPU side uses
        STAGES, zero_config_for, _parameters, _rank_partitions, _trainable_order,
    )

    n, e, pin = training.gpus, BYTES_PER_ELEMENT[training.dtype], training.offload_pin_memory
    params = _parameters(spec, training)
    if STAGES[training.resolved_strategy] < 3:
        order = _trainable_order(spec, training)
        partition, _ = _rank_partitions(order, n)
        return (HostBuffer("fp32 master partition", partition * FP32, pin),
                HostBuffer("fp32 gradient partition", partition * FP32, pin),
                HostBuffer("16-bit staging partition", partition * e, pin),
                HostBuffer("temp_grad_buffer_for_cpu_offload", max(order) * e, pin),
                HostBuffer("optimizer states", _optimizer_states(training, partition), False))
    threshold = zero_config_for(spec, training).stage3_param_persistence_threshold
    partition = sum(ceil(numel / n) * count for numel, count, t in params if t)
    buffers = [HostBuffer("fp32 master partition", partition * FP32, False),
               HostBuffer("fp32 gradient partition", partition * FP32, pin),
               HostBuffer("16-bit gradient partitions", partition * e, pin),
               HostBuffer("optimizer states", _optimizer_states(training, partition), False)]
    if training.offload == "params":
        trainable = sum(ceil(numel / n) * count for numel, count, t in params if t and numel > threshold)
        frozen = [ceil(numel / n) * e for numel, count, t in params if not t and numel > threshold
                  for _ in range(count)]
        buffers += [HostBuffer("16-bit trainable partitions", trainable * e, True),
                    HostBuffer("16-bit frozen partitions", sum(frozen), pin, tuple(frozen))]
    return tuple(buffers)


def _fsdp_buffers(spec: ModelSpec, training: TrainingSpec) -> tuple[HostBuffer, ...]:
    """One shard per parameter tensor (frozen base weights at --dtype; the trainable ones as the single-GPU plan
    stores them: PEFT's fp32 adapters), one gradient per trainable shard, the optimizer states of the shards."""
    from lora_planner.parallel.deepspeed import _parameters  # every parameter tensor, trainable or not
    from lora_planner.step import step_components, trainable_groups

    n, pin = training.gpus, training.offload_pin_memory
    e = BYTES_PER_ELEMENT[training.dtype]
    trained = [ceil(g.numel / n) * g.bytes_per_element for g in trainable_groups(spec, training)
               for _ in range(g.count)]
    frozen = [] if training.method == "full" else [ceil(numel / n) * e for numel, count, t in
                                                   _parameters(spec, training) if not t for _ in range(count)]
    states = ceil(step_components(spec, training).states / n)
    return (HostBuffer("parameter shards", sum(frozen) + sum(trained), pin, tuple(frozen + trained)),
            HostBuffer("gradient shards", sum(trained), pin, tuple(trained)),
            HostBuffer("optimizer states", states, False))

"""Per-GPU memory with several data-parallel GPUs: DDP, ZeRO-1, and sharded (ZeRO-2/3, FSDP) (pure).

Every rank runs its own micro-batch (`TrainingSpec.batch_size`), so activations, the loss buffers and
the layer scratch are one GPU's. What changes is where the model states live (ZeRO, Rajbhandari et al.
2020, arXiv 1910.02054, Sec. 5: optimizer states, gradients and parameters partitioned over N ranks give
(2 + 2 + K)Psi -> 2Psi + 2Psi + K Psi/N (Pos), 2Psi + (2 + K)Psi/N (Pos+g), (2 + 2 + K)Psi/N (Pos+g+p))
and which buffers the implementation adds. Modelled on PyTorch's own implementations, the ones the
distributed profiler measures (`lora_planner.profiler.distributed`, 2 CPU ranks on gloo):

- `ddp` (`DistributedDataParallel`, default `gradient_as_bucket_view=False`): a full replica plus flat
  gradient buckets, a second copy of every trainable gradient alive for the whole run;
- `zero1` (DDP + `ZeroRedundancyOptimizer`): as ddp, optimizer state divided over the ranks;
- `zero3` and `fsdp` (FSDP2 `fully_shard` per decoder layer, then the root, `reshard_after_forward=True`):
  parameters, gradients and optimizer state divided over the ranks; the root group (embeddings, final
  norm, lm_head) is gathered for the whole forward and backward; each layer is gathered when used, and
  an all-gather keeps its flat buffer beside the gathered parameters (twice the layer); backward adds
  the prefetched next layer and the reduce-scatter input (the layer's unsharded gradients); the root's
  gradients stay unsharded until its reduce-scatter at the end of backward. Frozen weights (LoRA) are
  sharded like the rest;
- `zero2` (FSDP2 with `reshard_after_forward=False`, PyTorch's SHARD_GRAD_OP): as fsdp, except that every
  layer stays gathered from its forward to its backward, so the end of forward holds all parameters.
  (DeepSpeed's ZeRO-2 instead keeps parameters replicated: 2Psi + (2 + K)Psi/N, never more than that.)

Known limitations: communication buffers of NCCL itself, CPU offload and DeepSpeed's own bucket sizes are
not modelled; shards are even divisions (FSDP2 pads each parameter to a multiple of N: negligible).
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from lora_planner.memory import MemoryBreakdown, PhaseMemory, StepComponents, group_bytes, single_gpu_phases
from lora_planner.params import buffer_numel
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec


def _with_extra_gradients(phases: tuple[PhaseMemory, ...], extra: int) -> tuple[PhaseMemory, ...]:
    return tuple(PhaseMemory(p.phase, replace(p.breakdown, gradients_bytes=p.breakdown.gradients_bytes + extra))
                 for p in phases)


def sharded_phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents) -> tuple[PhaseMemory, ...]:
    """The phases of one rank (see the module docstring), from the single-GPU components `c`."""
    n, strategy = training.gpus, training.resolved_strategy
    impl = training.resolved_optimizer_impl
    if strategy in ("ddp", "zero1"):
        if strategy == "zero1":
            # foreach scratch follows the local partition; for-loop's two copies of the largest tensor stay.
            scratch = ceil(c.optimizer_scratch / n) if impl == "foreach" else c.optimizer_scratch
            c = replace(c, states=ceil(c.states / n), optimizer_scratch=scratch)
        return _with_extra_gradients(single_gpu_phases(c), c.gradients)

    acts = c.activations
    buffers = buffer_numel(spec) * BYTES_PER_ELEMENT[training.dtype]
    root, layer, layer_trainable, root_trainable = group_bytes(spec, training)
    shards = ceil((c.weights - buffers) / n) + buffers
    grads, states = ceil(c.gradients / n), ceil(c.states / n)
    scratch = ceil(c.optimizer_scratch / n)
    # Gathered on top of the shards: the root group always; every layer too between forward and backward
    # under zero2 (no reshard after forward).
    held = root + (spec.num_layers * layer if strategy == "zero2" else 0)

    def phase(name, weights, temporaries, activations, gradients=0) -> PhaseMemory:
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=weights, gradients_bytes=gradients,
                                                 optimizer_states_bytes=states, activations_bytes=activations,
                                                 temporaries_bytes=temporaries))

    # Between two layers' backward (the last layer's done, the next one prefetched): the next layer
    # gathered beside its flat buffer (zero2: still gathered, no buffer), the finished layer's unsharded
    # gradients (the reduce-scatter input) beside their shard, lm_head's gradients unsharded until the
    # root's reduce-scatter at the very end; one layer's saved tensors are gone.
    one_layer = acts.checkpoint_per_layer_bytes if training.grad_checkpointing else acts.layer_bytes
    between_layers = c.layers_saved - one_layer + acts.model_bytes_below_head
    gathered_next = 0 if strategy == "zero2" else layer
    return (
        # The first all-gathers: root and layer 0, each beside its flat all-gather buffer.
        phase("forward_start", shards + root + layer, root + layer, acts.batch_bytes),
        phase("forward_end", shards + held, acts.loss_forward_scratch_bytes + (layer if strategy == "zero2" else 0),
              c.saved),
        # lm_head's backward pre-hook already all-gathers the last layer (prefetch) into its flat buffer.
        phase("backward_start", shards + held, acts.loss_backward_scratch_bytes + (0 if strategy == "zero2" else layer),
              c.saved),
        phase("backward_layers", shards + held + gathered_next, gathered_next + layer_trainable + c.head_gradients,
              between_layers, gradients=ceil(layer_trainable / n)),
        # The last op (the embedding's backward): the layers' gradients are sharded, the root's all still
        # unsharded; every saved tensor is gone.
        phase("backward_end", shards + root, root_trainable, acts.batch_bytes,
              gradients=ceil((c.gradients - root_trainable) / n)),
        phase("optimizer_step", shards, scratch, acts.batch_bytes, gradients=grads),
    )

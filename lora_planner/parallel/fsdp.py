"""FSDP2 `fully_shard`, per rank (pure): `fsdp` (FULL_SHARD) and `fsdp-grad-op` (SHARD_GRAD_OP).

Modelled on torch's FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py, `FSDPParamGroup`
`unshard` / `reshard` / `post_backward`; _fsdp_collectives.py `foreach_all_gather`, `foreach_reduce`),
the recipe the distributed profiler measures: `fully_shard` per decoder layer, then on the root.

- `fsdp` (`reshard_after_forward=True`, FSDP1's FULL_SHARD): parameters, gradients and optimizer state
  divided over the ranks; the root group (embeddings, final norm, lm_head) is gathered for the whole
  forward and backward; each layer is gathered when used, and an all-gather keeps its flat buffer beside
  the gathered parameters (twice the layer); backward adds the prefetched next layer and the
  reduce-scatter input (the layer's unsharded gradients); the root's gradients stay unsharded until its
  reduce-scatter at the end of backward. Frozen weights (LoRA) are sharded like the rest.
- `fsdp-grad-op` (`reshard_after_forward=False`, FSDP1's SHARD_GRAD_OP): as fsdp, except that every layer
  stays gathered from its forward to its backward, so the end of forward holds all parameters. This is
  not DeepSpeed's ZeRO-2 (which never shards parameters): see `lora_planner.parallel.deepspeed`.

Validated against every rank's measured peak (2 CPU ranks on gloo, tests/test_parallel.py).
Known limitations: NCCL's own buffers are not modelled; shards are even divisions (FSDP2 pads each
parameter to a multiple of N: negligible).
"""

from __future__ import annotations

from math import ceil

from lora_planner.step import MemoryBreakdown, PhaseMemory, StepComponents, group_bytes
from lora_planner.params import buffer_bytes
from lora_planner.specs import ModelSpec, TrainingSpec


def phases(spec: ModelSpec, training: TrainingSpec, c: StepComponents) -> tuple[PhaseMemory, ...]:
    """One rank under `fsdp` or `fsdp-grad-op` (see the module docstring), from the single-GPU `c`."""
    n = training.gpus
    keep_gathered = training.resolved_strategy == "fsdp-grad-op"  # no reshard after forward
    acts = c.activations
    buffers = buffer_bytes(spec, training.dtype)
    root, layer, layer_trainable, root_trainable = group_bytes(spec, training)
    shards = ceil((c.weights - buffers) / n) + buffers
    grads, states = ceil(c.gradients / n), ceil(c.states / n)
    scratch = ceil(c.optimizer_scratch / n)
    # CPUOffloadPolicy (`lora_planner.parallel.offload`): the shards, their gradients and the optimizer states live in
    # host RAM and the optimizer steps there; each all-gather first copies its group's shards to the GPU (the copy
    # freed once gathered), and each reduce-scatter's output goes back to the host
    offload = training.offload != "none"
    staging_root, staging_layer = (ceil(root / n), ceil(layer / n)) if offload else (0, 0)
    if offload:
        shards, grads, states, scratch = buffers, 0, 0, 0
    # Gathered on top of the shards: the root group always; every layer too between forward and backward
    # without reshard after forward.
    held = root + (spec.num_layers * layer if keep_gathered else 0)

    def phase(name, weights, temporaries, activations, gradients=0) -> PhaseMemory:
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=weights, gradients_bytes=gradients,
                                                 optimizer_states_bytes=states, activations_bytes=activations,
                                                 temporaries_bytes=temporaries))

    # Between two layers' backward (the last layer's done, the next one prefetched): the next layer
    # gathered beside its flat buffer (grad-op: still gathered, no buffer), the finished layer's unsharded
    # gradients (the reduce-scatter input) beside their shard, lm_head's gradients unsharded until the
    # root's reduce-scatter at the very end; one layer's saved tensors are gone.
    one_layer = acts.checkpoint_per_layer_bytes if training.grad_checkpointing else acts.layer_bytes
    between_layers = c.layers_saved - one_layer + acts.model_bytes_below_head + acts.loss_output_bytes
    gathered_next = 0 if keep_gathered else layer
    return (
        # The first all-gathers: root and layer 0, each beside its flat all-gather buffer.
        phase("forward_start", shards + root + layer, root + layer + staging_root + staging_layer, acts.batch_bytes),
        phase("forward_end", shards + held, acts.loss_forward_scratch_bytes + (layer if keep_gathered else 0),
              c.saved),
        # lm_head's backward pre-hook already all-gathers the last layer (prefetch) into its flat buffer.
        phase("backward_start", shards + held, acts.loss_backward_scratch_bytes + (0 if keep_gathered else layer),
              c.saved_at_backward_start),
        phase("backward_layers", shards + held + gathered_next,
              gathered_next + (staging_layer if gathered_next else 0) + layer_trainable + c.head_gradients
              + acts.backward_seed_bytes, between_layers, gradients=ceil(layer_trainable / n)),
        # The last op (the embedding's backward): the layers' gradients are sharded, the root's all still
        # unsharded; every saved tensor is gone (the loss value and backward's seed stay until it returns).
        phase("backward_end", shards + root, root_trainable + acts.backward_seed_bytes,
              acts.batch_bytes + acts.loss_output_bytes,
              gradients=0 if offload else ceil((c.gradients - root_trainable) / n)),
        phase("optimizer_step", shards, scratch, acts.batch_bytes, gradients=grads),
    )

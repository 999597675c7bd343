"""The memory model of one training step: peak allocated bytes, the phase it occurs in, and why (pure).

The peak is the maximum over the phases of a steady-state step (optimizer state exists from step 1's
`step()` on; gradients are freed by `zero_grad(set_to_none=True)` before each forward) of what is live:

| phase            | weights | grads | optimizer | activations                     | temporaries               |
|------------------|---------|-------|-----------|---------------------------------|---------------------------|
| forward_end      | yes     | -     | yes       | all saved + loss saved          | logits + fp32 upcast      |
| backward_start   | yes     | -     | yes       | all saved + loss saved          | loss-gradient buffers     |
| backward_layers  | yes     | head  | yes       | all layers (+ one recomputed)   | one layer's grad buffers  |
| backward_end     | yes     | all   | yes       | first layer's (or recomputed)   | one layer's grad buffers  |
| optimizer_step   | yes     | all   | yes       | the batch                       | implementation scratch    |

Step 1 has no optimizer state before its `step()`, and its `step()` creates the same state the steady
state holds, so the steady-state phases bound it. Between backward's first and last layer, memory moves
linearly (each layer frees its saved tensors and adds its gradients), so the two ends bound the middle.

Sources. Bytes per parameter for mixed precision: ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054,
Sec. 3.1: 2 + 2 + 12 bytes with Adam). The seed's rule: full = 4x the weights, LoRA = (1 + 4m)x
(weights + gradients + two Adam states for the trainable fraction m; Hu et al. 2021, arXiv 2106.09685).
QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3): NF4 weights in blocks of 64 with an absmax
constant each; double quantization stores those constants in 8 bits with one fp32 constant per 256 of
them: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter; embeddings, norms, biases and lm_head stay
16-bit. Activations: `lora_planner.activations`. Optimizer: `lora_planner.optimizers`.

Device overhead (CUDA only, outside `max_memory_allocated`): the CUDA context and libraries, and the
caching allocator's rounding and fragmentation (reserved - allocated). Both are settings with defaults
from common observation, to be calibrated against measured runs (`lora-plan calibrate`).

Known limitations: single device (no sharding yet); no CPU offload; activation rules follow the
transformers implementations of the supported families (see `activations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import ceil
from typing import Literal, get_args

from lora_planner.activations import ActivationProfile, activation_profile
from lora_planner.optimizers import TensorGroup, optimizer_scratch_bytes, optimizer_state_bytes
from lora_planner.params import Module, buffer_numel, count_params, lora_params, module_inventory
from lora_planner.specs import BYTES_PER_ELEMENT, LoraSpec, ModelSpec, TrainingSpec

Phase = Literal["forward_end", "backward_start", "backward_layers", "backward_end", "optimizer_step"]
PHASES: tuple[str, ...] = get_args(Phase)
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "temporaries")
MIB = 2**20
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class MemoryBreakdown:
    """Live bytes by PyTorch's memory categories."""

    weights_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_states_bytes: int = 0
    activations_bytes: int = 0
    temporaries_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_states_bytes
                + self.activations_bytes + self.temporaries_bytes)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, f"{name}_bytes") for name in CATEGORIES}


@dataclass(frozen=True)
class PhaseMemory:
    phase: Phase
    breakdown: MemoryBreakdown


@dataclass(frozen=True)
class DeviceOverhead:
    """What a CUDA device holds beyond the allocated peak. Zero on CPU."""

    cuda_context_bytes: int = 512 * MIB  # CUDA context + cuBLAS/cuDNN workspaces, typical for torch 2.x
    allocator_fraction: float = 0.05  # reserved/allocated - 1 for a training loop without memory churn

    def bytes_for(self, peak_allocated_bytes: int, device: str) -> int:
        if device != "cuda":
            return 0
        return self.cuda_context_bytes + ceil(peak_allocated_bytes * self.allocator_fraction)


@dataclass(frozen=True)
class MemoryEstimate:
    """The planner's answer for one method."""

    method: str
    total_params: int
    trainable_params: int
    trainable_fraction: float
    weights_at_dtype_bytes: int  # x in the seed's rule: the base weights at --dtype (NF4 for QLoRA)
    seed_rule_bytes: int
    phases: tuple[PhaseMemory, ...]
    device_overhead_bytes: int
    activations: ActivationProfile = field(repr=False)

    @property
    def peak(self) -> PhaseMemory:
        return max(self.phases, key=lambda p: p.breakdown.total_bytes)

    @property
    def peak_phase(self) -> Phase:
        return self.peak.phase

    @property
    def peak_allocated_bytes(self) -> int:
        return self.peak.breakdown.total_bytes

    @property
    def peak_device_bytes(self) -> int:
        return self.peak_allocated_bytes + self.device_overhead_bytes


def nf4_bytes(numel: int) -> int:
    """One NF4 tensor with double quantization (QLoRA Sec. 3; bitsandbytes `quantize_4bit`,
    `compress_statistics=True`): packed 4-bit values, one uint8 constant per 64 values, one fp32 constant
    per 256 of those."""
    blocks = ceil(numel / NF4_BLOCK)
    return ceil(numel / 2) + blocks + 4 * ceil(blocks / NF4_DOUBLE_QUANT_BLOCK)


def _base_weight_bytes(modules: tuple[Module, ...], training: TrainingSpec) -> int:
    """Frozen or trainable base weights as stored: --dtype (fp32 under AMP), NF4 linears under QLoRA."""
    e = BYTES_PER_ELEMENT[training.dtype]
    if training.method != "qlora":
        return sum(m.params for m in modules) * e
    total = 0
    for m in modules:
        if m.kind == "linear" and m.group != "lm_head":
            bias = m.out_features * e if m.bias else 0
            total += (nf4_bytes(m.weight_numel_each) + bias) * m.count
        else:
            total += m.params * e
    return total


@lru_cache(maxsize=4096)  # grids vary batch and sequence far more often than these inputs
def _trainable_groups(spec: ModelSpec, method: str, dtype: str, lora: LoraSpec) -> tuple[TensorGroup, ...]:
    """Every trainable tensor, grouped by shape: all weights and biases (full), or LoRA's A and B."""
    groups: list[TensorGroup] = []
    if method == "full":
        e = BYTES_PER_ELEMENT[dtype]
        for m in module_inventory(spec):
            if m.tied:
                continue
            if m.kind == "norm":
                groups.append(TensorGroup((m.out_features,), m.count * (2 if m.bias else 1), e))
                continue
            shape = (m.in_features, m.out_features) if m.kind == "embedding" else (m.out_features, m.in_features)
            groups.append(TensorGroup(shape, m.count, e))
            if m.bias:
                groups.append(TensorGroup((m.out_features,), m.count, e))
        return tuple(groups)
    e = 4 if lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[dtype]
    for m in lora_params(spec, lora.r, lora.target_modules).target_modules:
        groups.append(TensorGroup((lora.r, m.in_features), m.count, e))
        groups.append(TensorGroup((m.out_features, lora.r), m.count, e))
    return tuple(groups)


def trainable_groups(spec: ModelSpec, training: TrainingSpec) -> tuple[TensorGroup, ...]:
    """The trainable tensors of `training` grouped by shape (all weights, or LoRA's A and B)."""
    return _trainable_groups(spec, training.method, training.dtype, training.lora)


def estimate_memory(spec: ModelSpec, training: TrainingSpec,
                    overhead: DeviceOverhead | None = None) -> MemoryEstimate:
    """Predict the peak allocated memory of one steady-state training step (see the module docstring)."""
    overhead = overhead or DeviceOverhead()
    modules = module_inventory(spec)
    base_params = count_params(spec).total
    groups = trainable_groups(spec, training)
    trainable_params = sum(g.numel * g.count for g in groups)
    trainable_bytes = sum(g.nbytes for g in groups)

    base_bytes = _base_weight_bytes(modules, training)
    buffers = buffer_numel(spec) * BYTES_PER_ELEMENT[training.dtype]
    if training.method == "full":
        weights = base_bytes + buffers
        fraction = 1.0
        seed_rule = 4 * base_bytes
    else:
        weights = base_bytes + buffers + trainable_bytes
        fraction = trainable_params / (base_params + trainable_params)
        seed_rule = round((1 + 4 * fraction) * base_bytes)
    gradients = trainable_bytes
    impl = training.resolved_optimizer_impl
    step_on_device = training.device == "cpu" or impl == "fused"
    states = optimizer_state_bytes(groups, training.optimizer, step_on_device)
    opt_scratch = optimizer_scratch_bytes(groups, training.optimizer, impl)

    acts = activation_profile(spec, training)
    layer_scratch = acts.layer_backward_scratch_bytes
    if training.method == "qlora":
        # bitsandbytes dequantizes one weight to the compute dtype for each matmul, forward and backward.
        largest = max(m.weight_numel_each for m in modules if m.kind == "linear" and m.group != "lm_head")
        layer_scratch += largest * BYTES_PER_ELEMENT[training.compute_dtype]
    if training.grad_checkpointing:
        layers_saved = spec.num_layers * acts.checkpoint_per_layer_bytes
        recomputed = acts.layer_bytes  # the layer being recomputed in backward
    else:
        layers_saved = acts.all_layers_bytes
        recomputed = 0
    saved = layers_saved + acts.model_bytes + acts.loss_bytes
    # Gradients that exist once backward has left the loss: lm_head (+ final norm) for full fine-tuning.
    head_grads = sum(m.params for m in modules if m.group == "lm_head") * BYTES_PER_ELEMENT[training.dtype] \
        if training.method == "full" else 0
    # The end of backward: the first layer's backward (its saved tensors, its gradient buffers), or, for a
    # tied embedding, the very last op: autograd adds the embedding's V x h gradient to lm_head's, and
    # both partial gradients are alive beside the sum while every activation is already gone.
    last_layer_left = acts.checkpoint_per_layer_bytes if training.grad_checkpointing else acts.first_layer_bytes
    end_acts, end_scratch = last_layer_left + recomputed + acts.batch_bytes, layer_scratch
    if training.method == "full" and spec.tie_word_embeddings:
        tie_scratch = 2 * spec.vocab_size * spec.hidden_size * BYTES_PER_ELEMENT[training.dtype]
        if acts.batch_bytes + tie_scratch > end_acts + end_scratch:
            end_acts, end_scratch = acts.batch_bytes, tie_scratch

    def phase(name: Phase, **parts: int) -> PhaseMemory:
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=weights, optimizer_states_bytes=states, **parts))

    phases = (
        phase("forward_end", activations_bytes=saved, temporaries_bytes=acts.loss_forward_scratch_bytes),
        phase("backward_start", activations_bytes=saved, temporaries_bytes=acts.loss_backward_scratch_bytes),
        phase("backward_layers", gradients_bytes=head_grads,
              activations_bytes=layers_saved + acts.model_bytes + recomputed, temporaries_bytes=layer_scratch),
        phase("backward_end", gradients_bytes=gradients, activations_bytes=end_acts, temporaries_bytes=end_scratch),
        phase("optimizer_step", gradients_bytes=gradients, activations_bytes=acts.batch_bytes,
              temporaries_bytes=opt_scratch),
    )
    peak_allocated = max(p.breakdown.total_bytes for p in phases)
    return MemoryEstimate(
        method=training.method,
        total_params=base_params,
        trainable_params=trainable_params,
        trainable_fraction=fraction,
        weights_at_dtype_bytes=base_bytes,
        seed_rule_bytes=seed_rule,
        phases=phases,
        device_overhead_bytes=overhead.bytes_for(peak_allocated, training.device),
        activations=acts,
    )

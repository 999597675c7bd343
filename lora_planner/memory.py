"""The memory model of one training step: peak allocated bytes, the phase it occurs in, and why (pure).

The peak is the maximum over the phases of a steady-state step (optimizer state exists from step 1's
`step()` on; gradients are freed by `zero_grad(set_to_none=True)` before each forward) of what is live:

| phase           | weights | grads | optimizer | activations                     | temporaries                   |
|-----------------|---------|-------|-----------|---------------------------------|-------------------------------|
| forward_start   | yes     | -     | yes       | the batch                       | -                             |
| forward_end     | yes     | -     | yes       | all saved + loss saved + loss   | logits + fp32 upcast + held   |
| backward_start  | yes     | -     | yes       | all saved + log_softmax + loss  | seed + loss-gradient buffers  |
| backward_layers | yes     | head  | yes       | all layers (+ 1 recomputed) + loss | that layer's grad buffers + seed |
| backward_end    | yes     | all   | yes       | first layer's (or recomputed) + loss | ... + seed (or the last op's) |
| optimizer_step  | yes     | all   | yes       | the batch                       | implementation scratch        |

Weights include the buffers as transformers keeps them (RoPE's two fp32 tables, `params.buffer_bytes`).
forward_end is nll_loss, the forward's last op: "held" is what is alive there and not kept for backward (the
padded labels, the final hidden state when lm_head does not save it, autocast's unsaved weight copies;
`activations.ActivationProfile.loss_forward_scratch_bytes`). backward_start is log_softmax's backward: nll_loss's
targets and total weight were freed with its node. "loss" is the loss value (a 0-d fp32 tensor the caller holds);
it and `backward()`'s seed gradient (`ones_like(loss)`) live until `backward()` returns. backward_end is the
larger of the first layer's backward and the last op (full fine-tuning: the embedding's backward beside its
incoming tokens x h gradient; tied, the add of the two partial V x h gradients; `step.step_components`).
Checked phase by phase against real CPU steps with the exact tracker (`tests/profiler/test_runner.py`, byte for
byte).

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

The byte counts a step is assembled from (weights, trainable tensors, optimizer state, activations, the
phases) live in `lora_planner.step`; several GPUs (DDP, ZeRO, FSDP, DeepSpeed) reuse them per rank in
`lora_planner.parallel`; this module picks the phases and answers.

backward_layers is the last layer's backward (under checkpointing: the layer whose recompute plus backward buffers
weigh most), with the final norm's and lm_head's saved tensors freed by their backward; an MoE model's dense and
expert layers have different buffers, so backward_end scans every layer from the first one backward reaches.

Known limitations: CPU and activation offloading are planned from their engines' source (`lora_planner.parallel.
offload`, `lora_planner.activation_offload`), not measured on a GPU; activation rules follow the transformers
implementations of the supported families (see `activations`). The moments inside a layer's backward are modelled
coarsely (one buffer total per layer kind, every saved tensor of the layer alive): where they decide the peak, which
takes a vocabulary small against the layer (2-layer toys with 128 tokens of vocabulary), the plan is within -1.1 %
to +3.3 % under checkpointing and exact without it (`experiments/grids/dense_small_vocab.toml`); at real
vocabularies the logits' moments decide and the plan is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from math import ceil

from lora_planner.activations import ActivationProfile
from lora_planner.errors import PlannerInputError
from lora_planner.params import count_params
from lora_planner.parallel import sharded_phases
from lora_planner.parallel.offload import HostMemory, host_memory
from lora_planner.specs import LoraSpec, ModelSpec, TrainingSpec
from lora_planner.step import (  # noqa: F401 (the step's pieces, re-exported: callers import them from here)
    CATEGORIES, MIB, PHASE_TITLES, PHASES, MemoryBreakdown, Phase, PhaseMemory, StepComponents, group_bytes,
    layer_trainable_bytes, nf4_bytes, single_gpu_phases, step_components, trainable_groups, trainable_totals,
)

# Bounds of the device overhead settings (flags and calibration files): a CUDA context is ~0.3-1 GiB; the
# caching allocator's reserve is measured at a few % to ~30 % of the peak, never ten times it.
MAX_CUDA_CONTEXT_BYTES = 2**40
MAX_ALLOCATOR_FRACTION = 10.0


@dataclass(frozen=True)
class DeviceOverhead:
    """What a CUDA device holds beyond the allocated peak. Zero on CPU."""

    cuda_context_bytes: int = 512 * MIB  # CUDA context + cuBLAS/cuDNN workspaces, typical for torch 2.x
    allocator_fraction: float = 0.05  # reserved/allocated - 1 for a training loop without memory churn

    def __post_init__(self) -> None:
        """Checked like user input: they come from flags and from calibration files."""
        context = self.cuda_context_bytes
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context < MAX_CUDA_CONTEXT_BYTES:
            raise PlannerInputError("cuda-context", f"must be a size in [0, 1 TiB), got {context!r} bytes",
                                    "pass e.g. --cuda-context 512MiB")
        fraction = self.allocator_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
                or not 0 <= fraction < MAX_ALLOCATOR_FRACTION:
            raise PlannerInputError("allocator-overhead",
                                    f"must be a fraction in [0, {MAX_ALLOCATOR_FRACTION:g}), got {fraction!r}",
                                    "pass e.g. --allocator-overhead 0.05")

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
    # `--offload`: the host RAM of one rank's offloaded states (`lora_planner.parallel.offload`); None without
    host: HostMemory | None = None

    @functools.cached_property  # (the searches read it several times an estimate, which never changes)
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


def estimate_memory(spec: ModelSpec, training: TrainingSpec,
                    overhead: DeviceOverhead | None = None) -> MemoryEstimate:
    """Predict the peak allocated memory of one steady-state training step, per GPU (see the module
    docstring; several GPUs: `lora_planner.parallel`)."""
    overhead = overhead or DeviceOverhead()
    c = step_components(spec, training)
    base_params = count_params(spec).total
    trainable_params, _ = trainable_totals(spec, training)
    if training.method == "full":
        fraction, seed_rule = 1.0, 4 * c.base_weights
    else:
        fraction = trainable_params / (base_params + trainable_params)
        seed_rule = round((1 + 4 * fraction) * c.base_weights)
    phases = single_gpu_phases(c) if training.resolved_strategy is None else sharded_phases(spec, training, c)
    peak_allocated = max(p.breakdown.total_bytes for p in phases)
    return MemoryEstimate(
        method=training.method,
        total_params=base_params,
        trainable_params=trainable_params,
        trainable_fraction=fraction,
        weights_at_dtype_bytes=c.base_weights,
        seed_rule_bytes=seed_rule,
        phases=phases,
        device_overhead_bytes=overhead.bytes_for(peak_allocated, training.device),
        activations=c.activations,
        host=host_memory(spec, training),
    )


# The searches (`recommend`, the web page's sweeps) ask for the same configurations again and again: within one
# recommendation (every rung of the rank ladder at the micro-batches its neighbours tried) and across the page's
# requests, where one change leaves most of them as they were. Every argument is a frozen dataclass (hashable) and the
# estimate is immutable, so they share one process-wide LRU cache: about 8 KiB an entry (llama-7b, tracemalloc), so
# at most ~16 MiB. `planner.make_plan` goes through it too (the page's plan, then its sweeps at the same settings);
# direct callers of `estimate_memory` (among them the tests that patch the engine) never use it.
# Full fine-tuning has no adapters, so its estimate does not depend on the adapters' rank and alpha: one entry serves
# every rank (the page's "memory vs r" sweep asks full fine-tuning at each).
_estimate_memory_lru = functools.lru_cache(maxsize=2048)(estimate_memory)


def estimate_memory_cached(spec: ModelSpec, training: TrainingSpec,
                           overhead: DeviceOverhead | None = None) -> MemoryEstimate:
    """`estimate_memory` through the shared LRU cache (above)."""
    if training.method == "full" and (training.lora.r, training.lora.alpha) != (FULL_KEY_R, None):
        training = training.evolve(lora=training.lora.evolve(r=FULL_KEY_R, alpha=None))
    return _estimate_memory_lru(spec, training, overhead)


FULL_KEY_R = LoraSpec().r

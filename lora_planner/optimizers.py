"""Optimizer state and the optimizer step's scratch memory (pure).

State per trainable tensor (created lazily at the first `step()`):
- AdamW (Loshchilov & Hutter 2019; `torch.optim.AdamW`): exp_avg and exp_avg_sq, each the parameter's
  dtype and shape, plus a scalar `step` (a 4-byte tensor on the parameter's device only for `fused` /
  `capturable`; on CPU it lives with the parameter).
- 8-bit AdamW, paged or not (Dettmers et al. 2022, arXiv 2110.02861; bitsandbytes): two uint8 states with
  one fp32 absmax per block of 256 values, for tensors with at least 4096 elements (`min_8bit_size`);
  smaller tensors keep two fp32 states. Paged states live in CUDA unified memory and can be evicted to
  the host under pressure (they still count here: they are on the GPU when it has room).
- SGD with momentum (the planner assumes momentum > 0): one buffer like the parameter.
- Adafactor (Shazeer & Stern 2018, arXiv 1804.04235; `torch.optim.Adafactor`): for a matrix, a row and a
  column second-moment vector; for a vector, a full one; no first moment.

Scratch at the step (measured on torch 2.x with the live-tensor tracker):
- `for-loop` (`foreach=False`, PyTorch's CPU default): Adam computes
  `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` one tensor at a time: about two
  temporary copies of the largest trainable tensor;
- `foreach` (the CUDA default): `torch._foreach_sqrt(exp_avg_sqs)` materialises one copy of every
  trainable tensor at once;
- `fused`: in-place kernels, no scratch. bitsandbytes' 8-bit kernels are in place too.

Known limitations: weight decay is applied in place (AdamW) and assumed off for SGD; Adafactor's scratch
is an estimate (two copies of the largest tensor); DeepSpeed / apex optimizers are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil

from lora_planner.specs import Optimizer, OptimizerImpl

BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
FP32 = 4


@dataclass(frozen=True)
class TensorGroup:
    """`count` trainable tensors of one shape, stored with `bytes_per_element`."""

    shape: tuple[int, ...]
    count: int
    bytes_per_element: int

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.bytes_per_element * self.count


def _state_bytes_one(group: TensorGroup, optimizer: Optimizer) -> int:
    numel, e = group.numel, group.bytes_per_element
    if optimizer == "adamw":
        return 2 * numel * e
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * numel * FP32
        return 2 * (numel + ceil(numel / BNB_BLOCK_SIZE) * FP32)
    if optimizer == "sgd":
        return numel * e
    # adafactor: factored second moment for matrices, full for vectors
    if len(group.shape) >= 2:
        return (group.shape[0] + group.shape[-1]) * e
    return numel * e


@lru_cache(maxsize=4096)
def optimizer_state_bytes(groups: tuple[TensorGroup, ...], optimizer: Optimizer, step_on_device: bool) -> int:
    """Bytes of optimizer state for all trainable tensors (+ Adam's 4-byte `step` where it is on device)."""
    total = sum(_state_bytes_one(g, optimizer) * g.count for g in groups)
    if optimizer in ("adamw", "adafactor") and step_on_device:
        total += FP32 * sum(g.count for g in groups)
    return total


@lru_cache(maxsize=4096)
def optimizer_scratch_bytes(groups: tuple[TensorGroup, ...], optimizer: Optimizer, impl: OptimizerImpl) -> int:
    """Transient bytes inside `optimizer.step()` on top of weights, gradients and states."""
    if not groups or optimizer in ("adamw8bit", "paged_adamw8bit", "sgd") or impl == "fused":
        return 0
    largest = max(g.numel * g.bytes_per_element for g in groups)
    if optimizer == "adafactor" or impl == "for-loop":
        return 2 * largest
    return sum(g.nbytes for g in groups)  # foreach AdamW: one copy of every trainable tensor

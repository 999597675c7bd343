"""Optimizer state and the optimizer step's scratch memory (pure), per planner optimizer name.

State per trainable tensor of n elements and e bytes per element (created at the first `step()`;
torch's Adagrad at construction). Sources: the optimizers' code in torch 2.13, transformers 5.24
(`optimization.Adafactor`) and bitsandbytes 0.50 (`optim/optimizer.py`, `Optimizer2State.init_state`,
`Optimizer1State.init_state`, `optim/ademamix.py`); every row measured with the live-tensor tracker on
CPU (`tests/test_optimizers.py` pins the numbers):

| optimizer                  | full-size states          | small state                                  |
|----------------------------|---------------------------|----------------------------------------------|
| adamw (torch)              | 2 (exp_avg, exp_avg_sq) x e | 4-byte `step` tensor on the device if fused or on CPU |
| sgd (momentum 0)           | none                      |                                              |
| sgd_momentum (0.9)         | 1 (momentum_buffer) x e   |                                              |
| adagrad, rmsprop (torch)   | 1 (sum / square_avg) x e  | 4-byte `step` as for adamw                   |
| torch_adafactor            | factored: rows + cols x e; vectors: n x e | 4-byte `step` as for adamw   |
| adafactor (transformers)   | factored: rows + cols x 4; vectors: n x 4 | 4-byte `RMS` tensor, always on the device |
| bitsandbytes 32-bit        | k x 4 (fp32 whatever the weights) |                                      |
| bitsandbytes 8-bit         | k x 1 + one fp32 absmax per 256 values per state; tensors under 4096 elements keep fp32 states |

k = 2 for AdamW (Dettmers et al. 2022, arXiv 2110.02861), 1 for Lion (Chen et al. 2023, arXiv 2302.06675)
and RMSprop, 3 for AdEMAMix (two EMAs of the gradient + the second moment; Pagliardini et al. 2024, arXiv
2409.03137). bitsandbytes keeps `step` as a Python int. Paged states (`paged_*`) are allocated in CUDA
unified memory outside PyTorch's allocator and can be evicted to the host under pressure; they still
count here (they are on the GPU when it has room). The Hugging Face Trainer keeps `nn.Embedding` weights'
states in 32-bit under every 8-bit bitsandbytes optimizer (`Trainer.create_optimizer`,
`GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})`): a group marked
`embedding=True` gets 32-bit states.

Scratch at the step (on top of weights, gradients and states; measured with the tracker):
- `foreach` (PyTorch's CUDA default): AdamW and RMSprop `torch._foreach_sqrt` one copy of every trainable
  tensor; Adagrad two (`_foreach_sqrt` then an out-of-place `_foreach_add`); torch's Adafactor one;
- `for-loop` (PyTorch's CPU default): one tensor at a time, the largest sets it: AdamW two copies
  (`exp_avg_sq.sqrt() / bias_correction2_sqrt`), Adagrad and RMSprop one (`sqrt().add_(eps)`), torch's
  Adafactor one (`row_var @ col_var`);
- `fused`: in-place kernels, none; SGD without momentum or with it: none; bitsandbytes: in place, none;
- transformers' Adafactor (a Python loop): `grad**2 + eps` and then the factored approximation or `-update`
  are two fp32 copies of the tensor, plus fp32 copies of the gradient and the weight for 16-bit weights, plus
  (factored tensors) the fp32 row and column factors of the approximation.

Known limitations: a Python loop keeps the previous tensor's temporaries alive until it reassigns them, so
when the largest tensor directly follows another large one (LoRA's A then B; three same-shaped matrices)
the measured scratch is that much higher (AdamW for-loop: up to 3 copies); the planner counts the
largest tensor's own temporaries only, exact when it follows a small one (embeddings come first, lm_head
follows the final norm). Weight decay is in place (AdamW) or zero (the Trainer's default for the others).
DeepSpeed / apex optimizers are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil

from lora_planner.frozen import frozen_spec
from lora_planner.specs import Optimizer, OptimizerImpl

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes `min_8bit_size` default
BNB_BLOCK_SIZE = 256  # bitsandbytes blockwise quantization block
FP32 = 4


@frozen_spec  # (hashed at every cached state-size lookup)
class TensorGroup:
    """`count` trainable tensors of one shape, stored with `bytes_per_element`; `embedding` marks
    `nn.Embedding` weights (the Trainer keeps their states in 32-bit under 8-bit bitsandbytes optimizers)."""

    shape: tuple[int, ...]
    count: int
    bytes_per_element: int
    embedding: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.bytes_per_element * self.count


@dataclass(frozen=True)
class OptimizerModel:
    """How one optimizer lays out its state and what its step allocates (see the module docstring)."""

    full_states: int  # full-size state tensors per parameter
    state_dtype: str  # "param" (the parameter's dtype), "fp32", "bnb8" (8-bit blockwise), "factored", "factored32"
    step_tensor: str  # "none", "device-if" (fused or CPU), "always" (one 4-byte tensor per parameter)
    foreach_copies: int = 0  # copies of every trainable tensor under foreach
    loop_copies: int = 0  # copies of the largest tensor under for-loop


def _bnb(states: int, bits: int) -> OptimizerModel:
    return OptimizerModel(states, "bnb8" if bits == 8 else "fp32", "none")


MODELS: dict[str, OptimizerModel] = {
    "adamw": OptimizerModel(2, "param", "device-if", foreach_copies=1, loop_copies=2),
    "sgd": OptimizerModel(0, "param", "none"),
    "sgd_momentum": OptimizerModel(1, "param", "none"),
    "adagrad": OptimizerModel(1, "param", "device-if", foreach_copies=2, loop_copies=1),
    "rmsprop": OptimizerModel(1, "param", "device-if", foreach_copies=1, loop_copies=1),
    "torch_adafactor": OptimizerModel(0, "factored", "device-if", foreach_copies=1, loop_copies=1),
    "adafactor": OptimizerModel(0, "factored32", "always"),  # scratch: `_hf_adafactor_scratch`
    "adamw8bit": _bnb(2, 8), "paged_adamw8bit": _bnb(2, 8), "paged_adamw32bit": _bnb(2, 32),
    "lion8bit": _bnb(1, 8), "lion32bit": _bnb(1, 32), "paged_lion8bit": _bnb(1, 8), "paged_lion32bit": _bnb(1, 32),
    "rmsprop8bit": _bnb(1, 8), "rmsprop32bit": _bnb(1, 32),
    "ademamix8bit": _bnb(3, 8), "ademamix32bit": _bnb(3, 32),
    "paged_ademamix8bit": _bnb(3, 8), "paged_ademamix32bit": _bnb(3, 32),
}


def _state_bytes_one(group: TensorGroup, model: OptimizerModel) -> int:
    numel, e = group.numel, group.bytes_per_element
    if model.state_dtype in ("factored", "factored32"):
        width = FP32 if model.state_dtype == "factored32" else e
        if len(group.shape) >= 2:  # row and column second moments (a vector each)
            rows = numel // group.shape[-1]
            cols = numel // group.shape[-2]
            return (rows + cols) * width
        return numel * width
    if model.state_dtype == "param":
        return model.full_states * numel * e
    if model.state_dtype == "fp32" or numel < BNB_MIN_8BIT_SIZE or group.embedding:
        return model.full_states * numel * FP32
    return model.full_states * (numel + ceil(numel / BNB_BLOCK_SIZE) * FP32)  # uint8 state + fp32 absmax


@lru_cache(maxsize=4096)
def optimizer_state_bytes(groups: tuple[TensorGroup, ...], optimizer: Optimizer, step_on_device: bool) -> int:
    """Bytes of optimizer state for all trainable tensors, with the 4-byte `step` / `RMS` tensors that
    live on the device (`step_on_device`: the implementation is fused, or the device is the CPU)."""
    model = MODELS[optimizer]
    total = sum(_state_bytes_one(g, model) * g.count for g in groups)
    if model.step_tensor == "always" or (model.step_tensor == "device-if" and step_on_device):
        total += FP32 * sum(g.count for g in groups)
    return total


def _hf_adafactor_scratch(groups: tuple[TensorGroup, ...]) -> int:
    """transformers' Adafactor, largest tensor: two fp32 copies (`grad**2 + eps`, then the factored
    estimate or `-update`), plus fp32 copies of gradient and weight when they are 16-bit. A factored (2-D+)
    tensor peaks in `_approx_sq_grad` (transformers 5.24 `optimization.py`) at `torch.mul(r_factor, c_factor)`:
    beside those copies its fp32 row factor (`exp_avg_sq_row / mean`, rsqrt in place) and column factor
    (`exp_avg_sq_col.rsqrt()`) are alive."""
    def one(g: TensorGroup) -> int:
        copies = g.numel * FP32 * (2 if g.bytes_per_element == FP32 else 4)
        if len(g.shape) < 2:
            return copies
        return copies + (g.numel // g.shape[-1] + g.numel // g.shape[-2]) * FP32

    return max(one(g) for g in groups)


@lru_cache(maxsize=4096)
def optimizer_scratch_bytes(groups: tuple[TensorGroup, ...], optimizer: Optimizer, impl: OptimizerImpl) -> int:
    """Transient bytes inside `optimizer.step()` on top of weights, gradients and states."""
    if not groups:
        return 0
    if optimizer == "adafactor":
        return _hf_adafactor_scratch(groups)
    model = MODELS[optimizer]
    if impl == "foreach":
        return model.foreach_copies * sum(g.nbytes for g in groups)
    if impl == "for-loop":
        return model.loop_copies * max(g.numel * g.bytes_per_element for g in groups)
    return 0  # fused kernels (and bitsandbytes') update in place


def optimizer_bytes_touched(groups: tuple[TensorGroup, ...], optimizer: Optimizer, impl: OptimizerImpl,
                            step_on_device: bool) -> int:
    """Bytes the optimizer step moves through memory: each parameter read and written and its gradient
    read (3 passes at the weights' width), every state read and written, and under foreach each copy of
    the trainable tensors written and read back (AdamW: 3 + 2 x 2 = 7 passes, 9 with foreach)."""
    trainable = sum(g.nbytes for g in groups)
    moved = 3 * trainable + 2 * optimizer_state_bytes(groups, optimizer, step_on_device)
    if impl == "foreach" and optimizer != "adafactor":
        moved += 2 * MODELS[optimizer].foreach_copies * trainable
    return moved

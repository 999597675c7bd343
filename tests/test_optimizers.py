"""Optimizer state and step scratch (`lora_planner.optimizers`): by hand on small tensor groups, then
against the live-tensor tracker on real `torch.optim` / transformers optimizers."""

from __future__ import annotations

import pytest

from lora_planner.names import PLANNER_OPTIMIZERS
from lora_planner.optimizers import (
    MODELS, TensorGroup, optimizer_bytes_touched, optimizer_scratch_bytes, optimizer_state_bytes,
)
from lora_planner.specs import OPTIMIZERS

MATRIX = TensorGroup((64, 128), count=3, bytes_per_element=2)  # 8192 elements each, bf16
VECTOR = TensorGroup((64,), count=2, bytes_per_element=2)
SMALL = TensorGroup((16, 16), count=1, bytes_per_element=4)  # below bitsandbytes' 4096-element threshold
GROUPS = (MATRIX, VECTOR)
T = 3 * 8192 * 2 + 2 * 64 * 2  # trainable bytes
EIGHT_BIT_2 = 3 * 2 * (8192 + 32 * 4) + 2 * 2 * 64 * 4  # two uint8 states + absmax; vectors keep fp32 states


def test_every_planner_optimizer_is_modelled():
    assert set(MODELS) == set(PLANNER_OPTIMIZERS) == set(OPTIMIZERS)


@pytest.mark.parametrize("optimizer, step_on_device, expected", [
    ("adamw", False, 2 * T),
    ("adamw", True, 2 * T + 4 * 5),  # one fp32 `step` per tensor
    ("sgd", True, 0),  # torch's default and the Trainer's: momentum 0 keeps no state
    ("sgd_momentum", True, T),
    ("adagrad", False, T),
    ("adagrad", True, T + 4 * 5),
    ("rmsprop", True, T + 4 * 5),
    # torch's Adafactor: row + column second moments (bf16 like the weights) for matrices, a full one for vectors.
    ("torch_adafactor", False, 3 * (64 + 128) * 2 + 2 * 64 * 2),
    # transformers' Adafactor: the same moments in fp32, and a 4-byte `RMS` tensor per parameter, always.
    ("adafactor", False, 3 * (64 + 128) * 4 + 2 * 64 * 4 + 4 * 5),
    ("adamw8bit", True, EIGHT_BIT_2),
    ("paged_adamw8bit", False, EIGHT_BIT_2),
    ("paged_adamw32bit", True, 2 * (3 * 8192 + 2 * 64) * 4),  # fp32 states whatever the weights
    ("lion8bit", False, EIGHT_BIT_2 // 2),
    ("paged_lion32bit", False, (3 * 8192 + 2 * 64) * 4),
    ("rmsprop8bit", False, EIGHT_BIT_2 // 2),
    ("rmsprop32bit", False, (3 * 8192 + 2 * 64) * 4),
    ("ademamix8bit", False, 3 * EIGHT_BIT_2 // 2),  # m1, m2 (one double buffer) and nu
    ("paged_ademamix32bit", False, 3 * (3 * 8192 + 2 * 64) * 4),
])
def test_state_bytes(optimizer, step_on_device, expected):
    assert optimizer_state_bytes(GROUPS, optimizer, step_on_device) == expected


def test_small_tensors_keep_fp32_states_in_8bit_adam():
    assert optimizer_state_bytes((SMALL,), "adamw8bit", False) == 2 * 256 * 4


def test_trainer_keeps_embedding_states_in_32_bit_under_8bit_optimizers():
    embedding = TensorGroup((1000, 64), count=1, bytes_per_element=2, embedding=True)
    assert optimizer_state_bytes((embedding,), "adamw8bit", False) == 2 * 64_000 * 4
    assert optimizer_state_bytes((embedding,), "adamw", False) == 2 * 64_000 * 2  # torch: the weights' dtype


@pytest.mark.parametrize("optimizer, impl, expected", [
    ("adamw", "foreach", T),  # one copy of every trainable tensor
    ("adamw", "for-loop", 2 * 8192 * 2),  # two copies of the largest tensor
    ("adamw", "fused", 0),
    ("adagrad", "foreach", 2 * T),  # _foreach_sqrt, then an out-of-place _foreach_add
    ("adagrad", "for-loop", 8192 * 2),
    ("rmsprop", "foreach", T),
    ("rmsprop", "for-loop", 8192 * 2),
    ("torch_adafactor", "foreach", T),
    ("torch_adafactor", "for-loop", 8192 * 2),  # row_var @ col_var
    # transformers' Adafactor on bf16 weights: fp32 gradient, fp32 weight, grad**2 + eps and the factored estimate,
    # beside its fp32 row (64) and column (128) factors.
    ("adafactor", "for-loop", 4 * 8192 * 4 + (64 + 128) * 4),
    ("sgd", "foreach", 0),
    ("sgd_momentum", "foreach", 0),
    ("adamw8bit", "fused", 0),
])
def test_scratch_bytes(optimizer, impl, expected):
    assert optimizer_scratch_bytes(GROUPS, optimizer, impl) == expected


def test_transformers_adafactor_on_fp32_weights_copies_nothing_but_the_update():
    fp32 = TensorGroup((64, 128), count=1, bytes_per_element=4)
    assert optimizer_scratch_bytes((fp32,), "adafactor", "for-loop") == 2 * 8192 * 4 + (64 + 128) * 4


def test_no_trainable_tensors_no_scratch():
    assert optimizer_scratch_bytes((), "adamw", "foreach") == 0


@pytest.mark.parametrize("optimizer, impl, passes", [
    ("adamw", "fused", 7),  # parameter r/w, gradient r, two states r/w
    ("adamw", "foreach", 9),  # + the square-root copy written and read
    ("sgd_momentum", "fused", 5),
    ("sgd", "fused", 3),
])
def test_bytes_touched_by_the_step(optimizer, impl, passes):
    groups = (TensorGroup((64, 128), count=1, bytes_per_element=2),)
    assert optimizer_bytes_touched(groups, optimizer, impl, step_on_device=False) == passes * 8192 * 2


# ---------------------------------------------------------------------------------------------- measured

torch = pytest.importorskip("torch")

# A small tensor first, the largest after it: the for-loop implementations keep the previous tensor's
# temporaries alive into the next one (module docstring), so a small predecessor keeps that tiny.
SHAPES = ((64,), (64, 128), (32,), (32, 64))
MEASURED = [("adamw", impls := ("foreach", "for-loop", "fused")), ("sgd", impls), ("sgd_momentum", impls),
            ("adagrad", impls), ("rmsprop", ("foreach", "for-loop")), ("torch_adafactor", ("foreach", "for-loop")),
            ("adafactor", ("for-loop",))]


def _measure(optimizer: str, impl: str, dtype) -> tuple[int, int]:
    """(optimizer state bytes, scratch bytes) of a steady-state step, from the live-tensor tracker."""
    from lora_planner.profiler.runner import build_optimizer
    from lora_planner.profiler.tracker import measure_training_step
    from lora_planner.specs import TrainingSpec

    model = torch.nn.Module()
    model.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in SHAPES])
    training = TrainingSpec(optimizer=optimizer, optimizer_impl=None if optimizer == "adafactor" else impl,
                            device="cpu")
    opt = build_optimizer(model, training)
    result = measure_training_step(model, dict, opt, steps=2,
                                   loss_fn=lambda m, _: sum((p * 1.5).sum() for p in m.ps))
    peak = result.steps[-1].phase("optimizer_step").peak_breakdown
    return peak["optimizer_states"], peak["temporaries"]


@pytest.mark.parametrize("optimizer, impl", [(o, i) for o, impls_ in MEASURED for i in impls_])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_model_matches_the_tracker(optimizer, impl, dtype_name):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    e = 4 if dtype_name == "fp32" else 2
    groups = tuple(TensorGroup(s, 1, e) for s in SHAPES)
    states, scratch = _measure(optimizer, impl, dtype)
    assert states == optimizer_state_bytes(groups, optimizer, step_on_device=True)  # CPU: `step` is on the device
    predicted = optimizer_scratch_bytes(groups, optimizer, impl)
    # Exact up to the small tensors' temporaries: the 64-element predecessor's (at most 3 fp32 copies) and
    # torch's Adafactor's row / column norms (the planner counts full-size temporaries only; transformers'
    # Adafactor's row and column factors are counted).
    assert 0 <= scratch - predicted <= 1536, (scratch, predicted)

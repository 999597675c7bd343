"""Optimizer state and step scratch (`lora_planner.optimizers`), by hand on small tensor groups."""

from __future__ import annotations

import pytest

from lora_planner.optimizers import TensorGroup, optimizer_scratch_bytes, optimizer_state_bytes

MATRIX = TensorGroup((64, 128), count=3, bytes_per_element=2)  # 8192 elements each, bf16
VECTOR = TensorGroup((64,), count=2, bytes_per_element=2)
SMALL = TensorGroup((16, 16), count=1, bytes_per_element=4)  # below bitsandbytes' 4096-element threshold
GROUPS = (MATRIX, VECTOR)


@pytest.mark.parametrize("optimizer, step_on_device, expected", [
    ("adamw", False, 2 * (3 * 8192 * 2 + 2 * 64 * 2)),
    ("adamw", True, 2 * (3 * 8192 * 2 + 2 * 64 * 2) + 4 * 5),  # one fp32 `step` per tensor
    ("sgd", False, 3 * 8192 * 2 + 2 * 64 * 2),
    # 8-bit: uint8 m and v + one fp32 absmax per 256 values; tensors under 4096 elements keep fp32 states.
    ("adamw8bit", False, 3 * 2 * (8192 + 32 * 4) + 2 * 2 * 64 * 4),
    ("paged_adamw8bit", False, 3 * 2 * (8192 + 32 * 4) + 2 * 2 * 64 * 4),
    # Adafactor: row + column second moments for matrices, a full one for vectors.
    ("adafactor", False, 3 * (64 + 128) * 2 + 2 * 64 * 2),
])
def test_state_bytes(optimizer, step_on_device, expected):
    assert optimizer_state_bytes(GROUPS, optimizer, step_on_device) == expected


def test_small_tensors_keep_fp32_states_in_8bit_adam():
    assert optimizer_state_bytes((SMALL,), "adamw8bit", False) == 2 * 256 * 4


@pytest.mark.parametrize("optimizer, impl, expected", [
    ("adamw", "foreach", 3 * 8192 * 2 + 2 * 64 * 2),  # one copy of every trainable tensor
    ("adamw", "for-loop", 2 * 8192 * 2),  # two copies of the largest tensor
    ("adamw", "fused", 0),
    ("adafactor", "foreach", 2 * 8192 * 2),
    ("sgd", "foreach", 0),
    ("adamw8bit", "foreach", 0),
])
def test_scratch_bytes(optimizer, impl, expected):
    assert optimizer_scratch_bytes(GROUPS, optimizer, impl) == expected


def test_no_trainable_tensors_no_scratch():
    assert optimizer_scratch_bytes((), "adamw", "foreach") == 0

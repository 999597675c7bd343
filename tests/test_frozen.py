"""`frozen_spec`: the same equality, hashing, validation and copies as `@dataclass(frozen=True)` and
`dataclasses.replace`, with the hash computed once."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.errors import PlannerInputError
from lora_planner.frozen import frozen_spec
from lora_planner.specs import GrpoSpec, LoraSpec, TrainingSpec

ROOT = Path(__file__).resolve().parents[1]


@frozen_spec
class Point:
    x: int
    y: tuple = ()


def field_values(spec) -> tuple:
    return tuple(getattr(spec, f.name) for f in dataclasses.fields(spec))


CHANGES = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["full", "lora", "qlora"]), "batch_size": st.integers(1, 64),
    "seq_len": st.integers(1, 9000), "grad_checkpointing": st.booleans(), "dtype": st.sampled_from(["bf16", "fp16"]),
    "optimizer": st.sampled_from(["adamw", "adamw_torch", "paged_adamw_8bit", "sgd"]),
    "attention": st.sampled_from(["sdpa", "eager"]), "lora": st.builds(LoraSpec, r=st.integers(1, 512))})


@settings(max_examples=150, deadline=None)
@given(CHANGES)
def test_evolve_is_replace(changes):
    """`evolve` gives what `dataclasses.replace` gives (Hugging Face spellings normalised too), equal and with the
    same hash; a spec equals another exactly when their fields do."""
    base = TrainingSpec()
    evolved, replaced = base.evolve(**changes), dataclasses.replace(base, **changes)
    assert evolved == replaced and hash(evolved) == hash(replaced)
    assert field_values(evolved) == field_values(replaced)
    assert (evolved == base) == (field_values(evolved) == field_values(base))


def test_evolve_validates_and_refuses_unknown_fields():
    with pytest.raises(PlannerInputError, match="batch_size"):
        TrainingSpec().evolve(batch_size=0)
    with pytest.raises(PlannerInputError, match="QLoRA computes in 16-bit"):
        TrainingSpec(dtype="fp32", method="lora").evolve(method="qlora")
    with pytest.raises(TypeError, match="no field batch"):
        TrainingSpec().evolve(batch=2)
    with pytest.raises(PlannerInputError, match="num_generations"):
        GrpoSpec().evolve(num_generations=0)


def test_equality_and_hash_by_hand():
    assert Point(1) == Point(1) and hash(Point(1)) == hash(Point(1)) and Point(1) != Point(2)
    assert Point(1) != (1, ()) and Point(1, (2,)) == Point(1, (2,))
    assert {Point(1): "a"}[Point(1)] == "a"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Point(1).x = 2  # still frozen
    unhashable = Point(1, [2])  # (built, compared, but not hashed: as a frozen dataclass)
    assert unhashable == Point(1, [2])
    with pytest.raises(TypeError, match="unhashable"):
        hash(unhashable)


def test_copies_and_pickles():
    spec = TrainingSpec(batch_size=3, lora=LoraSpec(r=16, target_modules=("q_proj",)))
    for other in (copy.copy(spec), copy.deepcopy(spec), pickle.loads(pickle.dumps(spec))):
        assert other == spec and hash(other) == hash(spec) and other is not spec
    assert "_hash" not in spec.__getstate__()


def test_a_pickle_hashes_in_another_process():
    """String hashes differ from one process to the next: an unpickled spec computes its own again."""
    blob = pickle.dumps({TrainingSpec(optimizer="sgd"): 1})
    code = ("import pickle, sys; from lora_planner.specs import TrainingSpec; "
            "d = pickle.loads(sys.stdin.buffer.read()); assert d[TrainingSpec(optimizer='sgd')] == 1")
    subprocess.run([sys.executable, "-c", code], input=blob, check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONHASHSEED": "123"})

"""Frozen, validated dataclasses that searches hash, compare and copy thousands of times a second.

The planner's inputs (`ModelSpec`, `LoraSpec`, `GrpoSpec`, `TrainingSpec`) key every cache it has (the estimate's LRU,
the parameter counts', the step's), and the searches (`recommend`, the web page's sweeps) build a new `TrainingSpec`
for each point they try. A plain `@dataclass(frozen=True)` makes each of those cost more than it must:

- its `__hash__` hashes a fresh tuple of every field at each lookup (`TrainingSpec` has 45; `ModelSpec` ~40, some of
  them tuples), and `__eq__` builds two such tuples;
- `dataclasses.replace` goes through `__init__`, whose frozen `object.__setattr__` per field costs more than the
  validation it runs.

`frozen_spec` is `@dataclass(frozen=True)` with the same semantics and three changes:

- the field tuple and its hash are computed once per object, when its `__post_init__` (validation, normalisation)
  has run, and stored in it (`hash(spec)` reads it back); they are left out of pickles and copies and computed
  again on loading (string hashes differ between processes);
- `__eq__` compares the hashes first, then the field tuples: what the generated `__eq__` answers;
- `spec.evolve(**changes)` is `dataclasses.replace(spec, **changes)` without `__init__`: the fields copied, the
  changed ones set, `__post_init__` run (so every change is validated and normalised exactly as a constructed spec
  is). An unknown field raises `TypeError`, as `replace` does.

Known limitations: `vars(spec)` / `spec.__dict__` holds the two cached entries (`_key`, `_hash`) besides the
fields: read the fields with `dataclasses.fields` / `asdict`. `evolve` supports no `InitVar` or `init=False` field
(the specs have none; `frozen_spec` checks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")
_CACHED = ("_key", "_hash")


def frozen_spec(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True)` with a precomputed hash and field tuple, and `evolve` (see the module docstring)."""
    post_init = getattr(cls, "__post_init__", None)

    def __post_init__(self: Any) -> None:
        if post_init is not None:
            post_init(self)
        _seal(self)

    __post_init__.__doc__ = post_init.__doc__ if post_init is not None else None
    cls.__post_init__ = __post_init__  # (before the dataclass is made: its __init__ calls it only if it exists)
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    if any(not f.init for f in fields):
        raise TypeError(f"{cls.__name__}: frozen_spec fields must all be init fields")
    names = tuple(f.name for f in fields)
    name_set = frozenset(names)

    def _seal(self: Any) -> None:
        d = self.__dict__
        key = d["_key"] = tuple([d[n] for n in names])  # (direct writes: the instance is frozen)
        try:
            d["_hash"] = hash(key)
        except TypeError:  # an unhashable field value (e.g. a list): hash() raises TypeError, as it did
            d["_hash"] = None

    def __hash__(self: Any) -> int:
        h = self._hash
        if h is None:
            raise TypeError(f"unhashable {cls.__name__}: a field holds an unhashable value")
        return h

    def __eq__(self: Any, other: Any) -> bool:
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        a, b = self.__dict__, other.__dict__
        return a["_hash"] == b["_hash"] and a["_key"] == b["_key"]

    def __getstate__(self: Any) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _CACHED}

    def __setstate__(self: Any, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _seal(self)  # (string hashes differ from one process to the next)

    def evolve(self: T, **changes: Any) -> T:
        unknown = changes.keys() - name_set
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        new = object.__new__(cls)
        d, old = new.__dict__, self.__dict__
        for n in names:
            d[n] = old[n]
        d.update(changes)
        new.__post_init__()
        return new

    cls.__hash__ = __hash__
    cls.__eq__ = __eq__
    cls.__getstate__ = __getstate__
    cls.__setstate__ = __setstate__
    cls.evolve = evolve
    return cls

"""What every reader of `--from` shares: checked field access that fails in one line naming the file and the key,
and `Collected`, which records each option a file sets together with the key that set it (the smallest edit to fit,
`lora_planner.fit_edit`, writes its diff in those keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_planner.errors import PlannerInputError

# torch / transformers / framework spellings of a dtype -> the planner's
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
               "fp32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32",
               "half": "fp16", "float": "fp32"}
MISSING = object()


def bad(path: str, key: str, what: str, value: Any) -> PlannerInputError:
    return PlannerInputError("from", f"{path}: {key} must be {what}, got {value!r}", f"fix {key} in the file")


def typed(path: str, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` when it is a `kind` (a bool is no number here), else one line naming the file and the key."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise bad(path, key, what, value)
    return value


def positive(path: str, key: str, value: Any) -> int:
    if typed(path, key, value, int, "a positive integer") < 1:
        raise bad(path, key, "a positive integer", value)
    return value


def flag(path: str, key: str, value: Any) -> bool:
    return typed(path, key, value, bool, "true or false")


def names(path: str, key: str, value: Any) -> str:
    """A list of module names (or one name, or a comma list) as the CLI's comma list."""
    items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise bad(path, key, "a module name or a list of them", value)
    return ",".join(items)


def mapping(path: str, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return typed(path, key, value, dict, "a mapping")


def dtype(path: str, key: str, value: Any) -> str | None:
    """A dtype spelling -> bf16 | fp16 | fp32; "auto" (the checkpoint's) -> None."""
    if value in (None, "auto"):
        return None
    if not isinstance(value, str) or value.strip().lower() not in DTYPE_NAMES:
        raise bad(path, key, "bfloat16, float16, float32 or auto", value)
    return DTYPE_NAMES[value.strip().lower()]


def index_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the CLI's spelling of token ids and layer indices)."""
    out: list[str] = []
    for i in sorted(set(ids)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def int_list(path: str, key: str, value: Any) -> list[int]:
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in items):
        raise bad(path, key, "an index or a list of indices", value)
    return items


def get(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """`data["a"]["b"]` for "a.b"; `default` where a level is missing or not a mapping."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class Collected:
    """A reader's result as it is built: option (argparse dest) -> value, the file key that said it, and the
    memory-relevant fields left out."""

    path: str
    settings: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stack: str | None = None  # the framework preset that fills what the file does not say

    def set(self, dest: str, key: str, value: Any) -> None:
        self.settings[dest] = value
        self.keys[dest] = key

    def note(self, text: str) -> None:
        self.notes.append(text)

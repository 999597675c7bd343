"""The smallest edit to the user's own config that makes the plan fit (pure; issue 14).

When `--from` files plan a step that does not fit the GPU, this searches the levers the recommender uses
(`lora_planner.recommend`), each applied to the user's settings rather than to a default, and keeps every other
choice they made (model, method, rank, targets, dtype, attention, strategy):

| lever               | what changes                                              | weight |
|---------------------|-----------------------------------------------------------|-------:|
| checkpointing       | gradient checkpointing on (about a third more compute)    | 2      |
| Liger               | Liger's kernels and fused linear cross-entropy            | 1      |
| 8-bit optimizer     | a 32-bit AdamW -> bitsandbytes' AdamW8bit                 | 2      |
| micro-batch         | the micro-batch halved, gradient accumulation doubled: the same global batch | 1 per halving |
| optimizer offload   | DeepSpeed's offload_optimizer to the CPU (DeepSpeed strategies only) | 3 |
| 4-bit base          | LoRA -> QLoRA (NF4, double quantization)                  | 4      |
| sequence length     | halved (changes the data: the last resort)                | 5 per halving |

Candidates are planned in order of total weight (then fewer levers); the first that fits is the answer, so the edit
is the least disruptive one under these weights. Each change is written in the key of the file that set the
option (`FileSettings.keys`), else in the first file whose framework can say it (each reader's `EDITS`), else as
the command-line flag. The peak is the planner's (`estimate_memory`), on the same device overhead and headroom.

Known limitations: the weights are a judgement, not a measurement; levers a framework cannot express are still
offered, as flags; one method at a time; `full` is never turned into LoRA (that is the method the user chose).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product
from math import ceil
from typing import Any, Callable

from lora_planner.errors import PlannerInputError
from lora_planner.memory import DeviceOverhead, estimate_memory
from lora_planner.specs import STRATEGY_ALIASES, ModelSpec, TrainingSpec

MAX_PLANS = 400  # candidates planned at most (each is one `estimate_memory`): the answer stays instant
MAX_SEQ_HALVINGS = 3
# 32-bit optimizer -> its bitsandbytes 8-bit twin (the planner's names; `FILE_VALUE` has the Trainer's spellings)
EIGHT_BIT = {"adamw": "adamw8bit", "paged_adamw32bit": "paged_adamw8bit", "lion32bit": "lion8bit",
             "paged_lion32bit": "paged_lion8bit", "ademamix32bit": "ademamix8bit"}


@dataclass(frozen=True)
class Lever:
    name: str
    weight: int
    applies: Callable[[TrainingSpec], bool]
    apply: Callable[[TrainingSpec], TrainingSpec]


LEVERS: tuple[Lever, ...] = (
    Lever("checkpointing", 2, lambda t: not t.grad_checkpointing, lambda t: replace(t, grad_checkpointing=True)),
    Lever("Liger", 1, lambda t: not t.liger and t.loss in ("hf", "trl"), lambda t: replace(t, liger=True)),
    Lever("8-bit optimizer", 2, lambda t: t.optimizer in EIGHT_BIT,
          lambda t: replace(t, optimizer=EIGHT_BIT[t.optimizer], optimizer_impl=None)),
    Lever("optimizer offload", 3,
          lambda t: t.offload == "none" and STRATEGY_ALIASES.get(t.strategy, t.strategy or "").startswith("deepspeed"),
          lambda t: replace(t, offload="optimizer")),
    Lever("4-bit base", 4, lambda t: t.method == "lora" and not t.load_in_8bit and not t.lora.use_dora,
          lambda t: replace(t, method="qlora")),
)
BATCH_WEIGHT, SEQ_WEIGHT = 1, 5


@dataclass(frozen=True)
class KeyChange:
    """One line of the diff: `file` None is the command line; `added` when the file does not have the key yet."""

    file: str | None
    key: str
    before: Any
    after: Any
    added: bool = False


@dataclass(frozen=True)
class FitEdit:
    method: str
    usable_bytes: int
    peak_before_bytes: int
    peak_after_bytes: int | None  # None: nothing within the levers fits
    levers: tuple[str, ...]
    changes: tuple[KeyChange, ...]
    global_batch: int | None  # sequences per GPU per optimizer step, kept by the micro-batch lever
    plans_tried: int

    @property
    def fits(self) -> bool:
        return self.peak_after_bytes is not None


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(ceil(out[-1] / 2))
    return out


def smallest_edit(spec: ModelSpec, training: TrainingSpec, usable_bytes: int, files: list,
                  overhead: DeviceOverhead | None = None, accumulation: int | None = None) -> FitEdit:
    """The least-weight combination of `LEVERS`, micro-batch and sequence halvings whose plan fits `usable_bytes`
    (module docstring); `files` are the `FileSettings` the settings came from, `accumulation` their gradient
    accumulation steps (None: not said)."""
    overhead = overhead or DeviceOverhead()
    before = estimate_memory(spec, training, overhead).peak_device_bytes
    levers = [lv for lv in LEVERS if lv.applies(training)]
    batches = _halvings(training.batch_size)
    seqs = [s for s in _halvings(training.seq_len)[:MAX_SEQ_HALVINGS + 1] if s >= 128] or [training.seq_len]
    candidates = []
    for mask in product((False, True), repeat=len(levers)):
        chosen = [lv for lv, on in zip(levers, mask) if on]
        for bi, batch in enumerate(batches):
            for si, seq in enumerate(seqs):
                weight = sum(lv.weight for lv in chosen) + BATCH_WEIGHT * bi + SEQ_WEIGHT * si
                count = len(chosen) + (bi > 0) + (si > 0)
                candidates.append((weight, count, bi, si, chosen, batch, seq))
    candidates.sort(key=lambda c: c[:4])
    tried = 0
    for weight, count, bi, si, chosen, batch, seq in candidates:
        if weight == 0:
            continue  # the plan as it is: it does not fit
        if tried >= MAX_PLANS:
            break
        t = replace(training, batch_size=batch, seq_len=seq)
        for lever in chosen:
            t = lever.apply(t)
        tried += 1
        try:
            peak = estimate_memory(spec, t, overhead).peak_device_bytes
        except PlannerInputError:
            continue  # a combination the planner refuses (e.g. Liger on a family it does not patch this way)
        if peak <= usable_bytes:
            names = tuple(lv.name for lv in chosen) + (("micro-batch",) if bi else ()) + (
                ("sequence length",) if si else ())
            new_accumulation = None if accumulation is None else ceil(training.batch_size * accumulation / batch)
            return FitEdit(training.method, usable_bytes, before, peak, names,
                           _changes(training, t, files, accumulation, new_accumulation),
                           training.batch_size * accumulation if accumulation else None, tried)
    return FitEdit(training.method, usable_bytes, before, None, (), (), None, tried)


# TrainingSpec field -> the CLI option (argparse dest) it comes from, and how a value is written on the command line
OPTION_OF = {"grad_checkpointing": "grad_checkpointing", "liger": "liger", "optimizer": "optimizer",
             "offload": "offload", "method": "method", "batch_size": "batch_size", "seq_len": "seq_len"}
FILE_VALUE = {"optimizer": {"adamw8bit": "adamw_8bit", "paged_adamw8bit": "paged_adamw_8bit", "lion8bit": "lion_8bit",
                           "paged_lion8bit": "paged_lion_8bit", "ademamix8bit": "ademamix_8bit"}}


def _changes(old: TrainingSpec, new: TrainingSpec, files: list, accumulation: int | None,
             new_accumulation: int | None) -> tuple[KeyChange, ...]:
    out: list[KeyChange] = []
    for field_, dest in OPTION_OF.items():
        before, after = getattr(old, field_), getattr(new, field_)
        if before == after:
            continue
        after = FILE_VALUE.get(field_, {}).get(after, after)
        out += _spelled(dest, before, after, files)
        if dest == "batch_size" and new_accumulation is not None and new_accumulation != accumulation:
            out += _spelled("grad_accumulation", accumulation, new_accumulation, files)
    return tuple(out)


def _spelled(dest: str, before: Any, after: Any, files: list) -> list[KeyChange]:
    """The option's change in the file that set it, else the first file whose framework can say it, else a flag."""
    from lora_planner.from_files import READERS
    from lora_planner.from_files.fields import MISSING, get

    readers = dict(READERS)
    setter = next((f for f in reversed(files) if dest in f.keys), None)
    for f in ([setter] if setter else []) + [f for f in files if f is not setter]:
        spell = getattr(readers[f.kind], "EDITS", {}).get(dest)
        if spell is None:
            continue
        lines = spell(after, f.data)
        if lines is None:
            continue
        return [KeyChange(f.path, key, None if get(f.data, key, MISSING) is MISSING else get(f.data, key), value,
                          added=get(f.data, key, MISSING) is MISSING) for key, value in lines]
    flag = "--" + dest.replace("_", "-")
    if dest == "grad_accumulation":
        return [KeyChange(None, "gradient_accumulation_steps", before, after, added=before is None)]
    return [KeyChange(None, flag, before, after)]

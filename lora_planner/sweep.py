"""Sweeps: a declarative TOML grid of profile runs, expanded and run one by one (`lora-plan sweep`).

A grid file names the models and, per block, the values of each axis; the runs are the cartesian
product of the axes in every block, deduplicated. Importing this module imports no torch: parsing
and expanding a grid is pure; `run_sweep` imports the profiler when it starts running.

```toml
name = "cpu_validation"                      # optional, defaults to the file name
description = "what this grid is for"        # optional

[models.tiny-llama]                          # a label, and where its config comes from:
config = { model_type = "llama", vocab_size = 1000, hidden_size = 64, ... }   # an inline config.json
[models.qwen]
catalog = "qwen2.5-0.5b"                     # or a catalog name, or path = "some/config.json"

[axes]                                       # defaults for every block (scalars mean one value)
mode = "cpu"
steps = 3

[[grid]]                                     # one or more blocks; each is a product of its axes
models = ["tiny-llama", "qwen"]              # or "*" for every model
method = ["full", "lora"]
precision = ["fp32", "bf16", "amp-bf16"]
grad_checkpointing = [false, true]
```

Axes (with their defaults): `backend` ["hf"] (hf | builtin), `mode` ["cpu"] (cpu | fake | cuda),
`method` ["full", "lora"] (| qlora: real bitsandbytes NF4, cpu or cuda mode, hf backend), `precision` ["bf16"]
(fp32 | bf16 | fp16 | amp-bf16 | amp-fp16: the weight dtype, or fp32 masters under autocast), `r` [8],
`alpha` [] (2r), `target` ["default"] (a target set: "default" = PEFT's default for the family,
"all-linear", "q_proj,v_proj" or ["q_proj", "v_proj"]), `adapter_dtype` ["fp32"], `batch_size` [1],
`seq_len` [512], `grad_checkpointing` [false], `optimizer` ["adamw"] (adamw | sgd | adafactor),
`optimizer_impl` ["default"] (PyTorch's default for the device, or foreach | for-loop | fused),
`attention` ["sdpa"], `experts_implementation` ["grouped_mm"] (MoE models: grouped_mm | eager), `loss` ["hf"]
(hf | chunked[:N], torchtune's chunked cross-entropy: hf backend only), `collate` ["full"] (full | padding |
packing: every row full, padded rows with an attention mask, or TRL's packed padding-free row: hf backend only),
`adapter` ["lora"] (lora | rslora | dora | bias:lora_only | bias:all | save:embed_tokens,lm_head | tokens:N |
tokens:embed_tokens=N+lm_head=N: PEFT's use_rslora, use_dora, bias, modules_to_save and trainable_token_indices on top
of the LoRA axes: hf backend only), `quant` ["none"] (none | int8 | int8-nokbit: LoRA on an LLM.int8 base, with or
without kbit preparation; with method qlora: nf4-nokbit | nf4-nodq | fp4 | nf4-fp32-compute, one bitsandbytes option
changed from the QLoRA recipe's; real bitsandbytes, hf backend, cpu or cuda mode); and the scalars `steps` (3) and
`seed` (0).

Rules: for `method = "full"` the adapter axes (r, alpha, target, adapter_dtype, adapter) do not apply, so
they collapse to one run; runs of the builtin backend on a family it does not implement (it has
llama, mistral, qwen2) are left out and reported as skipped, so one grid can cover every family on
both backends. Every other bad value (unknown key, a target a family lacks, r wider than a layer)
is a `PlannerInputError` naming the block and the key. A run's identity is the profiler's record key
(`ProfileRequest.key`): `--resume` skips keys already in the output file. The key holds the model's
label, not its config: give a changed inline config a new label.

Running: `--out` is checked before the first run (`files.check_output_file`); each record is appended
(and fsynced) the moment its run finishes, out-of-memory and failed runs are recorded (`status` "oom" /
"error") and the sweep goes on, Ctrl-C stops after the records already written (exit 130). A record that
cannot be appended after all (disk full, the file replaced meanwhile) is kept on stderr and in a fallback
file (`profiler.records.RecordWriter`), as are the later ones; the sweep goes on and exits 1.

Records of a sweep carry a `sweep` object (grid, model source, target set, precision, torch CPU threads)
and, for runs whose step was tracked, `measured.phases`: the steady-state step's peak and end-of-phase
bytes for forward, backward, optimizer_step and zero_grad.
"""

from __future__ import annotations

import itertools
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_planner.catalog import resolve_model
from lora_planner.config_reader import load_config_json, spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.files import check_output_file, read_user_text
from lora_planner.params import (
    check_sequence_length, lora_params, modules_to_save, resolve_targets, trainable_token_layers,
)
from lora_planner.specs import UNSLOTH_LOSSES, LoraSpec, ModelSpec, TrainingSpec, parse_loss

# The builtin backend's families (`profiler.builtin_model.BUILTIN_FAMILIES`; a test keeps them equal).
BUILTIN_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
BACKENDS: tuple[str, ...] = ("hf", "builtin")
MODES: tuple[str, ...] = ("cpu", "fake", "cuda")
PROFILED_METHODS: tuple[str, ...] = ("full", "lora", "qlora")
PROFILED_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adafactor")
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp32": ("fp32", None), "bf16": ("bf16", None), "fp16": ("fp16", None),
    "amp-bf16": ("fp32", "bf16"), "amp-fp16": ("fp32", "fp16"),
}
# Axis name -> default values. The order is the expansion order (later axes vary fastest).
AXES: dict[str, list[Any]] = {
    "backend": ["hf"], "mode": ["cpu"], "method": ["full", "lora"], "precision": ["bf16"], "r": [8],
    "alpha": [], "target": ["default"], "adapter_dtype": ["fp32"], "batch_size": [1], "seq_len": [512],
    "grad_checkpointing": [False], "optimizer": ["adamw"], "optimizer_impl": ["default"], "attention": ["sdpa"],
    "experts_implementation": ["grouped_mm"], "loss": ["hf"], "collate": ["full"], "adapter": ["lora"],
    "quant": ["none"],
}
# The `quant` axis: how the base is stored, by method: LoRA's at the precision or LLM.int8 (`load_in_8bit`) with or
# without kbit preparation; QLoRA's NF4 as its recipe loads it ("none") or one bitsandbytes option changed. A value
# of the other method collapses to "none".
QUANT_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {"int8": {"load_in_8bit": True}, "int8-nokbit": {"load_in_8bit": True, "kbit_prep": False}},
    "qlora": {"nf4-nokbit": {"kbit_prep": False}, "nf4-nodq": {"double_quant": False}, "fp4": {"quant_type": "fp4"},
              "nf4-fp32-compute": {"bnb_4bit_compute_dtype": "fp32"}},
}
QUANTS = ("none", *QUANT_OPTIONS["lora"], *QUANT_OPTIONS["qlora"])
# The `collate` axis: every row full (no mask), padded rows with an attention mask, or a packed padding-free row.
COLLATES = ("full", "padding", "packing")
# The `adapter` axis: PEFT's options on top of plain LoRA (`adapter_options`).
ADAPTERS = ("lora", "rslora", "dora", "bias:lora_only", "bias:all")
MODULES_TO_SAVE_PREFIX = "save:"
TOKENS_PREFIX = "tokens:"


def adapter_options(value: str) -> dict[str, Any]:
    """The `LoraSpec` fields an `adapter` axis value sets: "lora" none; "rslora" use_rslora; "dora" use_dora;
    "bias:lora_only" / "bias:all" PEFT's bias; "save:NAME,NAME" modules_to_save; "tokens:N" trainable_token_indices
    (PEFT's list form, token ids 0..N-1), "tokens:NAME=N+NAME=N" its dict form."""
    if value.startswith(TOKENS_PREFIX):
        parts = value[len(TOKENS_PREFIX):].split("+")
        pairs = [part.partition("=")[::2] if "=" in part else ("", part) for part in parts]
        try:
            return {"trainable_token_indices": tuple((name.strip(), tuple(range(int(count)))) for name, count in pairs)}
        except ValueError:
            raise PlannerInputError("adapter", f"cannot read {value!r}",
                                    'write e.g. "tokens:8" or "tokens:embed_tokens=8+lm_head=8"') from None
    if value.startswith(MODULES_TO_SAVE_PREFIX):
        return {"modules_to_save": tuple(n.strip() for n in value[len(MODULES_TO_SAVE_PREFIX):].split(","))}
    return {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "bias:lora_only": {"bias": "lora_only"}, "bias:all": {"bias": "all"}}[value]
SCALARS: dict[str, int] = {"steps": 3, "seed": 0}
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class SweepRun:
    """One profile run of a grid, before the profiler is imported (`to_request` builds the request)."""

    model: str  # the grid's label for the model (the record's `model`)
    spec: ModelSpec
    training: TrainingSpec
    backend: str
    mode: str
    steps: int
    seed: int
    source: dict[str, Any] = field(compare=False, hash=False)  # the record's `sweep` object

    def to_request(self):  # -> profiler.runner.ProfileRequest (imports torch)
        from lora_planner.profiler.runner import ProfileRequest

        return ProfileRequest(model=self.model, spec=self.spec, training=self.training, backend=self.backend,
                              mode=self.mode, steps=self.steps, seed=self.seed)

    @property
    def label(self) -> str:
        t = self.training
        adapter = f" r={t.lora.r} {self.source['target']}" if t.method != "full" else ""
        ckpt = " ckpt" if t.grad_checkpointing else ""
        experts = f" experts={t.experts_implementation}" if self.spec.is_moe else ""
        attention = f" {t.attention}" if t.attention != "sdpa" else ""
        loss = "" if t.loss == "hf" else f" loss={t.loss}:{t.loss_chunk_tokens}" if t.loss == "litgpt" else \
            f" loss={t.loss}:{t.loss_chunks}" if t.loss in ("chunked", "linear") or (
                t.loss in UNSLOTH_LOSSES and t.loss_target_gib is None) else \
            f" loss={t.loss}:{t.loss_target_gib:g}gb" if t.loss in UNSLOTH_LOSSES else f" loss={t.loss}"
        collate = " padded" if t.padding else " packed" if t.packing else ""
        if t.method != "full" and self.source.get("adapter", "lora") != "lora":
            adapter += f" {self.source['adapter']}"
        if self.source.get("quant", "none") != "none":  # (QLoRA's too)
            adapter += f" {self.source['quant']}"
        return (f"{self.model} {t.method}{adapter} {self.source['precision']} {self.backend}/{self.mode} "
                f"b={t.batch_size} s={t.seq_len}{ckpt}{experts}{loss}{collate}{attention}")


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    runs: tuple[SweepRun, ...]
    skipped: tuple[tuple[str, str], ...]  # (run label, why it is left out)
    path: str | None = None


# ---------------------------------------------------------------------------------------------- parsing


def _err(where: str, problem: str, fix: str) -> PlannerInputError:
    return PlannerInputError(f"grid {where}", problem, fix)


def _as_list(where: str, key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if key != "alpha" and not values:
        raise _err(where, f"{key} is an empty list", f"give {key} at least one value or leave it out")
    return values


def _check_values(where: str, key: str, values: list[Any]) -> None:
    def bad(problem: str, fix: str) -> PlannerInputError:
        return _err(where, f"{key}: {problem}", fix)

    for value in values:
        if key in ("r", "batch_size", "seq_len"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"must be positive integers, got {value!r}", f"write e.g. {key} = [1, 2]")
        elif key == "alpha":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise bad(f"must be positive numbers, got {value!r}", "write e.g. alpha = [16]")
        elif key == "grad_checkpointing":
            if not isinstance(value, bool):
                raise bad(f"must be true or false, got {value!r}", "write grad_checkpointing = [false, true]")
        elif key == "target":
            names = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else None
            if not names or any(not isinstance(n, str) or not n.strip() for n in names):
                raise bad(f"a target set is a name list or a comma string, got {value!r}",
                          'write e.g. target = ["default", "all-linear", "q_proj,v_proj"]')
        elif not isinstance(value, str):
            raise bad(f"must be strings, got {value!r}", f"write e.g. {key} = [{AXES[key][0]!r}]")
        choices = {"backend": BACKENDS, "mode": MODES, "method": PROFILED_METHODS, "precision": tuple(PRECISIONS),
                   "optimizer": PROFILED_OPTIMIZERS, "adapter_dtype": ("fp32", "base"), "attention": ("sdpa", "eager"),
                   "optimizer_impl": ("default", "foreach", "for-loop", "fused"),
                   "experts_implementation": ("grouped_mm", "eager"), "collate": COLLATES,
                   "adapter": None if str(value).startswith((MODULES_TO_SAVE_PREFIX, TOKENS_PREFIX)) else ADAPTERS,
                   }.get(key)
        if key == "loss":
            try:
                parse_loss(value)
            except PlannerInputError as err:
                raise bad(err.problem, 'write e.g. loss = ["hf", "chunked:8"]') from None
        if choices and value not in choices:
            extra = {"optimizer": " (8-bit AdamW needs bitsandbytes on CUDA)", "mode": " (auto is not allowed in a "
                     "grid: a run's key must not depend on the machine)"}.get(key, "")
            raise bad(f"unknown value {value!r}{extra}", f"use {', '.join(choices)}")


def _target_tuple(value: Any) -> tuple[str, ...] | None:
    names = value if isinstance(value, list) else str(value).split(",")
    names = tuple(n.strip() for n in names if n.strip())
    return None if names == ("default",) else names


def _target_label(value: Any) -> str:
    names = _target_tuple(value)
    return "default" if names is None else ",".join(names)


def _load_models(where: str, table: Any, base_dir: Path) -> dict[str, tuple[ModelSpec, dict[str, Any]]]:
    if not isinstance(table, dict) or not table:
        raise _err(where, "no [models] table", 'add e.g. [models.qwen] catalog = "qwen2.5-0.5b"')
    models: dict[str, tuple[ModelSpec, dict[str, Any]]] = {}
    for label, entry in table.items():
        at = f"{where} models.{label}"
        if isinstance(entry, str):
            entry = {"catalog": entry}
        if not isinstance(entry, dict) or len(set(entry) & {"catalog", "config", "path"}) != 1 or \
                set(entry) - {"catalog", "config", "path"}:
            dotted = isinstance(entry, dict) and entry and not set(entry) & {"catalog", "config", "path"}
            raise _err(at, "needs exactly one of catalog = NAME, config = {...} or path = FILE"
                           + (" (TOML reads dots in a bare key as nested tables)" if dotted else ""),
                       'quote a label with dots, "granite-3.3-8b" = "granite-3.3-8b-instruct"' if dotted else
                       'write e.g. catalog = "gpt2" or config = { model_type = "llama", ... }')
        for key in ("catalog", "path"):
            if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
                raise _err(at, f"{key} must be a non-empty string, got {entry[key]!r}"[:200],
                           f'write e.g. {key} = "{"gpt2" if key == "catalog" else "configs/model.json"}"')
        try:
            if "catalog" in entry:
                spec = resolve_model(str(entry["catalog"]))
                source = {"catalog": spec.name}
            elif "config" in entry:
                if not isinstance(entry["config"], dict):
                    raise _err(at, "config must be a table (an inline config.json)", "write config = { ... }")
                spec = spec_from_config(dict(entry["config"]), name=label)
                source = {"config": dict(entry["config"])}
            else:
                path = Path(entry["path"])
                spec = load_config_json(path if path.is_absolute() else base_dir / path)
                spec = replace(spec, name=label)
                source = {"path": str(entry["path"])}
        except PlannerInputError as err:
            if err.field.startswith("grid "):
                raise
            raise _err(at, f"{err.field}: {err.problem}", err.fix) from None
        models[label] = (spec, source)
    return models


def _block_axes(where: str, defaults: dict[str, Any],
                block: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, int]]:
    axes = {key: list(values) for key, values in AXES.items()}
    scalars = dict(SCALARS)
    for source in (defaults, block):
        for key, value in source.items():
            if key == "models":
                continue
            if key in SCALARS:
                if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "steps" else 0):
                    bound = ">= 1" if key == "steps" else ">= 0"
                    raise _err(where, f"{key} must be an integer {bound}, got {value!r}",
                               f"write e.g. {key} = {SCALARS[key]}")
                scalars[key] = value
                continue
            if key not in AXES:
                raise _err(where, f"unknown key {key!r}", f"axes are {', '.join(AXES)}; scalars {', '.join(SCALARS)}")
            values = _as_list(where, key, value)
            _check_values(where, key, values)
            axes[key] = values
    return axes, scalars


def parse_grid(text: str, name: str = "grid", base_dir: str | Path = ".", path: str | None = None) -> Grid:
    """Parse and expand a grid document (see the module docstring)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _err(name, f"is not valid TOML ({err})", "fix the file (https://toml.io)") from None
    unknown = set(doc) - {"name", "description", "models", "axes", "grid"}
    if unknown:
        raise _err(name, f"unknown top-level key(s) {', '.join(sorted(unknown))}",
                   "use name, description, [models.*], [axes] and [[grid]]")
    grid_name = str(doc.get("name") or name)
    models = _load_models(name, doc.get("models"), Path(base_dir))
    defaults = doc.get("axes", {})
    if not isinstance(defaults, dict) or "models" in defaults:
        raise _err(f"{name} [axes]", "must be a table of axis values (models belong in [[grid]])",
                   "write e.g. [axes] mode = \"cpu\"")
    blocks = doc.get("grid")
    if blocks is None:
        blocks = [{}]
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks) or not blocks:
        raise _err(name, "[[grid]] must be one or more tables", "write [[grid]] blocks with axis lists")

    runs: dict[SweepRun, None] = {}
    skipped: dict[tuple[str, str], None] = {}
    for index, block in enumerate(blocks):
        where = f"{name} grid[{index}]"
        axes, scalars = _block_axes(where, defaults, block)
        chosen = block.get("models", "*")
        labels = list(models) if chosen == "*" else _as_list(where, "models", chosen)
        for label in labels:
            if label not in models:
                raise _err(where, f"unknown model label {label!r}", f"define [models.{label}] or use one of "
                                                                     f"{', '.join(models)}")
            spec, source = models[label]
            for run in _expand_block(where, label, spec, source, axes, scalars, grid_name):
                if isinstance(run, SweepRun):
                    runs.setdefault(run, None)
                else:
                    skipped.setdefault(run, None)
    return Grid(name=grid_name, description=str(doc.get("description", "")), runs=tuple(runs),
                skipped=tuple(skipped), path=path)


def _expand_block(where: str, label: str, spec: ModelSpec, source: dict[str, Any], axes: dict[str, list[Any]],
                  scalars: dict[str, int], grid_name: str) -> Iterator[SweepRun | tuple[str, str]]:
    names = list(AXES)
    for combo in itertools.product(*(axes[n] or [None] for n in names)):
        v = dict(zip(names, combo))
        if v["method"] == "full":  # adapter axes do not apply: one run
            v.update(r=AXES["r"][0], alpha=None, target="default", adapter_dtype="fp32", adapter="lora")
        if v["quant"] not in QUANTS:
            raise _err(f"{where} model {label}", f"quant: unknown value {v['quant']!r}",
                       f"use one of {', '.join(QUANTS)}")
        if v["quant"] not in QUANT_OPTIONS.get(v["method"], {}):  # another method's option: one run
            v.update(quant="none")
        dtype, amp = PRECISIONS[v["precision"]]
        device = "cuda" if v["mode"] == "cuda" else "cpu"
        targets = _target_tuple(v["target"])
        try:
            lora = LoraSpec(r=v["r"], alpha=v["alpha"], target_modules=targets, adapter_dtype=v["adapter_dtype"],
                            **adapter_options(v["adapter"]))
            training = TrainingSpec(
                method=v["method"], dtype=dtype, amp=amp, optimizer=v["optimizer"],
                optimizer_impl=None if v["optimizer_impl"] == "default" else v["optimizer_impl"],
                batch_size=v["batch_size"], seq_len=v["seq_len"], grad_checkpointing=v["grad_checkpointing"],
                device=device, attention=v["attention"], lora=lora if v["method"] != "full" else LoraSpec(),
                experts_implementation=v["experts_implementation"], **parse_loss(v["loss"]),
                padding=v["collate"] == "padding", packing=v["collate"] == "packing",
                **QUANT_OPTIONS.get(v["method"], {}).get(v["quant"], {}))
            if training.method != "full":
                lora_params(spec, lora.r, targets)  # unknown targets, r wider than a layer
                modules_to_save(spec, lora.modules_to_save)  # a module the planner does not copy
                trainable_token_layers(spec, lora)  # a module it cannot wrap, a token past the vocabulary
            else:
                resolve_targets(spec, None)
            check_sequence_length(spec, training.seq_len)  # GPT-2's learned positions
        except PlannerInputError as err:
            raise _err(f"{where} model {label}", f"{err.field}: {err.problem}", err.fix) from None
        sweep = {"grid": grid_name, "model_source": source, "target": _target_label(v["target"]),
                 "precision": v["precision"], "adapter": v["adapter"], "quant": v["quant"]}
        run = SweepRun(model=label, spec=spec, training=training, backend=v["backend"], mode=v["mode"],
                       steps=scalars["steps"], seed=scalars["seed"], source=sweep)
        if training.quantized and (v["backend"] != "hf" or v["mode"] == "fake"):
            yield (run.label, "QLoRA and 8-bit bases run on real bitsandbytes weights: hf backend, cpu or cuda mode")
            continue
        if v["experts_implementation"] != "grouped_mm" and not spec.is_moe:
            yield (run.label, "experts_implementation applies to MoE models only")
            continue
        if v["experts_implementation"] == "eager" and v["mode"] == "fake":
            yield (run.label, "the eager experts loop's data-dependent nonzero cannot run under fake tensors")
            continue
        if training.loss == "linear" and v["mode"] == "fake":
            yield (run.label, "torchtune's linear cross-entropy's data-dependent nonzero cannot run under fake tensors")
            continue
        if training.loss in ("fused-linear", "cce", "trl"):
            yield (run.label, f"the {training.loss} loss is a Triton (CUDA) kernel the profiler does not run")
            continue
        if training.loss == "unsloth":
            yield (run.label, "Unsloth's compiled chunk allocates inside inductor's code, unseen by the tracker: "
                              "profile unsloth-eager")
            continue
        if v["loss"] != "hf" and v["backend"] != "hf":
            yield (run.label, "the chunked loss runs on the hf backend (the builtin model has no output layer apart)")
            continue
        if v["adapter"] != "lora" and v["backend"] != "hf":
            yield (run.label, "PEFT's rslora / dora / bias / modules_to_save / trainable tokens run on the hf backend")
            continue
        if v["collate"] != "full" and v["backend"] != "hf":
            yield (run.label, "padded and packed batches run on the hf backend (the builtin model takes no mask)")
            continue
        if v["backend"] == "builtin" and spec.family not in BUILTIN_FAMILIES:
            yield (run.label, f"the builtin backend implements {', '.join(BUILTIN_FAMILIES)} only, not {spec.family}")
            continue
        yield run


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    text = read_user_text(path, "grid", "pass a TOML grid file, e.g. experiments/grids/cpu_validation.toml")
    return parse_grid(text, name=path.stem, base_dir=path.parent, path=str(path))


# ---------------------------------------------------------------------------------------------- running


@dataclass
class SweepResult:
    planned: int  # runs in the grid
    already_done: int  # skipped by --resume
    finished: list[dict[str, Any]] = field(default_factory=list)  # records written by this call
    not_started: int = 0  # left by --limit or Ctrl-C
    interrupted: bool = False
    kept: int = 0  # records that could not be appended to --out (on stderr and in `fallback`)
    fallback: Path | None = None
    kept_summary: str | None = None  # one line saying where the kept records are

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.finished:
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        return counts


def _device_memory_now() -> dict[str, int]:
    """After a cuda run (its tensors freed, the allocator's cache kept): memory the process holds
    outside the caching allocator (CUDA context, libraries) = device used - reserved."""
    import torch

    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {"device_used_bytes": total - free, "reserved_now_bytes": reserved,
            "non_allocator_bytes": max(0, total - free - reserved)}


def _error_record(request: Any, err: PlannerInputError) -> dict[str, Any]:
    from lora_planner.profiler.runner import base_record

    record = base_record(request)
    record.update(status="error", error=f"PlannerInputError: {err}"[:500])
    return record


def run_sweep(grid: Grid, out: str | Path, *, resume: bool = False, limit: int | None = None,
              measure: Callable[[Any], Any] | None = None, console: Any = None) -> SweepResult:
    """Run the grid's runs not yet in `out` (with `resume`), at most `limit` of them, appending each
    record as it finishes. `measure` replaces the runner's measure function (tests inject failures)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lora_planner.profiler.progress import describe
    from lora_planner.profiler.records import RecordWriter, finished_keys, read_records
    from lora_planner.profiler.runner import run_profile

    console = console or Console()
    out = check_output_file(out, "out")  # before any run: a bad --out never costs a measurement
    if not resume:
        existing, _ = read_records(out)
        if existing:
            raise PlannerInputError("out", f"{out} already holds {len(existing)} record(s)",
                                    "pass --resume to continue that sweep (finished runs are skipped) or choose "
                                    "another --out")
    requests: dict[str, tuple[SweepRun, Any]] = {}
    for run in grid.runs:  # two spellings of one setting (for-loop vs PyTorch's cpu default) are one run
        request = run.to_request()
        requests.setdefault(request.key, (run, request))
    import torch

    if measure is None and any(run.mode == "cuda" for run, _ in requests.values()) and not torch.cuda.is_available():
        raise PlannerInputError("mode", f"grid {grid.name} has cuda runs and no CUDA GPU is visible",
                                "run it on a machine with a GPU, or use a grid with mode cpu or fake")
    threads = torch.get_num_threads()
    done = finished_keys(out) if resume else set()
    todo = [(run, request) for key, (run, request) in requests.items() if key not in done]
    result = SweepResult(planned=len(requests), already_done=len(requests) - len(todo))
    if limit is not None:
        result.not_started = max(0, len(todo) - limit)
        todo = todo[:limit]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    writer = RecordWriter(out)
    try:
        with progress:
            task = progress.add_task(f"sweep {grid.name}", total=len(todo))
            for run, request in todo:
                progress.update(task, description=f"{grid.name}: {run.label}")

                def show_step(event: Any, label: str = f"{grid.name}: {run.label}") -> None:
                    progress.update(task, description=f"{label}: {describe(event)}")

                try:
                    record = run_profile(request, measure, progress=show_step)
                except PlannerInputError as err:  # settings this backend cannot run: recorded, sweep goes on
                    record = _error_record(request, err)
                record["sweep"] = {**run.source, "torch_threads": threads}
                if record["status"] == "ok" and run.mode == "cuda" and measure is None:
                    record["measured"].update(_device_memory_now())
                writer.append(record)
                result.finished.append(record)
                progress.advance(task)
    except KeyboardInterrupt:
        result.interrupted = True
        result.not_started += len(todo) - len(result.finished)
    result.kept, result.fallback, result.kept_summary = writer.kept, writer.fallback, writer.summary()
    return result


def run_sweep_command(args: Any, console: Any = None) -> int:
    """`lora-plan sweep GRID --out runs.jsonl [--resume] [--limit N] [--dry-run]`."""
    grid = load_grid(args.grid)
    from rich.console import Console

    console = console or Console()
    reasons = sorted({reason for _, reason in grid.skipped})
    skipped = f"; {len(grid.skipped)} left out ({'; '.join(reasons)})" if grid.skipped else ""
    console.print(f"grid {grid.name}: {len(grid.runs)} run(s){skipped}")
    if args.dry_run:
        for run in grid.runs:
            console.print(f"  {run.label}", highlight=False)
        return 0
    try:
        import torch
    except ImportError as err:
        raise PlannerInputError("sweep", f"running a sweep needs torch ({err.name} is missing)",
                                'pip install torch==2.13.0 && pip install -e ".[profile]"') from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run_sweep(grid, args.out, resume=args.resume, limit=args.limit, console=console)
    if result.already_done:
        console.print(f"resume: {result.already_done} run(s) already in {args.out}, skipped")
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts().items())) or "nothing run"
    kept = f"; {result.kept} of them kept in {result.fallback} instead" if result.kept else ""
    console.print(f"{len(result.finished)} run(s) recorded in {args.out} ({counts}){kept}", highlight=False)
    if result.not_started:
        console.print(f"{result.not_started} run(s) not started: run again with --resume to continue")
    if result.kept_summary:
        print(f"lora-plan: {result.kept_summary}", file=sys.stderr)
    if result.interrupted:
        where = f"{args.out}" + (f" and {result.fallback}" if result.kept else "")
        console.print(f"interrupted: the {len(result.finished)} finished record(s) are in {where}", highlight=False)
        return EXIT_INTERRUPTED
    if result.kept:
        return 1
    return 0 if all(r["status"] != "error" for r in result.finished) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `lora-plan sweep GRID --out runs.jsonl`")

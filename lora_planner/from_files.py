"""`--from FILE`: the settings of a config the user already has, as the planner's options (pure; issue 14).

Two kinds of file are read so far, recognised by their keys:

- a PEFT adapter config (`adapter_config.json`, or a `LoraConfig` written out as JSON or YAML; peft 0.21.2
  `tuners/lora/config.py`): `r`, `lora_alpha`, `target_modules` (a list, or "all-linear"), `use_dora`, `use_rslora`,
  `modules_to_save`, `layers_to_transform`, `bias`, `target_parameters`, and `base_model_name_or_path` as the model;
- transformers' `TrainingArguments` or TRL's `SFTConfig` as JSON or YAML (transformers 5.24 `training_args.py`, TRL
  1.16 `trainer/sft_config.py`): `per_device_train_batch_size`, `gradient_checkpointing` and its
  `use_reentrant`, `optim`, `max_length` / `max_seq_length`, `packing` / `padding_free`, `use_liger_kernel`, and the
  model's dtype from `model_init_kwargs`.

A field that changes memory is either set (its option) or listed as not modelled, with why; fields that do not
change memory (learning rate, logging, output paths, ...) are ignored silently. Later files win over earlier ones;
the command line's flags win over every file (`lora_planner.cli`), and files over a `--stack` preset.

Known limitations: axolotl, LLaMA-Factory, torchtune and litgpt YAML, DeepSpeed and accelerate configs and a model's
`quantization_config` are not read yet (issue 14); YAML needs PyYAML (installed with the profile and test extras).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_planner.errors import PlannerInputError
from lora_planner.files import read_user_text

FileKind = Literal["peft", "training_args"]
# the keys that say what a file is (one is enough)
PEFT_KEYS = frozenset({"peft_type", "lora_alpha", "target_modules", "use_dora", "lora_dropout"})
TRAINING_KEYS = frozenset({"per_device_train_batch_size", "gradient_checkpointing", "optim", "output_dir",
                           "gradient_accumulation_steps", "max_length", "max_seq_length", "packing", "padding_free",
                           "use_liger_kernel", "learning_rate"})
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
               "fp32": "fp32"}


@dataclass(frozen=True)
class FileSettings:
    """What one file says: `settings` maps the CLI's option names (argparse dests) to values; `not_modelled` the
    memory-relevant fields the plan leaves out, each with why."""

    path: str
    kind: FileKind
    settings: dict[str, Any] = field(default_factory=dict)
    not_modelled: tuple[str, ...] = ()


def read_settings_file(path: str) -> FileSettings:
    """Parse `path` (JSON, or YAML by its extension) and map it (module docstring)."""
    text = read_user_text(path, "from", "pass a PEFT adapter_config.json or a TrainingArguments / SFTConfig JSON or "
                                        "YAML file")
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise PlannerInputError("from", f"{path}: expected a mapping of settings, got {type(data).__name__}",
                                "pass a PEFT adapter_config.json or a TrainingArguments / SFTConfig JSON or YAML")
    keys = set(data)
    if keys & PEFT_KEYS or data.get("peft_type") is not None:
        return _peft(path, data)
    if keys & TRAINING_KEYS:
        return _training(path, data)
    raise PlannerInputError("from", f"{path}: neither a PEFT adapter config nor training arguments (no key such as "
                                    "r / lora_alpha / target_modules or per_device_train_batch_size / optim)",
                            "pass an adapter_config.json or a TrainingArguments / SFTConfig file")


def _parse(path: str, text: str) -> Any:
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml  # lazily: only YAML files need it
        except ImportError:
            raise PlannerInputError("from", f"{path}: reading YAML needs PyYAML",
                                    "pip install pyyaml, or pass the settings as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise PlannerInputError("from", f"{path}: not valid YAML{where}", "fix the file's syntax") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PlannerInputError("from", f"{path}: not valid JSON at line {err.lineno}, column {err.colno} "
                                        f"({err.msg})", "fix the file's syntax (YAML files end in .yaml or .yml)") \
            from None


def _typed(path: str, key: str, value: Any, kind: type | tuple[type, ...], fix: str) -> Any:
    """`value` when it is a `kind` (a bool is no number here), else one line naming the file and the key."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise PlannerInputError("from", f"{path}: {key} must be {fix}, got {value!r}", f"fix {key} in the file")
    return value


def _names(path: str, key: str, value: Any) -> str:
    """A list of module names (or one name) as the CLI's comma list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise PlannerInputError("from", f"{path}: {key} must be a module name or a list of them, got {value!r}",
                                f"fix {key} in the file")
    return ",".join(items)


def _peft(path: str, data: dict[str, Any]) -> FileSettings:
    """PEFT's LoraConfig fields (module docstring)."""
    if data.get("peft_type") not in (None, "LORA"):
        raise PlannerInputError("from", f"{path}: peft_type {data['peft_type']!r} is not LoRA",
                                "pass a LoRA adapter config (peft_type LORA)")
    settings: dict[str, Any] = {}
    notes: list[str] = []
    if "r" in data:
        settings["r"] = _typed(path, "r", data["r"], int, "a positive integer")
    if data.get("lora_alpha") is not None:
        settings["alpha"] = float(_typed(path, "lora_alpha", data["lora_alpha"], (int, float), "a number"))
    targets = data.get("target_modules")
    if isinstance(targets, str) and targets not in ("all-linear",) and not targets.isidentifier():
        notes.append(f"target_modules {targets!r} (a regular expression: pass --target with the module names)")
    elif targets is not None:
        settings["target"] = _names(path, "target_modules", targets)
    if data.get("target_parameters"):
        settings["target_parameters"] = _names(path, "target_parameters", data["target_parameters"])
    for key, dest in (("use_dora", "use_dora"), ("use_rslora", "use_rslora")):
        if data.get(key) is not None:
            settings[dest] = _typed(path, key, data[key], bool, "true or false")
    if data.get("modules_to_save"):
        settings["modules_to_save"] = _names(path, "modules_to_save", data["modules_to_save"])
    layers = data.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise PlannerInputError("from", f"{path}: layers_to_transform must be a layer index or a list of them, "
                                            f"got {data['layers_to_transform']!r}",
                                    "fix layers_to_transform in the file")
        settings["layers_to_transform"] = ",".join(map(str, layers))
    if data.get("bias") is not None:
        settings["bias"] = data["bias"]
    if data.get("base_model_name_or_path"):
        settings["model"] = _typed(path, "base_model_name_or_path", data["base_model_name_or_path"], str, "a name")
    dropout = data.get("lora_dropout") or 0
    if dropout:
        notes.append(f"lora_dropout {dropout} (PEFT then keeps a dropout mask and a dropped copy of each adapted "
                     "input; planned without: under by those copies)")
    for key in ("rank_pattern", "alpha_pattern"):
        if data.get(key):
            notes.append(f"{key} (per-module ranks or alphas: planned at r / lora_alpha everywhere)")
    if data.get("trainable_token_indices"):
        notes.append("trainable_token_indices (not read from files yet: pass --trainable-token-indices)")
    return FileSettings(path, "peft", settings, tuple(notes))


def _training(path: str, data: dict[str, Any]) -> FileSettings:
    """transformers' TrainingArguments / TRL's SFTConfig fields (module docstring)."""
    settings: dict[str, Any] = {}
    notes: list[str] = []
    if data.get("per_device_train_batch_size") is not None:
        settings["batch_size"] = _typed(path, "per_device_train_batch_size", data["per_device_train_batch_size"],
                                        int, "a positive integer")
    if data.get("gradient_checkpointing") is not None:
        settings["grad_checkpointing"] = _typed(path, "gradient_checkpointing", data["gradient_checkpointing"], bool,
                                                "true or false")
    kwargs = data.get("gradient_checkpointing_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise PlannerInputError("from", f"{path}: gradient_checkpointing_kwargs must be a mapping, got {kwargs!r}",
                                "fix gradient_checkpointing_kwargs in the file")
    if kwargs.get("use_reentrant") is not None and settings.get("grad_checkpointing"):
        settings["use_reentrant"] = _typed(path, "gradient_checkpointing_kwargs.use_reentrant",
                                           kwargs["use_reentrant"], bool, "true or false")
    if data.get("optim"):
        settings["optimizer"] = _typed(path, "optim", data["optim"], str, "an optimizer name")
    for key in ("max_length", "max_seq_length"):
        if data.get(key) is not None:
            settings["seq_len"] = _typed(path, key, data[key], int, "a positive integer")
    if data.get("packing") or data.get("padding_free"):
        settings["packing"] = True
    if data.get("use_liger_kernel") is not None:
        settings["liger"] = _typed(path, "use_liger_kernel", data["use_liger_kernel"], bool, "true or false")
    init = data.get("model_init_kwargs") or {}
    dtype = init.get("dtype", init.get("torch_dtype")) if isinstance(init, dict) else None
    mixed = "bf16" if data.get("bf16") else "fp16" if data.get("fp16") else None
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        settings["dtype"] = DTYPE_NAMES[dtype]
        # autocast over fp32 weights; over 16-bit ones it changes nothing: the dtype and autocast come together
        settings["amp"] = mixed if settings["dtype"] == "fp32" else None
    elif mixed:
        notes.append(f"{mixed}=true (mixed precision over the dtype the model is loaded in, which the file does not "
                     "say: planned at --dtype; pass --dtype fp32 --amp bf16 for an fp32 model)")
    if data.get("torch_compile"):
        notes.append("torch_compile (compiled graphs keep other tensors: planned eager)")
    if data.get("deepspeed"):
        notes.append("deepspeed (its JSON is not read yet: pass --strategy / --offload)")
    if data.get("fsdp"):
        notes.append("fsdp (not read yet: pass --gpus and --strategy fsdp)")
    return FileSettings(path, "training_args", settings, tuple(notes))


def merge_files(files: list[FileSettings]) -> dict[str, Any]:
    """Every file's settings, later files winning."""
    merged: dict[str, Any] = {}
    for f in files:
        merged.update(f.settings)
    return merged


def files_note(files: list[FileSettings], applied: list[str]) -> str:
    """The plan's note: which files, what they set (after the command line won), what they leave out."""
    names = ", ".join(f"{f.path} ({'PEFT adapter config' if f.kind == 'peft' else 'training arguments'})"
                      for f in files)
    text = f"from {names}: {', '.join(applied) or 'every setting given on the command line'}"
    left = [note for f in files for note in f.not_modelled]
    return text + ("; not modelled: " + "; ".join(left) if left else "")

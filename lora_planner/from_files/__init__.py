"""`--from FILE`: the settings of a config the user already has, as the planner's options (pure; issue 14).

A file's kind is recognised by its keys, one reader module each (the first that claims it wins, in `READERS`'
order); each maps its framework's field names to the CLI's options (argparse dests) and cites the source it read:

| kind             | module                         | what it is                                                 |
|------------------|--------------------------------|------------------------------------------------------------|
| `model_config`   | `from_files.model_config`      | config.json + quantization_config; BitsAndBytesConfig |
| `deepspeed`      | `from_files.deepspeed`         | a DeepSpeed JSON (ZeRO stage, offload, bucket sizes)       |
| `accelerate`     | `from_files.accelerate`        | an accelerate config YAML (processes, FSDP / DeepSpeed)    |
| `launcher`       | `from_files.launcher`          | a SkyPilot task / axolotl cloud config: the GPU and count  |
| `torchtune`      | `from_files.torchtune`         | a torchtune recipe YAML (`_component_` entries)            |
| `litgpt`         | `from_files.litgpt`            | a litgpt finetune YAML                                     |
| `axolotl`        | `from_files.axolotl`           | an axolotl YAML                                            |
| `llamafactory`   | `from_files.llamafactory`      | a LLaMA-Factory YAML                                       |
| `training_args`  | `from_files.training_args`     | transformers' TrainingArguments, TRL's SFTConfig / ...     |
| `peft`           | `from_files.peft`              | a PEFT adapter_config.json / LoraConfig                    |

A field that changes memory is either set (its option) or listed as not modelled, with why; fields that do not
change memory (learning rate, logging, output paths, datasets, ...) are ignored silently. A framework's file also
names its `--stack` preset (its defaults fill what the file does not say). Later files win over earlier ones; the
command line's flags win over every file (`lora_planner.cli`), and files over a `--stack` preset. Each setting
remembers the key that set it: the smallest edit to fit (`lora_planner.fit_edit`) is written in those keys.

Known limitations: YAML needs PyYAML (installed with the profile and test extras); a regular expression in
`target_modules` is listed, not expanded (pass `--target`); per-module ranks (`rank_pattern`) are planned at `r`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from lora_planner.errors import PlannerInputError
from lora_planner.files import read_user_text
from lora_planner.from_files import (
    accelerate, axolotl, deepspeed, launcher, litgpt, llamafactory, model_config, peft, torchtune, training_args,
)

FileKind = Literal["model_config", "deepspeed", "accelerate", "launcher", "torchtune", "litgpt", "axolotl",
                   "llamafactory", "peft", "training_args"]
# The order files are recognised in: the most specific keys first (an axolotl YAML has `lora_alpha` too).
READERS: tuple[tuple[FileKind, ModuleType], ...] = (
    ("model_config", model_config), ("deepspeed", deepspeed), ("accelerate", accelerate), ("launcher", launcher),
    ("torchtune", torchtune),
    ("litgpt", litgpt), ("axolotl", axolotl), ("llamafactory", llamafactory), ("training_args", training_args),
    ("peft", peft))
LABELS: dict[str, str] = {"model_config": "model config", "deepspeed": "DeepSpeed config",
                          "accelerate": "accelerate config", "launcher": "launcher config",
                          "torchtune": "torchtune recipe", "litgpt": "litgpt config",
                          "axolotl": "axolotl config", "llamafactory": "LLaMA-Factory config",
                          "peft": "PEFT adapter config", "training_args": "training arguments"}
KINDS_TEXT = ("a PEFT adapter_config.json, TrainingArguments / SFTConfig, an axolotl, LLaMA-Factory, torchtune or "
              "litgpt YAML, a DeepSpeed JSON, an accelerate config, a SkyPilot / axolotl cloud config or a model's "
              "config.json")


@dataclass(frozen=True)
class FileSettings:
    """What one file says: `settings` maps the CLI's option names (argparse dests) to values, `keys` each option
    to the file's key that set it; `not_modelled` the memory-relevant fields the plan leaves out, each with why;
    `stack` the framework preset that fills the rest; `data` the parsed file (the fit edit's "before")."""

    path: str
    kind: FileKind
    settings: dict[str, Any] = field(default_factory=dict)
    not_modelled: tuple[str, ...] = ()
    keys: dict[str, str] = field(default_factory=dict)
    stack: str | None = None
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def read_settings_file(path: str) -> FileSettings:
    """Parse `path` (JSON, or YAML by its extension), recognise its kind and map it (module docstring)."""
    data = load(path)
    if not isinstance(data, dict):
        raise PlannerInputError("from", f"{path}: expected a mapping of settings, got {type(data).__name__}",
                                f"pass {KINDS_TEXT}")
    for kind, reader in READERS:
        if reader.detect(data):
            got = reader.read(path, data)
            if "deepspeed" in data and kind in ("training_args", "axolotl", "llamafactory"):
                deepspeed.include(got, "deepspeed", data["deepspeed"])
            return FileSettings(path, kind, got.settings, tuple(got.notes), got.keys,
                                got.stack or getattr(reader, "STACK", None), data)
    raise PlannerInputError("from", f"{path}: not a config lora-plan reads (no key such as r / lora_alpha, "
                                    "per_device_train_batch_size, base_model, zero_optimization or model_type)",
                            f"pass {KINDS_TEXT}")


def load(path: str) -> Any:
    text = read_user_text(path, "from", f"pass {KINDS_TEXT}")
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


def merge_files(files: list[FileSettings]) -> dict[str, Any]:
    """Every file's settings, later files winning."""
    merged: dict[str, Any] = {}
    for f in files:
        merged.update(f.settings)
    return merged


def implied_stack(files: list[FileSettings]) -> str | None:
    """The preset of the last file that names one (an axolotl YAML: axolotl's schema defaults)."""
    return next((f.stack for f in reversed(files) if f.stack), None)


def files_note(files: list[FileSettings], applied: list[str]) -> str:
    """The plan's note: which files, what they set (after the command line won), what they leave out."""
    names = ", ".join(f"{f.path} ({f.label})" for f in files)
    text = f"from {names}: {', '.join(applied) or 'every setting given on the command line'}"
    left = [note for f in files for note in f.not_modelled]
    return text + ("; not modelled: " + "; ".join(left) if left else "")

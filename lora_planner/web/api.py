"""The web page's JSON API as plain functions (no web framework here; `lora_planner.web.app` routes to them).

A request's parameters are the CLI's options by their flag names without the dashes (`batch-size=4`,
`grad-checkpointing=1`, `method=full,lora`), so a page's URL, its API call and its "copy CLI command" are the same
settings: `argv_from_params` turns them into the argv `lora-plan` parses (`cli.parse_command`), and the answers are
the CLI's own `--json` documents (`cli.estimate_document`, `recommend_cli.recommend_document`), byte for byte.

- `plan(params, config=None)`: `lora-plan [estimate] ... --json`; `config` is an uploaded config.json (the model).
- `recommend(params, config=None)`: `lora-plan recommend ... --json`.
- `sweep(params, axis, values, config=None)`: the peak of every method as one option varies (r, batch-size,
  seq-len), with the GPU's usable memory: the page's "memory vs ..." charts.
- `models(query)`, `model_modules(params, config)`, `gpus()`: the catalogs and a model's module inventory (the
  target checkboxes).

Bad input raises `WebInputError` (`field`, `message`, `fix`), which the app answers with 400 and the page shows at the
field; options that read files on the server (`--from`, `--lengths`, `--calibration`, a config.json path as
`--model`) are refused: the page uploads files instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_planner.errors import PlannerInputError

TRUE = ("1", "true", "on", "yes")
FALSE = ("0", "false", "off", "no", "")
# Options that read the server's files, and the output switches the API sets itself
REFUSED = {"from": "upload the config instead", "lengths": "not available on the page",
           "calibration": "not available on the page", "routing": "not available on the page (balanced or worst)",
           "json": "the API always answers JSON", "detail": "the API always answers every phase",
           "verify": "run `lora-plan recommend --verify` (it trains)", "out": "not available on the page",
           "resume": "not available on the page"}
SWEEP_AXES = {"r": "r", "batch-size": "batch_size", "seq-len": "seq_len"}
MAX_SWEEP_POINTS = 16


class WebInputError(Exception):
    def __init__(self, field: str, message: str, fix: str = "") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.fix = field, message, fix

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Parsed:
    args: argparse.Namespace
    argv: list[str]


def _actions(command: str) -> dict[str, argparse.Action]:
    from lora_planner.cli_args import cached_parser

    parser = cached_parser(command)
    sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[command]  # noqa: SLF001
    return {opt[2:]: action for action in sub._actions for opt in action.option_strings  # noqa: SLF001
            if opt.startswith("--")}


def argv_from_params(command: str, params: Mapping[str, Any]) -> list[str]:
    """The CLI's argv for `params` (flag name without dashes -> value); a flag is on for 1 / true / on / yes."""
    actions = _actions(command)
    argv = [command]
    for name, value in params.items():
        if name in REFUSED:
            raise WebInputError(name, "not accepted by the web API", REFUSED[name])
        action = actions.get(name)
        if action is None or name in ("help", "version"):
            raise WebInputError(name, "unknown option", f"see `lora-plan {command} --help` for the options")
        text = "" if value is None else str(value).strip()
        if action.nargs == 0:  # a switch
            if text.lower() in TRUE:
                argv.append(f"--{name}")
            elif text.lower() not in FALSE:
                raise WebInputError(name, f"{text!r} is not on or off", "use 1 or 0")
            continue
        if text == "":
            continue  # an empty field: the option's default
        if name == "model" and (text.lower().endswith(".json") or text.startswith((".", "/", "~"))):
            raise WebInputError("model", "a path on the server", "upload the config.json instead")
        argv += [f"--{name}", text]
    return argv


def _parse(command: str, params: Mapping[str, Any]) -> Parsed:
    argv = argv_from_params(command, params)
    return Parsed(argparse.Namespace(**vars(_parse_argv(tuple(argv)))), argv)  # (a copy: callers annotate theirs)


@functools.lru_cache(maxsize=256)
def _parse_argv(argv: tuple[str, ...]) -> argparse.Namespace:
    """`cli.parse_command`, once per command line: a change of the page parses the same options for the plan and each
    sweep (what the API accepts reads no file, so the options alone decide the result; refusals are not cached)."""
    from lora_planner.cli import parse_command

    with _planner_errors(), contextlib.redirect_stderr(io.StringIO()):
        return parse_command(list(argv))


@contextlib.contextmanager
def _planner_errors():
    try:
        yield
    except PlannerInputError as err:
        raise WebInputError(err.field, err.problem, err.fix or "") from None
    except SystemExit:
        raise WebInputError("arguments", "cannot read these options", "see `lora-plan --help`") from None


def _spec(config: Mapping[str, Any] | None) -> Any:
    if config is None:
        return None
    from lora_planner.config_reader import spec_from_config

    if not isinstance(config, Mapping):
        raise WebInputError("config", "not a JSON object", "upload a model's config.json")
    with _planner_errors():
        return spec_from_config(dict(config), name=str(config.get("_name_or_path") or "uploaded config.json"))


def plan(params: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`lora-plan ... --json` for `params` (the document, and the command line that gives it)."""
    from lora_planner.cli import compute_estimate, estimate_document

    parsed = _parse("estimate", params)
    spec = _spec(config)
    with _planner_errors():
        doc = estimate_document(parsed.args, compute_estimate(parsed.args, spec))
    return {"plan": doc, "cli": cli_command(parsed.argv, config is not None)}


def recommend(params: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`lora-plan recommend ... --json` for `params`."""
    from lora_planner.recommend import recommend_for_objective as run
    from lora_planner.recommend_cli import recommend_document, request_from_args

    if config is not None and not params.get("model"):
        params = {**params, "model": "uploaded"}  # recommend requires --model; the uploaded config is the model
    parsed = _parse("recommend", params)
    spec = _spec(config)
    with _planner_errors():
        req = request_from_args(parsed.args, spec)
        doc = recommend_document(parsed.args, run(req))
    return {"recommendation": doc, "cli": cli_command(parsed.argv, config is not None)}


def sweep(params: Mapping[str, Any], axis: str, values: list[int],
          config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every method's peak on the device as `axis` takes `values` (the other options as `params`); points the planner
    refuses are null with the reason."""
    from lora_planner.cli import plan_inputs
    from lora_planner.cli_options import budget_from_args, overhead_from_args
    from lora_planner.memory import estimate_memory_cached
    from lora_planner.planner import usable_bytes

    if axis not in SWEEP_AXES:
        raise WebInputError("axis", f"cannot sweep {axis!r}", f"use one of {', '.join(SWEEP_AXES)}")
    if not values or len(values) > MAX_SWEEP_POINTS or any(v < 1 for v in values):
        raise WebInputError("values", f"1 to {MAX_SWEEP_POINTS} positive integers", "e.g. values=1,2,4,8")
    spec = _spec(config)
    parsed = _parse("estimate", params)  # once: each point changes one field of the step's settings
    with _planner_errors():
        budget, overhead = budget_from_args(parsed.args), overhead_from_args(parsed.args)
    usable = None if budget is None else usable_bytes(budget.memory_bytes, parsed.args.headroom)
    try:
        model, training, methods = plan_inputs(argparse.Namespace(**vars(parsed.args)), spec)
    except PlannerInputError:
        model = training = methods = None  # the settings as given are refused: each point re-reads its options
    points: list[dict[str, Any]] = []
    for value in values:
        try:  # the memory only: a sweep's points need no step time (`compute_estimate` less the throughput)
            if training is None:
                args = argparse.Namespace(**vars(parsed.args))
                setattr(args, SWEEP_AXES[axis], value)
                model, first, methods = plan_inputs(args, spec)
                point = {m: first.evolve(method=m) for m in methods}
                peaks = {m: estimate_memory_cached(model, t, overhead).peak_device_bytes for m, t in point.items()}
            else:
                peaks = {m: _swept_peak(model, training, overhead, axis, value, m) for m in methods}
        except PlannerInputError as err:
            points.append({"value": value, "peaks": None, "error": str(err)})
            continue
        points.append({"value": value, "peaks": peaks, "error": None})
    return {"axis": axis, "points": points, "usable_bytes": usable}


@functools.lru_cache(maxsize=8192)
def _swept_peak(model: Any, training: Any, overhead: Any, axis: str, value: int, method: str) -> int:
    """A sweep point's device peak for one method, cached by the sweep's own settings (a change redraws the sweeps it
    did not change from here, without building each point's settings again)."""
    from lora_planner.memory import estimate_memory_cached

    return estimate_memory_cached(model, _swept(training, axis, value, method), overhead).peak_device_bytes


def _swept(training: Any, axis: str, value: int, method: str) -> Any:
    """The settings `plan_inputs` gives with the option `axis` set to `value`, for `method`: the one field changed and
    validated (`TrainingSpec.evolve`), without reading the options again (tests/web/test_api.py holds the two equal)."""
    if axis == "r":
        return training.evolve(method=method, lora=training.lora.evolve(r=value))
    return training.evolve(method=method, **{SWEEP_AXES[axis]: value})


def models(query: str = "") -> list[dict[str, Any]]:
    """Catalog models whose name or repo id contains `query` (any case)."""
    from lora_planner.catalog import MODEL_CONFIGS

    q = query.strip().lower()
    return [{"name": name, "repo_id": repo} for name, (repo, _) in MODEL_CONFIGS.items()
            if q in name.lower() or q in repo.lower()]


def model_modules(params: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's linear module names (the target checkboxes) and PEFT's default targets for it."""
    from lora_planner.catalog import resolve_model
    from lora_planner.params import PEFT_DEFAULT_TARGETS, module_inventory

    spec = _spec(config)
    if spec is None:
        argv_from_params("estimate", {"model": params.get("model", "")})  # the same refusals as a plan
        with _planner_errors():
            spec = resolve_model(str(params.get("model") or "llama-3.1-8b"))
    names = list(dict.fromkeys(m.path.rsplit(".", 1)[-1] for m in module_inventory(spec) if m.kind == "linear"))
    return {"model": spec.name, "family": spec.family, "linear_modules": names,
            "default_targets": list(PEFT_DEFAULT_TARGETS.get(spec.family, ()))}


def gpus() -> list[dict[str, Any]]:
    from lora_planner.gpus import GPUS

    return [{"name": g.name, "memory_bytes": g.memory_bytes, "bf16": g.supports_bf16} for g in GPUS.values()]


def cli_command(argv: list[str], uploaded: bool) -> str:
    """The command line that gives the same answer (an uploaded config is `--model config.json`)."""
    import shlex

    command, rest = argv[0], list(argv[1:])
    if uploaded:
        rest = [a for i, a in enumerate(rest) if a != "--model" and (i == 0 or rest[i - 1] != "--model")]
        rest = ["--model", "config.json", *rest]
    words = ["lora-plan"] + ([] if command == "estimate" else [command]) + rest + ["--json"]
    return " ".join(shlex.quote(w) for w in words)

"""Hypothesis strategies of the fuzz suite: argument vectors built from the real option tables, and the
files they name (configs, grids, record files, calibration files), valid, boundary and hostile.

Option tables: `option_tables()` walks `lora_planner.cli_args.build_parser()` (each subparser's `_actions`:
option strings, whether it takes a value, choices, type, required), so a new option is fuzzed as soon as
it is declared. Its valid values come from `VALID` (by `dest`, from the project's own constants: catalog
models and GPUs, `lora_planner.specs`, `lora_planner.sweep`) or, for an option `VALID` does not know,
from its choices, its type's bounds or the `a|b|c` lists of its help text.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from lora_planner import cli, cli_args, specs, sweep
from lora_planner.catalog import MODEL_ALIASES, MODEL_CONFIGS, model_names
from lora_planner.gpus import GPUS

from .workspace import TINY_LLAMA, Ref

SUBCOMMANDS: tuple[str, ...] = tuple(cli.SUBCOMMANDS)
JSON_SUBCOMMANDS = ("estimate", "profile", "recommend")  # the ones with --json


# ---------------------------------------------------------------------------------------------- option tables


@dataclass(frozen=True)
class Option:
    sub: str
    strings: tuple[str, ...]  # ("--model",), ("--methods", "--method"), () for a positional
    dest: str
    takes_value: bool
    required: bool
    repeatable: bool  # action="append"
    choices: tuple[Any, ...] | None
    type: Any
    help: str

    @property
    def flag(self) -> str | None:
        longs = [s for s in self.strings if s.startswith("--")]
        return longs[0] if longs else (self.strings[0] if self.strings else None)


@functools.lru_cache(maxsize=None)
def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli_args.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@functools.lru_cache(maxsize=None)
def option_tables() -> dict[str, tuple[Option, ...]]:
    tables = {}
    for name, sub in subparsers().items():
        options = []
        for a in sub._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            options.append(Option(sub=name, strings=tuple(a.option_strings), dest=a.dest,
                                  takes_value=a.nargs != 0, required=bool(a.required) or not a.option_strings,
                                  repeatable=isinstance(a, argparse._AppendAction),
                                  choices=tuple(a.choices) if a.choices else None, type=a.type, help=a.help or ""))
        tables[name] = tuple(options)
    return tables


@functools.lru_cache(maxsize=None)
def option_strings(sub: str) -> frozenset[str]:
    """Every option string the subcommand accepts (with -h / --help)."""
    return frozenset(s for a in subparsers()[sub]._actions for s in a.option_strings)


# ---------------------------------------------------------------------------------------------- values

GIB = 2**30
MEMORY_SIZES = ("24GiB", "80GB", "80 GB", "40960MiB", "1.5GiB", "512MiB", "16 GiB", "1TB", "94GB")
LARGE_INTS = (0, 1, -1, 2**31, 2**31 - 1, 2**63, 2**64, 10**20, 10**12)
BOUNDARY_TEXT = ("", " ", "nan", "NaN", "inf", "-inf", "+inf", "1e400", "-1e400", "0x10", "1_000", "1e-400", "-0",
                 "0.0", "1.5", "1e9", "9" * 400, "é漢字", "\u202eevil", "a\tb", "a\nb", "x" * 5000, "--json", "-1",
                 ",", ",,", "all-linear,", "0-", "-3", "3-1", "q_proj,,v_proj", "None", "null", "true", "[]", "{}")
BOUNDARY = st.one_of(st.sampled_from(BOUNDARY_TEXT), st.sampled_from(LARGE_INTS).map(str),
                     st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(repr))
HOSTILE_PATHS = tuple(Ref(n) for n in ("dir", "fifo", "devzero", "under_file", "missing", "long_name",
                                       "long_path", "unicode", "dotted"))

HF_OPTIM_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_32bit", "lion_8bit", "adafactor",
                  "sgd", "adamw_hf", "rmsprop_bnb")
TARGETS = ("q_proj,v_proj", "all-linear", "q_proj", "c_attn", "query_key_value", "q_proj,k_proj,v_proj,o_proj",
           "gate_proj,up_proj,down_proj", "lm_head", "nonexistent_proj")


def _num(values: tuple[Any, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(values).map(str)


def _method_list(methods: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(methods), min_size=1, max_size=3, unique=True).map(",".join)


MODEL_VALUES = st.one_of(st.sampled_from(model_names()), st.sampled_from(sorted(MODEL_ALIASES)),
                         st.just(Ref("config.json")), st.just(Ref("unicode")), st.just(Ref("dotted")))

# dest -> strategy of valid values (strings, or Refs to workspace files).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": MODEL_VALUES,
    "method": _method_list(specs.METHODS),
    "methods": _method_list(specs.METHODS),
    "r": _num((1, 4, 8, 16, 64)),
    "alpha": _num((1, 8, 16.0, 32, 0.5)),
    "target": st.sampled_from(TARGETS),
    "adapter_dtype": st.sampled_from(("fp32", "base")),
    "layers_to_transform": st.sampled_from(("0", "0,1", "0-1", "1-3,5", "0-31", "3-1", "0-99999999999", "-1", "a-b")),
    "dtype": st.sampled_from(specs.DTYPES + ("bfloat16", "float16", "float32")),
    "amp": st.sampled_from(("bf16", "fp16", "bfloat16", "float16")),
    "optimizer": st.sampled_from(specs.OPTIMIZERS + HF_OPTIM_NAMES),
    "optimizer_impl": st.sampled_from(specs.OPTIMIZER_IMPLS),
    "batch_size": _num((1, 2, 4, 8)),
    "seq_len": _num((16, 128, 512, 2048, 4096, 8192)),
    "attention": st.sampled_from(specs.ATTENTIONS + ("flash_attention_3", "fa2")),
    "device": st.sampled_from(specs.DEVICES),
    "gpus": _num((1, 2, 4, 8)),
    "strategy": st.sampled_from(specs.STRATEGY_NAMES),
    "gpu": st.sampled_from(sorted(GPUS)),
    "gpu_mem": st.sampled_from(MEMORY_SIZES),
    "cuda_context": st.sampled_from(("512MiB", "1GiB", "0", "300MB")),
    "headroom": _num((0, 0.1, 0.5, 0.99)),
    "allocator_overhead": _num((0, 0.05, 1.0)),
    "mfu": _num((0.1, 0.4, 1.0)),
    "train_tokens": st.sampled_from(("1e9", "1000000", "2e12")),
    "backend": st.sampled_from(("hf", "builtin")),
    "mode": st.sampled_from(("cpu", "fake", "auto")),
    "steps": _num((1, 2, 3)),
    "threads": _num((1, 2)),
    "global_batch": _num((1, 8, 32, 256)),
    "trainable_fraction": _num((0.001, 0.01, 0.05, 0.5)),
    "min_micro_batch": _num((1, 2, 4)),
    "holdout": _num((0, 0.3, 0.5)),
    "seed": _num((0, 1, 42)),
    "limit": _num((1, 2, 3)),
    # files: what each subcommand's option names
    "calibration": st.just(Ref("calib.json")),
    "runs": st.just(Ref("runs.jsonl")),
    "grid": st.just(Ref("grid.toml")),
    "family": st.sampled_from(specs.FAMILIES),
}
# --out means a records file (profile, sweep), a calibration file (calibrate) or a folder (report).
OUT_VALUES = {"profile": st.sampled_from((Ref("runs.jsonl"), Ref("out_new"))),
              "sweep": st.sampled_from((Ref("runs.jsonl"), Ref("out_new"))),
              "calibrate": st.just(Ref("calib_out")), "report": st.just(Ref("report_dir"))}


def _help_words(help_text: str) -> tuple[str, ...]:
    """The `a|b|c` alternatives a help text lists."""
    words: list[str] = []
    for group in re.findall(r"[\w.-]+(?:\|[\w.-]+)+", help_text):
        words += group.split("|")
    return tuple(dict.fromkeys(words))


def valid_values(option: Option) -> st.SearchStrategy[Any]:
    if option.dest == "out" and option.sub in OUT_VALUES:
        return OUT_VALUES[option.sub]
    if option.dest in VALID:
        return VALID[option.dest]
    if option.choices:
        return st.sampled_from(option.choices).map(str)
    low, high = getattr(option.type, "low", None), getattr(option.type, "high", None)
    if option.type is int or isinstance(low, int):
        return st.integers(max(1, low or 1), min(16, high or 16)).map(str)
    if option.type is float or isinstance(low, float):
        return st.floats(0.0, 1.0).map(str)
    words = _help_words(option.help)
    if words:
        return st.sampled_from(words)
    if re.search(r"\b(file|path|folder|JSONL)\b", option.help):
        return st.sampled_from((Ref("config.json"), Ref("runs.jsonl"), Ref("out_new")))
    return st.sampled_from(("1", "x"))


def boundary_values(option: Option) -> st.SearchStrategy[Any]:
    return st.one_of(BOUNDARY, st.sampled_from(HOSTILE_PATHS))


# ---------------------------------------------------------------------------------------------- argument vectors


@dataclass
class Case:
    """One generated command line and what the checks need to know about it."""

    sub: str  # the subcommand that parses it (estimate when none is named)
    argv: list[Any]  # strings and Refs
    hostile: list[str] = field(default_factory=list)  # transforms applied (abbrev, repeat, unknown, foreign, ...)
    abbreviated: list[str] = field(default_factory=list)  # unique prefixes of real options used as options
    blank: list[str] = field(default_factory=list)  # options given exactly once, with an empty value
    files: dict[str, Any] = field(default_factory=dict)  # name -> content written before the run
    records: list[Ref] = field(default_factory=list)  # record files a run may only append to
    read_only: list[Ref] = field(default_factory=list)  # input files a run must leave as they are
    fake: str = "ok"  # what the fake measurement does: ok, oom, error

    @property
    def may_fail_a_run(self) -> bool:
        """profile / sweep exit 1 when a run was recorded as `error` (and only then)."""
        return self.sub in ("profile", "sweep") and "--dry-run" not in self.argv


def chance(draw: st.DrawFn, p: float) -> bool:
    """True with probability ~p (hypothesis' float draws cluster at 0, and shrink towards "not chosen")."""
    return draw(st.integers(0, 99)) >= round(100 * (1 - p))


def _pairs(option: Option, value: Any) -> list[Any]:
    if not option.strings:
        return [value]
    if not option.takes_value:
        return [option.flag]
    if isinstance(value, str) and value.startswith("-"):  # as a user must write it: --headroom=-1
        return [f"{option.flag}={value}"]
    return [option.flag, value]


def _required_extra(sub: str) -> list[str]:
    """Options a subcommand needs that argparse does not mark required (recommend: --gpu or --gpu-mem)."""
    return ["gpu"] if sub == "recommend" else []


@st.composite
def argv_for(draw: st.DrawFn, sub: str, hostile_ok: bool = True, fixed: dict[str, Any] | None = None,
             p_optional: float | None = None) -> Case:
    """A command line of `sub`: required options (mostly valid), some optional ones (valid or boundary),
    `fixed` dest -> value always given with that value; with `hostile_ok`, maybe hostile transforms."""
    fixed = dict(fixed or {})
    table = option_tables()[sub]
    boundary_rate = draw(st.sampled_from((0.0, 0.0, 0.0, 0.1, 0.4)))
    if p_optional is None:
        p_optional = draw(st.sampled_from((0.05, 0.15, 0.3)))
    tokens: list[Any] = []
    positional: list[Any] = []
    blank: list[str] = []
    for option in table:
        if option.dest in fixed:
            value = fixed[option.dest]
            if value is None:
                continue
            chosen = True
        else:
            needed = option.required or option.dest in _required_extra(sub)
            chosen = needed or chance(draw, p_optional)
            if not chosen:
                continue
            value = None
            if option.takes_value:
                bad = chance(draw, boundary_rate)
                value = draw(boundary_values(option) if bad else valid_values(option))
        pair = _pairs(option, value)
        if not option.strings:
            positional += pair
        else:
            tokens.append(pair)
            if option.takes_value and value == "" and option.flag:
                blank.append(option.flag)
    tokens = draw(st.permutations(tokens)) if tokens else tokens
    argv: list[Any] = [t for pair in tokens for t in pair]
    argv = positional + argv
    case = Case(sub=sub, argv=argv, blank=blank)
    if hostile_ok and chance(draw, 0.3):
        for _ in range(draw(st.integers(1, 2))):
            draw(_hostile(case, table))
    named = [sub] if (sub != "estimate" or draw(st.booleans()) or (argv and argv[0] in ("-h", "--help"))) else []
    case.argv = named + case.argv
    return case


@st.composite
def _hostile(draw: st.DrawFn, case: Case, table: tuple[Option, ...]) -> None:
    kind = draw(st.sampled_from(("abbrev", "repeat", "unknown", "foreign", "junk", "equals", "help", "dashdash",
                                 "drop")))
    case.hostile.append(kind)
    valued = [o for o in table if o.strings and o.takes_value]
    all_strings = option_strings(case.sub)
    if kind == "abbrev" and valued:
        option = draw(st.sampled_from(valued))
        flag = option.flag
        cut = draw(st.integers(3, max(3, len(flag) - 1)))
        prefix = flag[:cut]
        if prefix not in all_strings:
            matches = [s for s in all_strings if s.startswith(prefix)]
            if len(matches) == 1:  # argparse would take it for that option: it must be refused
                case.abbreviated.append(prefix)
            case.argv += [prefix, draw(valid_values(option))]
    elif kind == "repeat" and valued:
        option = draw(st.sampled_from(valued))
        case.argv += [option.flag, draw(valid_values(option)), option.flag, draw(valid_values(option))]
    elif kind == "unknown":
        case.argv += [draw(st.sampled_from(("--no-such-option", "--Model", "---model", "-x", "--model_", "--json=yes",
                                            "--gpu-mem=", "-")))]
    elif kind == "foreign":
        others = [o for s, opts in option_tables().items() if s != case.sub for o in opts
                  if o.strings and not set(o.strings) & all_strings]
        if others:
            option = draw(st.sampled_from(others))
            case.argv += _pairs(option, draw(valid_values(option)) if option.takes_value else None)
    elif kind == "junk":
        case.argv.insert(draw(st.integers(0, len(case.argv))), draw(st.sampled_from(("extra", "estimate", "0", "é"))))
    elif kind == "equals" and valued:
        option = draw(st.sampled_from(valued))
        value = draw(st.one_of(valid_values(option).filter(lambda v: isinstance(v, str)), BOUNDARY))
        case.argv.append(f"{option.flag}={value}")
    elif kind == "help":
        case.argv.insert(draw(st.integers(0, len(case.argv))), "--help")
    elif kind == "drop" and case.argv:  # a required option or the positional left out, or any other
        at = draw(st.integers(0, len(case.argv) - 1))
        del case.argv[at:at + (2 if str(case.argv[at]).startswith("--") and "=" not in str(case.argv[at]) else 1)]
    elif kind == "dashdash":
        case.argv += ["--", draw(st.sampled_from(("--json", "x")))]
    case.blank.clear()  # a repeated or reordered option may override the empty value: no expectation then


# ---------------------------------------------------------------------------------------------- JSON / TOML values

JSON_MUTANTS = st.one_of(
    st.sampled_from([0, 1, -1, -(2**40), 2**31, 2**63, 10**12, 10**20, 10**400 // 10**380, 1.5, -0.5, 1e308, "",
                     " ", "64", "1e400", "nan", None, True, False, [], {}, [64], {"a": 1}, "x" * 5000,
                     float("nan"), float("inf"), float("-inf")]),
    st.integers(-(2**70), 2**70), st.text(max_size=8),
)


def mutate_json(draw: st.DrawFn, doc: Any, max_ops: int = 3) -> Any:
    """`doc` (JSON-like) with up to `max_ops` random edits: a value retyped or replaced by a boundary value, a
    key deleted or added, a list emptied or a member duplicated."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, max_ops))):
        path = _random_path(draw, doc)
        if not path:
            doc = draw(JSON_MUTANTS)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        op = draw(st.sampled_from(("set", "set", "set", "delete", "add", "wrap")))
        if op == "delete" and isinstance(parent, dict):
            parent.pop(last, None)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(("unknown_key", "", "é", "__proto__")))] = draw(JSON_MUTANTS)
        elif op == "wrap":
            parent[last] = [parent[last]]
        else:
            parent[last] = draw(JSON_MUTANTS)
    return doc


def _random_path(draw: st.DrawFn, doc: Any) -> list[Any]:
    path: list[Any] = []
    node = doc
    while isinstance(node, (dict, list)) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        path.append(key)
        node = node[key]
        if chance(draw, 0.35):
            break
    return path


def dumps_loose(doc: Any) -> str:
    """JSON as Python writes it by default: NaN / Infinity are written as those (non-standard) constants."""
    return json.dumps(doc, allow_nan=True, ensure_ascii=False)


def deep_nesting(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """A text-level accident: cut short, a byte flipped, invalid UTF-8, a BOM, CRLF line ends."""
    op = draw(st.sampled_from(("truncate", "flip", "invalid_utf8", "bom", "crlf", "nul", "none")))
    if not data or op == "none":
        return data
    at = draw(st.integers(0, len(data) - 1))
    if op == "truncate":
        return data[:at]
    if op == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    if op == "invalid_utf8":
        return data[:at] + b"\xff\xfe\xc3" + data[at:]
    if op == "bom":
        return b"\xef\xbb\xbf" + data
    if op == "crlf":
        return data.replace(b"\n", b"\r\n")
    return data[:at] + b"\x00" + data[at:]


# ---------------------------------------------------------------------------------------------- configs

TINY_CONFIGS = {
    "tiny-llama": TINY_LLAMA,
    "tiny-gpt2": {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "tiny-bloom": {"model_type": "bloom", "vocab_size": 512, "hidden_size": 64, "n_layer": 2, "n_head": 4},
    "tiny-phi": {"model_type": "phi", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "partial_rotary_factor": 0.5, "max_position_embeddings": 256},
    "tiny-gemma": {"model_type": "gemma", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                   "max_position_embeddings": 256},
}
CONFIG_BASES = {**TINY_CONFIGS, **{name: cfg for name, (_, cfg) in MODEL_CONFIGS.items()}}
CONFIG_MUTANTS = st.one_of(JSON_MUTANTS, st.sampled_from(
    [10**12, 10**9, 3, 7, 2**40, "llama", "unknown_family", "LLAMA", "gpt_neox", "silu", "relu2"]))


@st.composite
def config_text(draw: st.DrawFn) -> str | bytes:
    """A config.json: a real one (catalog or tiny), mutated (retyped, deleted, absurd values), or broken text."""
    base = CONFIG_BASES[draw(st.sampled_from(sorted(CONFIG_BASES)))]
    kind = draw(st.sampled_from(("mutated", "mutated", "mutated", "huge", "plain", "text", "special")))
    if kind == "plain":
        return dumps_loose(base)
    if kind == "huge":  # one size key at an absurd value
        doc = dict(base)
        key = draw(st.sampled_from([k for k, v in base.items() if isinstance(v, int) and not isinstance(v, bool)]))
        doc[key] = draw(st.sampled_from((10**12, 10**9, 2**63, 10**20, 2**31)))
        return dumps_loose(doc)
    if kind == "special":
        return draw(st.sampled_from(("", "{}", "[]", "null", "nan", '{"model_type": NaN}', deep_nesting(),
                                     '{"model_type": "llama", "hidden_size": 1e400}', "\ufeff" + json.dumps(base))))
    if kind == "text":
        return draw(byte_mutation(json.dumps(base).encode()))
    doc = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(doc) + ["num_key_value_heads", "head_dim", "tie_word_embeddings",
                                                   "sliding_window", "rope_scaling", "n_inner", "hidden_act"]))
        if chance(draw, 0.25):
            doc.pop(key, None)
        else:
            doc[key] = draw(CONFIG_MUTANTS)
    return dumps_loose(doc)


# ---------------------------------------------------------------------------------------------- grids


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {toml_value(v)}"
                                for k, v in value.items() if v is not None) + " }"
    return '"None"'


def toml_doc(doc: dict[str, Any]) -> str:
    """A TOML document of `doc`, every top-level key as one inline value (`grid = [{...}]` is `[[grid]]`)."""
    return "".join(f"{json.dumps(str(k), ensure_ascii=False)} = {toml_value(v)}\n" for k, v in doc.items()
                   if v is not None)


def base_grid() -> dict[str, Any]:
    return {
        "name": "fuzz",
        "models": {"tiny": {"config": dict(TINY_LLAMA)}, "gpt": {"config": dict(TINY_CONFIGS["tiny-gpt2"])},
                   "cat": {"catalog": "qwen2.5-0.5b"}, "file": {"path": "config.json"}},
        "axes": {"mode": "cpu", "steps": 1, "batch_size": 1, "seq_len": 16},
        "grid": [{"models": ["tiny", "gpt"], "method": ["full", "lora"], "backend": list(sweep.BACKENDS)},
                 {"models": ["file"], "method": ["lora"], "precision": ["amp-bf16"], "r": [4]}],
    }


# valid values of each axis, from lora_planner.sweep's tables
AXIS_VALUES: dict[str, tuple[Any, ...]] = {
    "backend": sweep.BACKENDS, "mode": ("cpu", "fake"), "method": sweep.PROFILED_METHODS,
    "precision": tuple(sweep.PRECISIONS), "r": (1, 4, 8, 64), "alpha": (8, 16.0), "target": ("default", "all-linear"),
    "adapter_dtype": ("fp32", "base"), "batch_size": (1, 2), "seq_len": (8, 16, 32), "grad_checkpointing": (False, True),
    "optimizer": sweep.PROFILED_OPTIMIZERS, "optimizer_impl": ("default",) + specs.OPTIMIZER_IMPLS,
    "attention": specs.ATTENTIONS,
}
GRID_MUTANTS = st.one_of(
    st.sampled_from([0, -1, 1, 10**12, 2**63 - 1, 1.5, float("nan"), float("inf"), "", "x" * 5000, [], {},
                     [1, "a"], True, "cuda", "*", ["*"], "nope", list(range(1, 60)), [10**9], {"config": {}},
                     {"catalog": "nope"}, {"path": "no/such.json"}, {"path": "a_fifo"}, {"path": "/dev/zero"},
                     {"path": "a_folder"}, {"catalog": "llama-3-70b"}]),
    st.text(max_size=6),
)


@st.composite
def grid_text(draw: st.DrawFn) -> str | bytes:
    """A grid: the tiny valid one, one with random valid axes, or a mutated one (values retyped, keys
    unknown, absurd sizes, broken TOML)."""
    doc = base_grid()
    kind = draw(st.sampled_from(("valid", "axes", "mutated", "mutated", "text")))
    if kind == "axes":
        block = {"models": draw(st.sampled_from(("*", ["tiny"], ["gpt", "cat"])))}
        for axis in draw(st.lists(st.sampled_from(sorted(AXIS_VALUES)), max_size=4, unique=True)):
            block[axis] = draw(st.lists(st.sampled_from(AXIS_VALUES[axis]), min_size=1, max_size=2, unique=True))
        doc["grid"] = [block]
    elif kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            path = _random_path(draw, doc)
            parent = doc
            for step in path[:-1]:
                parent = parent[step]
            if not path:
                continue
            if chance(draw, 0.2) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif chance(draw, 0.2) and isinstance(parent, dict):
                parent[draw(st.sampled_from(("unknown", "steps", "seed", "models", "path")))] = draw(GRID_MUTANTS)
            else:
                parent[path[-1]] = draw(GRID_MUTANTS)
    text = toml_doc(doc)
    if kind == "text":
        return draw(byte_mutation(text.encode()))
    return text


# ---------------------------------------------------------------------------------------------- records

JUNK_LINES = ("", "   ", "null", "[]", "{}", "1e400", '{"key": NaN}', '{"key": Infinity, "status": "ok"}',
              '{"key": ["a"], "schema_version": 1}', '{"key": {"a": 1}}', "not json", '{"key": "x"', "\x00",
              '{"schema_version": 1, "key": "k", "status": "ok"}')


@st.composite
def record_lines(draw: st.DrawFn, corpus: tuple[str, ...]) -> bytes:
    """A record file from `corpus` (real-looking lines), then mutated: a field retyped, NaN / Infinity, a line
    cut short, duplicated, empty or junk lines, deep nesting, invalid UTF-8, a byte flipped."""
    lines = list(draw(st.lists(st.sampled_from(corpus), min_size=1, max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(("retype", "retype", "duplicate", "junk", "deep", "none")))
        at = draw(st.integers(0, len(lines) - 1))
        if op == "retype":
            try:
                doc = json.loads(lines[at])
            except (ValueError, RecursionError):  # a junk or deeply nested line inserted earlier
                continue
            lines[at] = dumps_loose(mutate_json(draw, doc, max_ops=2))
        elif op == "duplicate":
            lines.insert(at, lines[at])
        elif op == "junk":
            lines.insert(at, draw(st.sampled_from(JUNK_LINES)))
        elif op == "deep":
            lines.insert(at, deep_nesting() if draw(st.booleans()) else '{"key": "d", "settings": '
                         + deep_nesting(50_000) + "}")
    data = "".join(line + "\n" for line in lines).encode("utf-8", errors="surrogatepass")
    if chance(draw, 0.5):
        data = draw(byte_mutation(data))
    return data


# ---------------------------------------------------------------------------------------------- calibration files

CALIB_MUTANTS = st.one_of(JSON_MUTANTS, st.sampled_from([-1.0, -0.9, -5, 0, 1e-300, 1e300, 100, -(10**12), "0.5"]))


@st.composite
def calibration_text(draw: st.DrawFn, base: dict[str, Any]) -> str | bytes:
    """A calib.json: the real one `lora-plan calibrate` wrote, with overheads and factors made negative,
    non-numeric, huge or non-finite, keys deleted or retyped, or the text broken."""
    kind = draw(st.sampled_from(("plain", "targeted", "targeted", "mutated", "text")))
    doc = json.loads(json.dumps(base))
    if kind == "plain":
        return dumps_loose(doc)
    if kind == "text":
        return draw(byte_mutation(json.dumps(doc).encode()))
    if kind == "mutated":
        return dumps_loose(mutate_json(draw, doc))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(("factor", "cuda_context_bytes", "allocator_fraction", "evaluation",
                                       "fitted_on_modes", "kind", "schema_version")))
        value = draw(CALIB_MUTANTS)
        if target == "factor" and doc["activation_factors"]:
            group = draw(st.sampled_from(sorted(doc["activation_factors"])))
            doc["activation_factors"][group]["factor"] = value
        elif target in ("cuda_context_bytes", "allocator_fraction"):
            doc["device_overhead"][target] = value
        else:
            doc[target] = value
    return dumps_loose(doc)

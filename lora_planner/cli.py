"""`lora-plan`: the command line. Parse, compute (pure planner), render; bad input -> one line, exit 2.

Subcommands own their arguments. `lora-plan --model M ...` without a subcommand means `estimate`.
Heavy modules (rich for tables, torch for profiling) are imported only by the subcommand that needs them.

Exit codes: 0 done; 1 a profile / sweep run was recorded as failed (`"status": "error"`); 2 bad input (one
line naming the option and the fix: option values are checked by `lora_planner.cli_types`, files by
`lora_planner.files`); 70 an internal error (a bug: one line, `LORA_PLAN_DEBUG=1` shows the traceback);
130 interrupted (Ctrl-C; records already written stay); 141 stdout closed early (`| head`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lora_planner import __version__
from lora_planner.catalog import model_names, resolve_model
from lora_planner.cli_types import (
    MAX_STEPS, MAX_THREADS, MAX_TRAIN_TOKENS, Number, Text, count, fraction, option_error, positive_number,
)
from lora_planner.cli_options import (
    add_budget_arguments, add_overhead_arguments, add_seq_len_argument, budget_from_args, overhead_from_args,
)
from lora_planner.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, DEFAULT_R
from lora_planner.errors import PlannerInputError
from lora_planner.models_cli import add_models_arguments, run_models_command
from lora_planner.planner import make_plan, plan_to_dict, refit
from lora_planner.recommend_cli import add_recommend_arguments, run_recommend_command
from lora_planner.report import add_calibrate_arguments, add_report_arguments, run_calibrate_command, run_report_command
from lora_planner.specs import (
    ATTENTIONS, DEVICES, DTYPES, MAX_BATCH_SIZE, MAX_GPUS, MAX_R, METHODS, OPTIMIZER_IMPLS, OPTIMIZERS, STRATEGIES,
    LoraSpec, TrainingSpec, check_choice,
)
from lora_planner.sweep import add_sweep_arguments, run_sweep_command

SUBCOMMANDS = ("estimate", "profile", "recommend", "sweep", "calibrate", "report", "models")
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): an unexpected exception, i.e. a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that left


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error on two or more lines; we want one line naming the option and exit code 2.
    Option names must be typed whole (`--mod` is not `--model`): abbreviations are how a typo silently sets
    another option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        parsed = option_error(message)
        if parsed is None:
            raise PlannerInputError("arguments", message, f"see `{self.prog} --help`")
        field, problem, fix = parsed
        raise PlannerInputError(field, problem, fix or f"see `{self.prog} --help`")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_planner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Text("model", "--model llama-3.1-8b"), default=DEFAULT_MODEL,
                   help=f"catalog name ({', '.join(model_names())}), a Hugging Face repo id of one of them, "
                        f"or a path to a config.json (default: {DEFAULT_MODEL})")
    p.add_argument("--method", type=Text("method", "--method full,lora"), default="full,lora,qlora", help="comma list of full, lora, qlora (default: all)")
    p.add_argument("--r", type=count("r", "--r 8", MAX_R), default=DEFAULT_R, help=f"LoRA rank (default {DEFAULT_R}, PEFT's)")
    p.add_argument("--alpha", type=positive_number("alpha", "--alpha 16"), default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--target", type=Text("target", "--target q_proj,v_proj"), default=None,
                   help="LoRA target modules, comma list of PEFT names, or all-linear "
                        "(default: PEFT's default for the family, e.g. q_proj,v_proj)")
    p.add_argument("--adapter-dtype", choices=("fp32", "base"), default="fp32",
                   help="LoRA weights in fp32 (PEFT's default) or in the base dtype")
    p.add_argument("--layers-to-transform", type=Text("layers-to-transform", "--layers-to-transform 0-3"),
                   default=None,
                   help="PEFT's layers_to_transform: adapt the targets only in these layers, e.g. 0,1,2 or 24-31")
    p.add_argument("--no-kbit-prep", dest="kbit_prep", action="store_false",
                   help="QLoRA without PEFT's prepare_model_for_kbit_training (which TRL and most recipes "
                        "call, casting embeddings, norms and lm_head to fp32)")
    p.add_argument("--dtype", type=Text("dtype", "--dtype bf16"), default=None,
                   help=f"weight dtype: {'|'.join(DTYPES)}, or bfloat16|float16|float32 (default bf16; fp32 with --amp)")
    p.add_argument("--amp", type=Text("amp", "--amp bf16"), default=None, help="autocast mixed precision: bf16|fp16 or bfloat16|float16 "
                                               "(fp32 master weights)")
    p.add_argument("--optimizer", type=Text("optimizer", "--optimizer adamw"), default="adamw",
                   help=f"{'|'.join(OPTIMIZERS)}, or any Hugging Face TrainingArguments optim name (adamw_torch, "
                        "adamw_torch_fused, adamw_8bit, paged_adamw_32bit, lion_8bit, adafactor, sgd, ...; the ones "
                        "not modelled are refused with the reason) (default adamw, fused: the Trainer's default "
                        "adamw_torch_fused)")
    p.add_argument("--optimizer-impl", type=Text("optimizer-impl", "--optimizer-impl fused"), default=None,
                   help=f"{'|'.join(OPTIMIZER_IMPLS)} (default: fused for adamw, as the Hugging Face Trainer's "
                        "adamw_torch_fused on torch >= 2.8; PyTorch's for the other torch optimizers: foreach on "
                        "cuda, for-loop on cpu)")
    p.add_argument("--batch-size", type=count("batch-size", "--batch-size 4", MAX_BATCH_SIZE),
                   default=DEFAULT_BATCH_SIZE,
                   help=f"micro-batch size (default {DEFAULT_BATCH_SIZE})")
    add_seq_len_argument(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--attention", type=Text("attention", "--attention sdpa"), default="sdpa",
                   help=f"{'|'.join(ATTENTIONS)}, transformers' attn_implementation (default sdpa, transformers' "
                        "default; flash_attention_2 is refused until its kernel is modelled)")
    p.add_argument("--device", type=Text("device", "--device cuda"), default="cuda", help=f"{'|'.join(DEVICES)} (default cuda)")
    p.add_argument("--gpus", type=count("gpus", "--gpus 8", MAX_GPUS), default=1, help="data-parallel GPUs; --batch-size is per GPU (default 1)")
    p.add_argument("--strategy", type=Text("strategy", "--strategy fsdp"), default=None,
                   help=f"how GPUs share model states, one engine each: {'|'.join(STRATEGIES)}; zero1|zero2|zero3 "
                        "are DeepSpeed's stages (deepspeed-zeroN), fsdp is FSDP2 FULL_SHARD, fsdp-grad-op SHARD_GRAD_OP, "
                        "ddp-zero1 DDP + ZeroRedundancyOptimizer (default with --gpus: ddp)")
    add_budget_arguments(p)
    add_overhead_arguments(p)
    p.add_argument("--mfu", type=fraction("mfu", "--mfu 0.4", zero=False, one=True), default=0.4,
                   help="model-FLOPs utilisation assumed for step times (default 0.4)")
    p.add_argument("--train-tokens", type=Number("train-tokens", 1, MAX_TRAIN_TOKENS, "--train-tokens 1e9"),
                   default=None, help="also show the time to train on this many tokens, e.g. 1e9")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lora-plan", description="Will a full / LoRA / QLoRA fine-tune fit, and why.")
    parser.add_argument("--version", action="version", version=f"lora-plan {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_OneLineParser)
    estimate = sub.add_parser("estimate", help="predict the peak memory of one training step (default)")
    _add_planner_options(estimate)
    estimate.add_argument("--json", action="store_true", help="print the plan as JSON")
    estimate.add_argument("--detail", action="store_true", help="also show every phase of each method")
    estimate.add_argument("--calibration", type=Text("calibration", "--calibration calib.json"), default=None,
                          help="apply a calib.json from `lora-plan calibrate` (default: the uncalibrated planner)")

    profile = sub.add_parser("profile", help="run real training steps (full vs LoRA) and compare with the prediction")
    _add_planner_options(profile)
    profile.set_defaults(method="full,lora")
    profile.add_argument("--backend", type=Text("backend", "--backend hf"), default="hf", help="hf (transformers + peft, default) or builtin")
    profile.add_argument("--mode", type=Text("mode", "--mode cpu"), default="auto",
                         help="auto (cuda if present, else cpu for small models, else fake), cuda, cpu or fake")
    profile.add_argument("--steps", type=count("steps", "--steps 3", MAX_STEPS), default=3, help="measured steps per run (default 3; step 1 creates "
                                                               "the optimizer state)")
    profile.add_argument("--out", type=Text("out", "--out runs.jsonl"), default="runs.jsonl", help="JSONL file the records are appended to")
    profile.add_argument("--resume", action="store_true", help="skip runs already recorded in --out")
    profile.add_argument("--json", action="store_true", help="print the records as JSON")
    profile.add_argument("--threads", type=count("threads", "--threads 1", MAX_THREADS), default=None,
                         help="torch CPU threads (default: torch's); 1 is steadier and often faster on a busy machine")

    recommend = sub.add_parser("recommend", help="choose method, rank, alpha, micro-batch and checkpointing for a GPU")
    add_recommend_arguments(recommend)
    add_sweep_arguments(sub.add_parser("sweep", help="run a TOML grid of profile runs into a JSONL file (resumable)"))
    add_calibrate_arguments(sub.add_parser("calibrate", help="fit the planner's free constants to measured runs"))
    add_report_arguments(sub.add_parser("report", help="charts and a Markdown report from profile records"))
    add_models_arguments(sub.add_parser("models", help="list the model catalog (sizes, context, repo ids)"))
    return parser


def _training_from_args(args: argparse.Namespace, method: str) -> TrainingSpec:
    target = _csv(args.target) if args.target is not None else None
    if args.target is not None and not target:
        raise PlannerInputError("target", "empty target list", "pass e.g. --target q_proj,v_proj or all-linear")
    dtype = args.dtype if args.dtype is not None else ("fp32" if args.amp else "bf16")
    layers = _layer_list(args.layers_to_transform) if args.layers_to_transform is not None else None
    return TrainingSpec(
        method=method, dtype=dtype, amp=args.amp, optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
        batch_size=args.batch_size, seq_len=args.seq_len, grad_checkpointing=args.grad_checkpointing,
        device=args.device, attention=args.attention, gpus=args.gpus, strategy=args.strategy,
        lora=LoraSpec(r=args.r, alpha=args.alpha, target_modules=target, adapter_dtype=args.adapter_dtype,
                      layers_to_transform=layers),
        kbit_prep=args.kbit_prep,
    )


def _layer_list(text: str) -> tuple[int, ...]:
    """"0,1,2" or "24-31" or "0-3,8" -> sorted unique layer indices."""
    layers: set[int] = set()
    for part in _csv(text):
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            first, last = 0, -1
        if first < 0 or last < first:
            raise PlannerInputError("layers-to-transform", f"cannot read {part!r}",
                                    "pass layer indices or ranges, e.g. 0,1,2 or 24-31")
        layers.update(range(first, last + 1))
    if not layers:
        raise PlannerInputError("layers-to-transform", "no layer given", "pass e.g. --layers-to-transform 0-3")
    return tuple(sorted(layers))


def _methods_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    methods = _csv(args.method)
    for method in methods:
        if method not in METHODS:
            raise PlannerInputError("method", f"unknown method {method!r}", f"use a comma list of {', '.join(METHODS)}")
    if not methods:
        raise PlannerInputError("method", "no method given", "pass e.g. --method full,lora")
    return tuple(dict.fromkeys(methods))


def _train_tokens_from_args(args: argparse.Namespace) -> int | None:
    return None if args.train_tokens is None else int(args.train_tokens)  # a finite number >= 1 (cli_types)


def run_estimate(args: argparse.Namespace) -> int:
    spec = resolve_model(args.model)
    methods = _methods_from_args(args)
    training = _training_from_args(args, methods[0])
    for method in methods[1:]:
        _training_from_args(args, method)  # validate every method's settings before computing
    plan = make_plan(spec, training, methods, budget_from_args(args), overhead_from_args(args), mfu=args.mfu,
                     train_tokens=_train_tokens_from_args(args), headroom=args.headroom)
    calibration = None
    if getattr(args, "calibration", None):
        from lora_planner.report.calibrate import calibrate_plan_from_file

        plan, calibration = calibrate_plan_from_file(plan, args.calibration)
        plan = refit(plan)  # the fit of the calibrated peaks, by the same rule and headroom
    if args.json:
        print(json.dumps({**plan_to_dict(plan), **({"calibration": calibration} if calibration else {})}, indent=2))
        return 0
    from rich.console import Console  # only human output pays for rich

    from lora_planner.render import render_plan

    console = Console()
    render_plan(plan, console, detail=args.detail)
    if calibration:
        console.print(calibration["note"], style="yellow", highlight=False)
    return 0


def run_profile_command(args: argparse.Namespace) -> int:
    """Build one request per method, run them (appending each record as it finishes), show the table."""
    spec = resolve_model(args.model)
    methods = _methods_from_args(args)
    trainings = [_training_from_args(args, method) for method in methods]
    check_choice("backend", args.backend, ("builtin", "hf"))
    check_choice("mode", args.mode, ("auto", "cuda", "cpu", "fake"))
    try:
        from lora_planner.profiler.session import profile_session
    except ImportError as err:
        raise PlannerInputError("profile", f"profiling needs torch ({err.name} is missing)",
                                'pip install torch==2.13.0 && pip install -e ".[profile]"') from None
    return profile_session(args.model, spec, trainings, backend=args.backend, mode=args.mode, steps=args.steps,
                           out=args.out, resume=args.resume, as_json=args.json, threads=args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "estimate")
    try:
        args = build_parser().parse_args(argv)
        return {"estimate": run_estimate, "profile": run_profile_command,
                "recommend": run_recommend_command, "sweep": run_sweep_command, "calibrate": run_calibrate_command,
                "report": run_report_command, "models": run_models_command}[args.command](args)
    except PlannerInputError as err:
        print(f"lora-plan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0)
    except KeyboardInterrupt:  # profile / sweep say what was kept themselves; the rest computes nothing durable
        print("lora-plan: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lora-plan ... | head`: the reader left; nothing to report
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as err:  # noqa: BLE001 - a bug: one line and a distinct exit code, never a traceback
        if os.environ.get("LORA_PLAN_DEBUG"):
            raise
        print(f"lora-plan: internal error: {type(err).__name__}: {str(err)[:300]} (a bug: please report it with "
              "the command line; LORA_PLAN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does not complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

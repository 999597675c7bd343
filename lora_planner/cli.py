"""`lora-plan`: the command line. Parse, compute (pure planner), render; bad input -> one line, exit 2.

Subcommands own their arguments. `lora-plan --model M ...` without a subcommand means `estimate`.
Heavy modules (rich for tables, torch for profiling) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lora_planner import __version__
from lora_planner.catalog import model_names, resolve_model
from lora_planner.cli_options import (
    add_budget_arguments, add_overhead_arguments, add_seq_len_argument, budget_from_args, overhead_from_args,
)
from lora_planner.defaults import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, DEFAULT_R
from lora_planner.errors import PlannerInputError
from lora_planner.planner import make_plan, plan_to_dict, refit
from lora_planner.recommend_cli import add_recommend_arguments, run_recommend_command
from lora_planner.report import add_calibrate_arguments, add_report_arguments, run_calibrate_command, run_report_command
from lora_planner.specs import (
    ATTENTIONS, DEVICES, DTYPES, METHODS, OPTIMIZER_IMPLS, OPTIMIZERS, STRATEGIES, LoraSpec, TrainingSpec,
    check_choice, check_positive_int,
)
from lora_planner.sweep import add_sweep_arguments, run_sweep_command

SUBCOMMANDS = ("estimate", "profile", "recommend", "sweep", "calibrate", "report")
EXIT_BAD_INPUT = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error on two or more lines; we want one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PlannerInputError("arguments", message, f"see `{self.prog} --help`")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_planner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"catalog name ({', '.join(model_names())}), a Hugging Face repo id of one of them, "
                        f"or a path to a config.json (default: {DEFAULT_MODEL})")
    p.add_argument("--method", default="full,lora,qlora", help="comma list of full, lora, qlora (default: all)")
    p.add_argument("--r", type=int, default=DEFAULT_R, help=f"LoRA rank (default {DEFAULT_R}, PEFT's)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--target", default=None,
                   help="LoRA target modules, comma list of PEFT names, or all-linear "
                        "(default: PEFT's default for the family, e.g. q_proj,v_proj)")
    p.add_argument("--adapter-dtype", choices=("fp32", "base"), default="fp32",
                   help="LoRA weights in fp32 (PEFT's default) or in the base dtype")
    p.add_argument("--layers-to-transform", default=None,
                   help="PEFT's layers_to_transform: adapt the targets only in these layers, e.g. 0,1,2 or 24-31")
    p.add_argument("--no-kbit-prep", dest="kbit_prep", action="store_false",
                   help="QLoRA without PEFT's prepare_model_for_kbit_training (which TRL and most recipes "
                        "call, casting embeddings, norms and lm_head to fp32)")
    p.add_argument("--dtype", default=None,
                   help=f"weight dtype: {'|'.join(DTYPES)}, or bfloat16|float16|float32 (default bf16; fp32 with --amp)")
    p.add_argument("--amp", default=None, help="autocast mixed precision: bf16|fp16 or bfloat16|float16 "
                                               "(fp32 master weights)")
    p.add_argument("--optimizer", default="adamw",
                   help=f"{'|'.join(OPTIMIZERS)}, or any Hugging Face TrainingArguments optim name (adamw_torch, "
                        "adamw_torch_fused, adamw_8bit, paged_adamw_32bit, lion_8bit, adafactor, sgd, ...; the ones "
                        "not modelled are refused with the reason) (default adamw, fused: the Trainer's default "
                        "adamw_torch_fused)")
    p.add_argument("--optimizer-impl", default=None,
                   help=f"{'|'.join(OPTIMIZER_IMPLS)} (default: fused for adamw, as the Hugging Face Trainer's "
                        "adamw_torch_fused on torch >= 2.8; PyTorch's for the other torch optimizers: foreach on "
                        "cuda, for-loop on cpu)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"micro-batch size (default {DEFAULT_BATCH_SIZE})")
    add_seq_len_argument(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--attention", default="sdpa",
                   help=f"{'|'.join(ATTENTIONS)}, transformers' attn_implementation (default sdpa, transformers' "
                        "default; flash_attention_2 is refused until its kernel is modelled)")
    p.add_argument("--device", default="cuda", help=f"{'|'.join(DEVICES)} (default cuda)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs; --batch-size is per GPU (default 1)")
    p.add_argument("--strategy", default=None,
                   help=f"how GPUs share model states, one engine each: {'|'.join(STRATEGIES)}; zero1|zero2|zero3 "
                        "are DeepSpeed's stages (deepspeed-zeroN), fsdp is FSDP2 FULL_SHARD, fsdp-grad-op SHARD_GRAD_OP, "
                        "ddp-zero1 DDP + ZeroRedundancyOptimizer (default with --gpus: ddp)")
    add_budget_arguments(p)
    add_overhead_arguments(p)
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model-FLOPs utilisation assumed for step times (default 0.4)")
    p.add_argument("--train-tokens", default=None, help="also show the time to train on this many tokens, e.g. 1e9")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lora-plan", description="Will a full / LoRA / QLoRA fine-tune fit, and why.")
    parser.add_argument("--version", action="version", version=f"lora-plan {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_OneLineParser)
    estimate = sub.add_parser("estimate", help="predict the peak memory of one training step (default)")
    _add_planner_options(estimate)
    estimate.add_argument("--json", action="store_true", help="print the plan as JSON")
    estimate.add_argument("--detail", action="store_true", help="also show every phase of each method")
    estimate.add_argument("--calibration", default=None,
                          help="apply a calib.json from `lora-plan calibrate` (default: the uncalibrated planner)")

    profile = sub.add_parser("profile", help="run real training steps (full vs LoRA) and compare with the prediction")
    _add_planner_options(profile)
    profile.set_defaults(method="full,lora")
    profile.add_argument("--backend", default="hf", help="hf (transformers + peft, default) or builtin")
    profile.add_argument("--mode", default="auto",
                         help="auto (cuda if present, else cpu for small models, else fake), cuda, cpu or fake")
    profile.add_argument("--steps", type=int, default=3, help="measured steps per run (default 3; step 1 creates "
                                                               "the optimizer state)")
    profile.add_argument("--out", default="runs.jsonl", help="JSONL file the records are appended to")
    profile.add_argument("--resume", action="store_true", help="skip runs already recorded in --out")
    profile.add_argument("--json", action="store_true", help="print the records as JSON")
    profile.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (default: torch's); 1 is steadier and often faster on a busy machine")

    recommend = sub.add_parser("recommend", help="choose method, rank, alpha, micro-batch and checkpointing for a GPU")
    add_recommend_arguments(recommend)
    add_sweep_arguments(sub.add_parser("sweep", help="run a TOML grid of profile runs into a JSONL file (resumable)"))
    add_calibrate_arguments(sub.add_parser("calibrate", help="fit the planner's free constants to measured runs"))
    add_report_arguments(sub.add_parser("report", help="charts and a Markdown report from profile records"))
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
    if args.train_tokens is None:
        return None
    try:
        tokens = int(float(args.train_tokens))
    except ValueError:
        tokens = 0
    if tokens <= 0:
        raise PlannerInputError("train-tokens", f"cannot read {args.train_tokens!r}", "pass e.g. --train-tokens 1e9")
    return tokens


def run_estimate(args: argparse.Namespace) -> int:
    spec = resolve_model(args.model)
    methods = _methods_from_args(args)
    training = _training_from_args(args, methods[0])
    for method in methods[1:]:
        _training_from_args(args, method)  # validate every method's settings before computing
    if not 0 < args.mfu <= 1:
        raise PlannerInputError("mfu", f"must be in (0, 1], got {args.mfu}", "pass e.g. --mfu 0.4")
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
    check_positive_int("steps", args.steps)
    try:
        from lora_planner.profiler.session import profile_session
    except ImportError as err:
        raise PlannerInputError("profile", f"profiling needs torch ({err.name} is missing)",
                                'pip install torch==2.13.0 && pip install -e ".[profile]"') from None
    if args.threads is not None:
        check_positive_int("threads", args.threads)
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
                "report": run_report_command}[args.command](args)
    except PlannerInputError as err:
        print(f"lora-plan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())

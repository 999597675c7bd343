"""`lora-plan`: the command line. Parse, compute (pure planner), render; bad input -> one line, exit 2.

Every subcommand's options are declared in `lora_planner.cli_args`; each subcommand's module is imported only when
it runs. `lora-plan --model M ...` without a subcommand means `estimate`.
Heavy modules (rich for tables, torch for profiling) are imported only by the subcommand that needs them.

Exit codes: 0 done; 1 a profile / sweep run was recorded as failed (`"status": "error"`); 2 bad input (one
line naming the option and the fix: option values are checked by `lora_planner.cli_types`, files by
`lora_planner.files`); 70 an internal error (a bug: one line, `LORA_PLAN_DEBUG=1` shows the traceback);
130 interrupted (Ctrl-C; records already written stay); 141 stdout closed early (`| head`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from lora_planner.catalog import resolve_model
from lora_planner.cli_args import SUBCOMMAND_ARGUMENTS, cached_parser
from lora_planner.cli_options import budget_from_args, grpo_from_args, overhead_from_args
from lora_planner.errors import PlannerInputError
from lora_planner.planner import Plan, make_plan, plan_to_dict, refit
from lora_planner.specs import (
    LOGITS_OBJECTIVES, MAX_LAYERS, MAX_VOCAB, METHODS, REGISTERED_FAMILIES, STRATEGY_ALIASES, LoraSpec, ModelSpec, TrainingSpec,
    check_choice, parse_loss,
)

SUBCOMMANDS = tuple(SUBCOMMAND_ARGUMENTS)
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): an unexpected exception, i.e. a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that left


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _training_from_args(args: argparse.Namespace, method: str) -> TrainingSpec:
    target = _csv(args.target) if args.target is not None else None
    if args.target is not None and not target:
        raise PlannerInputError("target", "empty target list", "pass e.g. --target q_proj,v_proj or all-linear")
    dtype = args.dtype if args.dtype is not None else ("fp32" if args.amp else "bf16")
    layers = _layer_list(args.layers_to_transform) if args.layers_to_transform is not None else None
    return TrainingSpec(
        method=method, dtype=dtype, amp=args.amp, optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
        batch_size=args.batch_size, seq_len=args.seq_len,
        grad_checkpointing=args.grad_checkpointing or getattr(args, "activation_offload", "none") != "none"
        or getattr(args, "use_reentrant", False), use_reentrant=getattr(args, "use_reentrant", False),
        device=args.device, attention=args.attention, gpus=args.gpus, strategy=args.strategy,
        lora=LoraSpec(r=args.r, alpha=args.alpha, target_modules=target, adapter_dtype=args.adapter_dtype,
                      layers_to_transform=layers, target_parameters=_target_parameters(args),
                      use_rslora=getattr(args, "use_rslora", False), use_dora=getattr(args, "use_dora", False),
                      modules_to_save=_csv(args.modules_to_save) if getattr(args, "modules_to_save", None) else None,
                      bias=getattr(args, "bias", "none"),
                      trainable_token_indices=_token_indices(getattr(args, "trainable_token_indices", None))),
        kbit_prep=args.kbit_prep, double_quant=getattr(args, "double_quant", True),
        offload=getattr(args, "offload", "none"), offload_pin_memory=getattr(args, "offload_pin_memory", True),
        gpus_per_node=getattr(args, "gpus_per_node", None),
        activation_offload=getattr(args, "activation_offload", "none"),
        quant_type=getattr(args, "quant_type", "nf4"), load_in_8bit=_load_in_8bit(args),
        bnb_4bit_compute_dtype=getattr(args, "bnb_4bit_compute_dtype", None),
        experts_implementation=getattr(args, "experts_implementation", "grouped_mm"),
        routing=_routing(getattr(args, "routing", "balanced")),
        zero_config=getattr(args, "zero_config", None) or (),
        **parse_loss(getattr(args, "loss", "hf")),
        padding=getattr(args, "padding", False), packing=getattr(args, "packing", False),
        liger=getattr(args, "liger", False),
        objective=_objective(args), precompute_ref_log_probs=getattr(args, "precompute_ref_log_probs", False),
        cpo_alpha=getattr(args, "cpo_alpha", 1.0),
        **({"grpo": grpo_from_args(args)} if _objective(args) == "grpo" else {}),
    )


def _objective(args: argparse.Namespace) -> str:
    """`--objective` of estimate (TRL's trainers; `recommend --objective` is the rank evidence's and plans sft)."""
    if not hasattr(args, "precompute_ref_log_probs"):  # recommend / sweep / profile: the SFT step
        return "sft"
    return str(args.objective).strip().lower()


def _target_parameters(args: argparse.Namespace) -> tuple[str, ...] | None:
    text = getattr(args, "target_parameters", None)
    if text is None:
        return None
    names = _csv(text)
    if not names:
        raise PlannerInputError("target-parameters", "empty parameter list",
                                "pass e.g. --target-parameters mlp.experts.gate_up_proj,mlp.experts.down_proj")
    return names


def _routing(text: str) -> str | tuple[tuple[int, ...], ...]:
    """--routing balanced|worst|FILE: a JSON file holds a list of per-layer lists of tokens per expert, or the
    profiler's record (`{"router_counts": [[...], ...]}`)."""
    if text in ("balanced", "worst"):
        return text
    from lora_planner.files import read_json_file

    data = read_json_file(text, "routing", "pass balanced, worst, or a JSON list of per-layer tokens per expert")
    if isinstance(data, dict):
        data = data.get("router_counts", data.get("measured", {}).get("router_counts") if isinstance(
            data.get("measured"), dict) else None)
    if not (isinstance(data, list) and data and all(
            isinstance(row, list) and row and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in row) for row in data)):
        raise PlannerInputError("routing", f"{text}: expected a JSON list of per-layer lists of token counts "
                                           "(one count per expert)", "pass balanced, worst, or such a file")
    return tuple(tuple(row) for row in data)


def _token_indices(text: str | None) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """"128000-128255" (PEFT's list form) or "embed_tokens:0-9;lm_head:0-9" (its dict form) -> (module, ids) pairs."""
    if text is None:
        return None
    pairs = []
    for part in (p.strip() for p in text.split(";")):
        name, sep, ids = part.rpartition(":")
        if not ids.strip() or (sep and not name.strip()):
            raise PlannerInputError("trainable-token-indices", f"cannot read {part!r}",
                                    "pass token ids or ranges, e.g. 128000-128255, or embed_tokens:0-9;lm_head:0-9")
        pairs.append((name.strip(), _id_ranges(ids)))
    return tuple(pairs)


def _id_ranges(text: str) -> tuple[int, ...]:
    """"0,5,7" or "128000-128255" -> sorted unique token ids (at most MAX_VOCAB of them)."""
    return _index_ranges(text, "trainable-token-indices", "token", MAX_VOCAB, "vocabulary",
                         "pass token ids or ranges, e.g. 128000-128255", "pass the model's token ids")


def _layer_list(text: str) -> tuple[int, ...]:
    """"0,1,2" or "24-31" or "0-3,8" -> sorted unique layer indices."""
    layers = _index_ranges(text, "layers-to-transform", "layer", MAX_LAYERS, "model",
                           "pass layer indices or ranges, e.g. 0,1,2 or 24-31",
                           "pass the model's layer indices, e.g. 0-31")
    if not layers:
        raise PlannerInputError("layers-to-transform", "no layer given", "pass e.g. --layers-to-transform 0-3")
    return layers


def _index_ranges(text: str, field: str, what: str, limit: int, past: str, fix: str, past_fix: str) -> tuple[int, ...]:
    """Comma-separated indices and inclusive ranges ("0,5,7", "24-31") -> sorted unique indices below `limit`; the
    limit is checked before a range is built (0-99999999999 must not hang)."""
    found: set[int] = set()
    for part in _csv(text):
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            first, last = 0, -1
        if first < 0 or last < first:
            raise PlannerInputError(field, f"cannot read {part!r}", fix)
        if last >= limit:
            raise PlannerInputError(field, f"{what} {last:,} in {part!r} is past any {past} (at most {limit:,} "
                                           f"{what}s)", past_fix)
        found.update(range(first, last + 1))
    return tuple(sorted(found))


QUANT_SPELLINGS = {"none": "none", "int8": "int8", "8bit": "int8", "llm.int8": "int8", "bnb.int8": "int8",
                   "load_in_8bit": "int8", "bnb8": "int8"}


def _load_in_8bit(args: argparse.Namespace) -> bool:
    """`--quant` (none | int8, with the spellings users type: 8bit, llm.int8, bnb.int8, load_in_8bit)."""
    text = str(getattr(args, "quant", "none")).strip().lower()
    if text in ("nf4", "fp4", "4bit"):
        raise PlannerInputError("quant", f"{text} is QLoRA's 4-bit base", f"pass --method qlora --quant-type "
                                                                          f"{'fp4' if text == 'fp4' else 'nf4'}")
    if text not in QUANT_SPELLINGS:
        raise PlannerInputError("quant", f"unknown quantization {text!r}", "pass --quant int8 or --quant none")
    return QUANT_SPELLINGS[text] == "int8"


def _methods_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    if _load_in_8bit(args) and args.method in ("full,lora,qlora", "full,lora"):
        return ("lora",)  # the default methods: an 8-bit base carries LoRA adapters only
    methods = _csv(args.method)
    if args.method == "full,lora,qlora" and STRATEGY_ALIASES.get(args.strategy, args.strategy) == "deepspeed-zero3":
        methods = ("full", "lora")  # the default methods: QLoRA's NF4 weights under ZeRO-3 are refused (not modelled)
    for method in methods:
        if method not in METHODS:
            raise PlannerInputError("method", f"unknown method {method!r}", f"use a comma list of {', '.join(METHODS)}")
    if not methods:
        raise PlannerInputError("method", "no method given", "pass e.g. --method full,lora")
    return tuple(dict.fromkeys(methods))


def _train_tokens_from_args(args: argparse.Namespace) -> int | None:
    return None if args.train_tokens is None else int(args.train_tokens)  # a finite number >= 1 (cli_types)


@dataclass(frozen=True)
class Estimate:
    """What `estimate` computed: the plan (calibrated when asked), the calibration's summary, the fit edits."""

    plan: Plan
    calibration: dict | None
    edits: list


def plan_inputs(args: argparse.Namespace, spec: ModelSpec | None = None
                ) -> tuple[ModelSpec, TrainingSpec, tuple[str, ...]]:
    """The model, the step's settings (for the first method) and the methods `estimate` plans, every method's
    settings validated."""
    spec = spec or resolve_model(args.model)
    methods = _methods_from_args(args)
    if spec.family in REGISTERED_FAMILIES and args.method == "full,lora,qlora" and len(methods) > 1:
        methods = tuple(m for m in methods if m != "qlora")  # the default: traced profiles have no QLoRA (traced.py)
    if args.method == "full,lora,qlora" and str(getattr(args, "loss", "hf")).startswith("trl") and "full" in methods \
            and spec.tie_word_embeddings:
        methods = tuple(m for m in methods if m != "full")
        args.methods_note = ("full fine-tuning left out of the default methods: TRL's fused LM head with a tied, trained "
                             "output layer is not modelled (pass --method full --loss hf to plan it)")
    if args.method == "full,lora,qlora" and _objective(args) == "grpo" and "qlora" in methods:
        methods = tuple(m for m in methods if m != "qlora")
        note = "QLoRA left out of the default methods: GRPO on a 4-bit base is not modelled yet"
        args.methods_note = f"{args.methods_note}; {note}" if getattr(args, "methods_note", None) else note
    training = _training_from_args(args, methods[0])
    for method in methods[1:]:
        _training_from_args(args, method)  # validate every method's settings before computing
    return spec, training, methods


def compute_estimate(args: argparse.Namespace, spec: ModelSpec | None = None) -> Estimate:
    """`estimate`'s computation from parsed options (`spec`: the model already read, e.g. a config.json the web page
    uploaded; else `--model`). The CLI and the web page (`lora_planner.web`) share it."""
    spec, training, methods = plan_inputs(args, spec)
    plan = make_plan(spec, training, methods, budget_from_args(args), overhead_from_args(args), mfu=args.mfu,
                     train_tokens=_train_tokens_from_args(args), headroom=args.headroom)
    if training.objective != "sft":  # (before the options' notes, which come first)
        from lora_planner.objectives import describe

        plan = replace(plan, warnings=(describe(training, spec), *plan.warnings))
    for note in ("methods_note", "stack_note", "files_note", "lengths_note"):
        if getattr(args, note, None):
            plan = replace(plan, warnings=(getattr(args, note), *plan.warnings))
    calibration = None
    if getattr(args, "calibration", None):
        from lora_planner.report.calibrate import calibrate_plan_from_file

        plan, calibration = calibrate_plan_from_file(plan, args.calibration)
        plan = refit(plan)  # the fit of the calibrated peaks, by the same rule and headroom
    return Estimate(plan, calibration, _fit_edits(args, spec, training, plan))


def estimate_document(args: argparse.Namespace, estimate: Estimate) -> dict:
    """`lora-plan ... --json`: the plan's document with what the options read (preset, lengths, files)."""
    from dataclasses import asdict

    doc = plan_to_dict(estimate.plan)
    doc["fit_edits"] = [asdict(e) for e in estimate.edits] if getattr(args, "files", None) else None
    doc["inputs"]["stack"] = getattr(args, "stack", None)
    doc["inputs"]["lengths"] = getattr(args, "lengths_summary", None)
    doc["inputs"]["from_files"] = getattr(args, "files_summary", None)
    return {**doc, **({"calibration": estimate.calibration} if estimate.calibration else {})}


def run_estimate(args: argparse.Namespace) -> int:
    estimate = compute_estimate(args)
    plan = estimate.plan
    if args.json:
        import json  # only JSON output pays for it (cold start, issue 11)

        print(json.dumps(estimate_document(args, estimate), indent=2))
        return 0
    from lora_planner.render import render_plan
    from lora_planner.textable import Console  # stdlib only: the estimate path stays instant (no rich)

    console = Console()
    render_plan(plan, console, detail=args.detail)
    if estimate.calibration:
        console.print(estimate.calibration["note"], style="yellow", highlight=False)
    if estimate.edits:
        from lora_planner.render import render_fit_edits

        render_fit_edits(estimate.edits, plan.budget.name or plan.budget.memory_text, console)
    return 0


def _fit_edits(args: argparse.Namespace, spec, training: TrainingSpec, plan) -> list:
    """With `--from` files and a GPU: per method that does not fit, the smallest edit to those files
    (`lora_planner.fit_edit`), on the planner's (uncalibrated) peaks."""
    files = getattr(args, "files", None)
    if not files or plan.usable_bytes is None:
        return []
    from lora_planner.fit_edit import smallest_edit
    from lora_planner.from_files import merge_files

    accumulation = merge_files(files).get("grad_accumulation")
    return [smallest_edit(spec, replace(training, method=method), plan.usable_bytes, files, plan.overhead,
                          accumulation) for method, mp in plan.methods.items() if mp.fits is False]


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


def _runner(command: str) -> Callable[[argparse.Namespace], int]:
    """The subcommand's entry point, imported only when it runs (the estimate path stays light)."""
    if command == "estimate":
        return run_estimate
    if command == "profile":
        return run_profile_command
    if command == "recommend":
        from lora_planner.recommend_cli import run_recommend_command

        return run_recommend_command
    if command == "sweep":
        from lora_planner.sweep import run_sweep_command

        return run_sweep_command
    if command == "models":
        from lora_planner.models_cli import run_models_command

        return run_models_command
    if command == "serve":
        from lora_planner.web.serve import run_serve_command

        return run_serve_command
    from lora_planner.report import run_calibrate_command, run_report_command

    return {"calibrate": run_calibrate_command, "report": run_report_command}[command]


# What `recommend` searches itself: a preset does not fix it there.
RECOMMEND_SEARCHED = frozenset({"r", "alpha", "batch_size", "grad_checkpointing"})


def _explicit(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> set[str]:
    """The argparse dests named on the command line."""
    sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[args.command]  # noqa: SLF001
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in sub._actions if given & set(action.option_strings)}  # noqa: SLF001


def _apply_files(args: argparse.Namespace, explicit: set[str]) -> set[str]:
    """`--from FILE` (`lora_planner.from_files`): every file's settings for the options not on the command line
    (later files win); the note goes to `args.files_note`, the files' summary to `args.files_summary` (--json), the
    files to `args.files` (the smallest edit to fit). A framework's file names its preset, used when no `--stack`
    is given. Returns the options the files set, which a `--stack` preset then leaves alone."""
    from lora_planner.from_files import files_note, implied_stack, merge_files, read_settings_file
    from lora_planner.stacks import Stack, apply_stack

    files = [read_settings_file(path) for path in args.from_files]
    merged = {dest: value for dest, value in merge_files(files).items() if dest not in explicit}
    applied = apply_stack(Stack("files", "", merged), args, explicit)
    args.files = files
    args.files_note = files_note(files, applied)
    args.files_summary = [{"file": f.path, "kind": f.kind, "settings": _jsonable(f.settings), "keys": f.keys,
                           "stack": f.stack, "not_modelled": list(f.not_modelled)} for f in files]
    if getattr(args, "stack", None) is None and implied_stack(files):
        args.stack = implied_stack(files)
    return set(merged)


def _jsonable(settings: dict) -> dict:
    return {k: [list(p) for p in v] if isinstance(v, tuple) else v for k, v in settings.items()}


def _apply_stack(args: argparse.Namespace, explicit: set[str]) -> None:
    """`--stack NAME`: the framework's defaults (`lora_planner.stacks`) for every option not on the command line (nor
    set by `--from`); the note saying what was set goes to `args.stack_note` (printed with the plan)."""
    from lora_planner.stacks import apply_stack, resolve_stack, stack_note

    stack = resolve_stack(args.stack)
    if args.command == "recommend":
        explicit |= RECOMMEND_SEARCHED
    args.stack_note = stack_note(stack, apply_stack(stack, args, explicit))


def _apply_lengths(args: argparse.Namespace, argv: list[str]) -> None:
    """`--lengths FILE` / `--max-seq-len N`: the worst micro-batch the collator can build (`lora_planner.lengths`) sets
    --seq-len and --padding; `args.lengths_note` says which batch it is, `args.lengths_summary` goes to --json."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    args.lengths_note, args.lengths_summary = None, None
    if args.lengths is None:
        if args.max_seq_len is not None:
            if "--seq-len" in given and args.seq_len != args.max_seq_len:
                raise PlannerInputError("max-seq-len", "without --lengths it is the sequence length, and --seq-len "
                                                       "says otherwise", "pass one of --seq-len and --max-seq-len")
            args.seq_len = args.max_seq_len
        return
    from lora_planner.lengths import padding_share, read_lengths, worst_batch

    if "--seq-len" in given and not args.packing:
        raise PlannerInputError("seq-len", "--lengths sets the sequence length (the longest example, truncated)",
                                "drop --seq-len; pass --max-seq-len for the truncation length")
    lengths = read_lengths(args.lengths)
    truncation = args.max_seq_len if args.max_seq_len is not None else (args.seq_len if args.packing else None)
    # recommend searches the micro-batch: a padded one of b >= 2, one packed bin per row
    rows = getattr(args, "batch_size", None) or (1 if args.packing else 2)
    batch = worst_batch(lengths, rows, truncation, args.packing)
    args.seq_len, args.padding = batch.seq_len, batch.padding
    st = batch.stats
    cut = "" if truncation else "; not truncated (pass --max-seq-len: TRL's max_length)"
    share = "" if args.packing or rows == 1 or not hasattr(args, "batch_size") else \
        f"; on average {padding_share(lengths, rows, truncation):.0%} of a padded batch is padding"
    searched = " (recommend searches the batch size: each micro-batch planned as this one, b rows of it)" \
        if not hasattr(args, "batch_size") else ""
    args.lengths_note = (f"worst batch from {args.lengths} ({st.examples:,} examples, median {st.median_tokens:,.0f}, "
                         f"p99 {st.p99_tokens:,}, longest {st.longest_tokens:,} tokens{cut}): {batch.description}"
                         f"{share}{searched}")
    args.lengths_summary = {"file": args.lengths, "examples": st.examples, "median_tokens": st.median_tokens,
                            "p99_tokens": st.p99_tokens, "longest_tokens": st.longest_tokens,
                            "truncated_examples": st.truncated_examples, "max_seq_len": truncation,
                            "worst_batch": batch.description}


def parse_command(argv: list[str]) -> argparse.Namespace:
    """`argv` (a subcommand first) parsed, with what `--from`, `--stack` and `--lengths` set applied: what a
    subcommand runs on (the web page parses its requests the same way)."""
    parser = cached_parser(argv[0] if argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    explicit = _explicit(parser, args, argv) if getattr(args, "stack", None) or \
        getattr(args, "from_files", None) else set()
    if getattr(args, "from_files", None):
        explicit |= _apply_files(args, explicit)
    if getattr(args, "stack", None):
        _apply_stack(args, explicit)
    objective = str(getattr(args, "objective", None)).strip().lower()
    if objective == "rl" and getattr(args, "command", None) == "recommend":
        objective = "grpo"  # (recommend's evidence objective: GRPO's step is searched, `recommend_cli`)
    if objective == "grpo" and hasattr(args, "max_completion_length"):
        _apply_grpo_lengths(args, explicit or _explicit(parser, args, argv))
    if objective in LOGITS_OBJECTIVES and getattr(args, "loss", "hf") != "hf":
        if "loss" in (explicit or _explicit(parser, args, argv)):
            raise PlannerInputError("loss", f"TRL's trainer for --objective {args.objective} computes its loss from the "
                                            f"whole logits, not the {args.loss} loss", "drop --loss (or pass --loss hf)")
        args.loss = "hf"  # the trainer's own loss code over `outputs.logits`
    if objective in ("dpo", "kto", "grpo") and getattr(args, "loss", "trl") != "trl":
        if "loss" in (explicit or _explicit(parser, args, argv)):
            raise PlannerInputError("loss", f"TRL's trainer for --objective {args.objective} always runs its fused LM "
                                            f"head, not the {args.loss} loss", "drop --loss (or pass --loss trl)")
        args.loss = "trl"  # the trainer's own head: `model(..., fused_lm_head=True)`
    if hasattr(args, "lengths"):
        _apply_lengths(args, argv)
    return args


def _apply_grpo_lengths(args: argparse.Namespace, explicit: set[str]) -> None:
    """A GRPO row is prompt + completion (`GrpoSpec`): --seq-len set from --max-prompt-length (512 when neither is
    given) and --max-completion-length; the rows padded (prompts left, completions right, TRL's re-padding); the
    micro-batch TRL's 8 completions unless given."""
    completion, prompt = args.max_completion_length, args.max_prompt_length
    if prompt is not None:
        if "seq_len" in explicit and args.seq_len != prompt + completion:
            raise PlannerInputError("seq-len", f"a GRPO row is prompt + completion = {prompt + completion} tokens, not "
                                               f"--seq-len {args.seq_len}", "drop --seq-len (or --max-prompt-length)")
        args.seq_len = prompt + completion
    elif "seq_len" not in explicit:
        args.seq_len = 512 + completion
    elif args.seq_len <= completion:
        raise PlannerInputError("seq-len", f"a GRPO row is prompt + completion: --seq-len {args.seq_len} leaves no "
                                           f"prompt beside --max-completion-length {completion}",
                                "pass --max-prompt-length (and drop --seq-len)")
    args.padding = True
    if "batch_size" not in explicit and hasattr(args, "batch_size"):
        args.batch_size = 8  # TrainingArguments' per_device_train_batch_size, in completions


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "estimate")
    try:
        return _runner(argv[0] if argv[0] in SUBCOMMANDS else "estimate")(parse_command(argv))
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

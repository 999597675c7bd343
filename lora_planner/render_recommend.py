"""Human output of `lora-plan recommend`: the configuration, the reasons, the alternatives and the
`--verify` check, as rich tables. Only the CLI imports this module (rich stays off the API path)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lora_planner.memory import PHASE_TITLES
from lora_planner.planner import describe_budget, describe_usable, fits
from lora_planner.recommend import Recommendation, Verification
from lora_planner.render import print_wrapped
from lora_planner.specs import TrainingSpec

GIB = 2**30
METHOD_LABELS = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA"}
SHORT_METHOD = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _collate(t: TrainingSpec) -> str:
    return ", packed (padding-free rows of micro-batch x seq)" if t.packing else ", padded" if t.padding else ""


def _settings_line(rec: Recommendation) -> str:
    req = rec.request
    t = req.training
    precision = f"fp32 weights + {t.amp} autocast" if t.amp else f"{t.dtype} weights"
    gpus = f"{req.gpus} x " if req.gpus > 1 else ""
    budget = req.budget.name or describe_budget(req.budget)
    return " | ".join([
        f"{req.spec.name} on {gpus}{budget}", f"seq {t.seq_len}{_collate(t)}", f"global batch {req.global_batch}",
        precision,
        f"{t.optimizer} ({t.resolved_optimizer_impl})", f"{t.attention} attention", f"device {t.device}",
        f"headroom {100 * req.headroom:g} %",
    ])


def choice_table(rec: Recommendation) -> Table:
    req, c = rec.request, rec.choice
    title = "Recommended configuration" if rec.fits else "Nothing fits: the smallest configuration"
    table = Table(title=title, title_justify="left", show_header=False, title_style="bold" if rec.fits else "bold red")
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("")
    table.add_row("method", METHOD_LABELS[c.method])
    if req.gpus > 1:
        table.add_row("strategy", f"{req.strategy or 'ddp'} over {req.gpus} GPUs")
    if c.r is not None:
        table.add_row("rank r / alpha", f"{c.r} / {rec.alpha:g}")
        table.add_row("target modules", ", ".join(rec.target_modules))
    largest = f" (largest that fits: {c.max_micro_batch_size})" if c.max_micro_batch_size != c.micro_batch_size \
        and c.max_micro_batch_size else ""
    table.add_row("micro-batch per GPU", f"{c.micro_batch_size}{largest}")
    table.add_row("gradient accumulation", f"{c.gradient_accumulation_steps} steps")
    gpus = f"{req.gpus} GPUs" if req.gpus > 1 else "1 GPU"
    table.add_row("effective global batch", f"{c.effective_global_batch} ({c.micro_batch_size} x "
                                            f"{c.gradient_accumulation_steps} x {gpus}; asked {req.global_batch})")
    table.add_row("gradient checkpointing", "on" if c.grad_checkpointing else "off")
    table.add_row("predicted peak per GPU", f"{_gib(c.predicted_peak_bytes)} GiB at {PHASE_TITLES[c.peak_phase]}")
    table.add_row("budget per GPU", describe_budget(req.budget))
    table.add_row("usable memory", describe_usable(req.budget.memory_bytes, req.headroom))
    if rec.fits:
        table.add_row("fits", Text("yes", style="bold green"))
    else:
        table.add_row("fits", Text(f"no: needs {_gib(rec.needed_budget_bytes)} GiB per GPU", style="bold red"))
    return table


def alternatives_table(rec: Recommendation) -> Table:
    table = Table(title="Alternatives that fit: the Pareto frontier of method, r, micro-batch and checkpointing "
                        "vs peak (* recommended)", title_justify="left")
    for name in ("", "method", "r", "micro", "accum", "ckpt", "peak GiB", "max micro"):
        table.add_column(name, justify="left" if name in ("", "method", "ckpt") else "right", no_wrap=True)
    for a in rec.alternatives:
        chosen = a == rec.choice
        table.add_row("*" if chosen else "", SHORT_METHOD[a.method], "-" if a.r is None else str(a.r),
                      str(a.micro_batch_size), str(a.gradient_accumulation_steps),
                      "on" if a.grad_checkpointing else "off", _gib(a.predicted_peak_bytes),
                      str(a.max_micro_batch_size), style="bold" if chosen else "")
    return table


def verify_table(v: Verification) -> Table:
    table = Table(title=f"Verify: {v.backend} training step replayed under {v.mode} tensors (GiB; usable "
                        f"{_gib(v.usable_bytes)} GiB of {_gib(v.budget_bytes)} GiB)", title_justify="left")
    for name in ("run", "micro", "measured", "planner", "error", "to device", "device", "fits"):
        table.add_column(name, justify="left" if name in ("run", "fits") else "right", no_wrap=name == "fits")
    for r in v.runs:
        label = "chosen" if r.label == "recommended" else "next"
        if r.status != "ok":
            table.add_row(label, str(r.micro_batch_size), Text(r.status, style="bold red"),
                          _gib(r.predicted_peak_bytes), "", "", "", "")
            continue
        if v.fits(r):
            fit = Text("yes", style="green")
        elif fits(r.device_bytes, v.budget_bytes):
            fit = Text("headroom", style="yellow")
        else:
            fit = Text("no", style="red")
        table.add_row(label, str(r.micro_batch_size), _gib(r.measured_peak_bytes), _gib(r.predicted_peak_bytes),
                      f"{100 * r.relative_error:+.2f}%", f"{(r.added_bytes - r.cpu_kernel_extra_bytes) / GIB:+.2f}",
                      _gib(r.device_bytes), fit)
    return table


def render_verification(v: Verification, console: Console) -> None:
    if v.skipped:
        console.print(f"[yellow]verify: not run: {v.skipped}.[/yellow]")
        return
    console.print(verify_table(v))
    print_wrapped(console, f"Note: {v.note}. measured: peak allocated on CPU kernels; planner: its prediction for "
                           "that CPU step; error: planner / measured - 1; to device: modelled overhead (+ DDP buckets) "
                           "minus what CPU kernels keep beyond CUDA's; fits: device <= usable (yes), within the budget "
                           "but not the usable part (headroom), or no.", style="dim")
    extra = max((r.cpu_kernel_extra_bytes for r in v.runs), default=0)
    if extra >= 2**20:
        print_wrapped(console, f"CPU kernels keep up to {_gib(extra)} GiB more than the CUDA step here (dropout "
                               "masks, math-kernel attention under attention dropout): the fit is judged on the "
                               "device figure.", style="dim")
    tolerance = f"{100 * v.tolerance:g} %"
    worst = max((abs(r.relative_error) for r in v.runs if r.relative_error is not None), default=0.0)
    if v.confirmed:
        print_wrapped(console, f"verified: the planner is within {100 * worst:.2f} % of every measured peak "
                               f"(tolerance {tolerance}).", style="green")
    elif v.confirmed is False:
        print_wrapped(console, f"not confirmed: the planner is off by up to {100 * worst:.2f} % of a measured peak "
                               f"(tolerance {tolerance}).", style="yellow")
    for r in v.fit_surprises:
        verdict = "fits" if v.fits(r) else "does not fit"
        print_wrapped(console, f"note: measured, the {r.label} ({r.micro_batch_size}) {verdict}: "
                               f"{_gib(r.device_bytes)} GiB on the device against the usable {_gib(v.usable_bytes)} GiB"
                               f"; the search predicted the opposite, so the usable limit lies within the planner's "
                               "error.", style="yellow")
    for r in v.runs:
        if r.error:
            console.print(f"[red]{r.label}: {r.error}[/red]", highlight=False)


def render_recommendation(rec: Recommendation, console: Console, verification: Verification | None = None,
                          explain: bool = False) -> None:
    console.print(_settings_line(rec), style="dim")
    console.print(choice_table(rec))
    for warning in rec.warnings:
        print_wrapped(console, f"warning: {warning}", rest="  ", style="yellow")
    console.print(Text("Why", style="bold"))
    for reason in rec.reasons:
        print_wrapped(console, reason, first="- ", rest="  ")
    if rec.alternatives:
        console.print(alternatives_table(rec))
    if explain:
        _render_evidence(rec, console)
    if verification is not None:
        render_verification(verification, console)



def _render_evidence(rec: Recommendation, console: Console) -> None:
    """`--explain`: the evidence chain behind the rank (`lora_planner.rank_evidence`), each step with its sources."""
    from lora_planner.rank_evidence import cited

    ev = rec.request.evidence
    console.print(Text("Evidence", style="bold"))
    if ev is None:
        print_wrapped(console, "No data size given: the rank is the default or the one asked for. Pass --train-tokens "
                               "N or --examples N (and --objective) for a rank from the data and the evidence.",
                      first="- ", rest="  ")
        return
    for step in ev.steps:
        print_wrapped(console, cited(step), first="- ", rest="  ")

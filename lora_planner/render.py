"""Human output of a `Plan`: tables drawn by `lora_planner.textable` (stdlib only, so the estimate path answers
cold in <= 0.08 s). Only the CLI imports this module."""

from __future__ import annotations

import re
import textwrap

from typing import Any

from lora_planner.memory import CATEGORIES, PHASE_TITLES
from lora_planner.planner import Plan, describe_budget, describe_usable, gib_text, sdpa_kernel_for
from lora_planner.specs import TrainingSpec
from lora_planner.textable import Console, Styled, Table

GIB = 2**30
METHOD_TITLES = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA"}
SHORT_CATEGORY = {"weights": "weights", "gradients": "grads", "optimizer_states": "optimizer",
                  "activations": "acts", "temporaries": "temps"}


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _percent(fraction: float) -> str:
    return "100 %" if fraction == 1 else f"{100 * fraction:.4f} %"


def _seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"



def gib(n: int) -> str:
    """A table cell: the table's title or column header carries the unit."""
    return f"{n / GIB:.2f}"


NBSP = "\u00a0"
_NUMBER_UNIT = re.compile(r"(\d) (B|kB|KiB|MB|MiB|GB|GiB|TB|TiB|%|ms|s|min|h|days|tokens)(?=[\s.,;:)]|$)")


def print_wrapped(console: Any, text: str, first: str = "", rest: str = "", style: str | None = None) -> None:
    """Print prose wrapped to the console's width without ever separating a number from its unit.

    `console` is a `lora_planner.textable.Console` or a rich one (the recommender's). Rich breaks lines at any
    whitespace, the non-breaking space included, so the text is wrapped here
    (textwrap breaks only at ASCII whitespace: a non-breaking space between number and unit holds them
    together) and each line printed as it is."""
    kept = _NUMBER_UNIT.sub(lambda m: f"{m[1]}{NBSP}{m[2]}", text).replace("(1 - ", f"(1{NBSP}-{NBSP}")
    lines = textwrap.wrap(kept, width=max(console.width, 20), initial_indent=first, subsequent_indent=rest,
                          break_long_words=False, break_on_hyphens=False) or [first]
    for line in lines:
        console.print(line.replace(NBSP, " "), style=style, markup=False, highlight=False, soft_wrap=True)


def dpo_rows(t: TrainingSpec) -> str:
    """' pairs (2b rows)' for a preference objective, whose pairs are two rows each; ' completions' for GRPO's rows,
    with the prompt / completion split of their tokens."""
    if t.objective == "grpo":
        return f" completion{'s' if t.batch_size != 1 else ''}"
    return f" pair{'s' if t.batch_size != 1 else ''} ({t.rows[0]} rows)" if t.rows_per_example > 1 else ""


def grpo_split(t: TrainingSpec) -> str:
    """GRPO's row: ' (P prompt + C completion)'."""
    if t.objective != "grpo":
        return ""
    lc = t.grpo.max_completion_length
    return f" ({t.seq_len - lc} prompt + {lc} completion)"


def collate_text(t: TrainingSpec) -> str:
    """How the batch reaches the model, beside its size."""
    if t.packing:
        return f" packed into 1 row of {t.tokens} (padding-free)"
    if t.padding:
        return " padded (attention mask)"
    return " (every row full)" if t.batch_size > 1 else ""


def _settings_line(plan: Plan) -> str:
    t = plan.training
    precision = f"fp32 weights + {t.amp} autocast" if t.amp else f"{t.dtype} weights"
    lora = t.lora
    if all("layer" not in d or d.endswith(" layers)") and "(all " in d for d in plan.adapted_modules):
        targets = ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in plan.target_modules))  # every layer
    else:
        targets = ", ".join(plan.adapted_modules)
    parts = [
        precision,
        f"{t.optimizer} ({t.resolved_optimizer_impl}: {t.optimizer_impl_reason})",
        f"batch {t.batch_size}{dpo_rows(t)} x {t.seq_len} tokens{grpo_split(t)}{collate_text(t)}",
        f"{t.attention} attention" + _kernel_note(plan),
        *(["Liger kernels"] if t.liger else []),
        *([f"loss {t.loss}"] if t.loss != "hf" else []),
        ("gradient checkpointing" + (" (reentrant)" if t.use_reentrant else "") if t.grad_checkpointing
         else "no checkpointing") + _offload_note(t),
        f"device {t.device}",
    ]
    if t.gpus > 1:
        parts.append(f"{t.gpus} GPUs, {t.resolved_strategy} (memory per GPU, tokens/s for all)")
    elif t.offload != "none":
        parts.append(f"1 GPU, {t.resolved_strategy}")
    if t.offload != "none":
        what = "optimizer states, fp32 master and its gradient" if t.offload == "optimizer" else \
            "parameters, gradients and optimizer states"
        parts.append(f"{what} offloaded to host RAM ({'pinned' if t.offload_pin_memory else 'pageable'}; pinned "
                     "blocks reserved at powers of two by torch's host allocator)")
    if any(m != "full" for m in plan.methods):
        rslora = f" rsLoRA (scaling alpha / sqrt(r) = {lora.scaling:.3g})" if lora.use_rslora else ""
        kind = "DoRA" if lora.use_dora else "LoRA"
        saved = f", {', '.join(lora.modules_to_save)} trained in full" if lora.modules_to_save else ""
        saved += {"none": "", "lora_only": ", the adapted layers' biases trained",
                  "all": ", every bias trained"}[lora.bias]
        if lora.trainable_token_indices:
            saved += ", trainable tokens " + ", ".join(f"{len(ids):,} on {name or 'the input embeddings'}"
                                                        for name, ids in lora.trainable_token_indices)
        parts.append(f"{kind} r={lora.r} alpha={lora.effective_alpha:g}{rslora} on {targets} ({lora.adapter_dtype} "
                     f"adapters){saved}")
    if t.load_in_8bit:
        parts.append("8-bit base (LLM.int8, load_in_8bit) " + (
            "after prepare_model_for_kbit_training (embeddings, norms, lm_head in fp32)" if t.kbit_prep and
            t.dtype != "fp32" else "without prepare_model_for_kbit_training" if t.dtype != "fp32" else "in fp32"))
    if "qlora" in plan.methods and t.dtype != "fp32":
        parts.append("QLoRA after prepare_model_for_kbit_training (embeddings, norms, lm_head in fp32)"
                     if t.kbit_prep else "QLoRA without prepare_model_for_kbit_training (--no-kbit-prep)")
        parts.append(f"{t.quant_type.upper()} " + ("with double quantization" if t.double_quant
                                                   else "without double quantization (--no-double-quant)")
                     + f", 4-bit matmuls in {t.matmul_4bit_dtype}")
    return " | ".join(parts)


def _offload_note(t) -> str:
    """`--activation-offloading`, as assumed (`lora_planner.activation_offload`; modelled from source, not measured)."""
    return {"none": "",
            "torchtune": " with torchtune's activation offloading (saved tensors of 1 KiB or more in pinned host "
                         "RAM, the last 5 kept; modelled from its source)",
            "unsloth": " with Unsloth's offloaded checkpointing (layer inputs in pinned host RAM through two 16-bit GPU "
                       "buffers; modelled from its source)"}[t.activation_offload]


def _kernel_note(plan: Plan) -> str:
    """SDPA's kernel on CUDA, as assumed (`planner.sdpa_kernel_for`)."""
    kernel = sdpa_kernel_for(plan.spec, plan.training)
    names = {"flash": "flash", "efficient": "memory-efficient", "math": "math"}
    return f" ({names[kernel[0]]} kernel)" if kernel else ""


def _fits_cell(plan: Plan, method: str) -> Styled:
    mp = plan.methods[method]
    if mp.fits is None:
        smallest = mp.fits_on[0] if mp.fits_on else None
        return Styled(f"{smallest} or larger" if smallest else "no catalog GPU", "cyan")
    if mp.fits:
        return Styled("yes", "bold green")
    if plan.budget is not None and mp.estimate.peak_device_bytes <= plan.budget.memory_bytes:
        return Styled("no (in headroom)", "bold yellow")  # within the budget, not within the usable part
    return Styled("no", "bold red")


def fits_label(plan: Plan) -> str:
    """The label of the fit row: what the peak is compared with, with its unit."""
    if plan.budget is None or plan.usable_bytes is None:
        return "fits on"
    usable = gib_text(plan.usable_bytes)
    return f"fits in {plan.budget.name} (usable {usable})" if plan.budget.name else f"fits in usable {usable}"


def plan_table(plan: Plan) -> Table:
    """Methods side by side: the peak's breakdown, the peak, the seed's rule, and the fit."""
    methods = list(plan.methods)
    per_gpu = " per GPU" if plan.training.gpus > 1 else ""
    table = Table(title=f"Peak memory{per_gpu} of one training step (GiB)")
    table.add_column("", style="bold", no_wrap=True)
    for method in methods:
        table.add_column(METHOD_TITLES[method] + (" (8-bit base)" if method == "lora" and plan.training.load_in_8bit
                                                  else ""), justify="right")
    est = {m: plan.methods[m].estimate for m in methods}
    table.add_row("trainable params", *[human_count(est[m].trainable_params) for m in methods])
    table.add_row("trainable fraction m", *[_percent(est[m].trainable_fraction) for m in methods])
    for category in CATEGORIES:
        label = category.replace("_", " ")
        table.add_row(f"  {label}", *[gib(est[m].peak.breakdown.as_dict()[category]) for m in methods])
    table.add_row("peak allocated", *[Styled(gib(est[m].peak_allocated_bytes), "bold") for m in methods])
    table.add_row("  at phase", *[PHASE_TITLES[est[m].peak_phase] for m in methods])
    if plan.training.device == "cuda":
        table.add_row("  + CUDA context etc.", *[gib(est[m].device_overhead_bytes) for m in methods])
        table.add_row("peak on device", *[Styled(gib(est[m].peak_device_bytes), "bold") for m in methods])
    if any(est[m].host for m in methods):  # --offload: the host RAM the offloaded states take
        table.add_row("host RAM per rank", *[gib(est[m].host.total_bytes) if est[m].host else "-" for m in methods])
        table.add_row("  pinned (reserved)", *[gib(est[m].host.pinned_reserved_bytes) if est[m].host else "-"
                                                for m in methods])
        ranks = next(est[m].host.ranks_per_node for m in methods if est[m].host)
        table.add_row(f"host RAM per node ({ranks})", *[Styled(gib(est[m].host.per_node_bytes), "bold")
                                                      if est[m].host else "-" for m in methods])
    # The rule is for one GPU holding the whole model: beside a per-GPU peak it is labelled as such.
    seed_label = "seed rule 4x | (1+4m)x" if plan.training.gpus == 1 else "seed rule, whole model on 1 GPU"
    table.add_row(seed_label, *[gib(est[m].seed_rule_bytes) for m in methods])
    if plan.training.gpus == 1:
        table.add_row("  vs peak", *[f"{100 * (est[m].seed_rule_bytes / est[m].peak_allocated_bytes - 1):+.0f} %"
                                     for m in methods])
    gpu = plan.methods[methods[0]].throughput.gpu
    table.add_row(f"step time on {gpu}", *[_seconds(plan.methods[m].throughput.step_time_s) for m in methods])
    gpus = plan.training.gpus
    table.add_row("  tokens/s", *[f"{plan.methods[m].throughput.tokens_per_s * gpus:,.0f}" for m in methods])
    table.add_row("  TFLOPs per step", *[f"{plan.methods[m].throughput.flops.total / 1e12:,.2f}" for m in methods])
    if plan.train_tokens:
        table.add_row(f"  time for {plan.train_tokens:.3g} tokens",
                      *[_seconds(plan.methods[m].throughput.time_for_tokens_s(plan.train_tokens) / gpus)
                        for m in methods])
    table.add_row(fits_label(plan), *[_fits_cell(plan, m) for m in methods])
    return table


def phases_table(plan: Plan, method: str) -> Table:
    """Every phase of one method, so the user sees where the peak comes from."""
    e = plan.methods[method].estimate
    table = Table(title=f"{METHOD_TITLES[method]}: live memory by phase (GiB)")
    table.add_column("phase", style="bold", no_wrap=True)
    for category in CATEGORIES:
        table.add_column(SHORT_CATEGORY[category], justify="right")
    table.add_column("total", justify="right", style="bold")
    for p in e.phases:
        style = "reverse" if p.phase == e.peak_phase else ""
        values = p.breakdown.as_dict()
        table.add_row(PHASE_TITLES[p.phase], *[gib(values[c]) for c in CATEGORIES], gib(p.breakdown.total_bytes),
                      style=style)
    return table


def saved_tensors_table(plan: Plan, method: str, top: int = 10) -> Table:
    """The largest tensors one decoder layer keeps for backward, so the activation term is explained."""
    e = plan.methods[method].estimate
    acts = e.activations
    items = sorted(acts.largest_layer, key=lambda item: -item.nbytes)
    total = acts.total(acts.largest_layer)
    runs = acts.layer_runs
    if len(runs) == 1 or (len(runs) == 2 and runs[0][0] == 1 and runs[1][1] is acts.largest_layer):
        size = f"{total / 2**20:,.1f} MiB x {acts.num_layers} layers"
    else:  # LoRA on some layers only: layers differ (layer 0 alone may differ under LoRA: frozen input)
        size = f"the largest layer, {total / 2**20:,.1f} MiB; all {acts.num_layers} layers {acts.all_layers_bytes / 2**20:,.1f} MiB"
    table = Table(title=f"{METHOD_TITLES[method]}: what one layer keeps for backward ({size})")
    table.add_column("saved tensor", no_wrap=True)
    table.add_column("MiB", justify="right")
    table.add_column("share", justify="right")
    for item in items[:top]:
        table.add_row(item.name, f"{item.nbytes / 2**20:,.2f}", f"{100 * item.nbytes / total:.0f} %")
    if len(items) > top:
        rest = sum(item.nbytes for item in items[top:])
        table.add_row(f"{len(items) - top} more", f"{rest / 2**20:,.2f}", f"{100 * rest / total:.0f} %")
    return table


def render_plan(plan: Plan, console: Console, detail: bool = False) -> None:
    spec, params = plan.spec, plan.params
    groups = ", ".join(f"{g} {human_count(n)}" for g, n in params.by_group.items() if n)
    headline = f"{spec.name} ({spec.family}): {human_count(params.total)} parameters ({groups})"
    if spec.is_moe:
        headline = (f"{spec.name} ({spec.family}, {spec.num_experts} experts, {spec.num_experts_per_tok} per token): "
                    f"{human_count(params.total)} parameters, all resident in memory; {human_count(params.active)} "
                    f"active per token ({human_count(params.active - params.by_group['embeddings'])} without the "
                    f"embedding table), what the FLOPs follow ({groups})")
    first, *rest = textwrap.wrap(headline, width=max(console.width, 20), break_long_words=False,
                                 break_on_hyphens=False)
    console.print([Styled(spec.name, "bold"), Styled(first[len(spec.name):])])  # the name in bold
    for line in rest:
        console.print(line)
    print_wrapped(console, _settings_line(plan), style="dim")
    per_gpu = " per GPU" if plan.training.gpus > 1 else ""
    if plan.budget is not None:
        print_wrapped(console, f"budget{per_gpu}: {describe_budget(plan.budget)}; "
                               f"{describe_usable(plan.budget.memory_bytes, plan.headroom)} (--headroom)")
    else:
        print_wrapped(console, f"fits on: the smallest catalog GPU whose usable memory holds the peak on device, "
                               f"usable = memory x (1 - {100 * plan.headroom:g} %) (--headroom)", style="dim")
    for warning in plan.warnings:
        print_wrapped(console, f"warning: {warning}", rest="  ", style="yellow")
    console.print(plan_table(plan))
    mp = next(iter(plan.methods.values()))
    print_wrapped(console, f"step times: {mp.throughput.mfu:.0%} model-FLOPs utilisation of {mp.throughput.gpu}'s dense "
                  f"{plan.training.compute_dtype} peak + the memory-bound optimizer step" +
                  ("" if plan.budget and plan.budget.name else " (reference GPU; pass --gpu)"), style="dim")
    if detail:
        for method in plan.methods:
            console.print(phases_table(plan, method))
            if plan.methods[method].estimate.activations.layer_bytes:
                console.print(saved_tensors_table(plan, method))


def render_fit_edits(edits: list, gpu: str, console: Any) -> None:
    """`lora_planner.fit_edit`: per method that does not fit, the smallest edit to the user's files, as a diff of
    their keys (a key the file does not have yet is only added); changes no file can say are command-line flags."""""
    from lora_planner.planner import gib_text

    for edit in edits:
        head = f"{edit.method} does not fit {gpu} (usable {gib_text(edit.usable_bytes)}, peak " \
               f"{gib_text(edit.peak_before_bytes)})"
        if not edit.fits:
            print_wrapped(console, f"{head}; no edit within checkpointing, Liger, an 8-bit optimizer, a smaller "
                                   f"micro-batch, a 4-bit base, offload or a shorter sequence fits ({edit.plans_tried} "
                                   "plans): try `lora-plan recommend`, more GPUs or a larger one", style="red")
            continue
        kept = f"; the global batch kept at {edit.global_batch} sequences per GPU per step" if edit.global_batch and \
            "micro-batch" in edit.levers else ""
        print_wrapped(console, f"{head}. Smallest edit ({', '.join(edit.levers)}): peak "
                               f"{gib_text(edit.peak_after_bytes)}{kept}", style="bold")
        for file in dict.fromkeys(c.file for c in edit.changes):
            console.print(f"  {file}" if file else "  on the command line", style="dim")
            for c in (c for c in edit.changes if c.file == file):
                if not c.added:
                    console.print(f"  - {c.key}: {_yaml(c.before)}", style="red")
                console.print(f"  + {c.key}: {_yaml(c.after)}", style="green")


def _yaml(value: Any) -> str:
    """A value as the file would spell it (YAML / JSON scalars: true, false, lists)."""
    import json

    return json.dumps(value) if isinstance(value, (bool, list, dict)) or value is None else str(value)

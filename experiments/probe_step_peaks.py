"""Probe where a training step's memory peak really is, on tiny Llama models (CPU, exact bytes).

Grid: vocab 1000 / 32000 x full / LoRA (r=4, q_proj+v_proj) x fp32 / bf16 x AdamW foreach / for-loop
x gradient checkpointing off / on. Llama: hidden 64, intermediate 176, 4 heads, 2 kv heads,
2 layers; batch 2, seq 16; labels = input_ids (HF shifts them). Each config runs 3 steps with
`measure_training_step`; step 1 (optimizer state created lazily) and the steady state are reported.
Each config is also re-run under FakeTensorMode (model built on meta, `to_empty` inside the mode,
`hf_fake_parity()` on) and the per-step peaks compared.

"Loss scratch" = bytes, live at the peak, of activations/temporaries shaped like the logits
((B, S, V) or (B*S, V), any dtype), in units of B*S*V*4 (one fp32 logits tensor).

Run:  PYTHONPATH=. .venv/bin/python experiments/probe_step_peaks.py
Writes reports/probe_steps/step_peaks.md and step_peaks.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from lora_planner.profiler.tracker import (
    LiveTensorTracker,
    StepPeak,
    hf_fake_parity,
    measure_training_step,
)

B, S = 2, 16
LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
PHASES = ("forward", "backward", "optimizer_step", "zero_grad")
CATS = ("weights", "gradients", "optimizer_states", "activations", "temporaries")
ABBR = {"forward": "fwd", "backward": "bwd", "optimizer_step": "opt", "zero_grad": "zero_grad"}


def build_model(vocab: int, mode: str, dtype: torch.dtype, grad_ckpt: bool, on_meta: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, **LLAMA)
    torch.manual_seed(0)
    if on_meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if mode == "lora":
        lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lcfg)  # default autocast_adapter_dtype=True: adapters fp32
    return model


def run_one(vocab: int, mode: str, dtype: torch.dtype, foreach: bool, grad_ckpt: bool, fake: bool):
    def make_batch():
        ids = torch.randint(0, vocab, (B, S))
        return {"input_ids": ids, "labels": ids}

    tracker = LiveTensorTracker()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        model = build_model(vocab, mode, dtype, grad_ckpt, on_meta=True)
        # hf_fake_parity: without it transformers sees FakeTensors as "tracing" and builds a
        # packed-sequence 4-D mask the real run never builds (LoRA peaks then differ)
        with FakeTensorMode(allow_non_fake_inputs=True), hf_fake_parity():
            model.to_empty(device="cpu")
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
            res = measure_training_step(model, make_batch, opt, steps=3, tracker=tracker)
    else:
        model = build_model(vocab, mode, dtype, grad_ckpt, on_meta=False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
        res = measure_training_step(model, make_batch, opt, steps=3, tracker=tracker)
    tracker.detach()
    return res, tracker


def loss_scratch_units(tracker: LiveTensorTracker, event: int, vocab: int) -> float:
    unit = B * S * vocab * 4
    total = 0
    for info in tracker.storages_live_at(event):
        if info.category not in ("activations", "temporaries"):
            continue
        if info.shape and info.shape[-1] == vocab and math.prod(info.shape) == B * S * vocab:
            total += info.nbytes
    return total / unit


def top_storages(tracker: LiveTensorTracker, event: int, n: int = 6) -> list[dict]:
    out = []
    for info in tracker.storages_live_at(event):
        if info.category in ("activations", "temporaries"):
            out.append(
                dict(bytes=info.nbytes, category=info.category, op=info.op, shape=list(info.shape),
                     dtype=info.dtype, created=f"{info.created_phase}@{info.created_step}")
            )
        if len(out) >= n:
            break
    return out


def step_dict(s: StepPeak, tracker: LiveTensorTracker, vocab: int) -> dict:
    return dict(
        step=s.step,
        peak_bytes=s.peak_bytes,
        peak_phase=s.peak_phase,
        peak_breakdown=s.peak_breakdown,
        loss_scratch_units=round(loss_scratch_units(tracker, s.peak_event, vocab), 4),
        largest_transients_at_peak=top_storages(tracker, s.peak_event),
        phases={
            p.phase: dict(
                peak_bytes=p.peak_bytes,
                peak_breakdown=p.peak_breakdown,
                peak_loss_scratch_units=round(loss_scratch_units(tracker, p.peak_event, vocab), 4),
                end_bytes=p.end_bytes,
                end_breakdown=p.end_breakdown,
            )
            for p in s.phases
        },
    )


def kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/probe_steps", help="output folder")
    ap.add_argument("--no-fake", action="store_true", help="skip the FakeTensorMode re-runs")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    torch.set_num_threads(2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    grid = itertools.product(
        (1000, 32000), ("full", "lora"), (torch.float32, torch.bfloat16), (True, False), (False, True)
    )
    t_all = time.perf_counter()
    for vocab, mode, dtype, foreach, gc in grid:
        t0 = time.perf_counter()
        res, tr = run_one(vocab, mode, dtype, foreach, gc, fake=False)
        fake_peaks = None
        fake_err = None
        if not args.no_fake:
            try:
                fres, _ = run_one(vocab, mode, dtype, foreach, gc, fake=True)
                fake_peaks = [s.peak_bytes for s in fres.steps]
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                fake_err = f"{type(exc).__name__}: {exc}"[:200]
        steady = res.steady_state
        assert steady is not None
        row = dict(
            vocab=vocab,
            mode=mode,
            dtype=str(dtype).removeprefix("torch."),
            foreach=foreach,
            grad_ckpt=gc,
            batch=B,
            seq=S,
            param_bytes=res.param_bytes,
            trainable_param_bytes=res.trainable_param_bytes,
            buffer_bytes=res.buffer_bytes,
            adopted_bytes=res.adopted_bytes,
            logits_fp32_bytes=B * S * vocab * 4,
            step1=step_dict(res.first_step, tr, vocab),
            steady=step_dict(steady, tr, vocab),
            real_peaks=[s.peak_bytes for s in res.steps],
            fake_peaks=fake_peaks,
            fake_matches=None if fake_peaks is None else fake_peaks == [s.peak_bytes for s in res.steps],
            fake_error=fake_err,
            seconds=round(time.perf_counter() - t0, 3),
        )
        rows.append(row)
        print(
            f"V={vocab:>5} {mode:4} {row['dtype']:8} foreach={foreach!s:5} gc={gc!s:5} "
            f"step1={kib(row['step1']['peak_bytes']):>9} KiB ({row['step1']['peak_phase']}) "
            f"steady={kib(row['steady']['peak_bytes']):>9} KiB ({row['steady']['peak_phase']}) "
            f"loss_scratch={row['steady']['loss_scratch_units']}u fake_ok={row['fake_matches']}",
            flush=True,
        )

    with open(out_dir / "step_peaks.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out_dir / "step_peaks.md").write_text(render_md(rows, time.perf_counter() - t_all))
    print(f"wrote {out_dir / 'step_peaks.md'} and {out_dir / 'step_peaks.jsonl'}")
    return 0


def findings(rows: list[dict]) -> list[str]:
    out = []
    key = lambda r: (r["vocab"], r["mode"], r["dtype"], r["foreach"], r["grad_ckpt"])  # noqa: E731
    by = {key(r): r for r in rows}
    # where the peak is
    where: dict[tuple, set] = {}
    for r in rows:
        where.setdefault((r["mode"],), set()).add(r["steady"]["peak_phase"])
    for (mode,), phases in sorted(where.items()):
        out.append(f"- {mode}: steady-state peak falls in {', '.join(sorted(phases))} in every config.")
    # loss scratch per phase peak
    for mode in ("full", "lora"):
        for dtype in ("float32", "bfloat16"):
            f = {r["steady"]["phases"]["forward"]["peak_loss_scratch_units"] for r in rows
                 if r["mode"] == mode and r["dtype"] == dtype}
            b = {r["steady"]["phases"]["backward"]["peak_loss_scratch_units"] for r in rows
                 if r["mode"] == mode and r["dtype"] == dtype}
            out.append(
                f"- loss scratch ({mode}, {dtype}), units of B*S*V*4: at the forward-phase peak "
                f"{sorted(f)}, at the backward-phase peak {sorted(b)}."
            )
    # foreach vs for-loop
    for r in rows:
        if not r["foreach"]:
            continue
        other = by[(r["vocab"], r["mode"], r["dtype"], False, r["grad_ckpt"])]
        d = r["steady"]["peak_bytes"] - other["steady"]["peak_bytes"]
        if r["grad_ckpt"]:
            continue
        out.append(
            f"- foreach - for-loop steady peak, V={r['vocab']} {r['mode']} {r['dtype']}: "
            f"{d:,} B = {d / r['trainable_param_bytes']:.3f} x trainable param bytes."
        )
    # checkpointing
    for r in rows:
        if r["grad_ckpt"] or not r["foreach"]:
            continue
        on = by[(r["vocab"], r["mode"], r["dtype"], r["foreach"], True)]
        out.append(
            f"- grad checkpointing, V={r['vocab']} {r['mode']} {r['dtype']}: steady peak "
            f"{r['steady']['peak_bytes']:,} -> {on['steady']['peak_bytes']:,} B; live at forward end "
            f"{r['steady']['phases']['forward']['end_bytes']:,} -> "
            f"{on['steady']['phases']['forward']['end_bytes']:,} B."
        )
    # step 1 vs steady
    diffs = {(r["mode"], r["steady"]["peak_bytes"] - r["step1"]["peak_bytes"] ==
              r["steady"]["peak_breakdown"]["optimizer_states"]) for r in rows
             if r["steady"]["peak_bytes"] != r["step1"]["peak_bytes"]}
    same = sorted({r["mode"] for r in rows if r["steady"]["peak_bytes"] == r["step1"]["peak_bytes"]})
    out.append(f"- step-1 peak == steady peak for: {same or 'none'}; where they differ "
               f"(mode, difference == optimizer state bytes): {sorted(diffs)}.")
    return out


def render_md(rows: list[dict], seconds: float) -> str:
    lines = [
        "# Training-step memory peaks, tiny Llama (exact live-tensor bytes, CPU)",
        "",
        f"Generated by `experiments/probe_step_peaks.py` ({seconds:.0f} s, torch {torch.__version__}).",
        f"Llama hidden 64, intermediate 176, 4 heads / 2 kv heads, 2 layers; batch {B}, seq {S}; "
        "AdamW(lr=1e-3); LoRA r=4 on q_proj,v_proj (adapters fp32: peft autocasts them); "
        "gradient checkpointing non-reentrant. Bytes are sums of live untyped-storage sizes "
        "(no allocator rounding). KiB = 1024 B.",
        "",
        "Columns: step-1 and steady-state (steps 2-3) peak and the phase it falls in; the steady "
        "peak's breakdown W/G/O/A/T = weights / gradients / optimizer_states / activations / "
        "temporaries; live bytes at the end of each steady-state phase; loss scratch = logits-"
        "shaped activations+temporaries live at the steady peak, in units of B*S*V*4; "
        "fake = FakeTensorMode run gives identical per-step peaks.",
        "",
        "| V | mode | dtype | foreach | ckpt | step-1 peak KiB (phase) | steady peak KiB (phase) "
        "| W | G | O | A | T | end fwd | end bwd | end opt | end zero_grad | loss scratch @peak "
        "| bwd-peak loss scratch | fake |",
        "|" + "---|" * 19,
    ]
    for r in rows:
        s1, st = r["step1"], r["steady"]
        bd = st["peak_breakdown"]
        ends = [kib(st["phases"][p]["end_bytes"]) if p in st["phases"] else "-" for p in PHASES]
        bwd = st["phases"].get("backward", {}).get("peak_loss_scratch_units", "-")
        fake = "n/a" if r["fake_matches"] is None else ("yes" if r["fake_matches"] else "NO")
        if r["fake_error"]:
            fake = "error"
        lines.append(
            f"| {r['vocab']} | {r['mode']} | {r['dtype']} | {'yes' if r['foreach'] else 'no'} "
            f"| {'on' if r['grad_ckpt'] else 'off'} "
            f"| {kib(s1['peak_bytes'])} ({ABBR.get(s1['peak_phase'], s1['peak_phase'])}) "
            f"| {kib(st['peak_bytes'])} ({ABBR.get(st['peak_phase'], st['peak_phase'])}) "
            + "".join(f"| {kib(bd[c])} " for c in CATS)
            + "".join(f"| {e} " for e in ends)
            + f"| {st['loss_scratch_units']} | {bwd} | {fake} |"
        )
    lines += ["", "## Findings (computed from the rows above)", ""] + findings(rows)
    errors = [r for r in rows if r["fake_error"]]
    if errors:
        lines += ["", "FakeTensorMode errors:", ""]
        lines += [
            f"- V={r['vocab']} {r['mode']} {r['dtype']} foreach={r['foreach']} ckpt={r['grad_ckpt']}: "
            f"{r['fake_error']}"
            for r in errors
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

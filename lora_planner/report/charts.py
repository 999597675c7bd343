"""Charts of a report: each function takes a DataFrame (from `tables`) and returns a matplotlib Figure.

Headless: figures are built with `matplotlib.figure.Figure` on the Agg backend (no pyplot state, no
window); the caller saves them (`fig.savefig(path)`). Memory is shown in GiB (2^30 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before anything could pick an interactive backend

import numpy as np  # noqa: E402 (after the backend is chosen)
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lora_planner.memory import CATEGORIES  # noqa: E402

GIB = 2**30
METHOD_TITLES = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA"}
METHOD_COLORS = {"full": "#d62728", "lora": "#1f77b4", "qlora": "#2ca02c"}
CATEGORY_COLORS = {"weights": "#4e79a7", "gradients": "#f28e2b", "optimizer_states": "#e15759",
                   "activations": "#76b7b2", "temporaries": "#edc948"}
PHASE_TITLES = {"forward_end": "forward end", "backward_start": "backward start",
                "backward_layers": "backward (layers)", "backward_end": "backward end",
                "optimizer_step": "optimizer step"}
DPI = 110


def _figure(width: float = 8.0, height: float = 5.0, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _capacity_lines(ax: Any, capacities: Mapping[str, int] | None) -> None:
    for name, nbytes in (capacities or {}).items():
        ax.axhline(nbytes / GIB, color="0.35", linestyle=":", linewidth=1)
        ax.annotate(name, xy=(1.0, nbytes / GIB), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color="0.25")


def breakdown_chart(frame: pd.DataFrame, model: str = "", settings: str = "") -> Figure:
    """Stacked bars: what is live at each method's peak (weights, gradients, optimizer states,
    activations, temporaries), the CUDA overhead on top, and the seed's rule as a marker."""
    fig, ax = _figure(7.5, 5.2)
    x = np.arange(len(frame))
    bottom = np.zeros(len(frame))
    for category in CATEGORIES:
        values = frame[f"{category}_bytes"].to_numpy(dtype=float) / GIB
        ax.bar(x, values, bottom=bottom, color=CATEGORY_COLORS[category], label=category.replace("_", " "), width=0.6)
        bottom += values
    overhead = frame["device_overhead_bytes"].to_numpy(dtype=float) / GIB
    if overhead.any():
        ax.bar(x, overhead, bottom=bottom, color="white", edgecolor="0.4", hatch="//", width=0.6,
               label="CUDA context + allocator reserve")
    for i, row in enumerate(frame.itertuples()):
        top = bottom[i] + overhead[i]
        ax.annotate(f"{top:.1f} GiB\npeak at {PHASE_TITLES.get(row.peak_phase, row.peak_phase)}", (i, top),
                    xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    seed = frame["seed_rule_bytes"].to_numpy(dtype=float) / GIB
    ax.scatter(x, seed, marker="_", s=900, color="black", linewidths=2, zorder=5,
               label="seed rule: 4x (full), (1+4m)x (LoRA)")
    ax.set_xticks(x, [METHOD_TITLES.get(m, m) for m in frame["method"]])
    ax.set_xlabel("training method (same model, batch and settings)")
    ax.set_ylabel("memory at the peak (GiB)")
    ax.set_ylim(0, max(bottom + overhead) * 1.22)
    ax.set_title(f"{model}: memory at the peak of one training step" + (f"\n{settings}" if settings else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right", markerscale=0.35)
    return fig


def rank_chart(frame: pd.DataFrame, capacities: Mapping[str, int] | None = None, model: str = "",
               settings: str = "") -> Figure:
    """Peak on the device vs LoRA rank for LoRA and QLoRA (full fine-tuning flat, for reference), the
    seed's (1+4m)x rule dashed, and GPU capacities as dotted lines."""
    fig, ax = _figure(8, 5)
    for method, group in frame.groupby("method", sort=False):
        group = group.sort_values("r")
        color = METHOD_COLORS.get(method)
        ax.plot(group["r"], group["peak_device_bytes"] / GIB, marker="o", color=color,
                label=f"{METHOD_TITLES.get(method, method)}: planner (peak on device)")
        if method != "full":
            ax.plot(group["r"], group["seed_rule_bytes"] / GIB, linestyle="--", color=color,
                    label=f"{METHOD_TITLES.get(method, method)}: seed rule (1+4m)x")
    _capacity_lines(ax, capacities)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{model}: peak memory vs LoRA rank" + (f"\n{settings}" if settings else ""), fontsize=10)
    ax.legend(fontsize=8, loc="center left")
    return fig


def scaling_chart(frame: pd.DataFrame, axis: str, capacities: Mapping[str, int] | None = None, model: str = "",
                  settings: str = "") -> Figure:
    """Peak on the device vs batch size or sequence length, one line per method, GPU capacities dotted."""
    label = {"batch_size": "micro-batch size (sequences)", "seq_len": "sequence length (tokens)"}[axis]
    fig, ax = _figure(8, 5)
    for method, group in frame.groupby("method", sort=False):
        group = group.sort_values(axis)
        ax.plot(group[axis], group["peak_device_bytes"] / GIB, marker="o", color=METHOD_COLORS.get(method),
                label=METHOD_TITLES.get(method, method))
    _capacity_lines(ax, capacities)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.set_ylabel("peak memory on the device (GiB)")
    ax.set_ylim(bottom=0)
    title = "batch size" if axis == "batch_size" else "sequence length"
    ax.set_title(f"{model}: peak memory vs {title}" + (f"\n{settings}" if settings else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _run_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    labels = frame["backend"].astype(str) + " / " + frame["mode"].astype(str)
    return [(label, frame[labels == label]) for label in sorted(labels.unique())]


def parity_chart(frame: pd.DataFrame) -> Figure:
    """Predicted vs measured peak allocated memory (log-log) with the +-5 % band, and beside it the
    relative error of every run, so sub-percent errors stay visible."""
    ok = frame[frame["status"] == "ok"].copy()
    fig, (left, right) = _figure(12, 5.2, ncols=2)
    markers = {"full": "s", "lora": "o", "qlora": "^"}
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    measured = ok["measured_peak_bytes"].astype(float) / GIB
    lo, hi = (measured.min() / 1.5, measured.max() * 1.5) if len(ok) else (1e-3, 1.0)
    xs = np.geomspace(lo, hi, 50)
    left.fill_between(xs, xs * 0.95, xs * 1.05, color="0.85", label="within +-5 %")
    left.plot(xs, xs, color="0.3", linewidth=1, label="predicted = measured")
    right.axhspan(-5, 5, color="0.9", label="+-5 %")
    right.axhline(0, color="0.3", linewidth=1)
    for color, (label, group) in zip(colors * 3, _run_groups(ok)):
        for method, sub in group.groupby("method"):
            m = sub["measured_peak_bytes"].astype(float) / GIB
            p = sub["predicted_peak_bytes"].astype(float) / GIB
            name = f"{label}, {METHOD_TITLES.get(method, method)} ({len(sub)})"
            left.scatter(m, p, marker=markers.get(method, "o"), color=color, s=22, alpha=0.8, label=name)
            right.scatter(m, 100 * sub["relative_error"].astype(float), marker=markers.get(method, "o"), color=color,
                          s=22, alpha=0.8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("measured peak allocated (GiB, log scale)")
    left.set_yscale("log")
    left.set_ylabel("predicted peak allocated (GiB, log scale)")
    left.set_title(f"Predicted vs measured peak memory ({len(ok)} runs)", fontsize=10)
    left.legend(fontsize=7, loc="upper left")
    worst = float(ok["abs_pct_error"].max()) if len(ok) else 5.0
    limit = max(6.0, worst * 1.2)
    right.set_ylim(-limit, limit)
    right.set_ylabel("error: predicted / measured - 1 (%)")
    right.set_title("Relative error of each run", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    return fig


def pair_full_lora(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Full and LoRA runs under the same settings side by side (one LoRA run per setting: the smallest
    rank with the default targets when present), with `value` of both and the FLOP ratio."""
    ok = frame[(frame["status"] == "ok") & frame[value].notna()]
    keys = ["model", "backend", "mode", "precision", "batch_size", "seq_len", "grad_checkpointing", "attention",
            "optimizer", "optimizer_impl"]
    full = ok[ok["method"] == "full"].drop_duplicates(keys)
    lora = ok[ok["method"] == "lora"].copy()
    lora["_default"] = lora["target"] != "default"
    lora = lora.sort_values(["_default", "r"]).drop_duplicates(keys)
    pairs = full.merge(lora, on=keys, suffixes=("_full", "_lora"))
    pairs["ratio"] = pairs[f"{value}_lora"] / pairs[f"{value}_full"]
    return pairs


MIN_TIMED_FLOPS = 1e9  # a full step of fewer FLOPs (6N x tokens) times per-op overhead, not the model


def timed_pairs(frame: pd.DataFrame, min_flops: float = MIN_TIMED_FLOPS) -> pd.DataFrame:
    """Timed full / LoRA pairs whose full step does at least `min_flops` (approximate) FLOPs."""
    pairs = pair_full_lora(frame, "min_step_time_s")
    if pairs.empty:
        return pairs
    return pairs[pairs["full_step_flops_full"].astype(float) >= min_flops].reset_index(drop=True)


def speed_chart(frame: pd.DataFrame, flop_label: str = "FLOP ratio") -> Figure:
    """Step time of LoRA / full under the same settings beside the FLOP ratio, and tokens/s of both
    (pairs whose full step does at least 1 GFLOP: tiny models time per-op overhead). Times are the
    fastest of each run's timed steps: on a shared machine the others measure the neighbours."""
    pairs = timed_pairs(frame)
    fig, (left, right) = _figure(12, 5.2, ncols=2)
    if pairs.empty:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no timed full / LoRA pairs in these runs", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
        fig.suptitle("Step time: full vs LoRA")
        return fig
    labels = [f"{r.model} {r.backend}/{r.mode} {r.precision}\nb{r.batch_size}x{r.seq_len}"
              f"{' ckpt' if r.grad_checkpointing else ''}" for r in pairs.itertuples()]
    y = np.arange(len(pairs))
    left.barh(y, pairs["ratio"], color="#1f77b4", alpha=0.8, label="measured: LoRA / full step time (fastest step)")
    left.scatter(pairs["flop_ratio_lora"], y, marker="D", color="black", zorder=5, label=flop_label)
    left.axvline(2 / 3, color="0.4", linestyle="--", linewidth=1, label="2/3 (forward 2N, backward 4N vs 2N)")
    left.axvline(1, color="0.6", linewidth=1)
    left.set_yticks(y, labels, fontsize=7)
    left.set_xlim(0, max(1.6, 1.1 * float(pairs["ratio"].max())))
    left.invert_yaxis()
    left.set_xlabel("LoRA / full (lower: LoRA faster)")
    left.set_ylabel("model, backend / mode, precision, batch x sequence")
    left.set_title("Step time of LoRA relative to full fine-tuning", fontsize=10)
    left.legend(fontsize=7, loc="upper right")
    height = 0.4
    right.barh(y - height / 2, pairs["best_tokens_per_s_full"], height, color=METHOD_COLORS["full"],
               label="full fine-tune")
    right.barh(y + height / 2, pairs["best_tokens_per_s_lora"], height, color=METHOD_COLORS["lora"], label="LoRA")
    right.set_yticks(y, [""] * len(y))
    right.invert_yaxis()
    right.set_xlabel("tokens per second (fastest step)")
    right.set_title("Throughput", fontsize=10)
    right.legend(fontsize=8, loc="upper right")
    right.set_xlim(0, 1.3 * float(max(pairs["best_tokens_per_s_full"].max(), pairs["best_tokens_per_s_lora"].max())))
    fig.suptitle("Speed: full fine-tuning vs LoRA (fastest of each run's timed steps)", fontsize=11)
    return fig


def seed_rule_chart(frame: pd.DataFrame, model: str = "", settings: str = "") -> Figure:
    """The seed's rule (4x full, (1+4m)x LoRA/QLoRA) against the planner's peak as the sequence grows."""
    fig, ax = _figure(8, 5)
    for method, group in frame.groupby("method", sort=False):
        group = group.sort_values("seq_len")
        ax.plot(group["seq_len"], 100 * group["seed_rule_error"], marker="o", color=METHOD_COLORS.get(method),
                label=METHOD_TITLES.get(method, method))
    ax.axhline(0, color="0.3", linewidth=1)
    ax.axhspan(-10, 10, color="0.92", label="within +-10 %")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("seed rule / planner peak allocated - 1 (%)")
    ax.set_title(f"{model}: error of the seed's rule against the full memory model" +
                 (f"\n{settings}" if settings else ""), fontsize=10)
    ax.legend(fontsize=8)
    return fig


def seed_rule_measured_chart(frame: pd.DataFrame) -> Figure:
    """Measured runs: the seed's rule error against the share of the peak that is activations and
    temporaries (what the rule leaves out)."""
    ok = frame[(frame["status"] == "ok") & frame["seed_rule_error"].notna() & frame["meas_act_temp_share"].notna()]
    fig, ax = _figure(8, 5)
    for method, group in ok.groupby("method"):
        ax.scatter(100 * group["meas_act_temp_share"], 100 * group["seed_rule_error"], s=22, alpha=0.8,
                   color=METHOD_COLORS.get(method), label=f"{METHOD_TITLES.get(method, method)} ({len(group)} runs)")
    ax.axhline(0, color="0.3", linewidth=1)
    ax.axhspan(-10, 10, color="0.92", label="within +-10 %")
    ax.set_xlabel("activations + temporaries at the measured peak (% of the peak)")
    ax.set_ylabel("seed rule / measured peak - 1 (%)")
    ax.set_title("Where the seed's rule holds: measured runs", fontsize=10)
    ax.legend(fontsize=8)
    return fig

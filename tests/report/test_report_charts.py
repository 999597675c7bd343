"""Every chart returns a matplotlib Figure with a title, labelled axes and a legend, built headless."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from matplotlib.figure import Figure

from lora_planner.catalog import resolve_model
from lora_planner.gpus import GPUS
from lora_planner.report import charts
from lora_planner.report.tables import (
    breakdown_frame, error_summary, rank_frame, runs_frame, scaling_frame, seed_rule_frame,
)
from lora_planner.specs import LoraSpec, TrainingSpec
from tests.report.synthetic import biased_records, make_record

SPEC = resolve_model("llama-3.2-1b")
TRAINING = TrainingSpec(method="lora", batch_size=2, seq_len=512, lora=LoraSpec(r=8))
CAPACITIES = {"a100-40gb": GPUS["a100-40gb"].memory_bytes}


def records() -> list[dict]:
    out = biased_records(4, 1.1, method="lora", prefix="l", model="gpt2", family="gpt2", step_time=0.3)
    out += biased_records(4, 1.0, method="full", prefix="f", model="gpt2", family="gpt2", step_time=0.45)
    out.append(make_record("o", status="oom", model="gpt2", family="gpt2"))
    return out


def assert_labelled(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert axes
    title = fig._suptitle.get_text() if fig._suptitle else ""
    assert axes[0].get_ylabel()
    for ax in axes:
        assert ax.get_title() or title
        assert ax.get_xlabel()
        assert ax.get_legend() is not None


def test_analytic_charts():
    assert_labelled(charts.breakdown_chart(breakdown_frame(SPEC, TRAINING), SPEC.name, "batch 2 x 512"))
    ranks = rank_frame(SPEC, TRAINING, ranks=(4, 8, 16, 1024))
    assert set(ranks["r"]) == {4, 8, 16}  # 1024 is wider than the 512-wide k/v projections
    assert_labelled(charts.rank_chart(ranks, CAPACITIES, SPEC.name))
    for axis, values in (("batch_size", (1, 2, 4)), ("seq_len", (128, 256))):
        frame = scaling_frame(SPEC, TRAINING, axis, values)
        assert len(frame) == 3 * len(values)
        fig = charts.scaling_chart(frame, axis, CAPACITIES, SPEC.name)
        assert_labelled(fig)
        assert "GiB" in fig.axes[0].get_ylabel()
    seed = seed_rule_frame(SPEC, TRAINING, seq_lens=(128, 4096))
    assert (seed["seed_rule_error"] < 0).all()
    assert_labelled(charts.seed_rule_chart(seed, SPEC.name))


def test_measured_charts():
    frame = runs_frame(records())
    assert list(frame["status"]).count("ok") == 8 and frame["seed_rule_error"].notna().sum() == 8
    assert_labelled(charts.parity_chart(frame))
    assert_labelled(charts.seed_rule_measured_chart(frame))
    fig = charts.speed_chart(frame)
    assert_labelled(fig)
    pairs = charts.pair_full_lora(frame, "median_step_time_s")
    assert len(pairs) == 1 and pairs["ratio"].iloc[0] == pytest.approx(0.3 / 0.45)
    assert 0.6 < pairs["flop_ratio_lora"].iloc[0] < 0.75


def test_speed_chart_without_pairs_says_so():
    frame = runs_frame([make_record("x", model="gpt2", family="gpt2")])
    fig = charts.speed_chart(frame)
    assert isinstance(fig, Figure)
    assert any("no timed" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_error_summary_counts():
    frame = runs_frame(records())
    summary = error_summary(frame)
    assert list(summary["method"]) == ["full", "lora"]
    lora = summary[summary["method"] == "lora"].iloc[0]
    assert lora["runs"] == 5 and lora["ok"] == 4 and lora["oom"] == 1
    assert lora["max |err| %"] > 0 and lora["within 5 %"].endswith("/4")


def test_no_pyplot_figures_are_left_open():
    charts.parity_chart(runs_frame(records()))
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_markdown_table_renderer():
    from lora_planner.report.markdown import md_table

    frame = pd.DataFrame({"name": ["a|b", "c"], "n": [1, 2000], "x": [0.5, None]})
    text = md_table(frame, formats={"x": "{:.2f}"})
    assert text.splitlines() == ["| name | n | x |", "|---|---:|---:|", "| a\\|b | 1 | 0.50 |", "| c | 2,000 | - |"]
    assert md_table(pd.DataFrame()) == ""


def test_flop_ratio_approximation_is_two_thirds_or_three_quarters():
    from lora_planner.report.tables import approximate_flop_ratio, flop_ratio

    spec = resolve_model("llama-3-8b")
    assert approximate_flop_ratio(spec, TRAINING) == pytest.approx(2 / 3, abs=0.001)
    ckpt = TrainingSpec(method="lora", grad_checkpointing=True, lora=LoraSpec(r=8))
    assert approximate_flop_ratio(spec, ckpt) == pytest.approx(3 / 4, abs=0.001)
    ratio, source = flop_ratio(spec, TRAINING)
    assert 0.6 < ratio < 0.8 and "FLOP" in source

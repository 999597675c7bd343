"""Human output (`lora_planner.render`), rendered through a fixed-width console."""

from __future__ import annotations

import io

from rich.console import Console

from lora_planner.catalog import resolve_model
from lora_planner.planner import Budget, make_plan
from lora_planner.render import gib, human_count, render_plan
from lora_planner.specs import TrainingSpec


def rendered(plan, detail=False) -> str:
    out = io.StringIO()
    render_plan(plan, Console(file=out, width=120, color_system=None), detail=detail)
    return out.getvalue()


def test_plan_table_rows_and_values():
    plan = make_plan(resolve_model("llama-7b"), TrainingSpec(), ("full", "lora", "qlora"),
                     Budget(memory_bytes=24 * 2**30))
    text = rendered(plan)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 5}
    for row in ("trainable params", "weights", "gradients", "optimizer states", "activations", "temporaries",
                "peak allocated", "at phase", "peak on device", "seed rule 4x | (1+4m)x", "fits in 24.00"):
        assert row in lines, row
    full = plan.methods["full"].estimate
    assert gib(full.peak_allocated_bytes) in lines["peak allocated"]
    assert "no" in lines["fits in 24.00"] and "yes" in lines["fits in 24.00"]
    assert "6.74 B" in text and "0.0622 %" in text


def test_detail_adds_a_phase_table_per_method():
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(), ("full", "lora"))
    text = rendered(plan, detail=True)
    assert text.count("live memory by phase") == 2
    assert "optimizer step" in text and "backward start" in text


def test_bf16_warning_on_gpus_without_bf16():
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(), ("lora",),
                     Budget(memory_bytes=16 * 2**30, name="t4", supports_bf16=False))
    assert "no bf16 support" in rendered(plan)


def test_human_count():
    assert [human_count(n) for n in (7, 4_194_304, 6_738_415_616)] == ["7", "4.19 M", "6.74 B"]


def test_detail_explains_the_activation_term_with_the_largest_saved_tensors():
    plan = make_plan(resolve_model("llama-3-8b"), TrainingSpec(seq_len=2048), ("lora",))
    text = rendered(plan, detail=True)
    assert "what one layer keeps for backward" in text
    assert "self_attn.q_proj.lora_input_cast" in text and "mlp.gate_output" in text


def test_sliding_window_shorter_than_the_sequence_is_flagged():
    plan = make_plan(resolve_model("mistral-7b"), TrainingSpec(seq_len=8192), ("lora",))
    assert "sliding window" in rendered(plan)
    assert "sliding window" not in rendered(make_plan(resolve_model("mistral-7b"), TrainingSpec(seq_len=4096), ("lora",)))

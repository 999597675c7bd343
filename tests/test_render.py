"""Human output (`lora_planner.render`), rendered through a fixed-width console."""

from __future__ import annotations

import io
import re

import pytest
from lora_planner.textable import Console

from lora_planner.catalog import resolve_model
from lora_planner.planner import Budget, make_plan
from lora_planner.render import gib, human_count, print_wrapped, render_plan
from lora_planner.specs import TrainingSpec


def rendered(plan, detail=False, width=120) -> str:
    out = io.StringIO()
    render_plan(plan, Console(file=out, width=width, color=False), detail=detail)
    return out.getvalue()


def test_plan_table_rows_and_values():
    plan = make_plan(resolve_model("llama-7b"), TrainingSpec(), ("full", "lora", "qlora"),
                     Budget(memory_bytes=24 * 2**30))
    text = rendered(plan)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 5}
    for row in ("trainable params", "weights", "gradients", "optimizer states", "activations", "temporaries",
                "peak allocated", "at phase", "peak on device", "seed rule 4x | (1+4m)x",
                "fits in usable 21.60 GiB"):
        assert row in lines, row
    full = plan.methods["full"].estimate
    assert gib(full.peak_allocated_bytes) in lines["peak allocated"]
    assert "no" in lines["fits in usable 21.60 GiB"] and "yes" in lines["fits in usable 21.60 GiB"]
    assert "usable = 24.00 GiB x (1 - 10 %) = 21.60 GiB" in text
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


def test_sliding_window_shorter_than_the_sequence_is_modelled_not_flagged():
    plan = make_plan(resolve_model("mistral-7b"), TrainingSpec(seq_len=8192), ("lora",))
    assert "sliding window" not in rendered(plan)  # SDPA's mask past the window is counted (families.rules)


def test_multi_gpu_table_labels_the_seed_rule_as_the_whole_model():
    """The seed's rule is for one GPU holding everything; beside a per-GPU peak it says so."""
    plan = make_plan(resolve_model("llama-3-8b"), TrainingSpec(gpus=8, strategy="fsdp"), ("full", "lora"))
    text = rendered(plan)
    assert "Peak memory per GPU of one training step (GiB)" in text
    row = next(line for line in text.splitlines() if "seed rule" in line)
    assert "seed rule, whole model on 1 GPU" in row
    assert "seed rule 4x | (1+4m)x" in rendered(make_plan(resolve_model("llama-3-8b"), TrainingSpec(), ("lora",)))


def test_fit_row_carries_the_unit_and_the_gpu():
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(), ("lora",), Budget(memory_bytes=80 * 10**9,
                                                                              memory_text="80GB"))
    text = rendered(plan)
    assert "fits in usable 67.06 GiB" in text and "80 GB = 74.51 GiB" in text
    assert not re.search(r"fits in [\d.]+ ", text)
    named = rendered(make_plan(resolve_model("gpt2"), TrainingSpec(), ("lora",),
                               Budget(memory_bytes=24 * 2**30, name="rtx-4090")))
    assert "fits in rtx-4090 (usable 21.60 GiB)" in named


def test_within_the_budget_but_not_the_headroom_says_so():
    spec, training = resolve_model("gpt2"), TrainingSpec()
    peak = make_plan(spec, training, ("lora",)).methods["lora"].estimate.peak_device_bytes
    plan = make_plan(spec, training, ("lora",), Budget(memory_bytes=peak))
    assert plan.methods["lora"].fits is False and "no (in headroom)" in rendered(plan)
    assert make_plan(spec, training, ("lora",), Budget(memory_bytes=peak), headroom=0).methods["lora"].fits is True


def test_long_sequence_warning_is_rendered():
    plan = make_plan(resolve_model("llama-3-8b"), TrainingSpec(seq_len=200_000), ("lora",))
    text = " ".join(rendered(plan, width=80).split())
    assert "warning: --seq-len 200000 is above llama-3-8b's max_position_embeddings 8192" in text


UNIT_AT_LINE_START = re.compile(r"^(- )?(GiB|GB|MiB|KiB|B|%)([\s.,;:)]|$)")


@pytest.mark.parametrize("width", range(40, 101, 3))
def test_print_wrapped_keeps_numbers_with_their_units(width):
    text = ("Gradient checkpointing is on: without it even micro-batch 1 peaks at 34.41 GiB, above the 21.59 GiB "
            "usable; usable = 23.99 GiB x (1 - 10 %) = 21.59 GiB, 80 GB = 74.51 GiB, 512 MiB and 3 % more.")
    out = io.StringIO()
    print_wrapped(Console(file=out, width=width, color=False), text, first="- ", rest="  ")
    lines = out.getvalue().splitlines()
    assert not [line for line in lines if UNIT_AT_LINE_START.match(line.strip())]
    assert " ".join(" ".join(lines).split()) == "- " + " ".join(text.split())
    assert max(len(line) for line in lines) <= width


def test_layer_specific_lora_shows_the_adapted_layers_and_the_largest_layer():
    from lora_planner.specs import LoraSpec

    training = TrainingSpec(lora=LoraSpec(target_modules=("layers.3.self_attn.q_proj",)))
    out = " ".join(rendered(make_plan(resolve_model("llama-2-7b"), training, ("lora",)), detail=True, width=200).split())
    assert "LoRA r=8 alpha=16 on self_attn.q_proj (layer 3)" in out
    assert re.search(r"what one layer keeps for backward \(the largest layer, [\d.,]+ MiB; all 32 layers [\d.,]+ MiB\)", out)
    uniform = " ".join(rendered(make_plan(resolve_model("llama-2-7b"), TrainingSpec(), ("lora",)), detail=True,
                                width=200).split())
    assert re.search(r"what one layer keeps for backward \([\d.,]+ MiB x 32 layers\)", uniform)
    assert "on q_proj, v_proj (fp32 adapters)" in uniform

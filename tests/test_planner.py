"""`make_plan` and its JSON document (`lora_planner.planner`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lora_planner.catalog import resolve_model
from lora_planner.defaults import DEFAULT_HEADROOM
from lora_planner.errors import PlannerInputError
from lora_planner.gpus import GPUS
from lora_planner.memory import DeviceOverhead
from lora_planner.planner import (
    Budget, budget_from_options, describe_usable, fits, fits_on, make_plan, plan_to_dict, plan_warnings, refit,
    usable_bytes,
)
from lora_planner.specs import LoraSpec, TrainingSpec


def test_plan_compares_methods_under_the_same_settings():
    spec = resolve_model("llama-3.2-1b")
    training = TrainingSpec(batch_size=2, seq_len=1024, lora=LoraSpec(r=16), kbit_prep=False)
    plan = make_plan(spec, training, ("full", "lora", "qlora"), Budget(memory_bytes=GPUS["t4"].memory_bytes, name="t4"))
    peaks = {m: mp.estimate.peak_device_bytes for m, mp in plan.methods.items()}
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
    assert plan.methods["full"].fits is (peaks["full"] <= usable_bytes(GPUS["t4"].memory_bytes, DEFAULT_HEADROOM))
    assert plan.training.method == "full"
    assert plan.target_modules == ("q_proj", "v_proj")  # as asked: PEFT's default names
    assert plan.adapted_modules == ("self_attn.q_proj (all 16 layers)", "self_attn.v_proj (all 16 layers)")


def test_qlora_as_trl_runs_it_can_exceed_lora_on_a_small_model():
    """After prepare_model_for_kbit_training the tied 128k x 2048 embedding is fp32 and the stream runs
    in fp32: on a 1B model that outweighs what NF4 saves on the linears."""
    spec = resolve_model("llama-3.2-1b")
    plan = make_plan(spec, TrainingSpec(batch_size=2, seq_len=1024, lora=LoraSpec(r=16)), ("lora", "qlora"))
    assert plan.methods["qlora"].estimate.peak_allocated_bytes > plan.methods["lora"].estimate.peak_allocated_bytes


def test_fits_on_lists_catalog_gpus_smallest_first():
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(), ("lora",))
    fits_on = plan.methods["lora"].fits_on
    assert fits_on and all(GPUS[a].memory_bytes <= GPUS[b].memory_bytes for a, b in zip(fits_on, fits_on[1:]))
    assert plan.methods["lora"].fits is None


def test_json_round_trips_and_echoes_inputs():
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(seq_len=128), ("full", "lora"),
                     overhead=DeviceOverhead(cuda_context_bytes=0, allocator_fraction=0.0))
    doc = json.loads(json.dumps(plan_to_dict(plan)))
    assert doc["inputs"]["seq_len"] == 128 and doc["inputs"]["methods"] == ["full", "lora"]
    assert doc["inputs"]["target_modules"] == ["c_attn"]  # as asked (PEFT's default for GPT-2)
    assert doc["inputs"]["adapted_modules"] == ["attn.c_attn (all 12 layers)"]
    for method in ("full", "lora"):
        assert doc["methods"][method]["device_overhead_bytes"] == 0
        assert doc["methods"][method]["peak_device_bytes"] == doc["methods"][method]["peak_allocated_bytes"]


def test_usable_memory_and_the_fit_are_one_rule():
    assert usable_bytes(1000, 0.1) == 900 and usable_bytes(1000, 0) == 1000
    assert usable_bytes(GPUS["rtx-4090"].memory_bytes, 0.1) == int(GPUS["rtx-4090"].memory_bytes * 0.9)
    assert fits(900, 900) and not fits(901, 900)  # exactly at the usable memory is a fit
    for bad in (1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(PlannerInputError) as err:
            usable_bytes(1000, bad)
        assert err.value.field == "headroom"
    assert describe_usable(24 * 2**30, 0.1) == "usable = 24.00 GiB x (1 - 10 %) = 21.60 GiB"


def test_plan_fits_against_the_usable_memory_and_fits_on_too():
    spec, training = resolve_model("llama-3.2-1b"), TrainingSpec(seq_len=1024)
    peak = make_plan(spec, training, ("lora",)).methods["lora"].estimate.peak_device_bytes
    at_peak = Budget(memory_bytes=peak)
    assert make_plan(spec, training, ("lora",), at_peak, headroom=0).methods["lora"].fits is True
    plan = make_plan(spec, training, ("lora",), at_peak)
    assert plan.headroom == DEFAULT_HEADROOM and plan.usable_bytes == usable_bytes(peak, DEFAULT_HEADROOM)
    assert plan.methods["lora"].fits is False
    doc = plan_to_dict(plan)
    assert doc["inputs"]["headroom"] == DEFAULT_HEADROOM and doc["inputs"]["usable_bytes"] == plan.usable_bytes
    # `fits on` applies the same headroom to every catalog GPU.
    for name in plan.methods["lora"].fits_on:
        assert fits(peak, usable_bytes(GPUS[name].memory_bytes, DEFAULT_HEADROOM))
    exact = replace(GPUS["l4"], name="exact", memory_bytes=peak)
    assert fits_on(peak, {"exact": exact}, "bf16", headroom=0) == ("exact",)
    assert fits_on(peak, {"exact": exact}, "bf16") == ()


def test_refit_recomputes_the_fit_from_the_estimates():
    spec, training = resolve_model("gpt2"), TrainingSpec()
    plan = make_plan(spec, training, ("lora",), Budget(memory_bytes=80 * 2**30))
    stale = replace(plan, methods={"lora": replace(plan.methods["lora"], fits=False, fits_on=())})
    assert refit(stale).methods == plan.methods


def test_gpu_and_gpu_mem_make_one_budget():
    both = budget_from_options("h100-80gb", "94GB")
    assert (both.memory_bytes, both.name, both.memory_text) == (94 * 10**9, "h100-80gb", "94GB")
    assert budget_from_options(None, "24GiB") == Budget(memory_bytes=24 * 2**30, memory_text="24GiB")
    assert budget_from_options("t4", None) == Budget(GPUS["t4"].memory_bytes, "t4", supports_bf16=False)
    assert budget_from_options(None, None) is None
    plan = make_plan(resolve_model("gpt2"), TrainingSpec(), ("lora",), both)
    assert plan.methods["lora"].throughput.gpu == "h100-80gb"


def test_warnings_are_pure_and_in_the_json():
    spec = resolve_model("llama-3-8b")
    assert plan_warnings(spec, TrainingSpec(seq_len=8192)) == ()
    (warning,) = plan_warnings(spec, TrainingSpec(seq_len=200_000))
    assert "--seq-len 200000 is above llama-3-8b's max_position_embeddings 8192" in warning
    assert "RoPE scaling" in warning
    with pytest.raises(PlannerInputError, match="learned position table"):  # GPT-2 fails past n_positions
        make_plan(resolve_model("gpt2"), TrainingSpec(seq_len=2048), ("lora",))
    plan = make_plan(spec, TrainingSpec(seq_len=200_000), ("lora",))
    assert plan.warnings == (warning,) and plan_to_dict(plan)["warnings"] == [warning]


@pytest.mark.parametrize("name, methods, warned", [
    ("gpt2", ("lora",), True), ("bloom-7b1", ("full", "lora"), True), ("gpt2", ("full",), False),
    ("llama-2-7b", ("lora",), False),
])
def test_deepspeed_zero3_says_what_it_leaves_out(name, methods, warned):
    """ZeRO-3's saving linear (every frozen linear keeps its input) is modelled for Llama-style layers only."""
    training = TrainingSpec(gpus=2, strategy="deepspeed-zero3")
    plan = make_plan(resolve_model(name), training, methods)
    assert any("zero3_linear_wrap" in w for w in plan.warnings) is warned


@pytest.mark.parametrize("name, training, notes", [
    ("gemma-2-2b", TrainingSpec(), ("no SDPA attention for gemma2", "runs eager attention")),  # sdpa asked
    ("gemma-2-2b", TrainingSpec(attention="eager", seq_len=8192), ()),  # past the window: modelled, no note
    ("gemma-3-1b", TrainingSpec(seq_len=2048), ()),  # SDPA exists; its 512-token window is modelled
])
def test_gemma_notes_say_what_transformers_runs(name, training, notes):
    """Gemma 2 has no SDPA in transformers 5.24: what is planned is eager, and the plan says so; Gemma's sliding
    windows are counted, so the generic "not counted" window note stays away."""
    warnings = plan_warnings(resolve_model(name), training)
    assert not any("sliding window" in w for w in warnings)
    assert len(warnings) == (1 if notes else 0) and all(n in warnings[0] for n in notes)


@pytest.mark.parametrize("name, window", [("mistral-7b", 4096), ("phi-3-mini-4k-instruct", 2047),
                                          ("starcoder2-3b", 4096)])
def test_sliding_window_past_the_sequence_is_modelled_not_flagged(name, window):
    """From --seq-len >= window on, SDPA gets a materialised mask on every layer (each keeps k / v repeated to every
    head and an additive (1, 1, s, s) mask): counted, so no "not counted" window note, and the peak jumps there by
    more than the masks themselves."""
    spec = resolve_model(name)
    assert spec.sliding_window == window
    assert not any("sliding window" in w for w in plan_warnings(spec, TrainingSpec(seq_len=2 * window)))
    below, at = (make_plan(spec, TrainingSpec(seq_len=s), ("lora",)).methods["lora"].estimate.peak_allocated_bytes
                 for s in (window - 1, window))
    masks = spec.num_layers * window * window * 2  # bf16, batch 1
    assert at - below > masks

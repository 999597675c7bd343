"""`make_plan` and its JSON document (`lora_planner.planner`)."""

from __future__ import annotations

import json

from lora_planner.catalog import GPUS, resolve_model
from lora_planner.memory import DeviceOverhead
from lora_planner.planner import Budget, make_plan, plan_to_dict
from lora_planner.specs import LoraSpec, TrainingSpec


def test_plan_compares_methods_under_the_same_settings():
    spec = resolve_model("llama-3.2-1b")
    plan = make_plan(spec, TrainingSpec(batch_size=2, seq_len=1024, lora=LoraSpec(r=16)), ("full", "lora", "qlora"),
                     Budget(memory_bytes=GPUS["t4"].memory_bytes, name="t4"))
    peaks = {m: mp.estimate.peak_device_bytes for m, mp in plan.methods.items()}
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
    assert plan.methods["full"].fits is (peaks["full"] <= GPUS["t4"].memory_bytes)
    assert plan.training.method == "full"
    assert plan.target_modules == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


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
    assert doc["inputs"]["target_modules"] == ["transformer.h.0.attn.c_attn"]
    for method in ("full", "lora"):
        assert doc["methods"][method]["device_overhead_bytes"] == 0
        assert doc["methods"][method]["peak_device_bytes"] == doc["methods"][method]["peak_allocated_bytes"]

"""Does a LoRA step take the FLOP ratio of a full one? Measured on the CPU, never asserted in a test (timings move
with whatever else the machine runs; the FLOP counts themselves are exact in tests/test_throughput.py).

    python experiments/bench_step_time_ratio.py     # prints measured vs predicted, writes reports/step_time_ratio.json

A mid-sized Llama (4 layers, hidden 256) in fp32 on one thread (compute-bound enough); the two methods' steps
alternate and each keeps its fastest after the first, so outside load falls on both alike.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lora_planner.config_reader import spec_from_config
from lora_planner.profiler.runner import ProfileRequest, batch_factory, build_model, build_optimizer
from lora_planner.specs import TrainingSpec
from lora_planner.throughput import step_flops

ROOT = Path(__file__).resolve().parents[1]
SPEC = spec_from_config({"model_type": "llama", "vocab_size": 2000, "hidden_size": 256, "intermediate_size": 704,
                         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}, "mid")
STEPS = 9


def measure() -> dict[str, float]:
    torch.set_num_threads(1)
    runs = {}
    for method in ("full", "lora"):
        training = TrainingSpec(method=method, dtype="fp32", batch_size=4, seq_len=128, device="cpu")
        model = build_model(ProfileRequest("mid", SPEC, training, mode="cpu"), "cpu")
        runs[method] = (model, build_optimizer(model, training), batch_factory(SPEC, training, "cpu", 0))
    samples: dict[str, list[float]] = {"full": [], "lora": []}
    for _ in range(STEPS):
        for method, (model, optimizer, make_batch) in runs.items():
            batch = make_batch()
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples[method].append(time.perf_counter() - start)
    best = {method: min(values[1:]) for method, values in samples.items()}
    predicted = (step_flops(SPEC, TrainingSpec(method="lora", batch_size=4, seq_len=128)).total
                 / step_flops(SPEC, TrainingSpec(method="full", batch_size=4, seq_len=128)).total)
    return {"full_step_s": best["full"], "lora_step_s": best["lora"], "measured_ratio": best["lora"] / best["full"],
            "predicted_flop_ratio": predicted}


if __name__ == "__main__":
    result = measure()
    print(f"LoRA / full step time: measured {result['measured_ratio']:.3f}, "
          f"FLOP ratio {result['predicted_flop_ratio']:.3f} (full {1000 * result['full_step_s']:.0f} ms, LoRA {1000 * result['lora_step_s']:.0f} ms per step)")
    (ROOT / "reports" / "step_time_ratio.json").write_text(json.dumps(result, indent=2) + "\n")

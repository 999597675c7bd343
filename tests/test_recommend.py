"""`lora-plan recommend`: feasible and maximal choices, the decision order, the rank rules, the Pareto
alternatives, JSON / human output, the nothing-fits answer, bad input, and one fake-tensor --verify run."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from rich.console import Console

from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.gpus import GPUS
from lora_planner.memory import estimate_memory
from lora_planner.params import lora_params, rank_for_trainable_fraction
from lora_planner.planner import Budget, usable_bytes
from lora_planner.recommend import (
    DEFAULT_R, RANK_LADDER, Candidate, RecommendRequest, dominates, pareto_frontier, recommend, training_for,
)
from lora_planner.recommend_cli import VERIFY_TOLERANCE, Verification, VerifyRun, recommendation_to_dict, verify
from lora_planner.render_recommend import render_recommendation
from lora_planner.specs import LoraSpec, TrainingSpec

GIB = 2**30


def gpu_budget(name: str) -> Budget:
    gpu = GPUS[name]
    return Budget(memory_bytes=gpu.memory_bytes, name=gpu.name, supports_bf16=gpu.supports_bf16)


def request(model: str, gpu: str | Budget, seq_len: int = 1024, **kwargs) -> RecommendRequest:
    budget = gpu if isinstance(gpu, Budget) else gpu_budget(gpu)
    training = kwargs.pop("training", TrainingSpec(seq_len=seq_len))
    return RecommendRequest(spec=resolve_model(model), budget=budget, training=training, **kwargs)


def device_peak(req: RecommendRequest, method: str, r: int | None, ckpt: bool, micro: int) -> int:
    """The planner's peak per GPU, computed here independently of `recommend`'s search."""
    lora = req.training.lora if r is None else replace(req.training.lora, r=r)
    training = replace(req.training, method=method, batch_size=micro, grad_checkpointing=ckpt, lora=lora)
    est = estimate_memory(req.spec, training, req.overhead)
    ddp = est.phases[-1].breakdown.gradients_bytes if req.gpus > 1 else 0
    allocated = est.peak_allocated_bytes + ddp
    return allocated + req.overhead.bytes_for(allocated, training.device)


def fits(req: RecommendRequest, *config) -> bool:
    return device_peak(req, *config) <= req.budget.memory_bytes * (1 - req.headroom)


# ---------------------------------------------------------------------------------------------- feasibility


MODELS = ("gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "phi-2", "llama-2-7b", "llama-3-8b", "mistral-7b", "gemma-7b",
          "llama-2-13b")
TABLE_GPUS = ("t4", "rtx-4090", "a100-40gb", "h100-80gb")


@pytest.mark.parametrize("seq_len", (512, 2048))
@pytest.mark.parametrize("gpu", TABLE_GPUS)
@pytest.mark.parametrize("model", MODELS)
def test_recommendation_is_feasible_maximal_and_minimal(model, gpu, seq_len):
    if model == "gpt2":
        seq_len = min(seq_len, 1024)  # learned positions end at n_positions (params.check_sequence_length)
    req = request(model, gpu, seq_len, global_batch=64)
    rec = recommend(req)
    c = rec.choice
    usable = req.budget.memory_bytes * (1 - req.headroom)
    if not rec.fits:
        assert c.micro_batch_size == 1 and c.grad_checkpointing and c.r in (None, 1)
        assert c.predicted_peak_bytes > usable
        for method in ("full", "lora", "qlora"):
            assert not fits(req, method, None if method == "full" else 1, True, 1)
        return
    config = (c.method, c.r, c.grad_checkpointing)
    # Feasible: the recommended step, recomputed independently, is under budget x (1 - headroom).
    assert c.predicted_peak_bytes == device_peak(req, *config, c.micro_batch_size) <= usable
    # Maximal: the largest micro-batch fits and one more does not.
    assert fits(req, *config, c.max_micro_batch_size)
    assert not fits(req, *config, c.max_micro_batch_size + 1)
    # The schedule: never more than one step needs, as few accumulation steps as the largest allows.
    share = math.ceil(req.global_batch / req.gpus)
    assert c.micro_batch_size <= min(c.max_micro_batch_size, share)
    assert c.gradient_accumulation_steps == math.ceil(req.global_batch / (c.micro_batch_size * req.gpus))
    fewest = math.ceil(req.global_batch / (min(c.max_micro_batch_size, share) * req.gpus))
    assert c.gradient_accumulation_steps == fewest
    assert c.effective_global_batch == c.micro_batch_size * req.gpus * c.gradient_accumulation_steps >= req.global_batch
    # Checkpointing only when needed; no better method fits at all.
    if c.grad_checkpointing:
        assert not fits(req, c.method, c.r, False, 1)
    better = ("full", "lora", "qlora")[:("full", "lora", "qlora").index(c.method)]
    for method in better:
        assert not fits(req, method, None if method == "full" else 1, True, 1)
    assert rec.choice in rec.alternatives


def test_full_when_it_fits():
    rec = recommend(request("gpt2", "h100-80gb", 1024))
    assert rec.fits and rec.choice.method == "full"
    assert rec.choice.r is None and rec.alpha is None and rec.target_modules == ()
    assert not rec.choice.grad_checkpointing
    assert rec.choice.micro_batch_size == 32 and rec.choice.gradient_accumulation_steps == 1
    assert rec.choice.max_micro_batch_size > 32  # capped by the global batch, not by memory
    assert any("already makes the global batch" in r for r in rec.reasons)


def test_lora_when_full_does_not_fit_with_checkpointing_only_because_needed():
    req = request("llama-3-8b", "rtx-4090", 1024, global_batch=32)
    rec = recommend(req)
    c = rec.choice
    assert (c.method, c.r, rec.alpha) == ("lora", DEFAULT_R, 2.0 * DEFAULT_R)
    assert rec.target_modules == ("q_proj", "v_proj")
    assert not fits(req, "full", None, True, 1)
    assert c.grad_checkpointing and not fits(req, "lora", DEFAULT_R, False, 1)
    assert any(r.startswith("Gradient checkpointing is on: without it even micro-batch 1") for r in rec.reasons)
    assert c.micro_batch_size * c.gradient_accumulation_steps == c.effective_global_batch == 32


def test_qlora_when_lora_does_not_fit_and_no_checkpointing_when_not_needed():
    req = request("llama-2-13b", "rtx-4090", 512)
    rec = recommend(req)
    assert rec.choice.method == "qlora" and not rec.choice.grad_checkpointing
    assert not fits(req, "lora", 1, True, 1)
    assert any(r.startswith("LoRA does not fit: even r=1") for r in rec.reasons)
    assert any(r.startswith("Gradient checkpointing is off") for r in rec.reasons)


def test_methods_exclusion_and_min_micro_batch():
    rec = recommend(request("gpt2", "h100-80gb", 1024, methods=("lora", "qlora")))
    assert rec.choice.method == "lora"
    assert any("Excluded by --methods: full fine-tuning" in r for r in rec.reasons)
    assert {a.method for a in rec.alternatives} <= {"lora", "qlora"}
    # Without checkpointing QLoRA reaches micro-batch 3 here; asking for 8 turns checkpointing on.
    plain = recommend(request("llama-2-13b", "rtx-4090", 512))
    wanted = recommend(request("llama-2-13b", "rtx-4090", 512, min_micro_batch=8))
    assert not plain.choice.grad_checkpointing and plain.choice.max_micro_batch_size < 8
    assert wanted.choice.grad_checkpointing and wanted.choice.micro_batch_size >= 8
    assert any("micro-batch 8 (--min-micro-batch)" in r for r in wanted.reasons)


def test_pure_fp32_leaves_qlora_out():
    rec = recommend(request("llama-2-70b", "t4", training=TrainingSpec(dtype="fp32", seq_len=512)))
    assert not rec.fits and rec.choice.method == "lora"
    assert any("QLoRA is left out" in r for r in rec.reasons)


def test_balanced_micro_batch_keeps_the_step_count():
    # gpt2 at 128 tokens in 4 GiB: up to 16 sequences fit. 40 = 16 x 3 would overshoot to 48; 14 x 3 = 42.
    rec = recommend(request("gpt2", Budget(4 * GIB), 128, global_batch=40))
    c = rec.choice
    assert (c.max_micro_batch_size, c.micro_batch_size, c.gradient_accumulation_steps) == (16, 14, 3)
    assert c.effective_global_batch == 42
    assert any("same 3 accumulation steps" in r and "asked 40" in r for r in rec.reasons)


def test_data_parallel_counts_ddp_buckets_and_splits_the_batch():
    one = recommend(request("gpt2", "h100-80gb", 1024, global_batch=256))
    four = recommend(request("gpt2", "h100-80gb", 1024, global_batch=256, gpus=4))
    grads = 124_439_808 * 2  # every bf16 weight of GPT-2 (tied lm_head counted once)
    assert four.choice.ddp_bucket_bytes == grads and one.choice.ddp_bucket_bytes == 0
    assert four.choice.max_micro_batch_size <= one.choice.max_micro_batch_size
    assert four.choice.effective_global_batch == 256
    assert four.choice.micro_batch_size * 4 * four.choice.gradient_accumulation_steps == 256
    assert any("Data parallel over 4 GPUs" in r for r in four.reasons)


def test_peak_never_decreases_with_the_micro_batch():
    """The binary search relies on it."""
    spec = resolve_model("llama-3-8b")
    for method, ckpt in (("full", False), ("lora", True), ("qlora", False)):
        peaks = [estimate_memory(spec, TrainingSpec(method=method, batch_size=b, seq_len=512,
                                                    grad_checkpointing=ckpt)).peak_device_bytes
                 for b in range(1, 40)]
        assert peaks == sorted(peaks)


# ---------------------------------------------------------------------------------------------- rank and alpha


def test_rank_given_and_alpha_given():
    rec = recommend(request("llama-3-8b", "a100-80gb", 1024, r=64, methods=("lora",)))
    assert rec.choice.r == 64 and rec.alpha == 128 and rec.rank_source == "given"
    assert {a.r for a in rec.alternatives} == {64}
    alpha = recommend(request("llama-3-8b", "a100-80gb", 1024, r=64, methods=("lora",),
                              training=TrainingSpec(seq_len=1024, lora=LoraSpec(alpha=16))))
    assert alpha.alpha == 16 and any("alpha = 16, as given" in r for r in alpha.reasons)


def test_trainable_fraction_rounds_up_to_the_ladder():
    spec = resolve_model("llama-2-7b")
    targets = ("all-linear",)
    training = TrainingSpec(seq_len=512, lora=LoraSpec(target_modules=targets))
    rec = recommend(request("llama-2-7b", "h100-80gb", training=training, methods=("lora",), trainable_fraction=0.01))
    implied = rank_for_trainable_fraction(spec, 0.01, targets)
    assert rec.implied_r == implied and rec.rank_source == "trainable-fraction"
    assert rec.choice.r == min(r for r in RANK_LADDER if r >= implied)
    assert rec.choice.trainable_fraction >= 0.01
    assert lora_params(spec, rec.choice.r, targets).trainable_fraction == rec.choice.trainable_fraction
    assert any(f"needs r >= {implied}" in r for r in rec.reasons)


def test_seed_five_percent_rule_implies_an_off_ladder_rank():
    spec = resolve_model("llama-2-7b")
    rec = recommend(request("llama-2-7b", "h200", 512, methods=("lora",), trainable_fraction=0.05))
    implied = rank_for_trainable_fraction(spec, 0.05, None)  # q_proj, v_proj
    assert implied > RANK_LADDER[-1]
    assert rec.choice.r == implied == rec.implied_r
    assert rec.choice.trainable_fraction >= 0.05
    assert any("used as is" in r for r in rec.reasons)


def test_default_rank_steps_down_the_ladder_only_when_it_must():
    base = request("gpt2", Budget(GIB), 1024, methods=("lora",), headroom=0.0,
                   training=TrainingSpec(seq_len=1024, lora=LoraSpec(target_modules=("all-linear",))))
    lower = RANK_LADDER[RANK_LADDER.index(DEFAULT_R) - 1]
    at_default, at_lower = device_peak(base, "lora", DEFAULT_R, True, 1), device_peak(base, "lora", lower, True, 1)
    assert at_lower < at_default
    rec = recommend(replace(base, budget=Budget((at_lower + at_default) // 2)))
    assert rec.choice.r == lower and rec.choice.grad_checkpointing
    assert any(f"r={DEFAULT_R} does not fit even with checkpointing; r={lower}" in r for r in rec.reasons)


# ---------------------------------------------------------------------------------------------- alternatives


def cand(method="lora", r=16, ckpt=False, micro=4, peak=10 * GIB) -> Candidate:
    return Candidate(method=method, r=None if method == "full" else r, grad_checkpointing=ckpt, micro_batch_size=micro,
                     max_micro_batch_size=micro, gradient_accumulation_steps=1, effective_global_batch=micro,
                     predicted_peak_bytes=peak, peak_allocated_bytes=peak, device_overhead_bytes=0,
                     ddp_bucket_bytes=0, peak_phase="backward_start", trainable_params=1, trainable_fraction=0.1)


def test_dominance_rules():
    assert dominates(cand("full"), cand("lora"))  # better method, same peak
    assert not dominates(cand("full", peak=11 * GIB), cand("lora"))  # ... but needs more memory
    assert dominates(cand(micro=8), cand(micro=4))
    assert dominates(cand(ckpt=False), cand(ckpt=True))
    assert dominates(cand(r=32), cand(r=16))
    assert dominates(cand(peak=9 * GIB), cand(peak=10 * GIB))  # same configuration axes: lower peak wins
    assert not dominates(cand(), cand())
    assert not dominates(cand(r=32, peak=11 * GIB), cand(r=16))
    assert dominates(cand(r=32, peak=10 * GIB + 5), cand(r=16), tolerance_bytes=10)  # peaks within tolerance
    front = pareto_frontier([cand("qlora", micro=8, peak=9 * GIB), cand("lora", micro=4), cand("lora", micro=2),
                             cand("full", micro=1, ckpt=True, peak=11 * GIB), cand("lora", micro=0)])
    assert [(c.method, c.micro_batch_size) for c in front] == [("full", 1), ("lora", 4), ("qlora", 8)]


def test_alternatives_are_a_frontier_of_fitting_configurations():
    req = request("llama-3-8b", "rtx-4090", 1024)
    rec = recommend(req)
    alts = rec.alternatives
    assert len(alts) >= 3 and {a.method for a in alts} == {"lora", "qlora"}
    tolerance = math.ceil(0.01 * req.usable_bytes)
    others = [a for a in alts if a != rec.choice]
    for a in alts:
        assert a.predicted_peak_bytes <= req.usable_bytes
        assert a.predicted_peak_bytes == device_peak(req, a.method, a.r, a.grad_checkpointing, a.micro_batch_size)
    for a in others:
        assert not any(dominates(b, a, tolerance) for b in alts if b is not a)


# ---------------------------------------------------------------------------------------------- nothing fits


def test_nothing_fits_names_the_smallest_configuration_and_its_budget(capsys):
    assert main(["recommend", "--model", "llama-2-70b", "--gpu", "t4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is False
    assert (doc["method"], doc["r"], doc["micro_batch_size"], doc["gradient_checkpointing"]) == ("qlora", 1, 1, True)
    assert doc["predicted_peak_bytes"] > doc["usable_bytes"]
    assert doc["needed_budget_bytes"] == math.ceil(doc["predicted_peak_bytes"] / 0.9) > doc["budget_bytes"]
    assert doc["alternatives"] == []
    assert doc["reasons"][0].startswith("Nothing fits.")
    assert main(["recommend", "--model", "llama-2-70b", "--gpu", "t4"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns here
    usable = {name: usable_bytes(gpu.memory_bytes, 0.1) for name, gpu in GPUS.items() if gpu.supports_bf16}
    smallest = min((n for n in usable if usable[n] >= doc["predicted_peak_bytes"]), key=lambda n: usable[n])
    assert "Nothing fits" in out and f"needs {doc['needed_budget_bytes'] / GIB:.2f} GiB per GPU" in out
    assert f"({smallest} or larger)" in out


# ---------------------------------------------------------------------------------------------- output


def test_json_shape(capsys):
    assert main(["recommend", "--model", "llama-3-8b", "--gpu", "rtx-4090", "--seq-len", "1024",
                 "--global-batch", "32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("schema_version", "method", "r", "alpha", "target_modules", "micro_batch_size",
                "gradient_accumulation_steps", "gradient_checkpointing", "predicted_peak_bytes", "budget_bytes",
                "fits", "reasons", "alternatives"):
        assert key in doc, key
    assert doc["schema_version"] == 1 and "verify" not in doc
    assert (doc["method"], doc["r"], doc["alpha"], doc["target_modules"]) == ("lora", DEFAULT_R, 2.0 * DEFAULT_R,
                                                                              ["q_proj", "v_proj"])
    assert doc["budget_bytes"] == GPUS["rtx-4090"].memory_bytes and doc["fits"] is True
    assert doc["predicted_peak_bytes"] <= doc["usable_bytes"] == math.floor(0.9 * doc["budget_bytes"])
    assert all(isinstance(r, str) and r.endswith(".") for r in doc["reasons"])
    assert sum(a["recommended"] for a in doc["alternatives"]) == 1
    for alt in doc["alternatives"]:
        assert {"method", "r", "alpha", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                "predicted_peak_bytes"} <= set(alt)
        assert alt["predicted_peak_bytes"] <= doc["usable_bytes"]


def test_human_output(capsys):
    assert main(["recommend", "--model", "llama-3-8b", "--gpu", "rtx-4090", "--seq-len", "1024",
                 "--global-batch", "32"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns here
    rec = recommend(request("llama-3-8b", "rtx-4090", 1024, global_batch=32))
    for needle in ("Recommended configuration", "LoRA", f"{DEFAULT_R} / {2 * DEFAULT_R}", "q_proj, v_proj",
                   "gradient checkpointing", "Why", "Full fine-tuning does not fit", "Alternatives that fit",
                   f"{rec.choice.predicted_peak_bytes / GIB:.2f} GiB", "rtx-4090, 23.99 GiB",
                   "usable = 23.99 GiB x (1 - 10 %) = 21.59 GiB"):
        assert needle in out, needle


def test_rendering_at_a_fixed_width():
    rec = recommend(request("gpt2", "a10g", 512, gpus=2, global_batch=128))
    buffer = io.StringIO()
    render_recommendation(rec, Console(file=buffer, width=100, color_system=None))
    text = buffer.getvalue()
    assert "full fine-tune" in text and "2 GPUs" in text and "DDP gradient buckets" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert f"{rec.choice.predicted_peak_bytes / GIB:.2f} GiB" in text


def test_bf16_note_on_t4():
    rec = recommend(request("qwen2.5-0.5b", "t4", 512))
    assert any("t4 has no bf16 support" in w for w in rec.warnings)  # shown as a warning, as lora-plan does


@pytest.mark.parametrize("argv, field", [
    (["--gpus", "0"], "gpus"),
    (["--headroom", "1"], "headroom"),
    (["--headroom", "-0.1"], "headroom"),
    (["--global-batch", "0"], "global-batch"),
    (["--min-micro-batch", "0"], "min-micro-batch"),
    (["--gpu", "h300"], "unknown GPU"),
    (["--gpu-mem", "lots"], "gpu-mem"),
    (["--methods", "prefix"], "methods"),
    (["--methods", ","], "no method"),
    (["--r", "0"], "r:"),
    (["--r", "1024"], "exceeds the width"),
    (["--r", "8", "--trainable-fraction", "0.05"], "not allowed with argument"),
    (["--trainable-fraction", "1.5"], "trainable-fraction"),
    (["--trainable-fraction", "0.9"], "largest rank"),
    (["--methods", "qlora", "--dtype", "fp32"], "QLoRA"),
    (["--target", "qkv_proj"], "no module named"),
    (["--seq-len", "0"], "seq-len"),
    (["--optimizer", "lion"], "optimizer"),
    (["--device", "tpu"], "device"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, field):
    assert main(["recommend", "--model", "gpt2", *([] if "--gpu" in argv or "--gpu-mem" in argv else ["--gpu", "t4"]),
                 *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1 and err.startswith("lora-plan: error:")
    assert field in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["recommend", "--model", "gpt2"], "one of the arguments --gpu --gpu-mem is required"),
    (["recommend", "--model", "gpt2", "--headroom", "0"], "one of the arguments --gpu --gpu-mem is required"),
    (["recommend", "--gpu", "t4"], "--model"),
])
def test_missing_required_arguments(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- speed and imports


def test_estimate_path_does_not_import_torch_or_rich():
    code = "import lora_planner.recommend, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; from lora_planner.cli import main; "
            "main(['recommend', '--model', 'llama-3-8b', '--gpu', 'rtx-4090', '--json']); "
            "print(sorted(m for m in ('torch', 'rich', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_search_is_fast():
    start = time.perf_counter()
    for model, seq_len in (("llama-3-8b", 2048), ("gpt2", 1024), ("llama-2-70b", 2048)):
        recommend(request(model, "h100-80gb", seq_len, global_batch=1024))
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------------- --verify


def test_verify_replays_the_recommendation_under_fake_tensors():
    rec = recommend(request("gpt2", Budget(4 * GIB), 128, global_batch=256))
    assert rec.choice.method == "full" and rec.choice.micro_batch_size == rec.choice.max_micro_batch_size
    v = verify(rec)
    assert v.skipped is None and [r.label for r in v.runs] == ["recommended", "next micro-batch"]
    chosen, nxt = v.runs
    assert (chosen.status, nxt.status) == ("ok", "ok")
    assert nxt.micro_batch_size == chosen.micro_batch_size + 1
    assert chosen.measured_peak_bytes <= 4 * GIB
    assert abs(chosen.relative_error) < 1e-3 and abs(nxt.relative_error) < 1e-3
    assert chosen.cpu_kernel_extra_bytes > 0  # GPT-2's attention dropout: CPU SDPA keeps S x S probabilities
    assert chosen.device_bytes <= v.usable_bytes < nxt.device_bytes
    assert v.confirmed is True
    buffer = io.StringIO()
    render_recommendation(rec, Console(file=buffer, width=100, color_system=None), v)
    text = buffer.getvalue()
    for run in v.runs:
        assert f"{run.measured_peak_bytes / GIB:.2f}" in text and f"{run.device_bytes / GIB:.2f}" in text
    assert "CPU kernels" in text and "not measured" in text and "verified" in text
    doc = recommendation_to_dict(rec, v)
    assert doc["verify"]["confirmed"] is True
    assert doc["verify"]["runs"][0]["measured_peak_bytes"] == chosen.measured_peak_bytes


def test_verify_says_qlora_cannot_be_replayed_under_fake_tensors(capsys):
    assert main(["recommend", "--model", "llama-2-13b", "--gpu", "rtx-4090", "--seq-len", "512", "--verify"]) == 0
    assert "QLoRA cannot be replayed under fake tensors" in capsys.readouterr().out
    assert main(["recommend", "--model", "llama-2-13b", "--gpu", "rtx-4090", "--seq-len", "512", "--verify",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["runs"] == [] and "QLoRA" in doc["verify"]["skipped"] and doc["verify"]["confirmed"] is None


def test_calibration_reaches_every_prediction_of_the_search(tmp_path, capsys):
    """A calib.json that doubles LLaMA LoRA activations must shrink the micro-batch the search finds."""
    from lora_planner.report.calibrate import CALIBRATION_KIND, CALIBRATION_SCHEMA_VERSION

    calib = {"kind": CALIBRATION_KIND, "schema_version": CALIBRATION_SCHEMA_VERSION,
             "activation_factors": {"llama/lora": {"factor": 2.0}}, "device_overhead": {}}
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(calib))
    base = ["recommend", "--model", "llama-3.2-1b", "--gpu", "rtx-4090", "--methods", "lora", "--seq-len", "1024",
            "--global-batch", "256", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--calibration", str(path)]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["max_micro_batch_size"] < plain["max_micro_batch_size"]
    assert main([*base, "--calibration", str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------------------------------------- issue 9 items


@pytest.mark.parametrize("gpus, strategy", [(2, "ddp"), (2, "zero1"), (4, "fsdp"), (4, None)])
def test_multi_gpu_reasons_describe_the_strategy_not_a_stale_limitation(gpus, strategy):
    """Item 5: sharding is modelled (lora_planner.parallel); the reasons must not say otherwise."""
    rec = recommend(request("llama-3-8b", "rtx-4090", 1024, gpus=gpus, strategy=strategy, global_batch=64))
    text = " ".join(rec.reasons)
    assert "not modelled" not in text
    engine = rec.training.resolved_strategy
    assert f"Data parallel over {gpus} GPUs with {engine}" in text
    if engine == "fsdp":
        assert "parameters, gradients and optimizer state are divided over the GPUs" in text


@pytest.mark.parametrize("gpus", [1, 2])
def test_nothing_fits_points_at_sharding_without_stale_text(gpus):
    rec = recommend(request("llama-2-70b", "t4", 1024, gpus=gpus))
    assert not rec.fits
    text = " ".join(rec.reasons)
    assert "not modelled" not in text
    assert ("fsdp divides" in text) if gpus == 1 else ("Even sharded with fsdp over 2 GPUs" in text)


def test_fit_at_exactly_the_usable_memory_counts_as_a_fit():
    """Item 6: one rule, peak <= usable, in the search as in --verify."""
    base = request("gpt2", Budget(4 * GIB), 128, headroom=0.0, methods=("full",))
    peak = device_peak(base, "full", None, False, 3)
    rec = recommend(replace(base, budget=Budget(peak)))
    assert rec.choice.max_micro_batch_size == 3 and not rec.choice.grad_checkpointing


def _run(label, micro, measured, predicted, device_extra=0) -> VerifyRun:
    return VerifyRun(label=label, micro_batch_size=micro, status="ok", measured_peak_bytes=measured,
                     predicted_peak_bytes=predicted, cpu_kernel_extra_bytes=0, added_bytes=device_extra)


def _verify_text(v: Verification) -> str:
    buffer = io.StringIO()
    from lora_planner.render_recommend import render_verification

    render_verification(v, Console(file=buffer, width=100, color_system=None))
    return " ".join(buffer.getvalue().split())


def test_verify_verdict_follows_the_measured_error():
    """Item 6: a 0.04 % error is confirmed, even when the next micro-batch lands exactly on the usable memory
    (which fits, by the planner's one rule); an error above the stated tolerance is not."""
    usable = 10 * GIB
    chosen = _run("recommended", 3, 8 * GIB, round(8 * GIB * 1.0004))
    on_the_limit = _run("next micro-batch", 4, usable, round(usable * 0.9996))
    v = Verification(mode="fake", backend="hf", note="n", usable_bytes=usable, budget_bytes=11 * GIB,
                     runs=(chosen, on_the_limit))
    assert VERIFY_TOLERANCE == 0.005 and v.tolerance == VERIFY_TOLERANCE
    assert v.confirmed is True
    assert v.fits(on_the_limit) is True and v.fit_surprises == (on_the_limit,)
    text = _verify_text(v)
    assert "verified: the planner is within 0.04 % of every measured peak (tolerance 0.5 %)" in text
    assert "not confirmed" not in text
    assert "the next micro-batch (4) fits: 10.00 GiB on the device against the usable 10.00 GiB" in text
    doc = recommendation_to_dict(recommend(request("gpt2", Budget(4 * GIB), 128)), v)["verify"]
    assert doc["confirmed"] is True and doc["tolerance"] == 0.005
    assert [r["fits_usable"] for r in doc["runs"]] == [True, True]
    off = replace(v, runs=(chosen, _run("next micro-batch", 4, 12 * GIB, round(12 * GIB * 1.006))))
    assert off.confirmed is False and off.fit_surprises == ()
    assert "not confirmed: the planner is off by up to 0.60 % of a measured peak (tolerance 0.5 %)" in \
        _verify_text(off)


def test_verify_table_sizes_carry_units_and_headroom_verdict():
    usable, budget = 10 * GIB, 11 * GIB
    v = Verification(mode="fake", backend="hf", note="n", usable_bytes=usable, budget_bytes=budget,
                     runs=(_run("recommended", 1, 9 * GIB, 9 * GIB), _run("next micro-batch", 2, 10 * GIB + 1,
                                                                          10 * GIB + 1)))
    text = _verify_text(v)
    assert "usable 10.00 GiB of 11.00 GiB" in text and "│ headroom │" in text


def test_budget_echo_and_headroom_definition_in_recommend(capsys):
    """Items 9 and 10: the decimal size is echoed in GiB and usable memory is defined in the output."""
    assert main(["recommend", "--model", "llama-3-8b", "--gpu-mem", "80GB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "80 GB = 74.51 GiB" in out and "usable = 74.51 GiB x (1 - 10 %) = 67.06 GiB" in out
    rec = recommend(request("llama-3-8b", Budget(80 * 10**9, memory_text="80GB"), 1024))
    assert rec.request.usable_bytes == usable_bytes(80 * 10**9, 0.1)


UNIT_AT_LINE_START = re.compile(r"^(- )?(GiB|GB|MiB|KiB|%)([\s.,;:)]|$)")


@pytest.mark.parametrize("model, gpu", [("llama-3-8b", "rtx-4090"), ("llama-3-8b", "t4"), ("llama-2-70b", "t4"),
                                        ("llama-2-70b", "h100-80gb"), ("mistral-7b", "a100-40gb")])
def test_explanations_never_wrap_a_number_away_from_its_unit(model, gpu):
    """Item 16: at 80 columns (and around it) no line of the output starts with a unit."""
    rec = recommend(request(model, gpu, 1024))
    for width in range(72, 101, 4):
        buffer = io.StringIO()
        render_recommendation(rec, Console(file=buffer, width=width, color_system=None))
        lines = buffer.getvalue().splitlines()
        bad = [line for line in lines if UNIT_AT_LINE_START.match(line.strip().lstrip("│ "))]
        assert not bad, (width, bad)
        assert max(len(line) for line in lines) <= width


def test_verify_on_several_gpus_replays_one_ddp_rank_plus_its_buckets():
    """Issue 10: `recommend --verify --gpus 2` used to fail with a hint naming `--mode`, which recommend lacks."""
    from lora_planner.memory import estimate_memory, trainable_totals

    rec = recommend(request("gpt2", Budget(4 * GIB), 128, global_batch=256, gpus=2, strategy="ddp"))
    v = verify(rec)
    assert v.skipped is None and v.runs and v.runs[0].status == "ok"
    chosen = v.runs[0]
    step = training_for(rec.request, rec.choice.method, rec.choice.r, rec.choice.grad_checkpointing,
                        chosen.micro_batch_size, rec.alpha)
    buckets = trainable_totals(rec.request.spec, step)[1]
    one_gpu = estimate_memory(rec.request.spec, replace(step, gpus=1, strategy=None)).peak_allocated_bytes
    assert buckets > 0
    # measured one-GPU replay, CPU-kernel extra removed, DDP buckets added: the planner's rank within 0.5 %
    allocated = chosen.measured_peak_bytes - chosen.cpu_kernel_extra_bytes + buckets
    assert abs(allocated / (one_gpu + buckets) - 1) < 0.005
    assert abs(allocated / estimate_memory(rec.request.spec, step).peak_allocated_bytes - 1) < 0.005


def test_verify_on_sharded_strategies_says_which_profile_command_measures_them(capsys):
    assert main(["recommend", "--model", "gpt2", "--gpu", "t4", "--gpus", "2", "--strategy", "fsdp", "--verify",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["runs"] == []
    assert "`lora-plan profile --gpus 2 --strategy fsdp --mode cpu`" in doc["verify"]["skipped"]


def test_recommend_plans_the_chunked_loss(capsys):
    """`recommend --loss chunked` (issue 13) searches with torchtune's chunked loss and echoes it: LoRA of Llama-3-8B
    at 4,096 tokens does not fit a 24 GiB card with transformers' loss (23.49 GiB at one sequence, checkpointed),
    and does with the loss one chunk at a time (20.70 GiB)."""
    docs = {}
    for loss in ("hf", "chunked:8"):
        code = main(["recommend", "--model", "llama-3-8b", "--gpu-mem", "24GiB", "--seq-len", "4096", "--methods",
                     "lora", "--loss", loss, "--json"])
        docs[loss] = json.loads(capsys.readouterr().out)
        assert code == 0 and docs[loss]["loss"] == loss.split(":")[0]
    assert docs["hf"]["loss_chunks"] is None and docs["chunked:8"]["loss_chunks"] == 8
    assert (docs["hf"]["fits"], docs["chunked:8"]["fits"]) == (False, True)
    assert [round(docs[k]["predicted_peak_bytes"] / 2**30, 2) for k in docs] == [23.49, 20.70]


# ---- GRPO (`recommend --objective grpo | rl`): the round, its micro-batches, and what is given up ------------------


def _grpo_doc(capsys, *argv: str) -> dict:
    assert main(["recommend", "--model", "qwen3-8b", "--max-completion-length", "1024", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_grpo_searches_the_round_and_its_micro_batches(capsys):
    """On an 80 GB GPU the whole step's 32 completions are one round (TRL's steps_per_generation = the accumulation
    steps); the micro-batch divides it, and the reasons say which phase decides."""
    doc = _grpo_doc(capsys, "--gpu", "a100-80gb", "--objective", "grpo", "--methods", "lora")
    assert doc["fits"] and doc["objective"] == "grpo" and doc["loss"] == "trl"
    g = doc["grpo"]
    assert g["rows_per_round"] == 32 and g["prompts_per_round"] == 4 and g["prompt_tokens"] == 512
    assert 32 % doc["micro_batch_size"] == 0 and g["steps_per_generation"] == 32 // doc["micro_batch_size"]
    assert doc["effective_global_batch"] == 32
    assert any(r.startswith("GRPO (TRL's GRPOTrainer): the micro-batch and the global batch count completions")
               and "The generation phase peaks at" in r for r in doc["reasons"])


def test_grpo_gives_up_the_round_first(capsys):
    """On a 24 GB GPU the 32-completion round's KV cache does not fit: one prompt's 8 completions a round do, and the
    first reason says what was given up (`rl` searches GRPO's step too)."""
    doc = _grpo_doc(capsys, "--gpu", "rtx-4090", "--objective", "rl")
    assert doc["fits"] and doc["grpo"]["rows_per_round"] == 8 and doc["grpo"]["max_completion_length"] == 1024
    assert doc["reasons"][0].startswith("GRPO as asked does not fit on this GPU; gave up rounds of 8 completions")
    assert doc["method"] != "qlora" and any("QLoRA is left out: GRPO" in r for r in doc["reasons"])


def test_grpo_shortens_completions_when_a_round_of_one_prompt_does_not_fit(capsys):
    """20 GiB: rounds of one prompt do not fit either at 1,024 completion tokens; 512 do."""
    doc = _grpo_doc(capsys, "--gpu-mem", "20GiB", "--objective", "grpo", "--methods", "lora")
    assert doc["fits"] and doc["grpo"]["max_completion_length"] == 512 and doc["grpo"]["rows_per_round"] == 8
    assert doc["reasons"][0] == ("GRPO as asked does not fit on this GPU; gave up completions of 512 tokens "
                                 "(--max-completion-length 512) instead of 1024, rounds of 8 completions.")


@pytest.mark.parametrize(("argv", "field"), [
    (["--objective", "grpo", "--steps-per-generation", "2"], "steps-per-generation"),
    (["--objective", "grpo", "--global-batch", "12"], "global-batch"),
    (["--objective", "grpo", "--generation-batch-size", "12"], "generation-batch-size"),
])
def test_grpo_refusals(capsys, argv, field):
    assert main(["recommend", "--model", "qwen3-8b", "--gpu", "a100-80gb", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {field}:" in err


# ---- ORPO / SimPO / CPO (`recommend --objective orpo | simpo | cpo`): pairs, the whole logits -----------------------


def test_orpo_and_simpo_search_their_own_steps(capsys):
    """ORPO's micro-batch counts pairs and costs its logits in fp32: on an RTX 4090 it fits fewer pairs than DPO's
    fused head with the reference precomputed; SimPO's default cpo_alpha says what 0 would save."""
    base = ["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--methods", "lora", "--json"]
    assert main(base + ["--objective", "orpo"]) == 0
    orpo = json.loads(capsys.readouterr().out)
    assert orpo["fits"] and orpo["objective"] == "orpo" and orpo["loss"] == "hf"
    assert any(r.startswith("ORPO (TRL's ORPOTrainer): the micro-batch and the global batch count pairs")
               for r in orpo["reasons"])
    assert main(base + ["--objective", "dpo", "--precompute-ref-log-probs"]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert dpo["max_micro_batch_size"] > orpo["max_micro_batch_size"]
    assert main(base + ["--objective", "simpo"]) == 0
    simpo = json.loads(capsys.readouterr().out)
    assert simpo["cpo_alpha"] == 1.0 and any("--cpo-alpha 0 (pure SimPO) would peak at" in r for r in simpo["reasons"])
    assert main(base + ["--objective", "kto"]) == 2
    assert "recommend does not search KTO's step yet" in capsys.readouterr().err


# ---- the search's rank bounds: the same answers in fewer planner calls -------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--model", "llama-3.2-3b", "--gpu", "rtx-4090"],
    ["--model", "qwen3-8b", "--gpu", "a100-80gb", "--seq-len", "4096"],
    ["--model", "mistral-7b", "--gpu", "t4", "--train-tokens", "1e7"],
    ["--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--gpus", "4"],
    ["--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--seq-len", "2048"],
    ["--model", "qwen3-8b", "--gpu", "h100-80gb", "--objective", "rl", "--max-completion-length", "512"],
])
def test_rank_bounds_change_no_answer(monkeypatch, capsys, argv):
    """The ranks searched bound the others (the peak never falls as r grows): a smaller rank's largest micro-batch
    bounds a larger rank's from above, a larger rank's from below, and where two agree the ranks between need no
    search (`_Search._search_micro`). The answers are the unbounded search's, in fewer calls."""
    import lora_planner.recommend as rec
    from lora_planner import memory

    def recommend_json() -> tuple[str, int]:
        memory._estimate_memory_lru.cache_clear()
        assert main(["recommend", *argv, "--json"]) == 0
        return capsys.readouterr().out, memory._estimate_memory_lru.cache_info().misses

    bounded, bounded_calls = recommend_json()
    monkeypatch.setattr(rec._Search, "use_bounds", False)
    unbounded, unbounded_calls = recommend_json()
    assert bounded == unbounded and bounded_calls < unbounded_calls

"""`lora_planner.loss_preference`: ORPO's and CPO's (SimPO's) loss over the whole logits, by hand (the real
ORPOTrainer / CPOTrainer steps are in tests/profiler/test_trl_steps.py and experiments/objectives/orpo_runs.py)."""

from __future__ import annotations

import json

import pytest

from lora_planner.activations import activation_profile, make_flow
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.loss_preference import preference_loss_moments, preference_loss_saved
from lora_planner.memory import estimate_memory
from lora_planner.specs import TrainingSpec
from tests.test_loss import TINY_LLAMA_V1000

# 3 pairs = 6 rows of 33 tokens, V = 1,000, bf16 weights (Accelerate converts the logits to fp32)
ORPO = dict(method="lora", objective="orpo", dtype="bf16", device="cuda", batch_size=3, seq_len=33)
R, T, V, B = 6, 33, 1000, 3
FULL, SHIFTED, NLL = R * T * V * 4, R * (T - 1) * V * 4, B * (T - 1) * V * 4


def _saved(training: TrainingSpec) -> dict[str, int]:
    return {t.name: t.nbytes for t in preference_loss_saved(make_flow(TINY_LLAMA_V1000, training))}


def test_what_orpo_keeps_by_hand():
    saved = _saved(TrainingSpec(**ORPO))
    assert saved == {"loss.logits": FULL, "loss.logps_index": R * (T - 1) * 8,
                     "loss.logps_stats": R * (T - 1) * 4 * 2,  # Triton's log_z and expected logit
                     "loss.label_mask": R * (T - 1), "loss.token_counts": R * 8,
                     "loss.nll_log_softmax": NLL, "loss.nll_targets": B * (T - 1) * 8, "loss.total_weight": 4}
    # pure SimPO has no NLL term; CPU's logsumexp keeps one statistic a position; one pair's targets are a view of the
    # (2, T) labels
    simpo = _saved(TrainingSpec(**{**ORPO, "objective": "simpo", "cpo_alpha": 0.0, "device": "cpu"}))
    assert "loss.nll_log_softmax" not in simpo and simpo["loss.logps_stats"] == R * (T - 1) * 4
    assert _saved(TrainingSpec(**{**ORPO, "batch_size": 1}))["loss.nll_targets"] == 2 * T * 8


@pytest.mark.parametrize(("settings", "forward_total", "backward_total"), [
    # CUDA, bf16 weights: forward at the NLL (logits + its contiguous copy + its log_softmax), backward at the NLL
    # term's (2B, T, V) gradient beside the waiting one and the chosen half's (B, T, V)
    ({}, FULL + 2 * NLL + B * (T - 1) * 8, 2 * FULL + B * T * V * 4),
    # CPU: the stacked rows' gradient, gather's zeros and scatter_add's copy beside the logits and the NLL's output
    ({"device": "cpu"}, FULL + 2 * NLL + B * (T - 1) * 8, FULL + NLL + 3 * SHIFTED),
    # pure SimPO on CUDA: Accelerate's copy beside the bf16 logits; backward: the kernel's gradient beside the logits
    ({"objective": "simpo", "cpo_alpha": 0.0}, R * T * V * 2 + FULL, FULL + SHIFTED),
])
def test_the_moments_by_hand(settings, forward_total, backward_total):
    """(each moment also holds `concatenated_forward`'s four (2B, T) int64 tensors in forward)"""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(**{**ORPO, **settings}))
    saved = sum(t.nbytes for t in preference_loss_saved(flow))
    forward, kept, backward = preference_loss_moments(flow, head_held=0)
    assert saved + forward == forward_total + 4 * R * T * 8
    assert kept + backward == backward_total


def test_no_conversion_from_fp32_weights_without_autocast():
    """fp32 logits straight from the output layer: its moment is the logits beside the final hidden state it holds."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(**{**ORPO, "dtype": "fp32", "objective": "simpo",
                                                        "cpo_alpha": 0.0}))
    saved = sum(t.nbytes for t in preference_loss_saved(flow))
    held = R * T * 64 * 4
    forward, _, _ = preference_loss_moments(flow, head_held=held)
    assert saved + forward == FULL + held + 4 * R * T * 8


@pytest.mark.parametrize("settings", [{}, {"method": "full"}, {"grad_checkpointing": True}])
def test_the_nll_term_costs_memory_and_cpo_alpha_zero_drops_it(settings):
    def peak(**more) -> int:
        return estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**{**ORPO, **settings, **more})).peak_allocated_bytes

    orpo, simpo, pure = peak(), peak(objective="simpo"), peak(objective="simpo", cpo_alpha=0.0)
    assert orpo == simpo == peak(objective="cpo") > pure  # CPO's default cpo_alpha 1.0 keeps the NLL term
    assert peak(batch_size=4) > orpo  # more pairs, more logits


def test_logits_outweigh_dpo_s_fused_head():
    """The same pairs of Llama 3.1 8B (V = 128,256) through DPO's fused head never hold the logits: ORPO's step is
    heavier by more than its logits' fp32 bytes."""
    from lora_planner.catalog import resolve_model

    spec, settings = resolve_model("llama-3.1-8b"), {**ORPO, "batch_size": 2, "seq_len": 1024,
                                                     "grad_checkpointing": True}
    orpo = estimate_memory(spec, TrainingSpec(**settings)).peak_allocated_bytes
    dpo = estimate_memory(spec, TrainingSpec(**{**settings, "objective": "dpo", "loss": "trl",
                                                "precompute_ref_log_probs": True})).peak_allocated_bytes
    assert orpo - dpo > 4 * 1024 * 128256 * 4


@pytest.mark.parametrize(("settings", "field", "fragment"), [
    ({"loss": "trl"}, "loss", "from the whole logits"),
    ({"packing": True}, "packing", "padding-free"),
    ({"gpus": 2}, "gpus", "several GPUs"),
    ({"liger": True}, "liger", "Liger"),
    ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs", "only DPO and KTO"),
    ({"cpo_alpha": 0.0}, "cpo_alpha", "only CPOTrainer"),
])
def test_refused_with_the_reason(settings, field, fragment):
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(**{**ORPO, **settings})
    assert err.value.field == field and fragment in str(err.value)


def test_activation_profile_has_no_reference_and_no_value_at_forward_end():
    acts = activation_profile(TINY_LLAMA_V1000, TrainingSpec(**ORPO))
    assert acts.reference_moment == (0, 0) and acts.kl_moment == 0 and not acts.loss_value_at_forward_end
    assert acts.batch_bytes == 2 * R * T * 8 + R * T * 8  # ids and labels, and the sides' masks


def test_cli_plans_orpo_and_simpo(capsys):
    argv = ["--model", "llama-3.1-8b", "--method", "lora", "--dtype", "bf16", "--batch-size", "2", "--seq-len", "512"]
    assert main(argv + ["--objective", "orpo", "--json"]) == 0
    orpo = json.loads(capsys.readouterr().out)
    assert orpo["inputs"]["objective"] == "orpo" and orpo["inputs"]["rows"] == 4 and orpo["inputs"]["loss"] == "hf"
    assert main(argv + ["--objective", "simpo", "--cpo-alpha", "0", "--json"]) == 0
    simpo = json.loads(capsys.readouterr().out)
    assert simpo["inputs"]["cpo_alpha"] == 0
    assert simpo["methods"]["lora"]["peak_allocated_bytes"] < orpo["methods"]["lora"]["peak_allocated_bytes"]
    assert main(argv + ["--objective", "orpo"]) == 0
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "ORPO (TRL 1.16 ORPOTrainer" in out and "Triton" in out and "no reference model" in out


def test_stack_presets(capsys):
    assert main(["--model", "qwen3-8b", "--method", "lora", "--stack", "trl-cpo", "--objective", "simpo", "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["objective"], inputs["cpo_alpha"], inputs["dtype"], inputs["rows"]) == ("simpo", 1.0, "bf16", 16)
    # a stack whose loss is TRL's fused head: the objective's own loss replaces it unless --loss was given
    assert main(["--model", "qwen3-8b", "--method", "lora", "--stack", "trl-sft", "--objective", "orpo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["loss"] == "hf"


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--objective", "orpo", "--loss", "trl"], "computes its loss from the whole logits"),
    (["--objective", "dpo", "--cpo-alpha", "0"], "only CPOTrainer"),
    (["--objective", "simpo", "--cpo-alpha", "-1"], "cpo-alpha"),
])
def test_cli_refuses_in_one_line(capsys, argv, fragment):
    assert main(["--model", "llama-3.1-8b", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: ") and len(err.strip().splitlines()) == 1 and fragment in err

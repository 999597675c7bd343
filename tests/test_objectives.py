"""`lora_planner.objectives`: DPO's rows, its reference pass as a phase, and what is refused (hand counts; the real
TRL steps are in tests/profiler/test_trl_steps.py)."""

from __future__ import annotations

import json

import pytest

from lora_planner.activations import activation_profile, make_flow
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.inference import no_grad_layer_peak_bytes
from lora_planner.loss_fused import trl_held_outputs_bytes, trl_no_grad_head_bytes
from lora_planner.memory import estimate_memory
from lora_planner.objectives import reference_pass
from lora_planner.specs import TrainingSpec
from tests.test_loss import TINY_LLAMA_V1000

DPO = dict(method="lora", loss="trl", objective="dpo", device="cuda", batch_size=2, seq_len=16)


def test_a_pair_is_two_rows():
    t = TrainingSpec(**{**DPO, "batch_size": 3, "seq_len": 100})
    assert (t.rows, t.tokens, t.rows_per_example) == ((6, 100), 600, 2)
    assert TrainingSpec(batch_size=3, seq_len=100).rows == (3, 100)


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, "adapters-disabled"),
    ({"precompute_ref_log_probs": True}, "none"),
    ({"objective": "sft", "loss": "hf"}, "none"),
])
def test_reference_pass(settings, expected):
    assert reference_pass(TrainingSpec(**{**DPO, **settings})) == expected


@pytest.mark.parametrize(("settings", "field", "fragment"), [
    ({"objective": "grpo", "seq_len": 512}, "seq_len", "leave no prompt"),
    ({"objective": "orpo"}, "loss", "from the whole logits"),
    ({"objective": "kto", "batch_size": 1}, "batch_size", "KL term"),
    ({"objective": "simpo", "loss": "hf", "cpo_alpha": -1.0}, "cpo_alpha", "must be a number >= 0"),
    ({"cpo_alpha": 0.0}, "cpo_alpha", "only CPOTrainer"),
    ({"objective": "ppo"}, "objective", "unknown value"),
    ({"loss": "hf"}, "loss", "always runs its fused LM head"),
    ({"packing": True}, "packing", "no padding-free batches"),
    ({"gpus": 2}, "gpus", "one GPU so far"),
    ({"liger": True}, "liger", "Liger's kernels"),
    ({"offload": "optimizer"}, "offload", "CPU offload"),
    ({"objective": "sft", "precompute_ref_log_probs": True}, "precompute_ref_log_probs", "only DPO"),
])
def test_refused_with_the_reason(settings, field, fragment):
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(**{**DPO, **settings})
    assert err.value.field == field and fragment in str(err.value)


def test_full_fine_tuning_keeps_a_reference_copy():
    """Full fine-tuning: the reference is the model again (weights doubled in every phase) and no adapters to disable;
    a tied output layer is refused by the fused head."""
    full = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**{**DPO, "method": "full"}))
    precomputed = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**{**DPO, "method": "full",
                                                                     "precompute_ref_log_probs": True}))
    assert reference_pass(TrainingSpec(**{**DPO, "method": "full"})) == "model-copy"
    assert full.phases[0].breakdown.weights_bytes == 2 * precomputed.phases[0].breakdown.weights_bytes
    from lora_planner.catalog import resolve_model

    with pytest.raises(PlannerInputError, match="tied, trained output layer"):
        estimate_memory(resolve_model("llama-3.2-1b"), TrainingSpec(**{**DPO, "method": "full"}))


def test_the_reference_phase_by_hand():
    """Tiny Llama (h 64, I 176, V 1,000), LoRA bf16 on CUDA, 2 pairs of 16 tokens: 4 rows, K = 4 x 15 = 60 scored rows.
    The reference phase holds what the policy's forward saved and the outputs `_compute_loss` keeps (log_probs, entropy,
    mean_logits fp32, is_top1 and the label mask bool: 60 x (3 x 4 + 2)), and the no-grad pass's heaviest moment: the
    fused head's (the backbone's output 64 x 64 bf16, the gathered rows 60 x 64 bf16, their targets, the mask, the
    seven statistics, the 60 x 32,768 bf16 buffer, then log_z, log_probs, entropy and its temporary), above the
    layers' (4 stream tensors, the RoPE tables and positions, 3 x 64 x 176 bf16 in the MLP)."""
    t = TrainingSpec(**DPO, dtype="bf16")
    flow = make_flow(TINY_LLAMA_V1000, t)
    assert trl_held_outputs_bytes(flow) == 60 * (3 * 4 + 1) + 60
    head = 64 * 64 * 2 + 60 * 64 * 2 + 60 * 8 + 60 + 7 * 60 * 4 + 60 * 32768 * 2 + 4 * 60 * 4
    assert trl_no_grad_head_bytes(flow) == head
    layers = 4 * 64 * 64 * 2 + 2 * 16 * 16 * 2 + 16 * 8 + 3 * 64 * 176 * 2
    assert no_grad_layer_peak_bytes(flow) == layers
    acts = activation_profile(TINY_LLAMA_V1000, t)
    assert acts.reference_moment == (60 * 13 + 60, head)
    estimate = estimate_memory(TINY_LLAMA_V1000, t)
    phases = {p.phase: p.breakdown for p in estimate.phases}
    forward_end, reference = phases["forward_end"], phases["reference_forward"]
    assert reference.temporaries_bytes == head
    assert reference.weights_bytes == forward_end.weights_bytes and reference.gradients_bytes == 0
    assert [p.phase for p in estimate.phases][:3] == ["forward_start", "forward_end", "reference_forward"]


def test_precomputed_reference_log_probs_have_no_reference_phase():
    estimate = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**DPO, precompute_ref_log_probs=True))
    assert "reference_forward" not in [p.phase for p in estimate.phases]


def test_dpo_doubles_the_rows_of_the_sft_step():
    """Without its reference pass, a DPO step of b pairs is the SFT step of 2b rows with TRL's fused head, but for the
    batch the collator adds (attention and completion masks) and the DPO head's extra output."""
    dpo = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**DPO, precompute_ref_log_probs=True))
    sft = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**{**DPO, "objective": "sft", "batch_size": 4}))
    assert dpo.activations.layer == sft.activations.layer  # the same 64 tokens through each layer
    assert dpo.activations.batch_bytes == sft.activations.batch_bytes + 2 * 64 * 8


def test_cli_plans_dpo_with_trl_s_head_and_says_so(capsys):
    assert main(["--model", "llama-3.1-8b", "--objective", "dpo", "--method", "lora", "--batch-size", "2", "--json"]) \
        == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["loss"] == "trl" and doc["inputs"]["objective"] == "dpo" and doc["inputs"]["rows"] == 4
    lora = doc["methods"]["lora"]
    assert "reference_forward" in lora["phases"]
    assert any("DPO (TRL 1.16 DPOTrainer): 2 pairs = 4 rows" in w for w in doc["warnings"])


@pytest.mark.parametrize("argv", [
    ["--objective", "dpo", "--loss", "hf"],
    ["--objective", "grpo", "--loss", "hf"],
    ["--objective", "dpo", "--packing"],
    ["--precompute-ref-log-probs"],
])
def test_cli_refuses_in_one_line(capsys, argv):
    assert main(["--model", "llama-3.1-8b", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: ") and len(err.strip().splitlines()) == 1


def test_recommend_searches_the_dpo_step(capsys):
    """`recommend --objective dpo`: the micro-batch counts pairs, its peak is the DPO step's (reference pass included),
    and the reasons say what precomputing the reference would trade."""
    from lora_planner.catalog import resolve_model
    from lora_planner.specs import LoraSpec

    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--objective", "dpo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["objective"], doc["loss"], doc["method"]) == ("dpo", "trl", "lora")
    training = TrainingSpec(method="lora", loss="trl", objective="dpo", batch_size=doc["micro_batch_size"],
                            grad_checkpointing=doc["gradient_checkpointing"],
                            lora=LoraSpec(r=doc["r"], alpha=doc["alpha"], target_modules=tuple(doc["target_modules"])))
    assert estimate_memory(resolve_model("llama-3.1-8b"), training).peak_device_bytes == doc["predicted_peak_bytes"]
    reasons = " ".join(doc["reasons"])
    assert f"{doc['micro_batch_size']} pairs = {2 * doc['micro_batch_size']} rows" in reasons
    assert "--precompute-ref-log-probs would drop it" in reasons
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--objective", "dpo",
                 "--precompute-ref-log-probs", "--json"]) == 0
    precomputed = json.loads(capsys.readouterr().out)
    assert precomputed["micro_batch_size"] >= doc["micro_batch_size"]
    assert "no reference pass in the step" in " ".join(precomputed["reasons"])


def test_other_families_are_refused_even_precomputed():
    """The checkpointed forward's moment uses the same no-grad model: a GPT-2 DPO step is refused with or without a
    reference pass."""
    from lora_planner.catalog import resolve_model

    for precompute in (False, True):
        with pytest.raises(PlannerInputError, match="dense Llama-style"):
            estimate_memory(resolve_model("gpt2"), TrainingSpec(**{**DPO, "grad_checkpointing": True,
                                                                   "precompute_ref_log_probs": precompute}))


# ---- KTO: single examples, the policy's KL pass, two reference passes (real KTOTrainer steps: test_trl_steps) ----

KTO = dict(DPO, objective="kto", batch_size=4)


def test_kto_rows_phases_and_batch():
    """B examples are B rows (unpaired); the KL pass comes first and the reference passes (adapters disabled) after the
    forward; precomputing the reference drops only those."""
    training = TrainingSpec(**KTO)
    assert training.rows == (4, 16) and reference_pass(training) == "adapters-disabled"
    e = estimate_memory(TINY_LLAMA_V1000, training)
    assert [p.phase for p in e.phases][:3] == ["kl_forward", "forward_start", "forward_end"]
    assert "reference_forward" in [p.phase for p in e.phases]
    pre = estimate_memory(TINY_LLAMA_V1000, TrainingSpec(**KTO, precompute_ref_log_probs=True))
    assert [p.phase for p in pre.phases][0] == "kl_forward" and "reference_forward" not in [p.phase for p in pre.phases]
    # the collator's tensors: input_ids and labels as every step's, the masks and the KL batch (int64, taken as long
    # as the main one), the bool labels
    from lora_planner.activations import batch_extras

    extras = batch_extras(make_flow(TINY_LLAMA_V1000, training))
    assert sum(t.nbytes for t in extras) == 5 * 4 * 16 * 8 + 4


def test_kto_kl_pass_by_hand():
    """The KL pass: its labels (int64), then the heavier of the layers' no-grad moment (with the padded batch's bool
    mask) and the fused head's."""
    training = TrainingSpec(**KTO, padding=True)
    flow = make_flow(TINY_LLAMA_V1000, training)
    acts = activation_profile(TINY_LLAMA_V1000, training)
    tokens = 4 * 16
    assert acts.kl_moment == tokens * 8 + max(4 * 16 * 16 + no_grad_layer_peak_bytes(flow),
                                              trl_no_grad_head_bytes(flow))


def test_kto_refusals_and_cli(capsys):
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(**{**KTO, "batch_size": 1})
    assert err.value.field == "batch_size" and "KL term" in str(err.value)
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--objective", "kto", "--batch-size", "4",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["loss"] == "trl" and doc["inputs"]["rows"] == 4
    assert list(doc["methods"]["lora"]["phases"])[0] == "kl_forward"
    assert any(w.startswith("KTO (TRL 1.16 KTOTrainer): 4 examples") for w in doc["warnings"])

"""The rank from the data and the evidence (`lora_planner.rank_evidence`) and its use by `recommend`: hand counts, the
rule's monotonicity in the data's size, the objective's effect as cited, memory still deciding, and the CLI's
`--explain` / `--json`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.rank_evidence import MAX_EVIDENCE_RANK, rank_from_evidence, resolve_objective

LLAMA = resolve_model("llama-3.1-8b")
# Llama-3.1-8B, all seven linears of 32 layers: r x (in + out) each: q 4096+4096, k 4096+1024, v 4096+1024,
# o 4096+4096, gate / up 4096+14336, down 14336+4096 = 81,920 per layer per unit of rank -> 2,621,440
# (LoRA Without Regret: "Rank-1 LoRA for Llama-3.1-8B already has 3M parameters").
PER_RANK = 32 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)


@pytest.mark.parametrize("objective, amount, required, rank", [
    ("sft", 10_000_000, 10_000_000, 4),  # 1e7 bits x 2 / 2 = 1e7 params; 1e7 / 2,621,440 = 3.8 -> 4
    ("sft", 1_000_000, 1_000_000, 1),
    ("sft", 100_000_000, 100_000_000, 64),  # 38.1 -> 64
    ("rl", 320_000, 320_000, 1),  # MATH: ~10,000 problems x 32 samples; rank 1 suffices (the post's RL finding)
    ("preference", 60_000, 60_000, 1),
    ("continued-pretraining", 20_000_000_000, 20_000_000_000, MAX_EVIDENCE_RANK),  # capped, flagged
])
def test_rank_by_hand(objective, amount, required, rank):
    ev = rank_from_evidence(LLAMA, objective, amount)
    assert ev.params_per_rank == PER_RANK
    assert (ev.required_params, ev.rank, ev.alpha) == (required, rank, 2.0 * rank)
    assert ev.capped == (objective == "continued-pretraining")
    assert ev.seed_rank == 162  # the ~5 % rule on all-linear: 162 x 2,621,440 / (8.03 B + that) >= 5 %


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10**11), st.integers(1, 10**11), st.sampled_from(["sft", "rl", "preference",
                                                                          "continued-pretraining"]))
def test_monotone_in_the_data(a, b, objective):
    small, large = sorted((a, b))
    assert rank_from_evidence(LLAMA, objective, small).rank <= rank_from_evidence(LLAMA, objective, large).rank


@settings(max_examples=40, deadline=None)
@given(st.integers(1_000, 10**10))
def test_objective_changes_it_as_cited(tokens):
    """The same run as SFT tokens or as RL episodes of 1,024 tokens: an episode teaches ~1 bit, a token ~1 bit, so RL
    needs no more rank; continued pretraining is SFT's arithmetic plus the cap and Biderman et al.'s warning."""
    sft = rank_from_evidence(LLAMA, "sft", tokens)
    rl = rank_from_evidence(LLAMA, "rl", max(1, tokens // 1024))
    cpt = rank_from_evidence(LLAMA, "continued-pretraining", tokens)
    assert rl.rank <= sft.rank and cpt.rank == sft.rank
    assert any("underperformed full fine-tuning" in s.text for s in cpt.steps)
    assert any("rank 1" in s.text for s in rl.steps)


def test_margin_and_targets():
    assert rank_from_evidence(LLAMA, "sft", 10_000_000, capacity_margin=8).rank == 16  # 4e7 / 2.62e6 = 15.3
    qv = rank_from_evidence(LLAMA, "sft", 10_000_000, targets=("q_proj", "v_proj"))
    assert qv.params_per_rank == 32 * (8192 + 5120) and qv.rank == 32  # 1e7 / 425,984 = 23.5 -> 32


@pytest.mark.parametrize("text, expected", [("SFT", "sft"), ("grpo", "rl"), ("dpo", "preference"),
                                            ("cpt", "continued-pretraining")])
def test_objective_spellings(text, expected):
    assert resolve_objective(text) == expected


def test_bad_objective():
    with pytest.raises(PlannerInputError, match="objective"):
        resolve_objective("vibes")


def test_recommend_uses_it(capsys):
    """recommend with --train-tokens: the evidence's rank on all-linear when it fits, its cost over PEFT's default
    shown; --json carries the chain; --explain prints it with citations."""
    argv = ["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--train-tokens", "1e7"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["method"], doc["r"], doc["alpha"], doc["target_modules"]) == ("lora", 4, 8.0, ["all-linear"])
    assert doc["evidence"]["rank"] == 4 and doc["evidence"]["params_per_rank"] == PER_RANK
    assert any("LoRA Without Regret" in src for step in doc["evidence"]["steps"] for src in step["sources"])
    assert any(r.startswith("All-linear targets cost") for r in doc["reasons"])
    assert main([*argv, "--explain"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Evidence" in out and "[Hu et al. 2021, LoRA (arXiv 2106.09685), Table 5;" in out


def test_memory_still_decides(capsys):
    """On a 16 GiB card the data's r = 64 on all-linear does not fit LoRA; the ladder goes down (or to QLoRA), and the
    answer fits."""
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu-mem", "16GiB", "--train-tokens", "1e8",
                 "--methods", "lora", "--seq-len", "4096", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["evidence"]["rank"] == 64
    assert doc["fits"] is False or doc["predicted_peak_bytes"] <= doc["usable_bytes"]
    if doc["fits"] and doc["r"] != 64:
        assert any("r=64 does not fit" in r for r in doc["reasons"])


@pytest.mark.parametrize("argv, needle", [
    (["--objective", "continued-pretraining"], "needs its size"),
    (["--capacity-margin", "3"], "needs its size"),
    (["--train-tokens", "1e6", "--examples", "10"], "both given"),
    (["--train-tokens", "1e6", "--objective", "vibes"], "unknown objective"),
])
def test_bad_flags(capsys, argv, needle):
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_examples_for_rl_are_episodes(capsys):
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "h100-80gb", "--methods", "lora",
                 "--objective", "rl", "--examples", "320000", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["evidence"]["unit"], doc["evidence"]["amount"], doc["r"]) == ("episodes", 320000, 1)

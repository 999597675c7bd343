"""`--stack` presets (`lora_planner.stacks`): every preset names real options, plans on a real model, and never
overrides a flag given explicitly."""

from __future__ import annotations

import json

import pytest

from lora_planner.cli import main
from lora_planner.cli_args import build_parser
from lora_planner.errors import PlannerInputError
from lora_planner.stacks import STACKS, resolve_stack


def _dests(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[command]  # noqa: SLF001
    return {action.dest for action in sub._actions}  # noqa: SLF001


@pytest.mark.parametrize("name", list(STACKS))
def test_every_preset_names_estimate_options_and_plans(name, capsys):
    """A preset's keys are the estimate command's options (a misspelt key would silently set nothing), and the
    preset plans Llama-3.1-8B for LoRA and QLoRA (GRPO's: LoRA), saying what it set and what is not modelled."""
    stack = STACKS[name]
    assert set(stack.settings) <= _dests("estimate"), set(stack.settings) - _dests("estimate")
    methods = "lora" if stack.settings.get("objective") == "grpo" else "lora,qlora"  # (GRPO on 4 bits: refused)
    assert main(["--model", "llama-3.1-8b", "--method", methods, "--stack", name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["stack"] == name
    note = doc["warnings"][0]
    assert note.startswith(f"stack {name} ({stack.version}):")
    assert all(text in note for text in stack.notes)


def test_explicit_flags_win(capsys):
    """trl-sft's preset sets batch 8, fp32 + bf16 autocast and checkpointing; --batch-size 1 on the command line
    stays 1 and is not listed as set by the preset."""
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--stack", "trl-sft", "--batch-size", "1",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    inputs = doc["inputs"]
    assert (inputs["batch_size"], inputs["dtype"], inputs["amp"], inputs["grad_checkpointing"]) == (1, "fp32", "bf16",
                                                                                                      True)
    assert "--batch-size" not in doc["warnings"][0] and "--amp bf16" in doc["warnings"][0]


def test_stack_values_by_hand(capsys):
    """torchtune's Llama-3.1-8B LoRA recipe: bf16 adapters, r 8 / alpha 16 on q, v, o and the MLP, its chunked loss
    in 8 chunks, batch 2, checkpointing."""
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--stack", "torchtune", "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["adapter_dtype"], inputs["r"], inputs["alpha"], inputs["loss"], inputs["loss_chunks"],
            inputs["batch_size"], inputs["grad_checkpointing"]) == ("base", 8, 16.0, "chunked", 8, 2, True)
    assert inputs["target_modules"][:3] == ["q_proj", "v_proj", "o_proj"]


def test_recommend_keeps_searching_rank_and_batch(capsys):
    """In `recommend` a preset does not fix what the search chooses (rank, alpha, micro-batch, checkpointing)."""
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu-mem", "24GiB", "--stack", "litgpt", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stack"]["name"] == "litgpt" and "--r" not in doc["stack"]["note"]
    assert "--seq-len 512" in doc["stack"]["note"]


def test_unknown_stack():
    with pytest.raises(PlannerInputError) as err:
        resolve_stack("deepspeed")
    assert err.value.field == "stack" and "trl-sft" in err.value.fix
    assert main(["--model", "gpt2", "--stack", "nemo"]) == 2


def test_litgpt_plans_qlora_without_double_quantization(capsys):
    """litgpt's QLoRA (`--quantize bnb.nf4`) keeps an fp32 absmax per 64 weights: the preset turns double
    quantization off (an explicit flag would still win) and says so in its note."""
    assert main(["--model", "llama-3.1-8b", "--stack", "litgpt", "--method", "qlora", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["double_quant"] is False
    assert main(["--model", "llama-3.1-8b", "--stack", "litgpt", "--method", "qlora"]) == 0
    assert "--double-quant off" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", sorted(STACKS))
def test_notes_are_sentences(name):
    """Each note is one sentence of what is not modelled (a one-element tuple needs its comma)."""
    notes = STACKS[name].notes
    assert isinstance(notes, tuple) and all(isinstance(n, str) and len(n) > 20 for n in notes)


def test_an_explicit_packing_replaces_the_presets_padding(capsys):
    """trl-sft pads by default; `--packing` given explicitly wins over that too (the two exclude each other)."""
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--stack", "trl-sft", "--packing", "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["packing"], inputs["padding"]) == (True, False)

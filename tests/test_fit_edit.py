"""The smallest edit to the user's config that fits (`lora_planner.fit_edit`): the answer fits, nothing lighter does
(checked by brute force over every candidate), each change is written in the user's own keys, and `main` prints it
as a diff and carries it in --json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.fit_edit import BATCH_WEIGHT, LEVERS, SEQ_WEIGHT, KeyChange, _halvings, smallest_edit
from lora_planner.from_files import read_settings_file
from lora_planner.memory import DeviceOverhead, estimate_memory
from lora_planner.planner import usable_bytes
from lora_planner.specs import LoraSpec, TrainingSpec

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
GIB = 2**30
LLAMA = resolve_model("llama-3.1-8b")


def _peak(t: TrainingSpec) -> int:
    return estimate_memory(LLAMA, t, DeviceOverhead()).peak_device_bytes


@pytest.mark.parametrize("budget_gib", [12, 16, 20, 24, 40])
def test_answer_fits_and_nothing_lighter_does(budget_gib):
    """Every candidate of smaller weight (levers x micro-batch x sequence halvings) is planned: none fits."""
    t = TrainingSpec(method="lora", batch_size=8, seq_len=4096, optimizer="adamw_torch",
                     lora=LoraSpec(r=16, target_modules=("all-linear",)))
    usable = usable_bytes(budget_gib * GIB, 0.1)
    assert _peak(t) > usable
    edit = smallest_edit(LLAMA, t, usable, [], accumulation=2)
    assert edit.fits and edit.peak_after_bytes <= usable < edit.peak_before_bytes == _peak(t)
    weight_of = {lv.name: lv.weight for lv in LEVERS}
    chosen = sum(weight_of.get(n, 0) for n in edit.levers)
    batch_steps = next(i for i, b in enumerate(_halvings(8)) if any(
        c.key == "--batch-size" and c.after == b for c in edit.changes)) if "micro-batch" in edit.levers else 0
    seq_steps = next(i for i, s in enumerate(_halvings(4096)) if any(
        c.key == "--seq-len" and c.after == s for c in edit.changes)) if "sequence length" in edit.levers else 0
    best = chosen + BATCH_WEIGHT * batch_steps + SEQ_WEIGHT * seq_steps
    applicable = [lv for lv in LEVERS if lv.applies(t)]
    for mask in range(1 << len(applicable)):
        on = [lv for i, lv in enumerate(applicable) if mask >> i & 1]
        for bi, b in enumerate(_halvings(8)):
            for si, s in enumerate(_halvings(4096)[:4]):
                weight = sum(lv.weight for lv in on) + BATCH_WEIGHT * bi + SEQ_WEIGHT * si
                if 0 < weight < best:
                    c = replace(t, batch_size=b, seq_len=s)
                    for lv in on:
                        c = lv.apply(c)
                    assert _peak(c) > usable, (budget_gib, [lv.name for lv in on], b, s)


def test_global_batch_kept_by_hand():
    """torchtune's example on a 24 GB card: batch 4 x accumulation 8 -> 2 x 16, nothing else (the lighter levers do
    not fit), written in the recipe's own keys."""
    f = read_settings_file(str(CONFIGS / "torchtune_lora.yaml"))
    t = TrainingSpec(method="lora", batch_size=4, seq_len=2048, grad_checkpointing=True, loss="linear",
                     lora=LoraSpec(r=8, alpha=16, adapter_dtype="base",
                                   target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    edit = smallest_edit(LLAMA, t, usable_bytes(24 * 10**9, 0.1), [f], accumulation=8)
    assert edit.levers == ("micro-batch",) and edit.global_batch == 32
    assert edit.changes == (KeyChange(f.path, "batch_size", 4, 2),
                            KeyChange(f.path, "gradient_accumulation_steps", 8, 16))


def test_nothing_fits():
    t = TrainingSpec(method="full", batch_size=1, seq_len=512)
    edit = smallest_edit(LLAMA, t, 4 * GIB, [])
    assert not edit.fits and edit.changes == () and edit.plans_tried > 0


@pytest.mark.parametrize("name, text, dest, after, expected", [
    # the reader's own spelling: LLaMA-Factory's inverted flag, axolotl's plugin list, TRL's 4-bit flag
    ("l.yaml", "finetuning_type: lora\ndisable_gradient_checkpointing: true\n", "grad_checkpointing", True,
     [("disable_gradient_checkpointing", True, False, False)]),
    ("a.yaml", "base_model: x\nplugins: [my.Plugin]\n", "liger", True,
     [("plugins", ["my.Plugin"], ["my.Plugin", "axolotl.integrations.liger.LigerPlugin"], False),
      ("liger_rope", None, True, True), ("liger_rms_norm", None, True, True),
      ("liger_glu_activation", None, True, True), ("liger_fused_linear_cross_entropy", None, True, True)]),
    ("s.yaml", "use_peft: true\nper_device_train_batch_size: 2\n", "method", "qlora",
     [("load_in_4bit", None, True, True)]),
    ("t.yaml", "model: {_component_: torchtune.models.llama3_1.lora_llama3_1_8b}\n", "method", "qlora",
     [("model._component_", "torchtune.models.llama3_1.lora_llama3_1_8b", "torchtune.models.llama3_1.qlora_llama3_1_8b",
       False)]),
    ("g.yaml", "checkpoint_dir: c/x/y\nlora_r: 8\ntrain: {micro_batch_size: 4, global_batch_size: 64}\n",
     "grad_accumulation", 32, []),  # litgpt derives it from global_batch_size
    ("d.json", '{"zero_optimization": {"stage": 2}}', "offload", "optimizer",
     [("zero_optimization.offload_optimizer.device", None, "cpu", True)]),
    ("p.json", '{"r": 8, "lora_alpha": 16}', "batch_size", 2, [("--batch-size", 4, 2, False)]),  # no file can say it
])
def test_changes_in_the_files_own_keys(tmp_path, name, text, dest, after, expected):
    from lora_planner.fit_edit import _spelled

    (tmp_path / name).write_text(text)
    f = read_settings_file(str(tmp_path / name))
    got = _spelled(dest, 4, after, [f])
    assert [(c.key, c.before, c.after, c.added) for c in got] == expected
    assert all(c.file == (None if c.key.startswith("--") else f.path) for c in got)


def test_deepspeed_auto_batch_falls_through_to_the_training_arguments(tmp_path):
    """A DeepSpeed JSON whose micro-batch is "auto" takes it from the Trainer: the edit goes to the Trainer's file."""
    from lora_planner.fit_edit import _spelled

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    (tmp_path / "args.json").write_text('{"per_device_train_batch_size": 8}')
    files = [read_settings_file(str(tmp_path / n)) for n in ("ds.json", "args.json")]
    (change,) = _spelled("batch_size", 8, 4, files)
    assert (change.file, change.key, change.before, change.after) == (str(tmp_path / "args.json"),
                                                                      "per_device_train_batch_size", 8, 4)


def test_main_prints_the_diff_and_json(capsys):
    config = str(CONFIGS / "torchtune_lora.yaml")
    assert main(["--from", config, "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    words = " ".join(out.split())
    assert "lora does not fit rtx-4090" in words and "Smallest edit (micro-batch)" in words
    assert "  - batch_size: 4\n  + batch_size: 2\n" in out and "+ gradient_accumulation_steps: 16" in out
    assert main(["--from", config, "--gpu", "rtx-4090", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (edit,) = doc["fit_edits"]
    assert edit["levers"] == ["micro-batch"] and edit["peak_after_bytes"] <= doc["inputs"]["usable_bytes"]
    assert main(["--from", config, "--gpu", "h100-80gb", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit_edits"] == []  # it fits: nothing to edit
    assert main(["--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit_edits"] is None  # no --from: no file to edit

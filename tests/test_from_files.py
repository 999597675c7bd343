"""`--from FILE` (`lora_planner.from_files`): the shipped example configs, field by field; malformed files; what is
listed as not modelled; precedence (flags over files, later files over earlier, files over a preset) through
`main([...])`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.from_files import read_settings_file

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
PEFT = str(CONFIGS / "peft_adapter_config.json")
SFT = str(CONFIGS / "trl_sft_config.yaml")


def test_shipped_peft_adapter_config():
    f = read_settings_file(PEFT)
    assert f.kind == "peft"
    assert f.settings == {"r": 16, "alpha": 32.0, "target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                          "use_dora": False, "use_rslora": False, "bias": "none",
                          "model": "meta-llama/Llama-3.1-8B"}
    assert len(f.not_modelled) == 1 and f.not_modelled[0].startswith("lora_dropout 0.05")


def test_shipped_trl_sft_config():
    f = read_settings_file(SFT)
    assert f.kind == "training_args"
    assert f.settings == {"batch_size": 4, "grad_checkpointing": True, "use_reentrant": False,
                          "optimizer": "adamw_torch_fused", "seq_len": 2048, "packing": True, "liger": True,
                          "dtype": "bf16", "amp": None}
    assert f.not_modelled == ()  # learning rate, epochs, logging, output_dir: no memory change, ignored


@pytest.mark.parametrize("name, text, settings, note", [
    ("a.json", '{"r": 8, "target_modules": "all-linear", "layers_to_transform": 3}',
     {"r": 8, "target": "all-linear", "layers_to_transform": "3"}, None),
    ("a.json", '{"r": 8, "target_modules": ".*(q|v)_proj", "rank_pattern": {"q_proj": 4}}', {"r": 8},
     "regular expression"),
    ("t.json", '{"per_device_train_batch_size": 2, "bf16": true}', {"batch_size": 2}, "bf16=true"),
    ("t.json", '{"optim": "adamw_8bit", "torch_compile": true, "deepspeed": "ds.json"}',
     {"optimizer": "adamw_8bit"}, "torch_compile"),
    ("t.yml", "optim: adamw_torch\nbf16: true\nmodel_init_kwargs: {torch_dtype: float32}\n",
     {"optimizer": "adamw_torch", "dtype": "fp32", "amp": "bf16"}, None),
    ("t.json", '{"max_seq_length": 512, "padding_free": true, "gradient_checkpointing": false}',
     {"seq_len": 512, "packing": True, "grad_checkpointing": False}, None),
])
def test_fields_by_hand(tmp_path, name, text, settings, note):
    path = tmp_path / name
    path.write_text(text)
    f = read_settings_file(str(path))
    assert f.settings == settings
    assert (note is None and not f.not_modelled) or any(note in n for n in f.not_modelled)


@pytest.mark.parametrize("name, text, needle", [
    ("bad.json", '{"r": 8,', "not valid JSON at line 1"),
    ("bad.yaml", "r: [8\n", "not valid YAML"),
    ("list.json", "[1, 2]", "expected a mapping"),
    ("other.json", '{"hello": 1}', "neither a PEFT adapter config nor training arguments"),
    ("ia3.json", '{"peft_type": "IA3", "target_modules": ["k_proj"]}', "is not LoRA"),
    ("r.json", '{"r": "eight", "lora_alpha": 16}', "r must be a positive integer"),
    ("r.json", '{"r": true, "lora_alpha": 16}', "r must be a positive integer"),
    ("t.json", '{"target_modules": [1, 2]}', "target_modules must be a module name"),
    ("b.json", '{"per_device_train_batch_size": 2.5}', "per_device_train_batch_size must be a positive integer"),
])
def test_malformed_files_get_one_line(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PlannerInputError, match="from"):
        read_settings_file(str(path))
    assert main(["--model", "llama-3.1-8b", "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and err.count("\n") == 1, err


def test_precedence_through_main(tmp_path, capsys):
    """Flags win over files, later files over earlier ones, files over a --stack preset; --json lists the files."""
    later = tmp_path / "later.json"
    later.write_text('{"r": 4, "lora_alpha": 8}')
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--from", PEFT, "--from", str(later), "--from", SFT,
                 "--batch-size", "1", "--stack", "trl-sft", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    inputs = doc["inputs"]
    assert (inputs["r"], inputs["alpha"]) == (4, 8)  # the later file
    assert inputs["batch_size"] == 1  # the flag
    # the SFT file over the preset's padded 1,024-token rows and fp32 + autocast
    assert (inputs["seq_len"], inputs["packing"], inputs["padding"]) == (2048, True, False)
    assert (inputs["dtype"], inputs["amp"]) == ("bf16", None)
    assert inputs["stack"] == "trl-sft" and inputs["adapter_dtype"] == "fp32"  # the preset, where no file says
    assert [f["kind"] for f in inputs["from_files"]] == ["peft", "peft", "training_args"]
    assert any(w.startswith("from ") and "not modelled: lora_dropout" in w for w in doc["warnings"])

"""The `lora-plan` command through `main([...])`: output shape, JSON schema, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_planner.cli import main
from lora_planner.memory import CATEGORIES


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_human_output_names_every_method_and_the_peak(capsys):
    assert main(["--model", "llama-7b", "--r", "8"]) == 0
    out = capsys.readouterr().out
    for needle in ("llama-2-7b", "full fine-tune", "LoRA", "QLoRA", "peak allocated", "seed rule", "fits on",
                   "0.0622 %"):
        assert needle in out


def test_estimate_subcommand_is_the_default(capsys):
    assert main(["estimate", "--model", "gpt2", "--json"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    implicit = run_json(capsys, "--model", "gpt2")
    assert explicit == implicit


def test_json_shape_is_stable(capsys):
    doc = run_json(capsys, "--model", "llama-7b", "--r", "8", "--gpu", "a100-80gb")
    assert doc["schema_version"] == 1
    assert doc["model"]["name"] == "llama-2-7b"
    assert doc["model"]["total_params"] == 6_738_415_616
    assert doc["inputs"]["r"] == 8 and doc["inputs"]["alpha"] == 16
    assert set(doc["methods"]) == {"full", "lora", "qlora"}
    lora = doc["methods"]["lora"]
    assert lora["trainable_params"] == 4_194_304
    assert round(100 * lora["trainable_fraction"], 4) == 0.0622
    for method in doc["methods"].values():
        assert set(method["breakdown_bytes"]) == set(CATEGORIES)
        assert sum(method["breakdown_bytes"].values()) == method["peak_allocated_bytes"]
        assert method["peak_device_bytes"] == method["peak_allocated_bytes"] + method["device_overhead_bytes"]
        assert method["peak_phase"] in method["phases"]
        assert isinstance(method["fits"], bool)
    assert doc["methods"]["full"]["seed_rule_bytes"] == 4 * 6_738_415_616 * 2


def test_fits_follows_the_budget(capsys):
    small = run_json(capsys, "--model", "llama-7b", "--gpu-mem", "10GiB")
    assert small["methods"]["qlora"]["fits"] is True
    assert small["methods"]["full"]["fits"] is False
    assert small["inputs"]["budget_bytes"] == 10 * 2**30
    unbounded = run_json(capsys, "--model", "llama-7b")
    assert unbounded["methods"]["lora"]["fits"] is None
    assert unbounded["methods"]["lora"]["fits_on"]


def test_cpu_device_has_no_overhead(capsys):
    doc = run_json(capsys, "--model", "gpt2", "--device", "cpu", "--method", "lora")
    assert list(doc["methods"]) == ["lora"]
    assert doc["methods"]["lora"]["device_overhead_bytes"] == 0
    assert doc["inputs"]["optimizer_impl"] == "for-loop"


def test_amp_defaults_to_fp32_master_weights(capsys):
    doc = run_json(capsys, "--model", "gpt2", "--amp", "bf16", "--method", "full")
    assert doc["inputs"]["dtype"] == "fp32"
    assert doc["methods"]["full"]["breakdown_bytes"]["weights"] == 124_439_808 * 4


def test_detail_shows_every_phase(capsys):
    assert main(["--model", "gpt2", "--detail", "--method", "lora"]) == 0
    out = capsys.readouterr().out
    for phase in ("forward end", "backward start", "backward end", "optimizer step"):
        assert phase in out


def test_config_json_path(tmp_path, capsys):
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    doc = run_json(capsys, "--model", str(path), "--method", "lora")
    assert doc["model"]["family"] == "llama"


@pytest.mark.parametrize("argv, field", [
    (["--model", "llama-2-7"], "did you mean llama-2-7b"),
    (["--model", "nonexistent-model"], "unknown model"),
    (["--r", "0"], "r:"),
    (["--r", "-3"], "r:"),
    (["--r", "abc"], "--r"),
    (["--model", "gpt2", "--r", "769", "--target", "c_attn"], "exceeds the width"),
    (["--target", "qkv_proj"], "no module named 'qkv_proj'"),
    (["--target", "input_layernorm"], "norm layer"),
    (["--dtype", "fp8"], "dtype"),
    (["--amp", "int8"], "amp"),
    (["--dtype", "bf16", "--amp", "bf16"], "fp32 master weights"),
    (["--optimizer", "lion"], "optimizer"),
    (["--optimizer-impl", "vectorized"], "optimizer_impl"),
    (["--method", "prefix"], "method"),
    (["--gpu", "h300"], "unknown GPU"),
    (["--gpu-mem", "lots"], "gpu-mem"),
    (["--batch-size", "0"], "batch_size"),
    (["--seq-len", "-1"], "seq_len"),
    (["--device", "tpu"], "device"),
    (["--attention", "flash3"], "attention"),
    (["--method", "qlora", "--dtype", "fp32"], "QLoRA"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, field):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lora-plan: error:")
    assert field in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "t5", "hidden_size": 8}', "unsupported model_type 't5'"),
    ('{"model_type": "llama", "vocab_size": 10}', "hidden_size"),
    ("[1, 2]", "JSON object"),
])
def test_bad_config_json(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_config_file(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "absent" / "config.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert "estimate" in capsys.readouterr().out
    assert main(["--version"]) == 0


def test_estimate_path_does_not_import_torch_or_pandas():
    code = ("import sys; from lora_planner.cli import main; main(['--model', 'llama-7b', '--json']); "
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'rich') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"

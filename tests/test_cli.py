"""The `lora-plan` command through `main([...])`: output shape, JSON schema, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lora_planner.cli import main
from lora_planner.cli_args import build_parser
from lora_planner.cli_args import SUBCOMMAND_ARGUMENTS
from lora_planner.defaults import DEFAULT_HEADROOM, DEFAULT_R, DEFAULT_SEQ_LEN
from lora_planner.errors import PlannerInputError
from lora_planner.memory import CATEGORIES
from lora_planner.planner import usable_bytes
from lora_planner.specs import TrainingSpec

GIB = 2**30


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
    small = run_json(capsys, "--model", "llama-7b", "--gpu-mem", "10GiB", "--seq-len", "512")
    assert small["methods"]["qlora"]["fits"] is True
    assert small["methods"]["full"]["fits"] is False
    assert small["inputs"]["budget_bytes"] == 10 * 2**30
    assert small["inputs"]["usable_bytes"] == usable_bytes(10 * 2**30, DEFAULT_HEADROOM)
    for method in small["methods"].values():
        assert method["fits"] is (method["peak_device_bytes"] <= small["inputs"]["usable_bytes"])
    unbounded = run_json(capsys, "--model", "llama-7b")
    assert unbounded["methods"]["lora"]["fits"] is None
    assert unbounded["methods"]["lora"]["fits_on"]


def test_cpu_device_has_no_overhead(capsys):
    doc = run_json(capsys, "--model", "gpt2", "--device", "cpu", "--method", "lora")
    assert list(doc["methods"]) == ["lora"]
    assert doc["methods"]["lora"]["device_overhead_bytes"] == 0
    assert doc["inputs"]["optimizer_impl"] == TrainingSpec(device="cpu").resolved_optimizer_impl


def test_amp_defaults_to_fp32_master_weights(capsys):
    doc = run_json(capsys, "--model", "gpt2", "--amp", "bf16", "--method", "full")
    assert doc["inputs"]["dtype"] == "fp32"
    assert doc["methods"]["full"]["breakdown_bytes"]["weights"] == 124_439_808 * 4


def test_detail_shows_every_phase(capsys):
    assert main(["--model", "gpt2", "--detail", "--method", "lora"]) == 0
    out = capsys.readouterr().out
    for phase in ("forward end", "backward start", "backward end", "optimizer step"):
        assert phase in out


def test_chunked_loss_is_echoed_noted_and_smaller_at_long_sequences(capsys):
    """--loss chunked[:N] (issue 13): the inputs echo it, the notes say what was assumed, and at 32k tokens of
    Llama-3.1-8B LoRA it removes most of the loss's peak (the bf16 logits stay, the fp32 copies and gradients go
    one chunk at a time)."""
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "32768", "--grad-checkpointing"]
    hf = run_json(capsys, *base)
    chunked = run_json(capsys, *base, "--loss", "chunked:8")
    assert (hf["inputs"]["loss"], hf["inputs"]["loss_chunks"]) == ("hf", None)
    assert (chunked["inputs"]["loss"], chunked["inputs"]["loss_chunks"]) == ("chunked", 8)
    assert any("CEWithChunkedOutputLoss in 8 sequence chunks" in w for w in chunked["warnings"])
    before, after = (doc["methods"]["lora"]["peak_allocated_bytes"] for doc in (hf, chunked))
    assert (round(before / 2**30, 2), round(after / 2**30, 2)) == (70.48, 48.95)
    assert chunked["methods"]["lora"]["peak_phase"] == "forward_end"


def test_rslora_changes_the_scaling_shown_not_the_memory(capsys):
    """--use-rslora (PEFT's use_rslora): the header and the JSON give alpha / sqrt(r); every byte is the same."""
    base = ["--model", "llama-7b", "--method", "lora", "--r", "16"]
    plain, rs = run_json(capsys, *base), run_json(capsys, *base, "--use-rslora")
    assert (plain["inputs"]["use_rslora"], plain["inputs"]["lora_scaling"]) == (False, 2.0)
    assert (rs["inputs"]["use_rslora"], rs["inputs"]["lora_scaling"]) == (True, 8.0)
    assert plain["methods"] == rs["methods"]
    assert main([*base, "--use-rslora"]) == 0
    assert "rsLoRA (scaling alpha / sqrt(r) = 8)" in " ".join(capsys.readouterr().out.split())


def test_padding_and_packing_flags(capsys):
    """--padding / --packing: echoed in the JSON inputs and the header; Llama-3.1-8B LoRA, 4 x 2,048 tokens, no
    checkpointing: SDPA with a padding mask (its (b, 1, s, s) mask, k / v repeated per layer) 72.79 GiB against 68.79
    with every row full; packed into one 8,192-token row 75.79 GiB with SDPA (its mask is over the row), 68.79 with
    flash-attn 2 (varlen, no mask). Both flags at once: one line, exit 2."""
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048"]
    full, padded, packed = (run_json(capsys, *base, *extra) for extra in ([], ["--padding"], ["--packing"]))
    flash = run_json(capsys, *base, "--packing", "--attention", "flash_attention_2")
    assert (padded["inputs"]["padding"], packed["inputs"]["packing"], full["inputs"]["packing"]) == (True, True, False)
    gib = [round(doc["methods"]["lora"]["peak_allocated_bytes"] / 2**30, 2) for doc in (full, padded, packed, flash)]
    assert gib == [68.79, 72.79, 75.79, 68.79]
    assert main([*base, "--packing"]) == 0
    assert "packed into 1 row of 8192 (padding-free)" in " ".join(capsys.readouterr().out.split())
    assert main([*base, "--padding", "--packing"]) == 2
    assert "packing: not allowed with argument --padding" in capsys.readouterr().err


def test_liger_flag(capsys):
    """--liger (use_liger_kernel=True): Llama-3.1-8B LoRA at 8,192 tokens 68.79 -> 46.33 GiB, with checkpointing
    28.87 -> 18.25 GiB; the JSON echoes it and the loss that runs, the notes say it is modelled from Liger's source;
    --loss fused-linear alone keeps the HF layers."""
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "8192"]
    docs = [run_json(capsys, *base, *extra) for extra in ([], ["--liger"], ["--grad-checkpointing"],
                                                          ["--grad-checkpointing", "--liger"], ["--loss", "liger"])]
    gib = [round(doc["methods"]["lora"]["peak_allocated_bytes"] / 2**30, 2) for doc in docs]
    assert gib[:4] == [68.79, 46.33, 28.87, 18.25] and gib[1] < gib[4] < gib[0]
    assert (docs[1]["inputs"]["liger"], docs[1]["inputs"]["loss"]) == (True, "fused-linear")
    assert any("Liger-Kernel's source" in w for w in docs[1]["warnings"])
    assert main([*base, "--liger", "--loss", "chunked"]) == 2
    assert "liger: use_liger_kernel runs Liger's fused linear cross-entropy" in capsys.readouterr().err


def test_dora_flag(capsys):
    """--dora (PEFT's use_dora): echoed; Llama-3.1-8B all-linear at 4,096 tokens, no checkpointing, 57.11 -> 88.64
    GiB (every adapted linear keeps its base output and B A x for backward); the header says DoRA."""
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--target", "all-linear", "--seq-len", "4096"]
    lora, dora = run_json(capsys, *base), run_json(capsys, *base, "--dora")
    assert (lora["inputs"]["use_dora"], dora["inputs"]["use_dora"]) == (False, True)
    gib = [round(doc["methods"]["lora"]["peak_allocated_bytes"] / 2**30, 2) for doc in (lora, dora)]
    assert gib == [57.11, 88.64]
    # one magnitude per adapted linear's output: 32 layers x (4,096 + 1,024 + 1,024 + 4,096 + 2 x 14,336 + 4,096)
    assert dora["methods"]["lora"]["trainable_params"] - lora["methods"]["lora"]["trainable_params"] == 32 * 43008
    assert main([*base, "--dora"]) == 0
    assert "DoRA r=8 alpha=16" in " ".join(capsys.readouterr().out.split())


def test_modules_to_save_flag(capsys):
    """--modules-to-save embed_tokens,lm_head (PEFT's modules_to_save, e.g. for new tokens): echoed; Llama-3.1-8B LoRA
    at 4,096 tokens with checkpointing 21.93 -> 27.83 GiB (two 525 M-parameter bf16 copies, lm_head's gradient from
    the start of backward), QLoRA 15.24 -> 27.05 GiB (kbit preparation made the originals fp32, so are the copies and
    their AdamW states); an unknown module: one line, exit 2."""
    base = ["--model", "llama-3.1-8b", "--seq-len", "4096", "--grad-checkpointing"]
    gib = []
    for method in ("lora", "qlora"):
        for extra in ([], ["--modules-to-save", "embed_tokens,lm_head"]):
            doc = run_json(capsys, *base, "--method", method, *extra)
            gib.append(round(doc["methods"][method]["peak_allocated_bytes"] / 2**30, 2))
    assert gib == [21.93, 27.83, 15.24, 27.05]
    assert doc["inputs"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert doc["methods"]["qlora"]["trainable_params"] > 2 * 525_336_576
    assert main([*base, "--modules-to-save", "q_proj"]) == 2
    assert "modules_to_save: 'q_proj' is not planned yet" in capsys.readouterr().err


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
    (["--gpu", "h300", "--gpu-mem", "94GB"], "unknown GPU"),
    (["--headroom", "1"], "headroom"),
    (["--headroom", "-0.1"], "headroom"),
    (["--batch-size", "0"], "batch-size"),
    (["--seq-len", "-1"], "seq-len"),
    # issue 10: one validation layer (lora_planner.cli_types) for every option's value
    (["--alpha", "inf"], "alpha: 'inf' is not a finite number"),
    (["--alpha", "nan"], "alpha: 'nan' is not a finite number"),
    (["--mfu", "1e400"], "mfu: '1e400' is not a finite number"),
    (["--train-tokens", "1e400"], "train-tokens: '1e400' is not a finite number"),
    (["--train-tokens", "inf"], "train-tokens"),
    (["--train-tokens", "0"], "train-tokens: must be in [1, 1e+15]"),
    (["--headroom", "nan"], "headroom"),
    (["--allocator-overhead", "-inf"], "allocator-overhead"),
    (["--batch-size", "99999999999999999999"], "batch-size: must be an integer in [1, 1,048,576], got 1e+20"),
    (["--seq-len", "99999999999999999999"], "seq-len"),
    (["--gpus", "99999999999999999999"], "gpus"),
    (["--r", "1.5"], "r: '1.5' is not an integer"),
    (["--gpu-mem", ""], "gpu-mem: empty value"),
    (["--gpu-mem", "1e30GiB"], "more than 1 PiB"),
    (["--model", ""], "model: empty value"),
    (["--model", "x" * 5000], "model: 5,000 characters"),
    (["--target", "q_proj\x00"], "target: contains a control character"),
    (["--calibration", " "], "calibration: empty value"),
    (["--method", "lora", "--layers-to-transform", "0-99999999999"], "layers-to-transform: layer 99,999,999,999"),
    (["--mod", "llama-7b"], "unrecognized arguments: --mod"),  # no abbreviations
    (["--gpu-me", "24GiB"], "unrecognized arguments: --gpu-me"),
    (["profile", "--thread", "1"], "unrecognized arguments: --thread"),
    (["profile", "--threads", "99999999999"], "threads: must be an integer in [1, 1,024]"),
    (["profile", "--steps", "0"], "steps"),
    (["sweep", "grid.toml", "--out", "x.jsonl", "--limit", "0"], "limit"),
    (["calibrate", "--runs", "r.jsonl", "--out", "c.json", "--holdout", "1"], "holdout: must be in [0, 1)"),
    (["calibrate", "--runs", "r.jsonl", "--out", "c.json", "--seed", "-1"], "seed"),
    (["recommend", "--model", "llama-7b", "--gpu-mem", "24GiB", "--trainable-fraction", "1"],
     "trainable-fraction: must be in (0, 1)"),
    (["recommend", "--model", "llama-7b", "--gpu-mem", "24GiB", "--global-batch", "0"], "global-batch"),
    (["recommend", "--model", "llama-7b", "--gpu-mem", "24GiB", "--mode", "cpu"],
     "unrecognized arguments: --mode"),  # was read as --model
    (["--device", "tpu"], "device"),
    (["--attention", "flash3"], "attention"),
    # issue 13: the loss
    (["--loss", "fused"], "loss: unknown loss 'fused'"),
    (["--loss", "hf:4"], "loss: unknown loss 'hf:4'"),
    (["--loss", "chunked:0"], "loss: chunk count must be a positive integer"),
    (["--loss", "chunked:x"], "loss: chunk count must be a positive integer"),
    (["--loss", "chunked:64", "--seq-len", "32"], "loss: 64 chunks of a 32-token sequence"),
    (["--model", "gemma-2-2b", "--loss", "chunked"], "loss: gemma-2-2b's head applies final_logit_softcapping"),
    (["--method", "lora", "--target", "q_proj,lm_head", "--loss", "chunked"], "loss: the chunked loss with LoRA on "
                                                                                "lm_head"),
    (["--method", "full", "--amp", "bf16", "--loss", "chunked"], "loss: full fine-tuning under autocast"),
    (["profile", "--backend", "builtin", "--method", "lora", "--loss", "chunked"],
     "loss: the chunked loss runs on the hf backend"),
    (["--method", "qlora", "--dtype", "fp32"], "QLoRA"),
    (["--no-such-flag"], "unrecognized arguments"),
    # MoE (issue 12)
    (["--model", "qwen3-30b-a3b", "--experts-implementation", "batched_mm"], "experts_implementation"),
    (["--model", "qwen3-30b-a3b", "--routing", "missing-routing.json"], "routing"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target-parameters", "mlp.experts.w9"],
     "target_parameters: no expert or router parameter named 'mlp.experts.w9'"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target-parameters", "q_proj.weight"],
     "target_parameters: 'q_proj.weight' matches model.layers.0.self_attn.q_proj.weight, a linear weight"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target", "gate_proj"],
     "without also targeting up_proj"),
    (["--model", "qwen3-30b-a3b", "--method", "lora", "--target", "gate_up_proj"], "--target-parameters"),
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


@pytest.mark.parametrize("extra", [["--json"], [], ["--detail"]])
def test_estimate_path_imports_only_the_stdlib(extra):
    """Cold start (issue 11): neither torch, pandas, matplotlib nor rich, and not the other subcommands'
    modules, on the estimate path, human output included (drawn by lora_planner.textable)."""
    heavy = ("torch", "pandas", "matplotlib", "rich", "tempfile", "difflib", "lora_planner.recommend",
             "lora_planner.sweep", "lora_planner.profiler", "lora_planner.report")
    code = (f"import sys; from lora_planner.cli import main; main(['--model', 'llama-7b', *{extra!r}]); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_one_subcommand_builds_only_its_own_parser():
    parser = build_parser("models")
    assert parser.parse_args(["models", "--json"]).json
    with pytest.raises(PlannerInputError, match="invalid choice"):
        parser.parse_args(["estimate"])  # not built: argparse refuses the choice
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMAND_ARGUMENTS)


# ---------------------------------------------------------------------------------------------- issue 9


ITEM9 = ["--model", "llama-3.1-8b", "--r", "1", "--seq-len", "4096", "--gpu", "rtx-4090"]


def test_estimate_and_recommend_share_their_defaults():
    """One set of defaults (lora_planner.defaults) for every subcommand."""
    parser = build_parser()
    estimate = parser.parse_args(["estimate"])
    recommend = parser.parse_args(["recommend", "--model", "gpt2", "--gpu", "t4"])
    assert estimate.r == DEFAULT_R and estimate.seq_len == recommend.seq_len == DEFAULT_SEQ_LEN
    for option in ("headroom", "alpha", "cuda_context", "allocator_overhead", "adapter_dtype", "optimizer",
                   "attention", "device", "target"):
        assert getattr(estimate, option) == getattr(recommend, option), option
    assert estimate.headroom == DEFAULT_HEADROOM


def test_recommend_default_rank_is_the_estimate_default(capsys):
    doc = run_json(capsys, "recommend", "--model", "gpt2", "--gpu", "h100-80gb", "--methods", "lora")
    plan = run_json(capsys, "--model", "gpt2", "--method", "lora")
    assert doc["r"] == plan["inputs"]["r"] == DEFAULT_R
    assert doc["inputs"]["seq_len"] == plan["inputs"]["seq_len"] == DEFAULT_SEQ_LEN


@pytest.mark.parametrize("headroom, verdict", [(None, False), ("0", True)])
def test_estimate_and_recommend_give_one_verdict_and_one_usable_figure(capsys, headroom, verdict):
    """llama-3.1-8b LoRA r=1, checkpointing, 4096 tokens on an rtx-4090 peaks at 23.49 of 23.99 GiB: with the
    default headroom neither subcommand calls it a fit; with --headroom 0 both do."""
    extra = ["--headroom", headroom] if headroom else []
    plan = run_json(capsys, *ITEM9, "--method", "lora", "--grad-checkpointing", *extra)
    rec = run_json(capsys, "recommend", *ITEM9, "--methods", "lora", "--global-batch", "1", *extra)
    assert plan["inputs"]["usable_bytes"] == rec["usable_bytes"]
    assert plan["methods"]["lora"]["peak_device_bytes"] == rec["predicted_peak_bytes"]
    assert plan["methods"]["lora"]["fits"] is rec["fits"] is verdict
    assert main([*ITEM9, "--method", "lora", "--grad-checkpointing", *extra]) == 0
    estimate_out = " ".join(capsys.readouterr().out.split())
    assert main(["recommend", *ITEM9, "--methods", "lora", "--global-batch", "1", *extra]) == 0
    recommend_out = " ".join(capsys.readouterr().out.split())
    usable = "usable = 23.99 GiB x (1 - 10 %) = 21.59 GiB" if headroom is None else \
        "usable = 23.99 GiB x (1 - 0 %) = 23.99 GiB"
    assert usable in estimate_out and usable in recommend_out


# ---------------------------------------------------------------------------------------------- issues 10, 11, 14


def test_gpu_mem_is_echoed_with_its_unit(capsys):
    assert main(["--model", "llama-7b", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "80 GB = 74.51 GiB" in flat and "usable = 74.51 GiB x (1 - 10 %) = 67.06 GiB" in flat
    assert "fits in usable 67.06 GiB" in flat
    # Every size printed between the settings and the table (whose title says GiB) carries its unit.
    budget_line = flat[flat.index("budget:"):flat.index("Peak memory")]
    sizes = re.findall(r"\d+\.\d\d(?!\d)(?: (\S+))?", budget_line)
    assert sizes and all(unit.rstrip(";,.)") == "GiB" for unit in sizes), budget_line
    assert main(["--model", "llama-7b", "--gpu-mem", "24GiB"]) == 0
    assert "budget: 24 GiB; usable" in " ".join(capsys.readouterr().out.split())
    doc = run_json(capsys, "--model", "llama-7b", "--gpu-mem", "80GB")
    assert doc["inputs"]["gpu_mem"] == "80GB" and doc["inputs"]["budget_bytes"] == 80 * 10**9


def test_gpu_and_gpu_mem_combine(capsys):
    """A 94 GB H100 NVL: the memory of --gpu-mem, the step time of --gpu."""
    doc = run_json(capsys, "--model", "llama-3-8b", "--gpu", "h100-80gb", "--gpu-mem", "94GB")
    assert doc["inputs"]["gpu"] == "h100-80gb" and doc["inputs"]["budget_bytes"] == 94 * 10**9
    assert all(m["throughput"]["gpu"] == "h100-80gb" for m in doc["methods"].values())
    assert main(["--model", "llama-3-8b", "--gpu", "h100-80gb", "--gpu-mem", "94GB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "h100-80gb with --gpu-mem 94 GB = 87.54 GiB (memory from --gpu-mem" in out
    assert "step time on h100-80gb" in out and "reference GPU" not in out
    rec = run_json(capsys, "recommend", "--model", "llama-3-8b", "--gpu", "h100-80gb", "--gpu-mem", "94GB")
    assert rec["budget_bytes"] == 94 * 10**9 and rec["inputs"]["gpu"] == "h100-80gb"
    assert rec["inputs"]["gpu_mem"] == "94GB"


def test_seq_len_beyond_max_position_embeddings_warns(capsys):
    doc = run_json(capsys, "--model", "llama-3-8b", "--method", "lora", "--seq-len", "200000")
    assert len(doc["warnings"]) == 1 and "max_position_embeddings 8192" in doc["warnings"][0]
    assert run_json(capsys, "--model", "llama-3-8b", "--method", "lora", "--seq-len", "8192")["warnings"] == []
    assert main(["--model", "llama-3-8b", "--method", "lora", "--seq-len", "200000"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: --seq-len 200000 is above llama-3-8b's max_position_embeddings 8192" in out
    rec = run_json(capsys, "recommend", "--model", "llama-3-8b", "--gpu", "h200", "--seq-len", "200000")
    assert any("max_position_embeddings 8192" in w for w in rec["warnings"])
    assert main(["recommend", "--model", "llama-3-8b", "--gpu", "h200", "--seq-len", "200000"]) == 0
    assert "warning: --seq-len 200000" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------ which layers LoRA adapts, kbit prep

def test_layer_specific_target_is_echoed_as_asked(capsys):
    doc = run_json(capsys, "--model", "llama-2-7b", "--method", "lora", "--target", "layers.3.self_attn.q_proj",
                   "--json")
    assert doc["inputs"]["target_modules"] == ["layers.3.self_attn.q_proj"]
    assert doc["inputs"]["adapted_modules"] == ["self_attn.q_proj (layer 3)"]
    assert doc["methods"]["lora"]["trainable_params"] == 8 * (4096 + 4096)


def test_layers_to_transform_option(capsys):
    doc = run_json(capsys, "--model", "llama-2-7b", "--method", "lora", "--layers-to-transform", "0-3,31", "--json")
    assert doc["inputs"]["layers_to_transform"] == [0, 1, 2, 3, 31]
    assert doc["inputs"]["adapted_modules"] == ["self_attn.q_proj (layers 0-3, 31)", "self_attn.v_proj (layers 0-3, 31)"]
    assert doc["methods"]["lora"]["trainable_params"] == 5 * 2 * 8 * (4096 + 4096)
    assert main(["--model", "llama-2-7b", "--layers-to-transform", "x"]) == 2
    assert "layers-to-transform: cannot read 'x'" in capsys.readouterr().err


def test_qlora_kbit_prep_is_on_by_default_and_can_be_turned_off(capsys):
    on = run_json(capsys, "--model", "llama-3.1-8b", "--method", "qlora", "--json")
    off = run_json(capsys, "--model", "llama-3.1-8b", "--method", "qlora", "--no-kbit-prep", "--json")
    assert (on["inputs"]["kbit_prep"], off["inputs"]["kbit_prep"]) == (True, False)
    extra = on["methods"]["qlora"]["peak_allocated_bytes"] - off["methods"]["qlora"]["peak_allocated_bytes"]
    assert extra > 2 * (2 * 128256 * 4096)  # embed + lm_head from 2 to 4 bytes, plus the fp32 stream
    assert main(["--model", "llama-3.1-8b", "--method", "qlora"]) == 0
    assert "prepare_model_for_kbit_training" in capsys.readouterr().out


def test_profile_refuses_a_plan_the_planner_refuses_before_building_or_creating_anything(tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(["profile", "--model", "gpt2", "--seq-len", "2048", "--mode", "fake", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-plan: error: seq_len: 2,048 tokens") and len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- MoE (issue 12)


def test_moe_plan_shows_total_and_active_params_and_what_it_assumed(capsys):
    assert main(["--model", "qwen3-30b-a3b", "--r", "16"]) == 0
    out = capsys.readouterr().out
    for needle in ("30.53 B parameters, all", "3.35 B", "active per token", "experts_implementation grouped_mm",
                   "PEFT has no default LoRA targets for qwen3_moe", "fused expert tensors stay in"):
        assert needle in out.replace("\n", " "), needle
    data = run_json(capsys, "--model", "qwen3-30b-a3b", "--r", "16")
    assert (data["model"]["total_params"], data["model"]["active_params"]) == (30_532_122_624, 3_353_032_704)
    assert (data["model"]["num_experts"], data["model"]["num_experts_per_tok"]) == (128, 8)
    assert data["inputs"]["experts_implementation"] == "grouped_mm" and data["inputs"]["routing"] == "balanced"
    dense = run_json(capsys, "--model", "llama-7b")
    assert dense["model"]["active_params"] == dense["model"]["total_params"] and dense["inputs"]["routing"] is None


def test_moe_all_linear_adapts_the_experts_through_target_parameters(capsys):
    data = run_json(capsys, "--model", "mixtral-8x7b", "--method", "lora", "--target", "all-linear", "--r", "8")
    adapted = data["inputs"]["adapted_modules"]
    assert "mlp.experts.gate_up_proj [rank x2] (all 32 layers)" in adapted
    assert "mlp.gate.weight (all 32 layers)" in adapted
    # 32 layers x (attention r (in + out) + experts 8 x (2r (4096 + 28672) + r (14336 + 4096)) + router r (4096 + 8))
    attention = 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    experts = 8 * (16 * (4096 + 28672) + 8 * (14336 + 4096))
    assert data["methods"]["lora"]["trainable_params"] == 32 * (attention + experts + 8 * (4096 + 8))
    assert any("folds W + BA" in w for w in data["warnings"])


def test_moe_routing_moves_only_the_eager_loop(tmp_path, capsys):
    base = ["--model", "olmoe-1b-7b", "--method", "lora", "--batch-size", "4", "--seq-len", "2048"]
    grouped = {r: run_json(capsys, *base, "--routing", r)["methods"]["lora"]["peak_allocated_bytes"]
               for r in ("balanced", "worst")}
    assert grouped["balanced"] == grouped["worst"]
    eager = {r: run_json(capsys, *base, "--experts-implementation", "eager", "--routing", r)
             ["methods"]["lora"]["peak_allocated_bytes"] for r in ("balanced", "worst")}
    assert eager["balanced"] <= eager["worst"]
    notes = run_json(capsys, *base, "--experts-implementation", "eager")["warnings"]
    assert any(n.startswith("worst-case routing") for n in notes)  # the bound beside the balanced estimate
    assert not any(n.startswith("worst-case routing") for n in run_json(capsys, *base)["warnings"])
    counts = tmp_path / "routing.json"
    counts.write_text(json.dumps({"router_counts": [[8192 // 64 * 8] * 64] * 16}))  # balanced, written out
    measured = run_json(capsys, *base, "--experts-implementation", "eager", "--routing", str(counts))
    assert measured["methods"]["lora"]["peak_allocated_bytes"] == eager["balanced"]
    counts.write_text(json.dumps([[1] * 64] * 3))
    assert main([*base, "--experts-implementation", "eager", "--routing", str(counts)]) == 2
    assert "16 MoE layers of 64 experts" in capsys.readouterr().err


def test_recommend_runs_for_gpt_oss(capsys):
    assert main(["recommend", "--model", "gpt-oss-20b", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "LoRA" in out and "MXFP4" in out and "Full fine-tuning does not fit" in out


def test_bias_flag(capsys):
    """--bias lora_only|all (PEFT's bias): echoed in --json and the assumptions line; Qwen2.5-7B's q / k / v biases
    become trainable (lora_only: q and v, the default targets; all: k too); a misspelling: exit 2 naming the choices."""
    base = ["--model", "qwen2.5-7b", "--method", "lora"]
    counts = {}
    for bias in ("none", "lora_only", "all"):
        doc = run_json(capsys, *base, "--bias", bias)
        assert doc["inputs"]["bias"] == bias
        counts[bias] = doc["methods"]["lora"]["trainable_params"]
    assert counts["lora_only"] - counts["none"] == 28 * (3584 + 512)
    assert counts["all"] - counts["none"] == 28 * (3584 + 512 + 512)
    assert main([*base, "--bias", "all"]) == 0
    assert "every bias trained" in " ".join(capsys.readouterr().out.split())
    assert main([*base, "--bias", "some"]) == 2
    assert "bias: invalid choice: 'some' (choose from 'none', 'lora_only', 'all')" in capsys.readouterr().err


def test_trainable_token_indices_flag(capsys):
    """--trainable-token-indices (PEFT's trainable_token_indices): 256 new tokens on Llama-3.1-8B LoRA at 4,096 tokens
    with checkpointing cost 0.02 GiB (21.93 -> 21.95) where modules_to_save embed_tokens,lm_head costs 5.90 (27.83);
    training the same rows of lm_head too (the dict form) keeps its merged V x h matrix and input: 22.98; ranges and
    lists are read, counts echoed; a range past any vocabulary: one line, exit 2."""
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "4096", "--grad-checkpointing"]
    gib = {}
    for label, extra in [("none", []), ("list", ["--trainable-token-indices", "128000-128255"]),
                         ("dict", ["--trainable-token-indices", "embed_tokens:128000-128255;lm_head:128000-128127,"
                                                                "128128-128255"])]:
        doc = run_json(capsys, *base, *extra)
        gib[label] = round(doc["methods"]["lora"]["peak_allocated_bytes"] / 2**30, 2)
        echoed = doc["inputs"]["trainable_token_indices"]
    assert gib == {"none": 21.93, "list": 21.95, "dict": 22.98}
    assert echoed == {"embed_tokens": 256, "lm_head": 256}
    assert main([*base, "--trainable-token-indices", "5,9,12-13"]) == 0
    assert "trainable tokens 4 on the input embeddings" in " ".join(capsys.readouterr().out.split())
    assert main([*base, "--trainable-token-indices", "0-99999999999"]) == 2
    assert "is past any vocabulary" in capsys.readouterr().err
    assert main([*base, "--trainable-token-indices", "embed_tokens:"]) == 2
    assert "trainable-token-indices: cannot read" in capsys.readouterr().err


def test_lengths_flag(tmp_path, capsys):
    """--lengths FILE plans the worst batch the collator can build: Llama-3.1-8B LoRA, batch 4, checkpointing, lengths
    100 / 3,000 / 5,000 truncated at --max-seq-len 4,096: 4 x 4,096 tokens padded (the attention mask: 42.79 GiB,
    the same as --seq-len 4096 --padding); packed: the 7,196 tokens in one row; echoed in --json; a --seq-len
    beside it, or an unreadable file: one line, exit 2."""
    path = tmp_path / "lengths.json"
    path.write_text("[100, 3000, 5000]")
    base = ["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "4", "--grad-checkpointing"]
    doc = run_json(capsys, *base, "--lengths", str(path), "--max-seq-len", "4096")
    same = run_json(capsys, *base, "--seq-len", "4096", "--padding")
    assert doc["methods"]["lora"]["peak_allocated_bytes"] == same["methods"]["lora"]["peak_allocated_bytes"]
    assert round(doc["methods"]["lora"]["peak_allocated_bytes"] / 2**30, 2) == 42.79
    assert doc["inputs"]["lengths"]["worst_batch"].startswith("padded: the longest example (4,096 tokens)")
    assert doc["inputs"]["lengths"]["truncated_examples"] == 1
    packed = run_json(capsys, *base, "--lengths", str(path), "--max-seq-len", "4096", "--packing")
    # 7,196 tokens in all (5,000 truncated): two bins, fewer than the micro-batch's four
    assert packed["inputs"]["lengths"]["worst_batch"].startswith("packed: 2 bin(s) of up to 4,096 tokens")
    assert main([*base, "--lengths", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "worst batch from" in out and "not truncated" in out
    rec = run_json(capsys, "recommend", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--lengths", str(path),
                   "--max-seq-len", "4096")
    assert rec["lengths"]["longest_tokens"] == 5000 and "padded" in rec["lengths"]["worst_batch"]
    assert main([*base, "--lengths", str(path), "--seq-len", "512"]) == 2
    assert "seq-len: --lengths sets the sequence length" in capsys.readouterr().err
    path.write_text("[1, 2")
    assert main([*base, "--lengths", str(path)]) == 2
    assert "lengths:" in capsys.readouterr().err


def test_no_double_quant_flag(capsys):
    """--no-double-quant (bnb_4bit_use_double_quant=False): Llama-2-7B QLoRA at 512 tokens holds 301,751,424 bytes more
    (the fp32 absmax of every 64 weights), echoed; --quant-type fp4 changes no byte and is echoed."""
    base = ["--model", "llama-2-7b", "--method", "qlora", "--seq-len", "512"]
    dq, plain = run_json(capsys, *base), run_json(capsys, *base, "--no-double-quant", "--quant-type", "fp4")
    assert plain["methods"]["qlora"]["peak_allocated_bytes"] - dq["methods"]["qlora"]["peak_allocated_bytes"] \
        == 301_751_424
    assert (plain["inputs"]["double_quant"], plain["inputs"]["quant_type"]) == (False, "fp4")
    assert main([*base, "--no-double-quant"]) == 0
    assert "NF4 without double quantization" in " ".join(capsys.readouterr().out.split())


def test_quant_int8_plans_lora_on_an_8bit_base(capsys):
    """`--quant int8` (and transformers' spelling `--load-in-8bit`): LoRA only with the default methods, kbit
    preparation on, the inputs echoed; full fine-tuning or QLoRA with it, a 4-bit name, an unknown one: one line."""
    plan = run_json(capsys, "--model", "llama-3.1-8b", "--quant", "int8", "--grad-checkpointing", "--json")
    assert list(plan["methods"]) == ["lora"]
    assert (plan["inputs"]["load_in_8bit"], plan["inputs"]["kbit_prep"]) == (True, True)
    assert any(w.startswith("quant: an 8-bit base") and "non-reentrant" in w for w in plan["warnings"])
    alias = run_json(capsys, "--model", "llama-3.1-8b", "--load-in-8bit", "--grad-checkpointing", "--json")
    assert alias["methods"] == plan["methods"]
    lora = run_json(capsys, "--model", "llama-3.1-8b", "--method", "lora", "--json")["methods"]["lora"]
    assert plan["methods"]["lora"]["weights_at_dtype_bytes"] < lora["weights_at_dtype_bytes"]
    assert main(["--model", "llama-3.1-8b", "--quant", "int8"]) == 0
    assert "LoRA (8-bit base)" in capsys.readouterr().out
    # reentrant checkpointing runs the layers' forward without a graph: no 8-bit input is held (26.00 GiB here)
    reentrant = run_json(capsys, "--model", "llama-3.1-8b", "--quant", "int8", "--use-reentrant", "--json")
    assert (reentrant["inputs"]["use_reentrant"], reentrant["inputs"]["grad_checkpointing"]) == (True, True)
    held = plan["methods"]["lora"]["peak_allocated_bytes"] - reentrant["methods"]["lora"]["peak_allocated_bytes"]
    assert held == 32 * 1024 * (3 * 4096 + 14336) * 4  # 32 layers x 1,024 tokens x (3 H + I), fp32
    for argv, needle in ((["--method", "full", "--quant", "int8"], "carries LoRA adapters"),
                         (["--method", "qlora", "--load-in-8bit"], "QLoRA is the 4-bit base"),
                         (["--quant", "nf4"], "--method qlora"),
                         (["--quant", "int4"], "unknown quantization"),
                         (["--quant", "int8", "--dtype", "fp32", "--amp", "bf16"], "autocast")):
        assert main(["--model", "llama-3.1-8b", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err

"""`lora-plan profile` through `main([...])`: records on disk, resume, failures that do not stop a run,
Ctrl-C, JSON output, and one-line errors."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from lora_planner.cli import main
from lora_planner.profiler import runner
from lora_planner.profiler.records import read_records

TINY = {"model_type": "llama", "vocab_size": 500, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def profile_args(config, out, *extra):
    return ["profile", "--model", config, "--mode", "cpu", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--out", str(out), *extra]


def test_profile_writes_one_record_per_method_and_a_table(tiny_config, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(profile_args(tiny_config, out)) == 0
    records, bad = read_records(out)
    assert [r["settings"]["method"] for r in records] == ["full", "lora"] and bad == []
    assert all(r["status"] == "ok" and r["device"] == "cpu" for r in records)
    text = capsys.readouterr().out
    assert "predicted vs measured" in text and "full" in text and "lora" in text


def test_resume_skips_finished_runs(tiny_config, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(profile_args(tiny_config, out, "--method", "lora")) == 0
    assert main(profile_args(tiny_config, out, "--resume")) == 0
    records, _ = read_records(out)
    assert [r["settings"]["method"] for r in records] == ["lora", "full"]
    assert "1 run(s) already in" in capsys.readouterr().out


def test_json_output(tiny_config, tmp_path, capsys):
    assert main(profile_args(tiny_config, tmp_path / "r.jsonl", "--method", "full", "--json")) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1 and records[0]["measured"]["peak_bytes"] > 0


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_progress_is_one_stderr_line_per_step_and_stdout_stays_clean(tiny_config, tmp_path, capsys, extra):
    """Issue 9 item 15: progress per step while a run goes, on stderr (not a terminal here: plain lines)."""
    assert main(profile_args(tiny_config, tmp_path / "r.jsonl", *extra)) == 0
    captured = capsys.readouterr()
    lines = [re.sub(r" \(\d+\.\d s\)$", "", line) for line in captured.err.splitlines()]
    assert lines == [f"run {i}/2 {method} hf/cpu b=2 s=16: {what}" for i, method in ((1, "full"), (2, "lora"))
                     for what in ("building the model", "measured step 1/2", "measured step 2/2", "timed step 1/2",
                                  "timed step 2/2", "done, ok")]
    assert all(re.search(r" \(\d+\.\d s\)$", line) for line in captured.err.splitlines())
    assert "run 1/2" not in captured.out
    if extra:
        assert len(json.loads(captured.out)) == 2


def test_an_oom_is_recorded_and_the_next_run_goes_on(tiny_config, tmp_path, monkeypatch):
    real = runner.MEASURE["cpu"]

    def first_runs_out_of_memory(request):
        if request.training.method == "full":
            raise torch.OutOfMemoryError("out of memory")
        return real(request)

    monkeypatch.setitem(runner.MEASURE, "cpu", first_runs_out_of_memory)
    out = tmp_path / "runs.jsonl"
    assert main(profile_args(tiny_config, out)) == 0
    records, _ = read_records(out)
    assert [(r["settings"]["method"], r["status"]) for r in records] == [("full", "oom"), ("lora", "ok")]


def test_ctrl_c_keeps_finished_records(tiny_config, tmp_path, monkeypatch, capsys):
    real = runner.MEASURE["cpu"]

    def interrupted_on_second(request):
        if request.training.method == "lora":
            raise KeyboardInterrupt
        return real(request)

    monkeypatch.setitem(runner.MEASURE, "cpu", interrupted_on_second)
    out = tmp_path / "runs.jsonl"
    assert main(profile_args(tiny_config, out)) == 130
    records, _ = read_records(out)
    assert [r["settings"]["method"] for r in records] == ["full"]
    assert "1 finished record(s)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--backend", "jax"], "backend"),
    (["--mode", "tpu"], "mode"),
    (["--steps", "0"], "steps"),
    (["--method", "qlora", "--mode", "fake"], "QLoRA cannot be replayed under fake tensors"),
    (["--method", "qlora", "--backend", "builtin"], "the builtin backend has no bitsandbytes base"),
    (["--optimizer", "adamw8bit"], "bitsandbytes"),
])
def test_bad_input_is_one_line_exit_2(tiny_config, tmp_path, capsys, extra, message):
    assert main(profile_args(tiny_config, tmp_path / "r.jsonl", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_builtin_backend_rejects_families_it_does_not_implement(tmp_path, capsys):
    assert main(["profile", "--model", "gpt2", "--backend", "builtin", "--mode", "fake",
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "hf backend" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_mode_without_a_gpu_says_what_to_do(tiny_config, tmp_path, capsys):
    assert main(["profile", "--model", tiny_config, "--mode", "cuda", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "--mode fake" in capsys.readouterr().err


def test_hf_backend_without_transformers_names_the_fix(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert main(profile_args(tiny_config, tmp_path / "r.jsonl")) == 2
    err = capsys.readouterr().err
    assert "transformers and peft" in err and "--backend builtin" in err


def test_several_gpus_are_profiled_as_cpu_ranks_and_compared_per_rank(tiny_config, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(["profile", "--model", tiny_config, "--backend", "builtin", "--dtype", "fp32", "--gpus", "2",
                 "--strategy", "fsdp", "--batch-size", "2", "--seq-len", "16", "--out", str(out)]) == 0
    records, _ = read_records(out)
    assert [(r["settings"]["gpus"], r["settings"]["strategy"], r["mode"]) for r in records] == [(2, "fsdp", "cpu")] * 2
    assert all(abs(r["relative_error"]) <= 0.05 for r in records)
    assert "fsdpx2" in capsys.readouterr().out


def test_bad_settings_of_a_later_run_stop_the_session_before_its_first_run(tiny_config, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(profile_args(tiny_config, out, "--method", "full,qlora", "--mode", "fake")) == 2
    assert not out.exists()  # full was not run first
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: mode:") and "QLoRA" in err and err.count("\n") == 1


def test_threads_option_sets_torch_threads_and_rejects_bad_values(tmp_path, capsys):
    from lora_planner.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["profile", "--model", "gpt2", "--threads", "0", "--out", str(tmp_path / "r.jsonl")]) == 2
        err = capsys.readouterr().err
        assert "threads: must be" in err and "--threads 1" in err  # the option layer's wording
        config = tmp_path / "config.json"
        config.write_text('{"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, '
                          '"num_hidden_layers": 1, "num_attention_heads": 2}')
        assert main(["profile", "--model", str(config), "--method", "lora", "--mode", "fake", "--steps", "1",
                     "--seq-len", "8", "--threads", "1", "--out", str(tmp_path / "r.jsonl")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- issue 10


def quick_measure(calls):
    def measure(request):
        calls.append(request.key)
        return runner.Measurement(peak_bytes=1000, peak_phase="backward", breakdown_bytes={"weights": 1000},
                                  step1_peak_bytes=1000, steady_peak_bytes=900, step_times_s=(0.1, 0.2))

    return measure


def quick_args(config, out, *extra):
    return ["profile", "--model", config, "--backend", "builtin", "--mode", "cpu", "--steps", "2", "--batch-size",
            "1", "--seq-len", "8", "--out", str(out), *extra]


@pytest.mark.parametrize("make_out, needle", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "runs.jsonl", "lies under"),
    (lambda tmp: Path(os.devnull), "is a device, not a file"),
    (lambda tmp: tmp / ("x" * 300) / "runs.jsonl", "too long"),
])
def test_a_bad_out_is_refused_before_any_measurement(tiny_config, tmp_path, monkeypatch, capsys, make_out, needle):
    """Issue 10 class 1: --out is checked before the first step, so a measurement is never thrown away."""
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", quick_measure(calls))
    out = make_out(tmp_path)
    assert main(quick_args(tiny_config, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: out:") and needle in err and err.count("\n") == 1
    assert calls == []


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """The output file's writes fail with ENOSPC; the fallback goes to tmp_path/fallback."""
    from lora_planner.profiler import records

    out = tmp_path / "runs.jsonl"
    fallback_dir = tmp_path / "fallback"
    fallback_dir.mkdir()
    monkeypatch.setattr(records, "fallback_path", lambda name: fallback_dir / name)
    real = records._write

    def write(fd, data):
        if out.exists() and os.path.samestat(os.fstat(fd), os.stat(out)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(records, "_write", write)
    return out, fallback_dir


def test_a_full_disk_keeps_every_record_and_exits_1(tiny_config, monkeypatch, capsys, full_disk):
    out, fallback_dir = full_disk
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", quick_measure(calls))
    assert main(quick_args(tiny_config, out)) == 1
    assert len(calls) == 2  # the second run went on after the first could not be appended
    err = capsys.readouterr().err
    kept = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [r["settings"]["method"] for r in kept] == ["full", "lora"]
    [fallback] = fallback_dir.iterdir()
    assert [r["key"] for r in read_records(fallback)[0]] == [r["key"] for r in kept]
    assert f"cannot append to {out} (No space left on device)" in err
    assert f"2 record(s) could not be appended to {out}; they are in {fallback}" in err
    assert out.read_bytes() == b""


def test_resume_does_not_depend_on_how_the_config_path_is_spelled(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", quick_measure(calls))
    assert main(quick_args("./config.json", "runs.jsonl")) == 0
    assert main(quick_args(".//config.json", "runs.jsonl", "--resume")) == 0
    (tmp_path / "sub").mkdir()
    assert main(quick_args("sub/../config.json", "runs.jsonl", "--resume")) == 0
    assert len(calls) == 2
    records, _ = read_records("runs.jsonl")
    assert {r["model"] for r in records} == {"config.json"}
    assert capsys.readouterr().out.count("2 run(s) already in") == 2


@pytest.mark.parametrize("spellings, label", [
    (("meta-llama/Llama-2-7b-hf", "llama-2-7b", "LLAMA-2-7B", " llama-2-7b"), "llama-2-7b"),
    (("cfg/x.json", "./cfg/x.json", "cfg//x.json", "cfg/../cfg/x.json", "cfg/./x.json"), "cfg/x.json"),
])
def test_one_model_spelled_several_ways_has_one_key(spellings, label):
    """Issue 10 class 4: the resume key and the record's model are the normalised label."""
    from dataclasses import replace

    from lora_planner.catalog import resolve_model
    from lora_planner.profiler.session import build_requests
    from lora_planner.specs import TrainingSpec

    keys, labels = set(), set()
    for model in spellings:
        # a config path resolves to a spec named after the path (config_reader.load_config_json)
        spec = resolve_model(model) if label == "llama-2-7b" else replace(resolve_model("llama-2-7b"), name=model)
        [request] = build_requests(model, spec, [TrainingSpec(method="lora")], "hf", "fake", 2)
        keys.add(request.key)
        labels.add(request.model)
    assert len(keys) == 1 and labels == {label}


def test_resume_runs_again_a_run_whose_line_was_cut_short(tiny_config, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", quick_measure(calls))
    out = tmp_path / "runs.jsonl"
    assert main(quick_args(tiny_config, out)) == 0
    text = out.read_bytes()
    out.write_bytes(text[:-len(text.splitlines()[-1]) // 2 - 1])  # the lora record cut in half, no newline
    assert main(quick_args(tiny_config, out, "--resume")) == 0
    assert len(calls) == 3 and "|lora|" in calls[-1]
    records, bad = read_records(out)
    assert [r["settings"]["method"] for r in records] == ["full", "lora"]
    assert len(bad) == 1 and bad[0].line_number == 2


def test_resume_over_mistyped_records_does_not_crash(tiny_config, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", quick_measure(calls))
    out = tmp_path / "runs.jsonl"
    out.write_text('{"key": ["a", "list"], "schema_version": 1, "status": "ok"}\n{"key": {"a": 1}}\n'
                   + "[" * 50_000 + "\n" + '{"key": "x", "v": NaN}\n')
    assert main(quick_args(tiny_config, out, "--resume")) == 0
    assert len(calls) == 2


def test_a_record_with_a_non_finite_measurement_is_an_error_record(tiny_config, tmp_path, monkeypatch):
    def measure(request):
        return runner.Measurement(peak_bytes=float("nan"), peak_phase="backward", breakdown_bytes=None,
                                  step1_peak_bytes=1, steady_peak_bytes=None)

    monkeypatch.setitem(runner.MEASURE, "cpu", measure)
    out = tmp_path / "runs.jsonl"
    assert main(quick_args(tiny_config, out, "--method", "full")) == 1
    assert b"NaN" not in out.read_bytes()
    [record], bad = read_records(out)
    assert bad == [] and record["status"] == "error" and "measured.peak_bytes is nan" in record["error"]

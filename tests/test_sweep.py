"""Sweep grids: parsing and expansion (exact counts), bad grids (one-line errors), resume, failures that
do not stop a sweep, Ctrl-C, and `lora-plan sweep` through `main([...])`."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.profiler.records import read_records
from lora_planner.specs import FAMILIES
from lora_planner.sweep import BUILTIN_FAMILIES, load_grid, parse_grid, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ('{ model_type = "llama", vocab_size = 256, hidden_size = 32, intermediate_size = 64, '
              'num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }')
TINY_GPT2 = '{ model_type = "gpt2", vocab_size = 256, n_embd = 32, n_layer = 2, n_head = 4, n_positions = 64 }'

GRID = f"""
name = "t"
[models.tl]
config = {TINY_LLAMA}
[models.tg]
config = {TINY_GPT2}
[axes]
mode = "cpu"
steps = 2
seq_len = 16
[[grid]]
method = ["full", "lora"]
r = [4, 8]
backend = ["hf", "builtin"]
batch_size = [1, 2]
"""


def small_grid(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "g.toml"
    path.write_text(text or f"""
[models.tl]
config = {TINY_LLAMA}
[axes]
mode = "cpu"
steps = 2
batch_size = 2
seq_len = 8
[[grid]]
method = ["full", "lora"]
r = [2, 4]
""")
    return path


def test_expansion_counts_collapse_full_and_skip_builtin_families():
    grid = parse_grid(GRID)
    # per model and backend: full x 2 batches + lora x 2 ranks x 2 batches = 6; gpt2 has no builtin backend
    assert len(grid.runs) == 6 * 3
    assert len(grid.skipped) == 6
    assert all("builtin" in label and "tg" in label for label, _ in grid.skipped)
    assert {r.backend for r in grid.runs if r.model == "tg"} == {"hf"}
    full = [r for r in grid.runs if r.training.method == "full"]
    assert len(full) == 3 * 2 and all(r.training.lora.r == 8 for r in full)
    assert len({r.to_request().key for r in grid.runs}) == len(grid.runs)
    assert grid.runs[0].source["model_source"]["config"]["model_type"] == "llama"


def test_blocks_axes_defaults_and_dedup():
    text = f"""
[models.tl]
config = {TINY_LLAMA}
[axes]
seq_len = [16, 32]
precision = ["fp32", "amp-bf16"]
[[grid]]
method = "lora"
target = ["default", "all-linear", "q_proj,k_proj", ["q_proj", "v_proj"]]
[[grid]]
method = ["full", "lora"]
grad_checkpointing = [false, true]
"""
    grid = parse_grid(text)
    # block 0: 4 targets x 2 seq x 2 precisions = 16; block 1: full 8 + lora 8, of which lora with
    # default targets and no checkpointing (4) duplicate block 0 -> 12 new; "q_proj,v_proj" is the default set
    # written out: a different key, kept
    assert len(grid.runs) == 16 + 12
    amp = [r for r in grid.runs if r.source["precision"] == "amp-bf16"]
    assert all(r.training.dtype == "fp32" and r.training.amp == "bf16" for r in amp)
    assert {r.source["target"] for r in grid.runs} == {"default", "all-linear", "q_proj,k_proj", "q_proj,v_proj"}


def test_shipped_grids_parse_with_known_counts():
    counts = {name: len(load_grid(ROOT / "experiments" / "grids" / f"{name}.toml").runs)
              for name in ("cpu_validation", "fake_architectures", "gpu", "moe_small_vocab", "dense_small_vocab")}
    assert counts == {"cpu_validation": 388, "fake_architectures": 120, "gpu": 33, "moe_small_vocab": 84,
                      "dense_small_vocab": 32}
    cpu = load_grid(ROOT / "experiments" / "grids" / "cpu_validation.toml")
    assert {r.spec.family for r in cpu.runs} == set(FAMILIES)  # every family the planner knows
    assert {r.backend for r in cpu.runs} == {"hf", "builtin"} and {r.mode for r in cpu.runs} == {"cpu"}


def test_builtin_families_match_the_backend():
    from lora_planner.profiler.builtin_model import BUILTIN_FAMILIES as ACTUAL

    assert BUILTIN_FAMILIES == ACTUAL


@pytest.mark.parametrize("text, needle", [
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nmethod = ['sft']", "unknown value 'sft'"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nbatch = [1]", "unknown key 'batch'"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nmodels = ['b']", "unknown model label 'b'"),
    ("[models.a]\ncatalog = 'gpt3'\n", "unknown model 'gpt3'"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\ntarget = ['q_proj']", "no module named 'q_proj'"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nr = [0]", "positive integers"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nmode = ['auto']", "auto is not allowed"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nseq_len = []", "empty list"),
    ("[models.a]\nconfig = { model_type = 'llama' }", "hidden_size"),
    ("models = 3", "no [models] table"),
    ("[models.a\n", "not valid TOML"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nloss = ['fused']", "unknown loss 'fused'"),
    ("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nloss = ['chunked:0']", "chunk count must be a positive integer"),
])
def test_bad_grids_are_one_line_errors(text, needle):
    with pytest.raises(PlannerInputError) as info:
        parse_grid(text, name="bad")
    message = str(info.value)
    assert needle in message and "\n" not in message and message.startswith("grid bad")


def test_sweep_resume_and_limit(tmp_path):
    grid = load_grid(small_grid(tmp_path))
    out = tmp_path / "runs.jsonl"
    assert len(grid.runs) == 3
    first = run_sweep(grid, out, limit=1)
    assert len(first.finished) == 1 and first.not_started == 2
    with pytest.raises(PlannerInputError, match="--resume"):
        run_sweep(grid, out)
    second = run_sweep(grid, out, resume=True)
    assert second.already_done == 1 and len(second.finished) == 2
    records, bad = read_records(out)
    assert bad == [] and len(records) == 3 and len({r["key"] for r in records}) == 3
    assert all(r["status"] == "ok" and r["sweep"]["grid"] == "g" for r in records)
    phases = records[0]["measured"]["phases"]
    assert set(phases) == {"forward", "backward", "optimizer_step", "zero_grad"}
    assert max(p["peak_bytes"] for p in phases.values()) <= records[0]["measured"]["peak_bytes"]
    third = run_sweep(grid, out, resume=True)
    assert third.already_done == 3 and third.finished == []


def test_oom_and_errors_are_recorded_and_the_sweep_goes_on(tmp_path):
    from lora_planner.profiler.runner import Measurement

    grid = load_grid(small_grid(tmp_path))
    calls = []

    def measure(request):
        calls.append(request.key)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 2:
            raise ValueError("kernel exploded")
        return Measurement(peak_bytes=1000, peak_phase="backward", breakdown_bytes=None, step1_peak_bytes=900,
                           steady_peak_bytes=1000, step_times_s=(0.1, 0.2))

    out = tmp_path / "runs.jsonl"
    result = run_sweep(grid, out, measure=measure)
    assert [r["status"] for r in result.finished] == ["oom", "error", "ok"]
    records, _ = read_records(out)
    assert [r["status"] for r in records] == ["oom", "error", "ok"]
    assert "kernel exploded" in records[1]["error"]


def test_ctrl_c_keeps_finished_records(tmp_path):
    from lora_planner.profiler.runner import Measurement

    grid = load_grid(small_grid(tmp_path))
    calls = []

    def measure(request):
        calls.append(request)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return Measurement(peak_bytes=1000, peak_phase="backward", breakdown_bytes=None, step1_peak_bytes=900,
                           steady_peak_bytes=1000)

    out = tmp_path / "runs.jsonl"
    result = run_sweep(grid, out, measure=measure)
    assert result.interrupted and len(result.finished) == 1 and result.not_started == 2
    records, _ = read_records(out)
    assert len(records) == 1


def test_cli_sweep_dry_run_real_run_and_bad_input(tmp_path, capsys):
    path = small_grid(tmp_path)
    out = tmp_path / "runs.jsonl"
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 run(s)" in text and not out.exists()
    assert main(["sweep", str(path), "--out", str(out), "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "2 run(s) recorded" in text and "1 run(s) not started" in text
    assert main(["sweep", str(path), "--out", str(out), "--resume"]) == 0
    assert "2 run(s) already in" in capsys.readouterr().out
    assert len(read_records(out)[0]) == 3
    for argv, needle in ((["sweep", str(tmp_path / "nope.toml"), "--out", str(out)], "cannot read"),
                         (["sweep", str(path), "--out", str(out)], "--resume"),
                         (["sweep", str(path), "--out", str(out), "--resume", "--limit", "0"], "limit"),
                         (["sweep"], "arguments")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lora-plan: error:") and needle in err and err.count("\n") == 1


def test_parsing_a_grid_imports_no_torch():
    code = ("import sys; from lora_planner.sweep import load_grid; "
            "g = load_grid('experiments/grids/fake_architectures.toml'); "
            "print(len(g.runs), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["120", "False"]


def test_records_carry_json_serialisable_sweep_sources(tmp_path):
    grid = parse_grid(GRID)
    json.dumps([r.source for r in grid.runs])  # stored in every record


def test_the_sweep_progress_names_the_step_of_the_run_in_progress(tmp_path, monkeypatch):
    """Issue 9 item 15: the sweep's progress line says which step of the current run is going."""
    import io

    import rich.progress
    from rich.console import Console

    descriptions = []
    update = rich.progress.Progress.update

    def recording_update(self, task_id, **fields):
        if "description" in fields:
            descriptions.append(fields["description"])
        return update(self, task_id, **fields)

    monkeypatch.setattr(rich.progress.Progress, "update", recording_update)
    grid = load_grid(small_grid(tmp_path))
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    run_sweep(grid, tmp_path / "runs.jsonl", limit=1, console=console)
    label = f"{grid.name}: {grid.runs[0].label}"
    assert descriptions == [label] + [f"{label}: {step}" for step in (
        "building the model", "measured step 0/2", "measured step 1/2", "measured step 2/2", "timed step 1/2",
        "timed step 2/2")]


def test_qlora_runs_on_real_nf4_weights_only():
    """QLoRA is profiled on bitsandbytes' real 4-bit weights: cpu or cuda mode with the hf backend; the
    grid skips (and says why) its fake-mode and builtin runs."""
    grid = parse_grid("[models.a]\ncatalog = 'gpt2'\n[[grid]]\nmethod = ['qlora']\nmode = ['cpu', 'fake']\n"
                      "backend = ['hf', 'builtin']")
    assert [(r.backend, r.mode) for r in grid.runs] == [("hf", "cpu")]
    assert len(grid.skipped) == 3 and all("real bitsandbytes weights" in why for _, why in grid.skipped)


# ---------------------------------------------------------------------------------------------- issue 10


def _quick(calls):
    from lora_planner.profiler.runner import Measurement

    def measure(request):
        calls.append(request.key)
        return Measurement(peak_bytes=1000, peak_phase="backward", breakdown_bytes=None, step1_peak_bytes=900,
                           steady_peak_bytes=1000, step_times_s=(0.1,))

    return measure


@pytest.mark.parametrize("make_out, needle", [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "runs.jsonl", "lies under"),
    (lambda tmp: Path(os.devnull), "is a device"),
])
def test_a_bad_out_is_refused_before_the_first_run(tmp_path, monkeypatch, capsys, make_out, needle):
    from lora_planner.profiler import runner

    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", _quick(calls))
    grid = small_grid(tmp_path)
    with pytest.raises(PlannerInputError, match=needle):
        run_sweep(load_grid(grid), make_out(tmp_path), measure=_quick(calls))
    assert main(["sweep", str(grid), "--out", str(make_out(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: out:") and needle in err and err.count("\n") == 1
    assert calls == []


def test_a_full_disk_keeps_every_record_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    from lora_planner.profiler import records, runner

    out = tmp_path / "runs.jsonl"
    fallback_dir = tmp_path / "fallback"
    fallback_dir.mkdir()
    monkeypatch.setattr(records, "fallback_path", lambda name: fallback_dir / name)
    real = records._write
    written = []

    def write(fd, data):  # the first record goes in, then the disk is full
        if out.exists() and os.path.samestat(os.fstat(fd), os.stat(out)) and written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)
        return real(fd, data)

    monkeypatch.setattr(records, "_write", write)
    calls = []
    monkeypatch.setitem(runner.MEASURE, "cpu", _quick(calls))
    assert main(["sweep", str(small_grid(tmp_path)), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert len(calls) == 3
    assert len(read_records(out)[0]) == 1
    [fallback] = fallback_dir.iterdir()
    kept = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert [r["key"] for r in read_records(fallback)[0]] == [r["key"] for r in kept] and len(kept) == 2
    assert f"2 record(s) could not be appended to {out}; they are in {fallback}" in captured.err
    assert "2 of them kept in" in captured.out
    # once the disk has room again, the fallback completes the file and --resume has nothing left to do
    out.write_bytes(out.read_bytes() + fallback.read_bytes())
    monkeypatch.setattr(records, "_write", real)
    assert main(["sweep", str(small_grid(tmp_path)), "--out", str(out), "--resume"]) == 0
    assert len(calls) == 3


def test_resume_reruns_a_run_whose_record_was_cut_short(tmp_path):
    grid = load_grid(small_grid(tmp_path))
    out = tmp_path / "runs.jsonl"
    calls = []
    run_sweep(grid, out, measure=_quick(calls))
    text = out.read_bytes()
    out.write_bytes(text[:-100])  # the last record cut short (an interrupted write)
    result = run_sweep(grid, out, resume=True, measure=_quick(calls))
    assert result.already_done == 2 and len(result.finished) == 1 and calls[-1] == calls[2]
    records, bad = read_records(out)
    assert len(records) == 3 and len(bad) == 1 and "not JSON" in bad[0].reason


@pytest.mark.parametrize("make, needle", [
    (lambda p: os.mkfifo(p), "named pipe"),
    (lambda p: p.mkdir(), "folder"),
    (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
])
def test_a_grid_that_is_not_a_regular_text_file_is_one_line(tmp_path, capsys, make, needle):
    path = tmp_path / "g.toml"
    make(path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: grid:") and needle in err and err.count("\n") == 1


def test_a_grid_past_gpt2_learned_positions_is_refused_when_parsed_not_when_run():
    text = '[models.g]\ncatalog = "gpt2"\n[[grid]]\nmethod = ["lora"]\nseq_len = [512, 2048]\n'
    with pytest.raises(PlannerInputError, match=r"grid g grid\[0\] model g: seq_len: 2,048 tokens .* <= 1,024"):
        parse_grid(text, name="g")


@pytest.mark.parametrize("entry, problem", [
    ('path = ["a.json"]', "path must be a non-empty string, got ['a.json']"),
    ("catalog = 3", "catalog must be a non-empty string, got 3"),
    ('path = ""', "path must be a non-empty string"),
])
def test_model_sources_of_the_wrong_type_are_one_line(entry, problem):
    """Found by the fuzz suite (issue 10): `path = [...]` raised TypeError from Path()."""
    with pytest.raises(PlannerInputError, match=re.escape(problem)):
        parse_grid(f"[models.m]\n{entry}\n", name="g")


def test_a_dotted_bare_model_label_says_to_quote_it():
    """TOML reads `granite-3.3-8b = ...` as nested tables: say so instead of a puzzling "needs one of"."""
    with pytest.raises(PlannerInputError, match="quote a label with dots"):
        parse_grid('[models]\ngranite-3.3-8b = "granite-3.3-8b-instruct"\n', name="g")


def test_loss_axis_keys_labels_and_backend():
    """The grid's `loss` axis (issue 13): a chunked run has its own key and label; the builtin backend has no output
    layer apart, so its chunked runs are left out and counted."""
    grid = parse_grid("[models.a]\nconfig = { model_type = 'llama', vocab_size = 128, hidden_size = 64, "
                      "intermediate_size = 96, num_hidden_layers = 2, num_attention_heads = 4 }\n"
                      "[[grid]]\nmethod = 'lora'\nbackend = ['hf', 'builtin']\nloss = ['hf', 'chunked:4']\n",
                      name="losses")
    runs = {(r.backend, r.training.loss, r.training.loss_chunks) for r in grid.runs}
    assert runs == {("hf", "hf", 8), ("builtin", "hf", 8), ("hf", "chunked", 4)}
    chunked = next(r for r in grid.runs if r.training.loss == "chunked")
    assert chunked.label.endswith("loss=chunked:4") and chunked.to_request().key.endswith("|loss:chunked:4")
    assert len(grid.skipped) == 1 and "hf backend" in grid.skipped[0][1]


def test_adapter_axis_sets_peft_options():
    """The grid's `adapter` axis (issue 13): PEFT's use_rslora / use_dora / bias / modules_to_save /
    trainable_token_indices on LoRA runs, each its own key and label; full runs collapse to one; the builtin backend is
    left out; an unknown value or an unreadable token count is one error naming the block."""
    grid = parse_grid(f"[models.tl]\nconfig = {TINY_LLAMA}\n[axes]\nmode = 'cpu'\n"
                      "[[grid]]\nmethod = ['full', 'lora']\nbackend = ['hf', 'builtin']\n"
                      "adapter = ['lora', 'dora', 'bias:all', 'save:lm_head', 'tokens:4', "
                      "'tokens:embed_tokens=2+lm_head=3']\n")
    lora = {r.source["adapter"]: r.training.lora for r in grid.runs
            if r.training.method == "lora" and r.backend == "hf"}
    assert lora["dora"].use_dora and lora["bias:all"].bias == "all"
    assert lora["save:lm_head"].modules_to_save == ("lm_head",)
    assert lora["tokens:4"].trainable_token_indices == (("", (0, 1, 2, 3)),)
    assert lora["tokens:embed_tokens=2+lm_head=3"].trainable_token_indices == (("embed_tokens", (0, 1)),
                                                                              ("lm_head", (0, 1, 2)))
    # full on each backend (the adapter axis collapses), LoRA on hf with each option, plain LoRA on builtin
    assert len({r.to_request().key for r in grid.runs}) == len(grid.runs) == 2 + 6 + 1
    assert len(grid.skipped) == 5 and all("builtin" in label and "hf backend" in why for label, why in grid.skipped)
    for value, fragment in [("loha", "unknown value 'loha'"), ("tokens:x", "cannot read 'tokens:x'")]:
        with pytest.raises(PlannerInputError) as err:
            parse_grid(f"[models.tl]\nconfig = {TINY_LLAMA}\n[[grid]]\nmethod = 'lora'\nadapter = ['{value}']\n")
        assert fragment in err.value.problem


def test_quant_axis_puts_lora_on_an_8bit_base(tmp_path):
    """`quant = ["int8", "int8-nokbit"]`: LoRA on an LLM.int8 base with and without kbit preparation (distinct record
    keys); full fine-tuning collapses to one run; fake mode is skipped (real bitsandbytes weights); a bad value is
    one error naming the block."""
    path = tmp_path / "g.toml"
    path.write_text('[models.a]\ncatalog = "llama-3.2-1b"\n[[grid]]\nmodels = "*"\nmethod = ["full", "lora"]\n'
                    'quant = ["none", "int8", "int8-nokbit"]\nmode = ["cpu", "fake"]\n')
    grid = load_grid(path)
    cpu = [run for run in grid.runs if run.mode == "cpu"]
    assert sorted((r.training.method, r.training.load_in_8bit, r.training.kbit_prep) for r in cpu) == [
        ("full", False, True), ("lora", False, True), ("lora", True, False), ("lora", True, True)]
    assert len({r.to_request().key for r in cpu}) == 4
    assert sum("int8" in label for label, _ in grid.skipped) == 2
    path.write_text('[models.a]\ncatalog = "llama-3.2-1b"\n[[grid]]\nmodels = "*"\nmethod = "qlora"\n'
                    'quant = ["none", "int8", "nf4-nodq", "fp4", "nf4-nokbit", "nf4-fp32-compute"]\n')
    qlora = sorted((r.training.double_quant, r.training.quant_type, r.training.kbit_prep,
                    str(r.training.bnb_4bit_compute_dtype)) for r in load_grid(path).runs)
    assert qlora == [(False, "nf4", True, "None"), (True, "fp4", True, "None"), (True, "nf4", False, "None"),
                     (True, "nf4", True, "None"), (True, "nf4", True, "fp32")]  # int8 collapses to the recipe's
    path.write_text('[models.a]\ncatalog = "llama-3.2-1b"\n[[grid]]\nmodels = "*"\nquant = ["int4"]\n')
    with pytest.raises(PlannerInputError, match="quant"):
        load_grid(path)

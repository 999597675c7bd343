"""`lora-plan report`: files written, bad lines named (with line numbers) and skipped, empty input a
one-line error, several --runs files merged."""

from __future__ import annotations

import json
import os

import pytest

from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.report.runs import load_runs, read_runs
from tests.report.synthetic import biased_records, make_record

EXPECTED_PNGS = {"parity.png", "seed_rule_measured.png", "seed_rule.png", "breakdown.png", "rank.png", "batch.png",
                 "seq.png", "speed.png"}


def write_runs(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def messy_file(tmp_path):
    good = biased_records(3, 1.0, method="lora", prefix="l", model="gpt2", family="gpt2", step_time=0.2)
    good += biased_records(3, 1.0, method="full", prefix="f", model="gpt2", family="gpt2", step_time=0.3)
    partial = make_record("p")
    del partial["settings"]
    extra = [
        "this is not json",                                   # line 7
        json.dumps({"schema_version": 1, "model": {}}),        # 8: an estimate --json document, not a record
        json.dumps(partial),                                   # 9: partial record
        json.dumps({**make_record("v"), "schema_version": 9}),  # 10: unknown schema
        json.dumps([1, 2]),                                    # 11: not an object
        json.dumps(make_record("oom", status="oom", model="gpt2", family="gpt2")),  # 12: fine
        '{"schema_version": 1, "key": "cut',                  # 13: cut short
    ]
    return write_runs(tmp_path / "runs.jsonl", good, extra)


def test_read_runs_names_every_bad_line(tmp_path):
    path = messy_file(tmp_path)
    records, problems = read_runs(path)
    assert len(records) == 7 and records[-1]["status"] == "oom"
    assert [p.line_number for p in problems] == [7, 8, 9, 10, 11, 13]
    reasons = [p.reason for p in problems]
    assert "not JSON" in reasons[0] and "no 'key'" in reasons[1] and "no settings" in reasons[2]
    assert "schema_version 9" in reasons[3] and "not a JSON object" in reasons[4] and "cut short" in reasons[5]
    assert records[0]["_source"] == f"{path}:1"


def test_binary_garbage_is_a_bad_line_not_a_crash(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n" + json.dumps(make_record("a")).encode() + b"\n")
    records, problems = read_runs(path)
    assert len(records) == 1 and problems[0].line_number == 1


def test_report_writes_markdown_and_charts(tmp_path, capsys):
    runs = messy_file(tmp_path)
    more = write_runs(tmp_path / "more.jsonl", biased_records(2, 1.05, prefix="m", model="qwen2.5-0.5b",
                                                              family="qwen2"))
    out = tmp_path / "rep"
    assert main(["report", "--runs", str(runs), "--runs", str(more), "--out", str(out), "--model", "llama-3.2-1b"]) == 0
    captured = capsys.readouterr()
    assert f"{runs}:7: not JSON" in captured.err and "6 bad line(s) skipped" in captured.out
    names = {p.name for p in out.iterdir()}
    assert names == EXPECTED_PNGS | {"report.md"}
    for png in EXPECTED_PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    for needle in ("# Validation report", "## Summary", "Error by backend", "## The seed's claims, checked",
                   "(1 + 4m)", "4 x the weights", "forward pass unchanged", "larger batch", "5 % of the parameters",
                   "llama-3.2-1b: the planner's view", "## Speed", "## Runs that did not finish",
                   "## Every run", "## Input lines skipped", "line 13", "## Regenerate", "![predicted vs measured]",
                   "no phase snapshots"):
        assert needle in text, needle
    assert "| hf | cpu | lora | 6 | 5 | 1 | 0 |" in text  # 3 + 2 lora runs ok, 1 oom (the oom record is lora)


@pytest.mark.parametrize("content", ["", "\n\n", "garbage\n{]\n"])
def test_empty_or_unusable_input_is_one_line_exit_2(tmp_path, capsys, content):
    path = tmp_path / "runs.jsonl"
    path.write_text(content)
    assert main(["report", "--runs", str(path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: runs: no profile records in") and err.count("\n") == 1
    assert not (tmp_path / "rep").exists()


def test_report_bad_arguments_exit_2(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs.jsonl", [make_record("a")])
    for argv, needle in ((["report", "--runs", str(tmp_path / "none.jsonl"), "--out", "x"], "cannot read"),
                         (["report", "--runs", str(runs), "--out", str(tmp_path / "r"), "--model", "llama-9"],
                          "unknown model"),
                         (["report", "--out", "x"], "arguments")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_load_runs_requires_measured_records_when_asked(tmp_path):
    path = write_runs(tmp_path / "runs.jsonl", [make_record("a", status="oom")])
    assert len(load_runs([str(path)]).records) == 1
    with pytest.raises(PlannerInputError, match="1 record.s. without a measurement"):
        load_runs([str(path)], require="ok")


# ---------------------------------------------------------------------------------------------- issue 10


def test_a_file_given_twice_is_read_once(tmp_path, capsys, monkeypatch):
    path = write_runs(tmp_path / "runs.jsonl", biased_records(3, 1.0, prefix="a"))
    monkeypatch.chdir(tmp_path)
    runs = load_runs([str(path), str(path), "./runs.jsonl"])
    assert len(runs.records) == 3 and runs.paths == [str(path)]
    assert runs.notes == [f"--runs {path} is given twice: read once",
                          f"--runs ./runs.jsonl is the same file as {path}: read once"]
    out = tmp_path / "rep"
    assert main(["report", "--runs", str(path), "--runs", str(path), "--out", str(out), "--model", "gpt2"]) == 0
    captured = capsys.readouterr()
    assert "report: 3 record(s) from 1 file(s)" in captured.out
    assert captured.err == f"lora-plan: note: --runs {path} is given twice: read once\n"


@pytest.mark.parametrize("make_out, needle", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "exists and is not a folder"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "rep", "lies under"),
])
def test_report_checks_out_before_any_chart(tmp_path, capsys, monkeypatch, make_out, needle):
    from lora_planner.report import build

    monkeypatch.setattr(build, "runs_frame", lambda *a: pytest.fail("the report started before --out was checked"))
    runs = write_runs(tmp_path / "runs.jsonl", [make_record("a")])
    assert main(["report", "--runs", str(runs), "--out", str(make_out(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: out:") and needle in err and err.count("\n") == 1


def test_report_over_mistyped_records_names_the_lines(tmp_path, capsys):
    """Issue 10 class 3: valid JSON with the wrong types is a named bad line, not a traceback."""
    good = biased_records(3, 1.0, prefix="g", step_time=0.2)
    wrong = [
        {**make_record("k1"), "key": ["a", "list"]},
        {**make_record("k2"), "settings": {**make_record("k2")["settings"], "batch_size": "2"}},
        {**make_record("k3"), "predicted": {**make_record("k3")["predicted"], "breakdown_bytes": [1]}},
        {**make_record("k4"), "measured": {"peak_bytes": "many"}},
        {**make_record("k5"), "family": {"name": "llama"}},
        {**make_record("k6"), "step_times_s": ["fast"]},
    ]
    path = write_runs(tmp_path / "runs.jsonl", good + wrong, ["[" * 10_000 + "]" * 10_000, '{"key": "n", "x": NaN}'])
    assert main(["report", "--runs", str(path), "--out", str(tmp_path / "rep"), "--model", "gpt2"]) == 0
    captured = capsys.readouterr()
    assert "8 bad line(s) skipped" in captured.out
    for line, needle in ((4, "key is a list"), (5, "settings.batch_size is '2'"), (6, "predicted.breakdown_bytes"),
                         (7, "measured.peak_bytes is 'many'"), (8, "family is an object"),
                         (9, "step_times_s[0] is 'fast'"), (10, "not standard JSON (nested too deeply)"),
                         (11, "not standard JSON (NaN is not a JSON number)")):
        assert f"{path}:{line}: {needle}" in captured.err, needle
    assert "Traceback" not in captured.err


def test_runs_that_are_not_regular_files_are_refused(tmp_path, capsys):
    fifo = tmp_path / "runs.jsonl"
    os.mkfifo(fifo)
    assert main(["report", "--runs", str(fifo), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: runs:") and "named pipe" in err and err.count("\n") == 1


def test_calibrate_checks_out_first_and_leaves_no_empty_file(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs.jsonl", biased_records(6, 1.3, prefix="c"))
    (tmp_path / "file").write_text("x")
    assert main(["calibrate", "--runs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "file" / "c.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-plan: error: out:") and "lies under" in err  # --out first, before the runs
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--runs", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "runs: cannot read" in capsys.readouterr().err and not out.exists()  # no empty calib.json left
    assert main(["calibrate", "--runs", str(runs), "--runs", str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "is given twice: read once" in captured.err
    calib = json.loads(out.read_text())
    assert calib["n_records"] == 6 and calib["sources"] == [str(runs)]

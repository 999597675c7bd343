"""JSONL records (`lora_planner.profiler.records`): the one writer (durable, fresh line, one write, never
NaN) and the one reader (every field the report, calibrate and --resume use, type-checked; a bad line
named and skipped, never a crash), and `RecordWriter`, which keeps what it cannot append."""

from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_planner.errors import PlannerInputError
from lora_planner.profiler import records as records_module
from lora_planner.profiler.records import (
    METHODS, RecordWriter, append_record, check_record, finished_keys, read_records,
)
from tests.report.synthetic import make_record

ROOT = Path(__file__).resolve().parents[2]


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    append_record(path, make_record("a"))
    append_record(path, make_record("b", status="oom"))
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a", "b"] and bad == []
    assert records[0]["_source"] == f"{path}:1" and records[1]["status"] == "oom"
    assert finished_keys(path) == {"a", "b"}
    assert path.read_bytes().endswith(b"}\n") and path.read_bytes().count(b"\n") == 2


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join([json.dumps(make_record("a")), "{truncated", "[1, 2]", "",
                               json.dumps({"no": "key"}), json.dumps(make_record("b"))]) + "\n")
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a", "b"]
    assert [(b.line_number, b.reason.split(" ")[0]) for b in bad] == [(2, "not"), (3, "not"), (5, "not")]
    assert "JSON" in bad[0].reason and "key" in bad[2].reason
    assert str(bad[0]).startswith(f"{path}:2: not JSON")


def test_missing_file_reads_as_empty_for_resume_and_is_an_error_for_a_report(tmp_path):
    assert read_records(tmp_path / "absent.jsonl") == ([], [])
    assert finished_keys(tmp_path / "absent.jsonl") == set()
    with pytest.raises(PlannerInputError, match="runs: cannot read"):
        read_records(tmp_path / "absent.jsonl", "runs", missing_ok=False)


def test_real_records_are_all_valid():
    """The schema is the records' own: every line of the shipped sweep data reads back."""
    for name in ("cpu_validation", "fake_architectures"):
        records, bad = read_records(ROOT / "reports" / "data" / f"{name}.jsonl")
        assert bad == [] and len(records) > 50


def test_methods_are_the_planners():
    from lora_planner.specs import METHODS as PLANNER_METHODS

    assert METHODS == PLANNER_METHODS


# ---------------------------------------------------------------------------------------------- truncation


def test_an_append_after_a_cut_short_line_starts_a_new_line(tmp_path):
    """Issue 10 class 2: the fragment of an interrupted write stays one bad line; later records are whole."""
    path = tmp_path / "runs.jsonl"
    append_record(path, make_record("a"))
    with path.open("ab") as handle:
        handle.write(json.dumps(make_record("cut")).encode()[:57])  # interrupted mid-line
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a"]
    assert len(bad) == 1 and bad[0].line_number == 2 and "cut short" in bad[0].reason
    assert finished_keys(path) == {"a"}  # --resume runs "cut" again

    append_record(path, make_record("b"))
    append_record(path, make_record("cut"))  # the resumed run
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["a", "b", "cut"]
    assert [b.line_number for b in bad] == [2] and "not JSON" in bad[0].reason
    assert finished_keys(path) == {"a", "b", "cut"}


def test_a_record_is_one_write_call_then_fsync(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'{"fragment')
    calls = []
    real_write, real_fsync = records_module._write, os.fsync
    monkeypatch.setattr(records_module, "_write",
                        lambda fd, data: calls.append(("write", data)) or real_write(fd, data))
    monkeypatch.setattr(records_module.os, "fsync", lambda fd: calls.append(("fsync", fd)) or real_fsync(fd))
    append_record(path, make_record("a"))
    assert [c[0] for c in calls] == ["write", "fsync"]
    assert calls[0][1].startswith(b"\n{") and calls[0][1].endswith(b"}\n")


def test_a_short_write_is_an_error_not_a_silent_fragment(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    monkeypatch.setattr(records_module, "_write", lambda fd, data: os.write(fd, data[:10]))
    with pytest.raises(OSError) as info:
        append_record(path, make_record("a"))
    assert info.value.errno == errno.ENOSPC


def test_non_finite_numbers_are_never_written(tmp_path):
    path = tmp_path / "runs.jsonl"
    record = make_record("a")
    record["measured"]["peak_bytes"] = float("inf")
    with pytest.raises(ValueError):
        append_record(path, record)
    assert not path.exists() or b"Infinity" not in path.read_bytes()


# ---------------------------------------------------------------------------------------------- field types


def _set(record, dotted, value):
    *parents, last = dotted.split(".")
    target = record
    for name in parents:
        target = target[name]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value


def _phased_record():
    record = make_record("a")
    record["measured"]["phases"] = {"forward": {"peak_bytes": 10, "end_bytes": 5, "peak_breakdown": {"weights": 5},
                                                "end_breakdown": {"activations": 3}}}
    record["sweep"] = {"grid": "g", "model_source": {"config": {"model_type": "llama"}}, "target": "default",
                       "precision": "bf16", "torch_threads": 4}
    record["step_times_s"] = [0.1, 0.2]
    return record


def _nested(depth):
    value = {}
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize("field, value, needle", [
    ("key", ["a", "b"], "key is a list, not a non-empty string"),
    ("key", "", "key is '', not a non-empty string"),
    ("model", {"name": "x"}, "model is an object, not a non-empty string"),
    ("family", "llama/x", "family is 'llama/x'"),
    ("backend", 3, "backend is 3"),
    ("timestamp", 5, "timestamp is 5, not a string"),
    ("error", {}, "error is an object"),
    ("schema_version", True, "schema_version True"),
    ("schema_version", "1", "schema_version '1'"),
    ("status", ["ok"], "status a list is not one of"),
    ("status", "done", "status 'done'"),
    ("settings", KeyError, "no settings"),
    ("settings", [], "settings is a list, not an object"),
    ("settings.batch_size", "2", "settings.batch_size is '2', not a positive integer"),
    ("settings.batch_size", True, "settings.batch_size is True"),
    ("settings.batch_size", 0, "settings.batch_size is 0"),
    ("settings.batch_size", 2.0, "settings.batch_size is 2.0"),
    ("settings.seq_len", 10**40, "settings.seq_len is"),
    ("settings.method", "sft", "settings.method is 'sft', not full / lora / qlora"),
    ("settings.method", ["lora"], "settings.method is a list"),
    ("settings.r", None, "no settings.r for a lora run"),
    ("settings.r", "8", "settings.r is '8'"),
    ("settings.alpha", -1, "settings.alpha is -1"),
    ("settings.grad_checkpointing", "yes", "settings.grad_checkpointing is 'yes', not true or false"),
    ("settings.target_modules", [1], "settings.target_modules[0] is 1, not a string"),
    ("settings.layers_to_transform", [-1], "settings.layers_to_transform[0] is -1"),
    ("settings.amp", 16, "settings.amp is 16"),
    ("settings.gpus", 0, "settings.gpus is 0"),
    ("predicted", KeyError, "no predicted"),
    ("predicted.peak_bytes", "100", "predicted.peak_bytes is '100', not a positive finite number of bytes"),
    ("predicted.peak_bytes", 0, "predicted.peak_bytes is 0"),
    ("predicted.peak_bytes", 10**30, "predicted.peak_bytes is"),
    ("predicted.breakdown_bytes", [1, 2], "predicted.breakdown_bytes is a list, not an object"),
    ("predicted.breakdown_bytes.activations", "x", "predicted.breakdown_bytes.activations is 'x'"),
    ("predicted.breakdown_bytes.activations", -5, "predicted.breakdown_bytes.activations is -5"),
    ("predicted.peak_device_bytes", None, "predicted.peak_device_bytes is None"),
    ("measured", KeyError, "no measured"),
    ("measured", None, "measured is None, not an object"),
    ("measured.peak_bytes", -1, "measured.peak_bytes is -1"),
    ("measured.peak_bytes", 0, "measured.peak_bytes is 0"),
    ("measured.reserved_peak_bytes", "big", "measured.reserved_peak_bytes is 'big'"),
    ("measured.non_allocator_bytes", True, "measured.non_allocator_bytes is True"),
    ("measured.breakdown_bytes", "x", "measured.breakdown_bytes is 'x'"),
    ("measured.phases", [1], "measured.phases is a list"),
    ("measured.phases.forward", 3, "measured.phases.forward is 3, not an object"),
    ("measured.phases.forward.end_breakdown.activations", "3", "measured.phases.forward.end_breakdown.activations"),
    ("relative_error", KeyError, "no relative_error"),
    ("relative_error", "0.1", "relative_error is '0.1', not a finite number"),
    ("step_times_s", [0.1, "x"], "step_times_s[1] is 'x'"),
    ("step_times_s", [0.0], "step_times_s[0] is 0.0, not a step time in seconds (1e-09 to 1e+09)"),
    ("step_times_s", [5e-324], "step_times_s[0] is 5e-324"),
    ("median_step_time_s", 1e300, "median_step_time_s is 1e+300"),
    ("step_times_s", 0.1, "step_times_s is 0.1, not a list"),
    ("median_step_time_s", [], "median_step_time_s is a list"),
    ("tokens_per_s", -3, "tokens_per_s is -3"),
    ("sweep", "g", "sweep is 'g', not an object"),
    ("sweep.target", ["q_proj"], "sweep.target is a list"),
    ("sweep.model_source.config", "x", "sweep.model_source.config is 'x', not an object"),
    ("sweep.model_source.catalog", 1, "sweep.model_source.catalog is 1"),
    ("sweep.model_source.config", _nested(40), "nested more than 32 levels deep"),
])
def test_a_field_of_the_wrong_type_is_a_named_bad_line(tmp_path, field, value, needle):
    record = _phased_record()
    assert check_record(record) is None
    _set(record, field, value)
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(make_record("good")) + "\n" + json.dumps(record) + "\n")
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["good"]
    assert len(bad) == 1 and bad[0].line_number == 2 and needle in bad[0].reason, bad
    assert "\n" not in bad[0].reason
    assert finished_keys(path) == {"good"}


@pytest.mark.parametrize("status", ["oom", "error"])
def test_records_without_a_measurement_need_no_measured_fields(status):
    record = make_record("a", status=status)
    assert check_record(record) is None
    record["measured"] = "whatever"  # not read for a run that did not finish
    assert check_record(record) is None


def test_optional_fields_may_be_absent_or_null():
    record = make_record("a", method="full")
    for name in ("timestamp", "device"):
        del record[name]
    record["sweep"] = None
    record["measured"].update(breakdown_bytes=None, steady_peak_bytes=None, phases=None)
    record.update(median_step_time_s=None, tokens_per_s=None)
    assert check_record(record) is None


@pytest.mark.parametrize("line, needle", [
    (b'{"key": NaN}', "NaN is not a JSON number"),
    (b'{"key": "a", "x": Infinity}', "Infinity is not a JSON number"),
    (b'{"key": "a", "x": -Infinity}', "Infinity is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b'{"key": "\xff\xfe"}', "not UTF-8 text"),
    (b'{"key": 1' + b"0" * 5000 + b"}", "not standard JSON"),
    (b"\x00\x01", "not JSON"),
])
def test_hostile_lines_are_named_and_skipped(tmp_path, line, needle):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(line + b"\n" + json.dumps(make_record("ok")).encode() + b"\n")
    records, bad = read_records(path)
    assert [r["key"] for r in records] == ["ok"]
    assert len(bad) == 1 and bad[0].line_number == 1 and needle in bad[0].reason


def test_an_overflowing_float_is_a_bad_line(tmp_path):
    record = json.dumps(make_record("a")).replace('"peak_bytes": 104857600', '"peak_bytes": 1e999', 1)
    path = tmp_path / "runs.jsonl"
    path.write_text(record + "\n")
    records, bad = read_records(path)
    assert records == [] and "peak_bytes is inf" in bad[0].reason


def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "runs.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(PlannerInputError) as info:
        read_records(fifo, "runs")
    assert "named pipe" in str(info.value) and str(info.value).startswith("runs:")
    with pytest.raises(PlannerInputError, match="out:"):
        finished_keys(fifo)


def test_a_folder_is_refused_with_one_line(tmp_path):
    with pytest.raises(PlannerInputError, match="is a folder"):
        read_records(tmp_path, "runs")


# ---------------------------------------------------------------------------------------------- hypothesis

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
PATHS = ["key", "model", "family", "status", "settings", "settings.method", "settings.batch_size", "settings.seq_len",
         "settings.r", "settings.grad_checkpointing", "predicted", "predicted.peak_bytes", "predicted.breakdown_bytes",
         "measured", "measured.peak_bytes", "measured.breakdown_bytes", "measured.phases", "relative_error",
         "step_times_s", "median_step_time_s", "sweep", "timestamp", "schema_version"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_mutated_records_never_crash_the_reader_or_the_report_frame(tmp_path, mutations):
    from lora_planner.report.calibrate import fit_calibration
    from lora_planner.report.tables import runs_frame

    record = make_record("m")
    for dotted, value in mutations:
        try:
            _set(record, dotted, copy.deepcopy(value))
        except (TypeError, KeyError, IndexError):
            pass  # a parent was replaced by a non-object: the record is mutated enough
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    records, bad = read_records(path)
    assert len(records) + len(bad) == 1
    if records:  # whatever passes the check, the report's frame and calibrate can use
        runs_frame(records + [make_record("other")])
        fit_calibration(records + [make_record(f"c{i}", measured=(100 + i) * 2**20) for i in range(3)], holdout=0.3)
        assert finished_keys(path) == {records[0]["key"]}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path, data):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(data)
    records, bad = read_records(path)
    assert records == [] or all(check_record(r) is None for r in records)


# ---------------------------------------------------------------------------------------------- RecordWriter


@pytest.fixture
def failing_out(tmp_path, monkeypatch):
    """--out whose writes fail with ENOSPC (the fallback file, elsewhere, writes fine)."""
    out = tmp_path / "out" / "runs.jsonl"
    out.parent.mkdir()
    out.touch()
    monkeypatch.setattr(records_module, "fallback_path", lambda name: tmp_path / "tmp" / name)
    real = records_module._write

    def write(fd, data):
        if os.path.samestat(os.fstat(fd), os.stat(out)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(records_module, "_write", write)
    return out


def test_a_record_that_cannot_be_appended_is_kept_on_stderr_and_in_a_fallback(failing_out, capsys):
    writer = RecordWriter(failing_out)
    assert writer.append(make_record("a")) is False
    assert writer.append(make_record("b")) is False
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "No space left on device" in lines[0] and str(writer.fallback) in lines[0]
    assert [json.loads(line)["key"] for line in lines[1:]] == ["a", "b"]
    assert failing_out.read_bytes() == b""
    assert [r["key"] for r in read_records(writer.fallback)[0]] == ["a", "b"]
    assert writer.kept == 2 and "2 record(s) could not be appended" in writer.summary()
    assert writer.fallback.name.startswith("lora-plan-records-") and writer.fallback.suffix == ".jsonl"


def test_a_writer_that_succeeds_says_nothing(tmp_path, capsys):
    writer = RecordWriter(tmp_path / "runs.jsonl")
    assert writer.append(make_record("a")) is True
    assert writer.kept == 0 and writer.summary() is None and capsys.readouterr().err == ""


def test_a_file_replaced_by_a_folder_meanwhile_is_kept_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(records_module, "fallback_path", lambda name: tmp_path / name)
    out = tmp_path / "runs.jsonl"
    out.mkdir()
    writer = RecordWriter(out)
    assert writer.append(make_record("a")) is False
    assert read_records(writer.fallback)[0][0]["key"] == "a"
    assert "cannot append to" in capsys.readouterr().err

"""Running one generated case and holding its answer to the CLI's contract (issue 10).

`run_case` calls `lora_planner.cli.main(argv)` in-process, in the case's workspace folder, with stdout and
stderr captured, under a watchdog (`FUZZ_CASE_TIMEOUT` seconds, SIGALRM; faulthandler kills the process
if even that cannot interrupt it) and an address-space limit (a read of /dev/zero fails with MemoryError
instead of taking the machine's memory). `check_case` then asserts:

1. no exception escapes `main`, and it answers in time;
2. the exit code is 0 or 2; 1 only for `profile` / `sweep` runs (not `--dry-run`) and only when a run was
   recorded with `"status": "error"`; on 2, stderr is exactly one line `lora-plan: error: ...` (preceded
   only by `lora-plan: skipped FILE:LINE: ...` notices: the record readers name each line they skip);
   every `--flag` the output mentions is an option of the same subcommand, unless the user typed it (it is
   echoed back) or it sits in a quoted command of another subcommand (`` `lora-plan calibrate --out F` ``);
   an abbreviated option (`--mod`) and an option given once with an empty value are refused (exit 2);
3. on success with `--json`, stdout is standard JSON, every number finite, byte counts non-negative integers,
   and each breakdown sums to its peak (`check_estimate_doc`, `check_recommend_doc`, `check_profile_doc`);
4. record files are only ever appended to, and every line a run wrote is a readable record; input files
   (`--runs`, `--calibration`, configs, grids) are left as they were.

A violation raises `ContractViolation(kind, detail)`: `kind` is short and stable (the survey deduplicates
on it), `detail` says what happened.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import math
import os
import re
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_planner.cli import main

from .strategies import JSON_SUBCOMMANDS, SUBCOMMANDS, Case, option_strings
from .workspace import Ref, Workspace

CASE_TIMEOUT_S = float(os.environ.get("FUZZ_CASE_TIMEOUT", "30"))
ADDRESS_SPACE_HEADROOM = 3 * 2**30  # how much more memory one case may map
ERROR_PREFIX = "lora-plan: error: "
SKIP_PREFIX = ("lora-plan: skipped ", "lora-plan: note: ")  # information before the error: the lines a reader skips, a file given twice


class Hang(BaseException):
    """Raised by the watchdog inside `main` (a BaseException: `except Exception` in the product cannot eat it)."""


class InterpreterCrash(BaseException):
    """Raised by the `torch.set_num_threads` guard where the real call would crash the interpreter."""


class ContractViolation(AssertionError):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}\n{detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class Outcome:
    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    error: BaseException | None  # what escaped main
    trace: str | None
    seconds: float


# ---------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"main() gave no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True, file=sys.__stderr__)  # a hang SIGALRM cannot break: fail, never hang CI
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_limit(headroom: int = ADDRESS_SPACE_HEADROOM) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(argv: list[str], cwd: Path, timeout: float = CASE_TIMEOUT_S) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    code = error = trace = None
    here = os.getcwd()
    start = time.perf_counter()
    try:
        os.chdir(cwd)
        with watchdog(timeout), memory_limit(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is the finding
        if isinstance(exc, KeyboardInterrupt):
            raise
        error, trace = exc, traceback.format_exc()
    finally:
        os.chdir(here)
    return Outcome(argv=list(argv), code=code, stdout=out.getvalue(), stderr=err.getvalue(), error=error,
                   trace=trace, seconds=time.perf_counter() - start)


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Write the case's files, run it, check it (raises `ContractViolation`); returns the outcome."""
    for name, content in case.files.items():
        ws.write(name, content)
    watched = {ref: ws.snapshot(ref) for ref in case.records + case.read_only}
    outcome = run_cli([ws.resolve(t) for t in case.argv], ws.root)
    try:
        check_case(case, ws, outcome, watched)
    except ContractViolation as violation:
        if not COLLECT:
            raise
        _collect(case, outcome, violation)
    else:
        if COLLECT:
            _collect(case, outcome, None)
    return outcome


# `python -m tests.fuzz.survey` sets this: violations are written there (one JSON line each, with every
# outcome's exit code) instead of failing the test, so one run lists every distinct defect.
COLLECT = os.environ.get("FUZZ_COLLECT")


def _collect(case: Case, outcome: Outcome, violation: ContractViolation | None) -> None:
    entry = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "sub": case.sub, "code": outcome.code,
             "seconds": round(outcome.seconds, 3), "argv": [a[:200] for a in outcome.argv],
             "files": {k: (v if isinstance(v, str) else v.decode("utf-8", "replace"))[:600] for k, v in case.files.items()
                       if k not in ("runs.jsonl", "calib.json", "grid.toml") or "runs" in k},
             "stderr": outcome.stderr[-400:], "kind": violation.kind if violation else None,
             "detail": violation.detail[-3000:] if violation else None}
    with open(COLLECT, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------- checks


def _where(trace: str) -> str:
    """The innermost frame of the product in a traceback: 'lora_planner/x.py:function'."""
    frames = re.findall(r'File "([^"]*)", line (\d+), in (\S+)', trace)
    for path, _, function in reversed(frames):
        if "lora_planner" in path and "/tests/" not in path:
            return f"{path[path.rindex('lora_planner'):]}:{function}"
    return "outside lora_planner"


def check_case(case: Case, ws: Workspace, outcome: Outcome, watched: dict[Ref, bytes | None]) -> None:
    shown = f"argv: {outcome.argv!r}\ncode: {outcome.code}\nstderr: {outcome.stderr[-2000:]!r}"
    if outcome.error is not None:
        exc = outcome.error
        if isinstance(exc, Hang):
            raise ContractViolation(f"hang ({case.sub})", f"{shown}\n{outcome.trace}")
        if isinstance(exc, InterpreterCrash):
            raise ContractViolation(f"interpreter crash ({case.sub}): {exc}", shown)
        last = (outcome.trace or "").strip().splitlines()[-1]
        raise ContractViolation(f"traceback {type(exc).__name__} at {_where(outcome.trace or '')}",
                                f"{shown}\n{last}\n{outcome.trace}")
    written = _check_files(case, ws, watched, shown)
    code = outcome.code
    allowed = {0, 2} | ({1} if case.may_fail_a_run else set())
    if code not in allowed:
        raise ContractViolation(f"exit code {code} ({case.sub})", f"{shown}\nstdout: {outcome.stdout[-2000:]!r}")
    if code == 1 and not any(isinstance(r, dict) and r.get("status") == "error" for r in written):
        raise ContractViolation(f"exit code 1 with no error record ({case.sub})", shown)
    if code == 2:
        _check_error_lines(outcome.stderr, shown, case.sub)
    if case.abbreviated and code != 2:
        raise ContractViolation("abbreviated option accepted", f"{shown}\nabbreviations: {case.abbreviated}")
    if case.blank and code != 2 and "--help" not in outcome.argv:
        raise ContractViolation(f"empty value accepted: {case.blank[0]} ({case.sub})", shown)
    _check_flags(case, ws, outcome, shown)
    if code in (0, 1) and "--json" in outcome.argv and case.sub in JSON_SUBCOMMANDS and "--help" not in outcome.argv \
            and "--" not in outcome.argv and not any(a.startswith("--json=") for a in outcome.argv):
        doc = parse_standard_json(outcome.stdout, shown)
        check_json_numbers(doc, shown)
        {"estimate": check_estimate_doc, "recommend": check_recommend_doc, "profile": check_profile_doc}[case.sub](
            doc, shown)


def _check_error_lines(stderr: str, shown: str, sub: str) -> None:
    lines = stderr.splitlines()
    while lines and lines[0].startswith(SKIP_PREFIX):
        lines.pop(0)
    if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
        raise ContractViolation(f"exit 2 without exactly one error line ({sub})", shown)


def _check_files(case: Case, ws: Workspace, watched: dict[Ref, bytes | None], shown: str) -> list[Any]:
    """Input files unchanged, record files appended to only; returns the records this run wrote."""
    written: list[Any] = []
    for ref, before in watched.items():
        after = ws.snapshot(ref)
        if ref in case.read_only:
            if before is not None and after != before:
                raise ContractViolation(f"input file changed: {ref.name}", shown)
            continue
        if before is None:
            new = after or b""
        elif after is None:
            raise ContractViolation("record file removed", shown)
        elif after == before:
            new = b""
        elif not after.startswith(before):
            raise ContractViolation("record file rewritten (not only appended to)",
                                    f"{shown}\nbefore ends {before[-200:]!r}\nafter: {after[:len(before) + 200][-400:]!r}")
        elif not before or before.endswith(b"\n"):
            new = after[len(before):]
        elif after[len(before):len(before) + 1] == b"\n":  # the line cut short is closed first: allowed
            new = after[len(before) + 1:]
        else:
            raise ContractViolation("record appended onto a line cut short",
                                    f"{shown}\nbefore ends {before[-200:]!r}\nappended: {after[len(before):][:300]!r}")
        written += check_record_lines(new, shown)
    return written


def check_record_lines(data: bytes, shown: str) -> list[Any]:
    """Every line a run wrote: standard JSON, a record the report reader accepts, ending with a newline."""
    from lora_planner.report.runs import check_record

    if data and not data.endswith(b"\n"):
        raise ContractViolation("record written without a final newline", f"{shown}\n{data[-200:]!r}")
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as err:
            raise ContractViolation("unreadable record written", f"{shown}\n{err}: {line[:300]!r}") from None
        reason = check_record(record)
        if reason:
            raise ContractViolation(f"unreadable record written: {reason}", f"{shown}\n{line[:300]!r}")
        check_json_numbers(record, shown)
        records.append(record)
    return records


FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
QUOTED = re.compile(r"`([^`]*)`")


def _check_flags(case: Case, ws: Workspace, outcome: Outcome, shown: str) -> None:
    """Every --flag the output names belongs to this subcommand (echoes and other subcommands' quoted
    commands excepted). Checked on stderr always, and on stdout unless it is the JSON document (whose
    strings are checked too: warnings and reasons are hints)."""
    own = option_strings(case.sub)
    typed = set(FLAG.findall(" ".join(outcome.argv)))
    for content in case.files.values():
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        typed |= set(FLAG.findall(text))
    for text in (outcome.stderr, outcome.stdout):
        for flag in FLAG.findall(_without_other_commands(text, case.sub)):
            if flag not in own and flag not in typed:
                raise ContractViolation(f"names a flag {case.sub} does not have: {flag}",
                                        f"{shown}\nstdout: {outcome.stdout[-1500:]!r}")


def _without_other_commands(text: str, sub: str) -> str:
    def keep(match: re.Match[str]) -> str:
        words = match.group(1).split()
        if words and words[0] == "lora-plan":
            named = words[1] if len(words) > 1 and words[1] in SUBCOMMANDS else "estimate"
            if named != sub:
                return ""
        return match.group(0)

    return QUOTED.sub(keep, text)


# ---------------------------------------------------------------------------------------------- JSON


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def parse_standard_json(text: str, shown: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise ContractViolation("--json output is not standard JSON", f"{shown}\n{err}\nstdout: {text[:1500]!r}") \
            from None


# Keys whose numbers are counts or sizes and so never negative (besides every key ending `_bytes`).
NON_NEGATIVE_SUFFIXES = ("_bytes", "_params", "_flops", "flops_per_step", "_time_s", "tokens_per_s", "batch_size",
                         "_steps", "gpus", "num_layers", "hidden_size", "vocab_size", "train_tokens", "seq_len")
# Signed by definition: relative errors (predicted / measured - 1), `cpu_kernel_extra_bytes` (--verify: the CPU
# replay's predicted peak minus the device's, either way round), and margins.
SIGNED_KEYS = ("relative_error", "cpu_kernel_extra_bytes", "margin_bytes")


def check_json_numbers(doc: Any, shown: str, path: str = "$") -> None:
    """Every number finite; byte counts (keys ending `_bytes`, values of `*breakdown*` objects) and the counts of
    `NON_NEGATIVE_SUFFIXES` non-negative, and byte counts integers."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            where = f"{path}.{key}"
            key = str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in SIGNED_KEYS:
                if key.endswith("_bytes") and not isinstance(value, int):
                    raise ContractViolation(f"byte count not an integer: {key}", f"{shown}\n{where} = {value!r}")
                if key.endswith(NON_NEGATIVE_SUFFIXES) and value < 0:
                    raise ContractViolation(f"negative figure: {key}", f"{shown}\n{where} = {value!r}")
            if "breakdown" in key and isinstance(value, dict):
                for part, n in value.items():
                    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                        raise ContractViolation(f"breakdown entry not a non-negative integer: {key}",
                                                f"{shown}\n{where}.{part} = {n!r}")
            check_json_numbers(value, shown, where)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            check_json_numbers(value, shown, f"{path}[{i}]")
    elif isinstance(doc, float) and not math.isfinite(doc):
        raise ContractViolation("non-finite number in JSON", f"{shown}\n{path} = {doc!r}")


def _expect(condition: bool, kind: str, shown: str, detail: str) -> None:
    if not condition:
        raise ContractViolation(kind, f"{shown}\n{detail}")


def check_estimate_doc(doc: Any, shown: str) -> None:
    """`lora_planner.planner.plan_to_dict`. Checked, per method: `breakdown_bytes` (the peak phase's five
    categories) sums to `peak_allocated_bytes` = `per_gpu_peak_allocated_bytes`; `phases[peak_phase]` is that
    breakdown and no phase sums above the peak; `peak_device_bytes` = `peak_allocated_bytes` +
    `device_overhead_bytes`; with a budget, `fits` is `peak_device_bytes <= inputs.usable_bytes`, and
    `usable_bytes` = floor(`budget_bytes` x (1 - `headroom`)); `model.params_by_group` sums to
    `model.total_params`; `trainable_fraction` in [0, 1]."""
    _expect(isinstance(doc, dict) and isinstance(doc.get("methods"), dict), "estimate JSON shape", shown, repr(doc)[:500])
    inputs, model = doc["inputs"], doc["model"]
    usable, budget = inputs.get("usable_bytes"), inputs.get("budget_bytes")
    if budget is not None:
        _expect(usable == math.floor(budget * (1 - inputs["headroom"])), "usable_bytes != budget x (1 - headroom)",
                shown, f"{usable} vs {budget} x (1 - {inputs['headroom']})")
    _expect(sum(model["params_by_group"].values()) == model["total_params"], "params_by_group != total_params",
            shown, repr(model))
    for method, m in doc["methods"].items():
        peak = m["peak_allocated_bytes"]
        total = sum(m["breakdown_bytes"].values())
        _expect(total == peak, "breakdown does not sum to the peak (estimate)", shown,
                f"{method}: sum {m['breakdown_bytes']} = {total} != peak_allocated_bytes {peak}")
        _expect(m["per_gpu_peak_allocated_bytes"] == peak, "per-GPU peak != peak (estimate)", shown, method)
        _expect(m["phases"].get(m["peak_phase"]) == m["breakdown_bytes"], "peak phase's breakdown != breakdown_bytes",
                shown, f"{method}: {m['peak_phase']}")
        _expect(max(sum(p.values()) for p in m["phases"].values()) == peak, "a phase above the peak (estimate)", shown,
                f"{method}: {m['phases']}")
        _expect(m["peak_device_bytes"] == peak + m["device_overhead_bytes"], "peak_device_bytes != peak + overhead",
                shown, f"{method}: {m['peak_device_bytes']} != {peak} + {m['device_overhead_bytes']}")
        if usable is not None:
            _expect(m["fits"] == (m["peak_device_bytes"] <= usable), "fits disagrees with the peak (estimate)", shown,
                    f"{method}: fits={m['fits']} peak_device={m['peak_device_bytes']} usable={usable}")
        _expect(0 <= m["trainable_fraction"] <= 1, "trainable_fraction outside [0, 1]", shown, method)


def check_recommend_doc(doc: Any, shown: str) -> None:
    """`lora_planner.recommend_cli.recommendation_to_dict` (it has no breakdown): `usable_bytes` =
    floor(`budget_bytes` x (1 - `headroom`)); when `fits`, `predicted_peak_bytes` (the device peak) <=
    `usable_bytes`; when not, `needed_budget_bytes` is given and its usable memory holds the smallest peak;
    `micro_batch_size` <= `max_micro_batch_size`; `effective_global_batch` = micro x GPUs x accumulation."""
    _expect(isinstance(doc, dict) and "fits" in doc, "recommend JSON shape", shown, repr(doc)[:500])
    budget, usable = doc["budget_bytes"], doc["usable_bytes"]
    _expect(usable == math.floor(budget * (1 - doc["headroom"])), "usable_bytes != budget x (1 - headroom)", shown,
            f"{usable} vs {budget} x (1 - {doc['headroom']})")
    if doc["fits"]:
        _expect(doc["predicted_peak_bytes"] <= usable, "fits but the peak is above the usable memory", shown,
                f"{doc['predicted_peak_bytes']} > {usable}")
        _expect(doc["micro_batch_size"] <= doc["max_micro_batch_size"], "micro batch above its max", shown, "")
        _expect(doc["effective_global_batch"] == doc["micro_batch_size"] * doc["gpus"] *
                doc["gradient_accumulation_steps"], "effective_global_batch != micro x gpus x accumulation", shown, "")
    else:
        needed = doc["needed_budget_bytes"]
        if needed is not None:
            _expect(math.floor(needed * (1 - doc["headroom"])) >= doc["predicted_peak_bytes"],
                    "needed_budget_bytes does not hold the peak", shown, f"{needed} vs {doc['predicted_peak_bytes']}")


def check_profile_doc(doc: Any, shown: str) -> None:
    """`profile --json`: the records. Each record's `predicted.breakdown_bytes` sums to `predicted.peak_bytes`,
    `predicted.peak_device_bytes` = `peak_bytes` + `device_overhead_bytes`; an ok record has a positive
    `measured.peak_bytes`. (`relative_error` is signed.)"""
    _expect(isinstance(doc, list), "profile JSON shape", shown, repr(doc)[:500])
    for record in doc:
        predicted = record["predicted"]
        _expect(sum(predicted["breakdown_bytes"].values()) == predicted["peak_bytes"],
                "breakdown does not sum to the peak (profile record)", shown, repr(predicted))
        _expect(predicted["peak_device_bytes"] == predicted["peak_bytes"] + predicted["device_overhead_bytes"],
                "peak_device_bytes != peak + overhead (profile record)", shown, repr(predicted))
        if record["status"] == "ok":
            _expect(record["measured"]["peak_bytes"] > 0, "ok record without a positive measured peak", shown, "")

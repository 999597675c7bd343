"""Progress of profile runs (issue 9 item 15): the runner's events per step (no rich there), and the
display that draws them: plain lines when stderr is not a terminal, a live rich display when it is."""

from __future__ import annotations

import io
from functools import partial

import pytest
from rich.console import Console

from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.profiler.progress import RunProgressDisplay
from lora_planner.profiler.runner import ProfileRequest, RunProgress, check_request, measure_cuda, run_profile
from lora_planner.specs import LoraSpec, TrainingSpec

TINY = spec_from_config({"model_type": "llama", "vocab_size": 500, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "tiny")


def tiny_request(mode: str = "cpu", steps: int = 3, **training) -> ProfileRequest:
    settings = dict(method="lora", dtype="fp32", batch_size=1, seq_len=8, device="cpu", lora=LoraSpec(r=2))
    settings.update(training)
    return ProfileRequest(model="tiny", spec=TINY, training=TrainingSpec(**settings), mode=mode, steps=steps)


def stages(events: list[RunProgress]) -> list[tuple[str, int, int]]:
    return [(e.stage, e.step, e.steps) for e in events]


def test_a_cpu_run_reports_its_start_then_every_measured_and_timed_step():
    events: list[RunProgress] = []
    record = run_profile(tiny_request(), progress=events.append)
    assert record["status"] == "ok"
    assert stages(events) == [("build", 0, 0), ("measure", 0, 3), ("measure", 1, 3), ("measure", 2, 3),
                              ("measure", 3, 3), ("time", 1, 3), ("time", 2, 3), ("time", 3, 3)]


def test_a_fake_run_reports_its_traced_steps():
    events: list[RunProgress] = []
    assert run_profile(tiny_request(mode="fake", steps=2), progress=events.append)["status"] == "ok"
    assert stages(events) == [("build", 0, 0), ("measure", 0, 2), ("measure", 1, 2), ("measure", 2, 2)]


def test_the_cuda_protocol_reports_counted_timed_and_tracked_steps():
    from tests.profiler.test_runner import FakeCuda

    events: list[RunProgress] = []
    measure = partial(measure_cuda, cuda=FakeCuda([100, 200]), device="cpu")
    assert run_profile(tiny_request(steps=2), measure=measure, progress=events.append)["status"] == "ok"
    assert stages(events) == [("build", 0, 0), ("measure", 1, 2), ("measure", 2, 2), ("time", 1, 2), ("time", 2, 2),
                              ("breakdown", 0, 2), ("breakdown", 1, 2), ("breakdown", 2, 2)]


def test_without_a_callback_nothing_is_reported_and_a_stand_in_measure_needs_none():
    def failing(request):
        raise RuntimeError("boom")

    events: list[RunProgress] = []
    assert run_profile(tiny_request(), measure=failing, progress=events.append)["status"] == "error"
    assert stages(events) == [("build", 0, 0)]


@pytest.mark.parametrize("training, needle", [
    (dict(method="qlora"), "QLoRA"),
    (dict(optimizer="adamw8bit"), "bitsandbytes"),
])
def test_bad_settings_are_found_before_anything_is_built(training, needle):
    with pytest.raises(PlannerInputError, match=needle):
        check_request(tiny_request(**training))
    check_request(tiny_request())  # good settings pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_when_stderr_is_not_a_terminal():
    out, clock = io.StringIO(), Clock()
    with RunProgressDisplay(2, Console(file=out, width=200), clock=clock) as display:
        callback = display.run("lora hf/cpu b=1 s=8")
        callback(RunProgress("build"))
        callback(RunProgress("measure", 0, 2))  # a stage begins: no line
        clock.now += 1.25
        callback(RunProgress("measure", 1, 2))
        clock.now += 1.0
        display.finished({"status": "oom"})
    assert out.getvalue().splitlines() == ["run 1/2 lora hf/cpu b=1 s=8: building the model (0.0 s)",
                                           "run 1/2 lora hf/cpu b=1 s=8: measured step 1/2 (1.2 s)",
                                           "run 1/2 lora hf/cpu b=1 s=8: done, oom (2.2 s)"]


def test_a_live_display_on_a_terminal_shows_the_run_and_its_step():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    with RunProgressDisplay(2, console) as display:
        callback = display.run("full hf/cpu b=1 s=8")
        callback(RunProgress("measure", 2, 3))
        display._progress.refresh()
        text = out.getvalue()
        display.finished({"status": "ok"})
    assert "run 1/2 full hf/cpu b=1 s=8" in text and "measured step" in text and "2/3" in text

"""The web API (`lora_planner.web.api` and its routes in `web.app`), through Starlette's test client: the answers are
the CLI's own `--json` documents for the same options, bad input is a field-level 400 (never a 500: fuzzed), files on
the server are refused, an uploaded config.json plans as `--model config.json` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_planner.cli import main
from lora_planner.web import api

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from lora_planner.web.app import create_app  # noqa: E402

CLIENT = TestClient(create_app())
CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def cli_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def to_argv(params: dict[str, str]) -> list[str]:
    return [w for k, v in params.items() for w in ((f"--{k}",) if v == "1" and k in (
        "grad-checkpointing", "liger", "use-dora", "packing", "padding") else (f"--{k}", v))]


PLANS = [
    {"model": "llama-3.1-8b"},
    {"model": "llama-3.1-8b", "gpu": "rtx-4090", "r": "16", "grad-checkpointing": "1"},
    {"model": "qwen3-8b", "method": "lora,qlora", "batch-size": "4", "seq-len": "2048", "packing": "1",
     "attention": "flash_attention_2", "gpu-mem": "40GiB"},
    {"model": "mistral-7b", "method": "full", "gpus": "8", "strategy": "zero3", "gpu": "h100-80gb", "dtype": "bf16"},
    {"model": "gemma-2-9b", "method": "lora", "stack": "trl-sft", "liger": "1", "target": "all-linear", "gpu": "l4"},
]


@pytest.mark.parametrize("params", PLANS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_plan_is_the_clis_json(capsys, params):
    response = CLIENT.get("/api/plan", params=params)
    assert response.status_code == 200
    data = response.json()
    assert data["plan"] == cli_json(capsys, to_argv(params))
    assert data["cli"] == "lora-plan " + " ".join(to_argv(params)) + " --json"
    assert data["server_ms"] > 0 and 0 < data["server_cpu_ms"]


def test_recommend_is_the_clis_json(capsys):
    params = {"model": "llama-3.1-8b", "gpu": "rtx-4090", "seq-len": "2048"}
    data = CLIENT.post("/api/recommend", json={"params": params}).json()
    assert data["recommendation"] == cli_json(capsys, ["recommend", *to_argv(params)])
    assert data["cli"] == "lora-plan recommend --model llama-3.1-8b --gpu rtx-4090 --seq-len 2048 --json"


def test_grpo_recommendation_is_the_clis_json(capsys):
    """GRPO's search with its trade-offs (`recommend.recommend_for_objective`), as the CLI runs it."""
    params = {"model": "qwen3-8b", "gpu": "rtx-4090", "objective": "rl", "max-completion-length": "1024"}
    data = CLIENT.post("/api/recommend", json={"params": params}).json()
    assert data["recommendation"] == cli_json(capsys, ["recommend", *to_argv(params)])
    assert data["recommendation"]["reasons"][0].startswith("GRPO as asked does not fit on this GPU")


def test_uploaded_config_plans_as_the_file(capsys):
    path = CONFIGS / "qwen3_8b_bnb4bit_config.json"
    config = json.loads(path.read_text())
    data = CLIENT.post("/api/plan", json={"params": {"gpu": "rtx-4090", "method": "lora"}, "config": config}).json()
    expected = cli_json(capsys, ["--model", str(path), "--gpu", "rtx-4090", "--method", "lora"])
    assert data["plan"]["methods"] == expected["methods"]
    assert data["cli"] == "lora-plan --model config.json --gpu rtx-4090 --method lora --json"
    modules = CLIENT.post("/api/modules", json={"config": config}).json()
    assert modules["linear_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                         "lm_head"]


@pytest.mark.parametrize("method, path, params, body, field", [
    ("get", "/api/plan", {"r": "0"}, None, "r"),
    ("get", "/api/plan", {"batch-size": "many"}, None, "batch-size"),
    ("get", "/api/plan", {"model": "llama-9000"}, None, "model"),
    ("get", "/api/plan", {"gpu": "rtx-9090"}, None, "gpu"),
    ("get", "/api/plan", {"grad-checkpointing": "maybe"}, None, "grad-checkpointing"),
    ("get", "/api/plan", {"colour": "red"}, None, "colour"),
    ("get", "/api/plan", {"from": "/etc/passwd"}, None, "from"),
    ("get", "/api/plan", {"model": "/etc/config.json"}, None, "model"),
    ("get", "/api/plan", {"calibration": "c.json"}, None, "calibration"),
    ("post", "/api/plan", None, b"[1, 2]", "body"),
    ("post", "/api/plan", None, b'{"params": {}, "config": {"model_type": "no-such"}}', "no-such"),
    ("post", "/api/plan", None, b'{"params": {}, "config": [1]}', "config"),
    ("get", "/api/sweep", {"axis": "dtype", "values": "1"}, None, "axis"),
    ("get", "/api/sweep", {"axis": "r", "values": ""}, None, "values"),
    ("get", "/api/recommend", {"model": "llama-3.1-8b"}, None, "arguments"),
])
def test_bad_input_is_a_field_level_400(method, path, params, body, field):
    response = CLIENT.get(path, params=params) if method == "get" else CLIENT.post(path, content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"field", "message", "fix"} and field in (error["field"] + error["message"])


def test_sweep_by_hand():
    """The batch sweep's peaks are the plans' own and never fall as the batch grows."""
    data = CLIENT.get("/api/sweep", params={"model": "llama-3.2-1b", "gpu": "rtx-4090", "axis": "batch-size",
                                            "values": "1,2,4,8"}).json()
    assert [p["value"] for p in data["points"]] == [1, 2, 4, 8]
    for method in ("full", "lora", "qlora"):
        peaks = [p["peaks"][method] for p in data["points"]]
        assert peaks == sorted(peaks)
        plan = CLIENT.get("/api/plan", params={"model": "llama-3.2-1b", "gpu": "rtx-4090", "batch-size": "4"}).json()
        assert peaks[2] == plan["plan"]["methods"][method]["peak_device_bytes"]
    assert data["usable_bytes"] == plan["plan"]["inputs"]["usable_bytes"]


SWEPT = [
    {"model": "llama-3.1-8b"},
    {"model": "qwen3-8b", "method": "lora,qlora", "target": "all-linear", "alpha": "32", "grad-checkpointing": "1",
     "packing": "1", "loss": "chunked:4", "attention": "eager"},
    {"model": "gemma-2-9b", "stack": "trl-sft", "liger": "1", "gpu": "l4", "use-dora": "1", "method": "lora"},
    {"model": "llama-3.2-1b", "objective": "dpo", "batch-size": "2"},
    {"model": "qwen3-8b", "objective": "grpo", "max-completion-length": "256", "num-generations": "4"},
    {"model": "mistral-7b", "method": "full", "gpus": "4", "strategy": "zero3", "optimizer": "adamw8bit"},
    {"model": "llama-3.1-8b", "loss": "chunked:3000"},  # refused as given (3,000 chunks of 1,024 tokens): per point
]


@pytest.mark.parametrize("params", SWEPT, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("axis,values", [("r", [1, 4, 64, 300]), ("batch-size", [1, 3, 64]),
                                         ("seq-len", [100, 2048, 40000])])
def test_sweep_points_are_the_clis_settings(params, axis, values):
    """Each point's settings (`api._swept`: one field of the parsed settings changed) are what the CLI reads from
    the options with that one changed, for every method, and its peak that of `lora-plan` with those options."""
    import argparse

    from lora_planner.cli import plan_inputs
    from lora_planner.errors import PlannerInputError
    from lora_planner.memory import estimate_memory

    parsed = api._parse("estimate", params)
    try:
        _, training, _ = plan_inputs(argparse.Namespace(**vars(parsed.args)))
    except PlannerInputError:
        training = None
    swept = api.sweep(params, axis, values)
    for value, point in zip(values, swept["points"]):
        args = argparse.Namespace(**vars(parsed.args))
        setattr(args, api.SWEEP_AXES[axis], value)
        try:
            spec, first, methods = plan_inputs(args)
            expected = {m: estimate_memory(spec, first.evolve(method=m)).peak_device_bytes for m in methods}
        except PlannerInputError as err:
            assert point == {"value": value, "peaks": None, "error": str(err)}
            continue
        assert point == {"value": value, "peaks": expected, "error": None}
        if training is not None:
            for method in methods:
                assert api._swept(training, axis, value, method) == first.evolve(method=method)


def test_parsed_options_are_each_callers_own():
    """The parse cache hands out copies: what one request writes on its options (`plan_inputs`' notes) is not seen by
    the next."""
    first = api._parse("estimate", {"model": "qwen3-8b", "objective": "grpo"})
    first.args.methods_note = "written by a caller"
    again = api._parse("estimate", {"model": "qwen3-8b", "objective": "grpo"})
    assert again.args is not first.args and getattr(again.args, "methods_note", None) is None
    assert vars(again.args) == {k: v for k, v in vars(first.args).items() if k != "methods_note"}


def test_prepare_process_freezes_and_raises_the_thresholds():
    import gc

    from lora_planner.web.app import GC_THRESHOLDS, prepare_process

    before = gc.get_threshold()
    try:
        prepare_process()
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_catalogs():
    models = CLIENT.get("/api/models", params={"q": "QWEN3-8"}).json()["models"]
    assert {"name": "qwen3-8b", "repo_id": "Qwen/Qwen3-8B"} in models
    gpus = CLIENT.get("/api/gpus").json()["gpus"]
    assert {"name": "rtx-4090", "memory_bytes": 24_564 * 2**20, "bf16": True} in gpus
    modules = CLIENT.get("/api/modules", params={"model": "llama-3.1-8b"}).json()
    assert modules["default_targets"] == ["q_proj", "v_proj"]


def test_page_and_assets():
    page = CLIENT.get("/")
    assert page.status_code == 200 and "<form id=\"form\"" in page.text
    for asset in ("app.js", "style.css"):
        assert CLIENT.get(f"/static/{asset}").status_code == 200


OPTIONS = ["model", "method", "r", "alpha", "batch-size", "seq-len", "gpu", "gpu-mem", "gpus", "strategy", "dtype",
           "amp", "optimizer", "attention", "loss", "stack", "quant", "target", "grad-checkpointing", "packing",
           "liger", "headroom", "mfu", "use-dora", "bias", "layers-to-transform", "train-tokens"]
VALUES = st.one_of(st.sampled_from(["", "0", "1", "-1", "8", "1e30", "nan", "all-linear", "bf16", "fsdp", "h100",
                                    "24GiB", "llama-3.1-8b", "lora,qlora", "x" * 300, "\u00e9\u0000", "0-3"]),
                   st.text(max_size=12))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=5))
def test_never_a_500(params):
    response = CLIENT.get("/api/plan", params=params)
    assert response.status_code in (200, 400), (params, response.text[:300])
    if response.status_code == 400:
        assert response.json()["error"]["field"]


def test_argv_from_params_by_hand():
    assert api.argv_from_params("estimate", {"model": "gpt2", "grad-checkpointing": "on", "liger": "0",
                                             "alpha": ""}) == ["estimate", "--model", "gpt2", "--grad-checkpointing"]


def test_serve_parses_and_serves(monkeypatch, capsys):
    """`lora-plan serve --port N` hands its options to the server (stood in for here), and says where it listens."""
    from lora_planner.web import app

    calls = []
    monkeypatch.setattr(app, "serve", lambda host, port, open_browser: calls.append((host, port, open_browser)))
    assert main(["serve", "--port", "8123", "--open"]) == 0
    assert calls == [("127.0.0.1", 8123, True)] and "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert main(["serve", "--port", "0"]) == 2

"""`lora-plan models`: the catalog as a table and as JSON, through `main` as a user runs it."""

from __future__ import annotations

import json

import pytest

from lora_planner.catalog import MODEL_CONFIGS, resolve_model
from lora_planner.cli import main
from lora_planner.models_cli import catalog_rows, params_text
from lora_planner.params import count_params


def test_json_lists_every_catalog_model(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(MODEL_CONFIGS)
    by_name = {row["name"]: row for row in rows}
    assert by_name["llama-3.1-405b"] == {
        "name": "llama-3.1-405b", "repo_id": "meta-llama/Llama-3.1-405B", "family": "llama",
        "total_params": 405_853_388_800, "active_params": 405_853_388_800, "embedding_params": 128256 * 16384,
        "context_tokens": 131072, "tied_embeddings": False}
    # MoE: every expert resident, 8 of 128 routed per token (Qwen3-30B-A3B's card: 30.5 B total, 3.3 B active)
    assert (by_name["qwen3-30b-a3b"]["total_params"], by_name["qwen3-30b-a3b"]["active_params"]) == (
        30_532_122_624, 3_353_032_704)
    assert by_name["llama-3.2-1b"]["tied_embeddings"] is True
    assert by_name["gpt2"]["embedding_params"] == 50257 * 768 + 1024 * 768  # token + position embeddings
    for row in rows:
        assert row["total_params"] == count_params(resolve_model(row["name"])).total


def test_family_filter(capsys):
    assert main(["models", "--json", "--family", "mistral"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["family"] for row in rows} == {"mistral"}
    assert "mistral-nemo-12b" in {row["name"] for row in rows}


def test_unknown_family_is_one_line_exit_2(capsys):
    assert main(["models", "--family", "t5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "family" in err and "llama" in err


def test_table_shows_units(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models", "--family", "llama"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-405b" in out and "meta-llama/Llama-3.1-405B" in out
    assert "405.85 B" in out and "131,072" in out and "134.5 M" in out
    assert "tokens" in out and "B = 10^9" in out
    assert "gpt2" not in out


@pytest.mark.parametrize(("n", "text"), [(405_853_388_800, "405.85 B"), (7_248_023_552, "7.25 B"),
                                         (361_821_120, "361.8 M"), (999_999_999, "1.00 B"), (999_900_000, "999.9 M")])
def test_params_text(n, text):
    assert params_text(n) == text


def test_rows_are_frozen():
    row = catalog_rows("gpt2")[0]
    with pytest.raises(AttributeError):
        row.total_params = 0  # type: ignore[misc]

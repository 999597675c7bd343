"""The model catalog (`lora_planner.catalog`): names, aliases, Hugging Face repo ids and their variants, the
local Hugging Face cache for repo ids outside the catalog, and each entry's total against transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_planner.catalog import (
    MODEL_ALIASES, MODEL_CONFIGS, PENDING_MODEL_CONFIGS, cached_config_path, hub_cache_dir, model_names, resolve_model,
)
from lora_planner.config_reader import load_config_json
from lora_planner.errors import PlannerInputError
from lora_planner.params import count_params
from lora_planner.specs import FAMILIES
from tests.hf_reference import meta_model, total_params


def _write(tmp_path, config, filename="config.json"):
    path = tmp_path / filename
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_catalog_config_round_trips_through_a_file(tmp_path, name):
    """A catalog entry written out as config.json reads back to the same spec (the catalog and the
    reader cannot drift apart)."""
    spec = load_config_json(_write(tmp_path, MODEL_CONFIGS[name][1]))
    assert dataclasses.replace(spec, name=name) == resolve_model(name)


# --------------------------------------------------------------------------------------------------
# Catalog names, aliases and Hugging Face repo ids
# --------------------------------------------------------------------------------------------------

def test_model_names_are_the_catalog():
    assert model_names() == tuple(MODEL_CONFIGS)
    assert {c["model_type"] for _, c in MODEL_CONFIGS.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_catalog_name_and_repo_id_resolve(name):
    repo, config = MODEL_CONFIGS[name]
    spec = resolve_model(name)
    assert spec.name == name and spec.family == config["model_type"]
    assert resolve_model(repo) == spec
    assert resolve_model(repo.upper()) == spec
    assert resolve_model(f"  {name.upper()} ") == spec


@pytest.mark.parametrize(("alias", "name"), [
    ("llama-7b", "llama-2-7b"),
    ("llama2-7b", "llama-2-7b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("meta-llama/llama-2-7b-hf", "llama-2-7b"),
    ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
    ("Llama-3-8B-Instruct", "llama-3-8b"),
    ("llama-3.1-8b-instruct", "llama-3.1-8b"),
    ("mistral-7b-v0.1", "mistral-7b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
    ("TinyLlama", "tinyllama-1.1b"),
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
    ("openai-community/gpt2", "gpt2"),
    ("bigscience/bloom-7b1", "bloom-7b1"),
    ("microsoft/phi-2", "phi-2"),
    ("google/gemma-7b", "gemma-7b"),
    # fine-tunes and base repos of the issue-11 entries resolve to the catalogued shapes
    ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b-instruct"),
    ("llama-3.3-70b", "llama-3.3-70b-instruct"),
    ("Qwen/Qwen2.5-14B-Instruct", "qwen2.5-14b"),
    ("mistralai/Mistral-Small-24B-Instruct-2501", "mistral-small-24b"),
    ("Mistral-Small-24B-Base-2501", "mistral-small-24b"),
    ("microsoft/Phi-3-medium-4k-instruct", "phi-3-medium-4k-instruct"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen-7b"),
    ("HuggingFaceTB/SmolLM3-3B", "smollm3-3b"),
    ("HuggingFaceTB/SmolLM3-3B-Base", "smollm3-3b"),
])
def test_aliases_and_repo_ids(alias, name):
    spec = resolve_model(alias)
    assert spec.name == name
    assert count_params(spec).total == count_params(resolve_model(name)).total


def test_every_alias_points_into_the_catalog():
    assert set(MODEL_ALIASES.values()) <= set(MODEL_CONFIGS)
    assert all(alias == alias.lower() for alias in MODEL_ALIASES)


def test_llama_7b_alias_count():
    assert count_params(resolve_model("llama-7b")).total == 6_738_415_616


@pytest.mark.parametrize(("typo", "suggestions"), [
    ("llama-2-7", ("llama-2-7b",)),
    ("llama2-7", ("llama2-7b",)),
    ("qwen2.5-7", ("qwen2.5-7b",)),
    ("mistral", ("mistral-7b",)),
    ("gpt-2", ("gpt2",)),
    ("bloom", ("bloom-7b1",)),
    ("phi2", ("phi-2",)),
    ("gemma7b", ("gemma-7b",)),
])
def test_unknown_model_suggests_close_names(typo, suggestions):
    with pytest.raises(PlannerInputError) as err:
        resolve_model(typo)
    assert err.value.field == "model"
    assert repr(typo) in err.value.problem
    assert "did you mean" in err.value.fix
    for suggestion in suggestions:
        assert suggestion in err.value.fix
    assert "config.json" in err.value.fix


def test_unknown_model_without_close_names_lists_the_catalog():
    with pytest.raises(PlannerInputError) as err:
        resolve_model("zzzzzz")
    assert "did you mean" not in err.value.fix
    for name in MODEL_CONFIGS:
        assert name in err.value.fix


def test_chat_and_instruct_variants_resolve_to_their_base_shapes():
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert resolve_model("mistral-7b-instruct").name == "mistral-7b"


@pytest.mark.parametrize("repo_id, name", [("META-LLAMA/LLAMA-3.1-8B", "llama-3.1-8b"),
                                           ("Qwen/QWEN2.5-7B", "qwen2.5-7b"), (" openai-community/GPT2 ", "gpt2")])
def test_hugging_face_repo_ids_resolve_case_insensitively(repo_id, name):
    assert resolve_model(repo_id).name == name


@pytest.mark.parametrize("name", [
    "x" * 5000, "a/" * 3000 + "config.json", "dir/" + "y" * 300 + "/config.json", "bad\0name", "bad\0name.json",
    "/" + "z" * 4096, "   ", "",
])
def test_odd_model_names_and_paths_are_one_line_errors(name):
    with pytest.raises(PlannerInputError) as err:
        resolve_model(name)
    assert err.value.field == "model" and "\n" not in str(err.value) and len(str(err.value)) < 1500


# --------------------------------------------------------------------------------------------------
# The newer catalog entries (their totals: PUBLISHED_TOTALS in tests/test_params.py, against transformers)
# --------------------------------------------------------------------------------------------------

def test_pending_entries_are_not_registered():
    """Families without rules yet stay out of the catalog (and out of the names that resolve)."""
    assert not set(PENDING_MODEL_CONFIGS) & set(MODEL_CONFIGS)
    assert {c["model_type"] for _, c in PENDING_MODEL_CONFIGS.values()}.isdisjoint(FAMILIES)
    for name, (_, config) in PENDING_MODEL_CONFIGS.items():
        with pytest.raises(PlannerInputError):
            resolve_model(name)


@pytest.mark.parametrize(("repo_id", "name"), [
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ("Qwen/Qwen3-8B", "qwen3-8b"),
    ("qwen/qwen3-0.6b", "qwen3-0.6b"),
    ("allenai/OLMo-2-1124-7B-Instruct", "olmo2-7b"),
    ("allenai/OLMo-2-1124-13B", "olmo2-13b"),
    ("meta-llama/Meta-Llama-3.1-405B-Instruct", "llama-3.1-405b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("qwen/qwen2.5-3b-instruct", "qwen2.5-3b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b-instruct"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "mistral-nemo-12b"),
    ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2-1.7b"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-r1-distill-qwen-1.5b"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
    ("google/gemma-7b-it", "gemma-7b"),
])
def test_fine_tune_repo_ids_resolve_to_their_base_entry(repo_id, name):
    assert resolve_model(repo_id).name == name
    assert resolve_model(repo_id.upper()).name == name


# --------------------------------------------------------------------------------------------------
# Repo ids outside the catalog: a fake local Hugging Face cache (offline)
# --------------------------------------------------------------------------------------------------

SMALL_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _fake_cache(root, repo_id, config, revision="0123abcd" * 5, refs=True):
    """The hub cache layout: blobs/<hash> holds the file, snapshots/<rev>/config.json links to it."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / "c0ffee"
    blob.write_text(json.dumps(config), encoding="utf-8")
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blob)
    if refs:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot / "config.json"


@pytest.fixture(params=["huggingface_hub", "layout"])
def hub_cache(request, tmp_path, monkeypatch):
    """A temporary HF_HUB_CACHE, read through huggingface_hub and through the documented layout (no library)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    if request.param == "layout":
        monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # import -> ImportError
    return tmp_path / "hub"


def test_repo_id_outside_the_catalog_is_read_from_the_local_cache(hub_cache):
    path = _fake_cache(hub_cache, "acme/Tiny-Llama-Test", SMALL_LLAMA)
    assert cached_config_path("acme/Tiny-Llama-Test") == path
    spec = resolve_model("acme/Tiny-Llama-Test")
    assert spec.name == "acme/Tiny-Llama-Test" and spec.family == "llama"
    assert count_params(spec).total == total_params(meta_model(SMALL_LLAMA))


def test_cached_repo_folder_in_another_case_and_without_refs(hub_cache):
    _fake_cache(hub_cache, "Acme/Tiny-Llama-Test", SMALL_LLAMA, refs=False)
    assert resolve_model("acme/tiny-llama-test").hidden_size == 256


def test_hf_home_locates_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    _fake_cache(tmp_path / "hf" / "hub", "acme/other", SMALL_LLAMA)
    assert resolve_model("acme/other").num_layers == 2


def test_uncached_repo_id_says_how_to_pass_a_config_json(hub_cache):
    with pytest.raises(PlannerInputError) as err:
        resolve_model("acme/Not-Downloaded-7B")
    message = str(err.value)
    assert err.value.field == "model" and "\n" not in message
    assert "huggingface-cli download acme/Not-Downloaded-7B config.json" in err.value.fix
    assert "--model path/to/config.json" in err.value.fix and str(hub_cache) in err.value.problem


def test_a_broken_cached_config_is_one_line(hub_cache):
    _fake_cache(hub_cache, "acme/broken", {**SMALL_LLAMA, "hidden_size": "wide"})
    with pytest.raises(PlannerInputError) as err:
        resolve_model("acme/broken")
    assert err.value.field == "acme/broken: hidden_size"


def test_catalog_and_cache_lookup_never_import_huggingface_hub_at_start_up():
    import subprocess
    import sys
    code = ("import sys; import lora_planner.catalog, lora_planner.cli; from lora_planner.catalog import resolve_model;"
            "resolve_model('llama-7b'); print(sorted(m for m in ('huggingface_hub', 'rich', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

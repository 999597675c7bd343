"""Traced profiles (`lora_planner.traced`), pure: the exact fit, the cache key and folder, a hand-built profile
planned through the ordinary pipeline, and the one-line refusals (no torch, encoder-decoder)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from lora_planner import traced
from lora_planner.activations import activation_profile
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.families.base import Module
from lora_planner.params import count_params, lora_params
from lora_planner.specs import LoraSpec, TrainingSpec

LORA_KEY = "lora|bf16|-|sdpa|fp32|r2|L:self_attn.q_proj,self_attn.v_proj|O:"
TINY_CONFIG = {"model_type": "made_up_lm", "hidden_size": 4, "vocab_size": 10}


def tiny_profile(**overrides) -> traced.TracedProfile:
    """A 2-layer model, 4 wide, vocabulary 10: embed 40, per layer norm 4 + q 16 + v 16, final norm 4, lm_head 40."""
    p = "model.layers.0."
    profile = traced.TracedProfile(
        model_type="made_up_lm", config_hash=traced.config_hash(TINY_CONFIG, traced.library_versions()),
        versions=traced.library_versions(), created="2026-11-30 21:00 UTC", trace_s=1.5,
        config=traced.normalised_config(TINY_CONFIG),
        sizes=dict(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=2,
                   intermediate_size=8, tie_word_embeddings=False, max_position_embeddings=64, lm_head_bias=False),
        modules=(Module("model.embed_tokens", "embedding", "embeddings", 10, 4),
                 Module(p + "input_layernorm", "norm", "norms", 4, 4, count=2),
                 Module(p + "self_attn.q_proj", "linear", "attention", 4, 4, count=2),
                 Module(p + "self_attn.v_proj", "linear", "attention", 4, 4, count=2),
                 Module("model.norm", "norm", "norms", 4, 4)),
        buffer_numel=0, fixed_buffer_bytes=0, peft_default_targets=("q_proj", "v_proj"), peft_has_default=False, layer_prefix=p,
        last_linear="self_attn.v_proj",
        # layer 0 (no input gradient) keeps 10 bytes per token; later layers 20 per token + one byte per b s^2
        layers={f"{LORA_KEY}|grad=0": (10, 0, 0, 0, 0, 0), f"{LORA_KEY}|grad=1": (20, 1, 0, 0, 0, 0)},
        # before the layers 8 bytes per position; the head and the loss exactly what the generic rules count
        # (LayerNorm input bf16 + fp32 mean / rstd on CUDA: 16 per token; fp32 log-softmax + int64 targets + 4)
        model_levels={f"{LORA_KEY}|gc=0": traced.ModelLevel(before_layers=(0, 0, 0, 0, 8, 0), head=(16, 0, 0, 0, 0, 0),
                                                            loss=(48, 0, 0, 0, 0, 4), held=(0,) * 6,
                                                            checkpoint_layer=(0,) * 6)})
    return replace(profile, **overrides)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(traced.ENV_CACHE, str(tmp_path / "traced"))


@pytest.mark.parametrize("poly", [(3, 1, 0, 5, 7, 11), (0, 0, 2, 0, 0, 0), (4096, 0, 0, 0, 72, 0)])
def test_solve_exact_recovers_integer_coefficients(poly):
    shapes = [(2, 16), (3, 16), (2, 24), (4, 24), (3, 32), (2, 40), (4, 40), (3, 48)]
    assert traced.solve_exact(shapes, [traced.evaluate(poly, b, s) for b, s in shapes]) == poly


def test_solve_exact_refuses_what_is_not_such_a_polynomial():
    shapes = [(2, 16), (3, 16), (2, 24), (4, 24), (3, 32), (2, 40), (4, 40), (3, 48)]
    values = [traced.evaluate((3, 1, 0, 5, 7, 11), b, s) + (8 if b == 2 else 0) for b, s in shapes]
    with pytest.raises(ValueError):
        traced.solve_exact(shapes, values)


def test_evaluate_by_hand():
    # b=2, s=3: 5*6 + 1*18 + 2*9 + 3*2 + 4*3 + 7 = 30 + 18 + 18 + 6 + 12 + 7
    assert traced.evaluate((5, 1, 2, 3, 4, 7), 2, 3) == 91


def test_cache_key_ignores_what_changes_no_size_and_follows_versions():
    versions = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    base = traced.config_hash(TINY_CONFIG, versions)
    assert traced.config_hash({**TINY_CONFIG, "transformers_version": "4.0", "bos_token_id": 1}, versions) == base
    assert traced.config_hash({**TINY_CONFIG, "hidden_size": 8}, versions) != base
    assert traced.config_hash(TINY_CONFIG, {**versions, "transformers": "5.25.0"}) != base


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(traced.ENV_CACHE, str(tmp_path / "a"))
    assert traced.cache_dir() == tmp_path / "a"
    monkeypatch.delenv(traced.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert traced.cache_dir() == tmp_path / "x" / "lora_planner" / "traced"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert traced.cache_dir() == tmp_path / "h" / ".cache" / "lora_planner" / "traced"


def test_profile_round_trips_through_the_cache():
    profile = tiny_profile()
    traced.save(profile)
    assert traced.load_cached(TINY_CONFIG) == profile
    assert traced.load_cached({**TINY_CONFIG, "hidden_size": 8}) is None


def test_cached_modules_from_another_module_version_still_read():
    """A cache written when `Module` had other fields (issue 12's interim `fused`) or lacked `layers` reads back."""
    profile = tiny_profile()
    data = profile.to_json()
    data["modules"] = [{**{k: v for k, v in m.items() if k != "layers"}, "fused": 1} for m in data["modules"]]
    assert traced.TracedProfile.from_json(data) == profile


@pytest.mark.parametrize("key", [LORA_KEY, "full|fp32|bf16|eager",
                                 "lora|fp16|-|sdpa|base|r16|L:mlp.fc1,self_attn.q_proj|O:lm_head"])
def test_settings_keys_parse_back(key):
    settings = traced.parse_key(key)
    assert settings["method"] in ("full", "lora")
    if settings["method"] == "lora":
        rebuilt = (f"lora|{settings['dtype']}|{settings['amp'] or '-'}|{settings['attention']}|"
                   f"{settings['adapter_dtype']}|r{settings['r']}|L:{','.join(settings['layer_targets'])}|"
                   f"O:{','.join(settings['outside_targets'])}")
        assert rebuilt == key


def test_hand_built_profile_plans_through_the_ordinary_pipeline():
    """Parameters and LoRA counts from the recorded layout; saved bytes from the fitted coefficients."""
    spec = traced.spec_of(tiny_profile(), "tiny")
    assert count_params(spec).total == 40 + 2 * 36 + 4 + 40
    assert lora_params(spec, 2, None).trainable_params == 2 * 2 * 2 * (4 + 4)
    training = TrainingSpec(method="lora", batch_size=2, seq_len=3, lora=LoraSpec(r=2))
    acts = activation_profile(spec, training)
    assert [(count, [t.nbytes for t in saved]) for count, saved in acts.layer_runs] == \
        [(1, [10 * 6]), (1, [20 * 6 + 2 * 9])]
    model = {t.name: t.nbytes for t in acts.model}
    assert model["traced.model_level"] == 8 * 3
    assert not any(name.endswith("traced_difference") or "traced_loss" in name for name in model)


def test_traced_note_names_the_versions():
    profile = tiny_profile()
    spec = traced.spec_of(profile, "tiny")
    note = traced.traced_note(spec.family)
    v = profile.versions
    assert f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}" in note
    assert "2026-11-30 21:00 UTC" in note


@pytest.mark.parametrize("device, scores_per_b_s2, expected", [
    ("cuda", 1, ["CPU kernels", "S x S attention scores", "upper bound"]),
    ("cuda", 0, ["CPU kernels"]),
    ("cpu", 1, []),
])
def test_traced_note_says_when_cpu_kernels_bound_a_cuda_plan(device, scores_per_b_s2, expected):
    """The tiny profile's later layers keep one byte per b s^2 under SDPA (as Falcon's masked SDPA does on CPU)."""
    layers = {f"{LORA_KEY}|grad=0": (10, 0, 0, 0, 0, 0), f"{LORA_KEY}|grad=1": (20, scores_per_b_s2, 0, 0, 0, 0)}
    spec = traced.spec_of(tiny_profile(layers=layers), "tiny")
    note = traced.traced_note(spec.family, device)
    for phrase in expected:
        assert phrase in note
    if not expected:
        assert "CPU kernels" not in note and "upper bound" not in note
    if scores_per_b_s2 == 0:
        assert "upper bound" not in note


def test_missing_settings_without_torch_name_the_install_line(monkeypatch):
    spec = traced.spec_of(tiny_profile(), "tiny")
    monkeypatch.setattr(traced.util, "find_spec", lambda name: None)
    with pytest.raises(PlannerInputError, match=r"pip install 'lora-planner\[profile\]'"):
        activation_profile(spec, TrainingSpec(method="full", batch_size=1, seq_len=8))


def test_uncached_config_without_torch_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(traced.util, "find_spec", lambda name: None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "falcon", "hidden_size": 64}))
    assert main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lora-planner[profile]'" in err[0]


def test_encoder_decoder_is_refused_before_anything_is_imported():
    with pytest.raises(PlannerInputError, match="encoder-decoder"):
        traced.traced_spec({"model_type": "bart", "is_encoder_decoder": True}, "config.json")


def test_the_module_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, lora_planner.traced; "
                           "assert 'torch' not in sys.modules"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_repo_id_in_the_local_hugging_face_cache_plans_from_the_traced_cache(tmp_path, monkeypatch):
    """An unknown repo id whose config.json is in the local HF cache, with a cached profile: planned, no tracing."""
    from lora_planner.catalog import resolve_model

    traced.save(tiny_profile())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    revision = "0123abcd" * 5
    repo = tmp_path / "hub" / "models--acme--made-up-lm"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(TINY_CONFIG))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(traced, "_tracer", lambda: pytest.fail("nothing should be traced"))
    spec = resolve_model("acme/made-up-lm")
    assert spec.family == tiny_profile().family_id and count_params(spec).total == 156


@pytest.mark.parametrize("dtype, expected", [("bf16", 3 * 2 + 16384), ("fp32", 3 * 4 + 16384)])
def test_buffers_that_keep_their_dtype_are_planned_at_their_bytes(dtype, expected):
    """GPT-BigCode's bool causal mask (max_positions^2 bytes) stays bool at any dtype; bf16-built buffers follow it."""
    from lora_planner.params import buffer_bytes

    spec = traced.spec_of(tiny_profile(buffer_numel=3, fixed_buffer_bytes=16384, config_hash="b" * 64), "tiny")
    assert buffer_bytes(spec, dtype) == expected

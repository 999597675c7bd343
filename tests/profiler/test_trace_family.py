"""The traced path's tracer (`lora_planner.profiler.trace_family`), held to transformers, PEFT and fake traces of
the full-size models: three families with no analytic rule (falcon, stablelm, cohere), from their official
config.json fields:

- tiiuae/falcon-7b config.json (https://huggingface.co/tiiuae/falcon-7b/blob/main/config.json): parallel attention,
  multi-query, `alibi` false, `new_decoder_architecture` false, 4544 wide, 71 heads, 32 layers, vocabulary 65024;
- stabilityai/stablelm-2-1_6b config.json (https://huggingface.co/stabilityai/stablelm-2-1_6b/blob/main/config.json):
  partial rotary 0.25, LayerNorm, q/k/v biases (`use_qkv_bias`), `qk_layernorm` false, untied, vocabulary 100352;
- CohereForAI/aya-23-8B config.json (https://huggingface.co/CohereForAI/aya-23-8B/blob/main/config.json), the
  smallest `cohere` model: 4096 wide, 32 layers, GQA 32 / 8, vocabulary 256000, `logit_scale` 0.0625, tied.
  (The same fields appear in mlc-llm's Cohere export script in the code index.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_planner import traced
from lora_planner.cli import main
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import estimate_memory
from lora_planner.params import count_params, lora_params
from lora_planner.profiler.hf_backend import require_hf
from lora_planner.profiler.runner import ProfileRequest, run_profile
from lora_planner.specs import LoraSpec, TrainingSpec

FALCON_7B = {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
             "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
             "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
             "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71,
             "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
             "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024}
STABLELM_2_1_6B = {"architectures": ["StableLmForCausalLM"], "bos_token_id": 100257, "eos_token_id": 100257,
                   "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02,
                   "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
                   "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 24,
                   "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "qk_layernorm": False,
                   "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
                   "use_parallel_residual": False, "use_qkv_bias": True, "vocab_size": 100352}
AYA_23_8B = {"architectures": ["CohereForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
             "bos_token_id": 5, "eos_token_id": 255001, "hidden_act": "silu", "hidden_size": 4096,
             "initializer_range": 0.02, "intermediate_size": 14336, "layer_norm_eps": 1e-05, "logit_scale": 0.0625,
             "max_position_embeddings": 8192, "model_type": "cohere", "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": 0, "rope_theta": 10000,
             "torch_dtype": "float16", "use_cache": True, "use_qk_norm": False, "vocab_size": 256000}
CONFIGS = {"falcon-7b": FALCON_7B, "stablelm-2-1_6b": STABLELM_2_1_6B, "aya-23-8b": AYA_23_8B}
# A tiny stablelm with qk_layernorm on (the option the 1.6B leaves off), for real CPU steps.
TINY_STABLELM = {"model_type": "stablelm", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "partial_rotary_factor": 0.25, "qk_layernorm": True, "use_qkv_bias": True,
                 "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture(scope="module", autouse=True)
def trace_cache(tmp_path_factory):
    """Every test of this module traces into one temporary cache (module scope: each profile is traced once)."""
    folder = tmp_path_factory.mktemp("traced")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(traced.ENV_CACHE, str(folder))
        yield folder


@pytest.fixture(scope="module")
def specs(trace_cache):
    return {name: spec_from_config(config, name) for name, config in CONFIGS.items()}


def meta_model(config: dict):
    transformers, _ = require_hf()
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version",
                                                              "torch_dtype")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_equal_transformers_and_trainable_equals_peft(specs, name):
    _, peft = require_hf()
    spec = specs[name]
    model = meta_model(CONFIGS[name])
    assert count_params(spec).total == sum(p.numel() for p in model.parameters())
    profile = traced.profile_of(spec.family)
    explicit = {"falcon-7b": ("query_key_value", "dense_4h_to_h"), "stablelm-2-1_6b": ("q_proj", "o_proj"),
                "aya-23-8b": ("k_proj", "down_proj")}[name]
    for targets in (None, ("all-linear",), explicit):
        asked = profile.peft_default_targets if targets is None else targets
        config = peft.LoraConfig(r=8, target_modules="all-linear" if asked == ("all-linear",) else list(asked))
        with torch.device("meta"):
            peft_model = peft.get_peft_model(meta_model(CONFIGS[name]), config)
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert lora_params(spec, 8, targets).trainable_params == trainable, targets


def test_peft_defaults_and_the_documented_choice(specs):
    """PEFT 0.21.2 maps falcon to query_key_value and stablelm to q/v; cohere has no entry: q_proj, v_proj, said."""
    defaults = {name: traced.profile_of(spec.family).peft_default_targets for name, spec in specs.items()}
    assert defaults == {"falcon-7b": ("query_key_value",), "stablelm-2-1_6b": ("q_proj", "v_proj"),
                        "aya-23-8b": ("q_proj", "v_proj")}
    assert not traced.profile_of(specs["aya-23-8b"].family).peft_has_default
    spec = specs["falcon-7b"]
    assert (spec.num_kv_heads, spec.tie_word_embeddings, spec.hidden_size) == (1, True, 4544)


# Three full-size fake traces per family (the bar): full, LoRA with the default targets, all-linear +
# gradient checkpointing, each within 0.5 % and in the same phase.
FAKE_CASES = [(name, settings) for name in CONFIGS for settings in (
    dict(method="full", seq_len=128, batch_size=1),
    dict(method="lora", seq_len=256, batch_size=2),
    dict(method="lora", seq_len=256, batch_size=2, grad_checkpointing=True, lora=LoraSpec(target_modules=("all-linear",))),
)]


@pytest.mark.parametrize("name, settings", FAKE_CASES,
                         ids=[f"{n}-{s['method']}{'-gc-all-linear' if s.get('grad_checkpointing') else ''}"
                              for n, s in FAKE_CASES])
def test_traced_planner_matches_fake_traces_of_the_full_size_model(specs, name, settings):
    training = TrainingSpec(dtype="bf16", device="cpu", **settings)
    record = run_profile(ProfileRequest(model=name, spec=specs[name], training=training, mode="fake", steps=2))
    assert record["status"] == "ok", record.get("error")
    assert abs(record["relative_error"]) <= 0.005, (record["predicted"], record["measured"])
    assert record["measured"]["peak_phase"] == record["predicted"]["coarse_phase"]


# GPT-BigCode (StarCoder 1): multi-query attention, 0.1 dropouts by default, and a bool max_positions^2 causal-mask
# buffer that stays bool at any dtype (`Family.fixed_buffer_bytes`).
TINY_BIGCODE = {"model_type": "gpt_bigcode", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4,
                "n_positions": 128, "multi_query": True}


@pytest.mark.parametrize("config, settings", [
    ({**TINY_STABLELM, "qk_layernorm": True}, dict(method="full", dtype="fp32")),
    ({**TINY_STABLELM, "qk_layernorm": True}, dict(method="lora", dtype="fp32", grad_checkpointing=True)),
    # Under CPU autocast the real per-head q / k LayerNorm keeps 40 bytes per token more than its fake-tensor twin
    # (the traced profile equals the fake trace exactly): the AMP case runs without qk_layernorm.
    ({**TINY_STABLELM, "qk_layernorm": False}, dict(method="lora", dtype="fp32", amp="bf16", attention="eager")),
    (TINY_BIGCODE, dict(method="full", dtype="fp32")),
], ids=["stablelm-full", "stablelm-lora-gc", "stablelm-amp-eager", "gpt_bigcode-full"])
def test_traced_planner_matches_real_cpu_steps_byte_for_byte(config, settings):
    spec = spec_from_config(config, "tiny")
    training = TrainingSpec(device="cpu", batch_size=2, seq_len=32, **settings)
    record = run_profile(ProfileRequest(model="tiny", spec=spec, training=training, mode="cpu", steps=2))
    assert record["status"] == "ok", record.get("error")
    assert record["predicted"]["peak_bytes"] == record["measured"]["peak_bytes"], record["measured"]["phases"]


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "t5", "d_model": 64}, "encoder-decoder"),
    ({"model_type": "vit", "hidden_size": 64}, "cannot build it as a causal LM"),
    ({"model_type": "not_a_model", "hidden_size": 64}, "not known to transformers"),
])
def test_unplannable_configs_are_refused_in_one_line(config, needle):
    with pytest.raises(PlannerInputError, match=needle):
        spec_from_config(config, "config.json")


def test_cli_traces_once_then_plans_from_the_cache_without_torch(tmp_path, capsys):
    """The first plan traces (one line on stderr, with the time it took); a second process plans from the cache
    and never imports torch; the output names the versions."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_STABLELM))
    args = ["--model", str(path), "--method", "lora", "--batch-size", "2", "--seq-len", "64", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "tracing" in captured.err and " s" in captured.err
    doc = json.loads(captured.out)
    assert doc["model"]["traced"]["versions"]["transformers"] == traced.library_versions()["transformers"]
    assert any("traced with torch" in w for w in doc["warnings"])
    script = ("import sys, json; from lora_planner.cli import main; rc = main(sys.argv[1:]); "
              "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tracing" not in done.stderr
    assert json.loads(done.stdout)["methods"]["lora"]["peak_allocated_bytes"] == \
        doc["methods"]["lora"]["peak_allocated_bytes"]


def test_traced_profile_is_equal_to_a_fresh_estimate(specs):
    """Planning twice gives the same numbers (the cache round-trips every fitted coefficient)."""
    spec = specs["stablelm-2-1_6b"]
    training = TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=256)
    first = estimate_memory(spec, training).peak_allocated_bytes
    reloaded = traced.load_cached(STABLELM_2_1_6B)
    assert reloaded is not None and any(key.startswith("lora|bf16|-|sdpa|fp32|r8|") for key in reloaded.layers)
    traced.register(reloaded)
    assert estimate_memory(spec, training).peak_allocated_bytes == first

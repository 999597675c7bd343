"""The shared op rules (`lora_planner.families.rules`) that cannot be measured on this machine, by hand: flash-attn 2
(CUDA-only kernels; modelled from Dao-AILab/flash-attention's `flash_attn_interface.py` and `flash_api.cpp`). The rules
that run on the CPU are held to real steps in `tests/test_activations.py`."""

from __future__ import annotations

import pytest

from lora_planner.activations import activation_profile, make_flow
from lora_planner.catalog import resolve_model as get_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.families import family_rules
from lora_planner.families.rules import flash_backward_scratch
from lora_planner.specs import LoraSpec, TrainingSpec

TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
B, S = 2, 64
T = B * S


def layer_saved(spec, **training) -> dict[str, int]:
    flow = make_flow(spec, TrainingSpec(batch_size=B, seq_len=S, **training))
    flow = flow.in_layer(flow.layer_adapters[-1])
    flow.layer_type = (spec.layer_types or (None,))[-1]
    saved: dict[str, int] = {}
    for item in family_rules(spec.family).layer(flow, True):
        saved[item.name] = saved.get(item.name, 0) + item.nbytes
    return saved


def attention_part(saved: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in saved.items() if k.startswith("attn.") or k == "self_attn.o_proj.input"}


def test_flash_attention_full_fine_tuning_by_hand():
    """Full fine-tuning, bf16, b = 2, s = 64, 4 heads of 16, 2 kv heads: q (T x 64), k and v at kv width (T x 32),
    the output (T x 64) in bf16, the (b, heads, s) fp32 log-sum-exp, 2 int64 of RNG state, and o_proj's input, a copy
    (flash's output keeps q's head-major order). SDPA keeps the same but o_proj reads its output without a copy."""
    spec = spec_from_config(TINY, "tiny")
    flash = attention_part(layer_saved(spec, method="full", attention="flash_attention_2"))
    assert flash == {"attn.q_rotated": T * 64 * 2, "attn.k_rotated": T * 32 * 2, "attn.v": T * 32 * 2,
                     "attn.output": T * 64 * 2, "attn.logsumexp": B * 4 * S * 4, "attn.rng_state": 16,
                     "self_attn.o_proj.input": T * 64 * 2}
    sdpa = attention_part(layer_saved(spec, method="full"))
    assert {k: v for k, v in flash.items() if k not in ("attn.rng_state", "self_attn.o_proj.input")} == sdpa


def test_flash_attention_pads_head_dim_to_a_multiple_of_8():
    """head_dim 12 (48 / 4): `F.pad` to 16 channels copies q, k and v, and the output is the padded width."""
    spec = spec_from_config({**TINY, "hidden_size": 48}, "tiny-12")
    flash = attention_part(layer_saved(spec, method="lora", attention="flash_attention_2",
                                       lora=LoraSpec(target_modules=("q_proj", "v_proj"))))
    assert flash["attn.q_rotated"] == flash["attn.output"] == T * 4 * 16 * 2
    assert flash["attn.k_rotated"] == flash["attn.v"] == T * 2 * 16 * 2


def test_flash_attention_casts_qlora_fp32_stream_to_16_bit():
    """QLoRA after kbit preparation: the stream and q / k / v are fp32; transformers casts them to bf16 for flash-attn
    (`fa_peft_integration_check`), so q, k, v and the output are bf16 where SDPA keeps fp32; LoRA on o_proj then
    casts its bf16 input to the fp32 adapter (a copy it keeps) instead of keeping the input."""
    spec = spec_from_config(TINY, "tiny")
    lora = LoraSpec(target_modules=("q_proj", "v_proj", "o_proj"))
    flash = layer_saved(spec, method="qlora", attention="flash_attention_2", lora=lora)
    sdpa = layer_saved(spec, method="qlora", lora=lora)
    assert sdpa["attn.q_rotated"] == T * 64 * 4 and flash["attn.q_rotated"] == T * 64 * 2
    assert flash["attn.output"] == T * 64 * 2 and flash["attn.v"] == T * 32 * 2
    assert flash["self_attn.o_proj.lora_input_cast"] == T * 64 * 4 and "self_attn.o_proj.lora_input_cast" not in sdpa


def test_flash_attention_needs_no_sliding_window_mask():
    """Mistral's 4096 window at s = 8192: SDPA gets an additive (b, 1, s, s) mask and k / v repeated to every head;
    flash-attn takes the window as `window_size`: k / v at kv width, no mask."""
    spec = get_model("mistral-7b")
    flow_kwargs = dict(method="lora", seq_len=8192, batch_size=1)
    sdpa = make_flow(spec, TrainingSpec(**flow_kwargs))
    flash = make_flow(spec, TrainingSpec(attention="flash_attention_2", **flow_kwargs))
    sdpa.layer_type = flash.layer_type = "sliding_attention"
    rules = family_rules("mistral")
    sdpa_saved = {t.name: t.nbytes for t in rules.layer(sdpa, True)}
    flash_saved = {t.name: t.nbytes for t in rules.layer(flash, True)}
    assert sdpa_saved["attn.additive_mask"] == 8192 * 8192 * 2 and "attn.additive_mask" not in flash_saved
    assert flash_saved["attn.k_rotated"] == 8192 * spec.kv_size * 2 < sdpa_saved["attn.k_rotated"]


def test_gemma2_flash_attention_soft_caps_in_the_kernel():
    """Gemma 2 plans eager attention for SDPA (transformers refuses it); flash-attn soft-caps inside the kernel: no
    S x S softmax or tanh, the flash tensors instead."""
    spec = get_model("gemma-2-2b")
    eager = layer_saved(spec, method="lora")
    flash = layer_saved(spec, method="lora", attention="flash_attention_2")
    assert "attn.softmax" in eager and "attn.softcap_tanh" in eager
    assert not any(k in flash for k in ("attn.softmax", "attn.softcap_tanh"))
    assert flash["attn.logsumexp"] == B * spec.num_heads * S * 4 and flash["attn.rng_state"] == 16


def test_flash_backward_scratch_by_hand():
    """`mha_bwd`: the output's gradient, dq, dk, dv, `softmax_d` (b, heads, 128) fp32, `dq_accum` (b, 128, heads,
    32) fp32 (s and head_dim rounded up to 128 and 32), dk / dv expanded to every head (GQA), and the stream's
    incoming gradient. With a 16-wide MLP the attention's backward is the layer's heaviest moment."""
    spec = spec_from_config({**TINY, "intermediate_size": 16}, "tiny-mlp16")
    training = TrainingSpec(method="lora", batch_size=B, seq_len=S, attention="flash_attention_2")
    q, kv = T * 64 * 2, T * 32 * 2
    expected = 2 * q + 2 * kv + B * 4 * 128 * 4 + B * 128 * 4 * 32 * 4 + 2 * q + T * 64 * 2
    assert flash_backward_scratch(make_flow(spec, training)) == expected
    assert activation_profile(spec, training).layer_backward_scratch_bytes == expected
    mlp = (2 * 64 + 3 * 16) * T * 2
    assert activation_profile(spec, TrainingSpec(method="lora", batch_size=B, seq_len=S)) \
        .layer_backward_scratch_bytes == mlp < expected


@pytest.mark.parametrize("model, fragment", [("bloom-7b1", "bloom"), ("gpt2", "gpt2"), ("gpt-oss-20b", "sinks"),
                                             ("deepseek-v2-lite", "latent")])
def test_flash_attention_refused_where_not_modelled(model, fragment):
    with pytest.raises(PlannerInputError) as err:
        make_flow(get_model(model), TrainingSpec(attention="flash_attention_2"))
    assert err.value.field == "attention" and fragment in str(err.value)

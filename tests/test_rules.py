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


# ---------------------------------------------------------------------------------------------- padding and packing


def test_padding_materialises_the_sdpa_mask_in_every_layer_by_hand():
    """A padded batch (b = 2, s = 64): SDPA gets the (b, 1, s, s) mask, converts it to an additive bf16 one it keeps,
    and `repeat_kv` copies k / v to all 4 heads (GQA is off with a mask); eager attention keeps what it keeps
    anyway (its mask always exists)."""
    spec = spec_from_config(TINY, "tiny")
    plain = attention_part(layer_saved(spec, method="lora"))
    padded = attention_part(layer_saved(spec, method="lora", padding=True))
    assert padded["attn.additive_mask"] == B * S * S * 2
    assert padded["attn.k_rotated"] - plain["attn.k_rotated"] == T * (64 - 32) * 2
    assert sum(padded.values()) - sum(plain.values()) == B * S * S * 2 + 2 * T * (64 - 32) * 2
    assert layer_saved(spec, method="lora", attention="eager", padding=True) == \
        layer_saved(spec, method="lora", attention="eager")


def test_packing_is_one_row_of_every_token_by_hand():
    """Packed (b = 2, s = 64): one row of 128 tokens. SDPA: a (1, 1, 128, 128) mask per layer (twice the padded
    batch's b s^2); eager: the S^2 softmax over the row, b times the batch's; flash-attn: varlen, the same tensors as
    an unpacked batch (its log-sum-exp (1, heads, 128) the same bytes)."""
    spec = spec_from_config(TINY, "tiny")
    packed = attention_part(layer_saved(spec, method="lora", packing=True))
    assert packed["attn.additive_mask"] == (B * S) ** 2 * 2
    eager_packed = layer_saved(spec, method="lora", attention="eager", packing=True)
    eager = layer_saved(spec, method="lora", attention="eager")
    assert eager_packed["attn.softmax"] == 4 * (B * S) ** 2 * 4 == B * eager["attn.softmax"]
    assert layer_saved(spec, method="lora", attention="flash_attention_2", packing=True) == \
        layer_saved(spec, method="lora", attention="flash_attention_2")


def test_flash_padding_keeps_the_unpadding_indices():
    """flash-attn with a padding mask runs varlen: each layer's int64 gather indices (worst case every token) and the
    int32 cumulative lengths (b + 1) beside the usual tensors."""
    spec = spec_from_config(TINY, "tiny")
    padded = layer_saved(spec, method="lora", attention="flash_attention_2", padding=True)
    plain = layer_saved(spec, method="lora", attention="flash_attention_2")
    assert {k: v for k, v in padded.items() if k not in plain} == {"attn.unpad_indices": T * 8,
                                                                    "attn.cu_seqlens": (B + 1) * 4}


def test_packed_batch_and_checkpointed_masks_by_hand():
    """Outside the layers: a packed batch carries TRL's int64 position_ids, int32 seq_idx and cumulative lengths (two
    sequences + 1); checkpointing then keeps the (1, 1, T, T) bool mask instead of making position ids; a padded
    batch carries its int64 attention mask."""
    spec = spec_from_config(TINY, "tiny")
    packed = {t.name: t.nbytes for t in activation_profile(spec, TrainingSpec(
        method="lora", batch_size=B, seq_len=S, packing=True, grad_checkpointing=True)).model}
    assert packed["batch.position_ids"] == T * 8 and packed["batch.seq_idx"] == T * 4
    assert packed["batch.cu_seq_lens"] == 3 * 4
    assert packed["checkpoint.attention_mask"] == T * T and "checkpoint.position_ids" not in packed
    padded = {t.name: t.nbytes for t in activation_profile(spec, TrainingSpec(
        method="lora", batch_size=B, seq_len=S, padding=True, grad_checkpointing=True)).model}
    assert padded["batch.attention_mask"] == T * 8 and padded["checkpoint.attention_mask"] == B * S * S


@pytest.mark.parametrize("model", ["gpt2", "bloom-7b1", "phi-2", "deepseek-v2-lite"])
def test_masks_refused_where_not_measured(model):
    with pytest.raises(PlannerInputError) as err:
        make_flow(get_model(model), TrainingSpec(packing=True))
    assert err.value.field == "packing"


def test_padding_and_packing_exclude_each_other():
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(padding=True, packing=True)
    assert err.value.field == "packing"
    assert TrainingSpec(batch_size=4, seq_len=2048, packing=True).rows == (1, 8192)


# ---------------------------------------------------------------------------------------------- Liger's kernels


def test_liger_layer_by_hand():
    """`--liger` on Llama, LoRA q_proj / v_proj, bf16, b = 2, s = 64, without checkpointing: each RMSNorm keeps its
    bf16 input (the residual stream, T x 64) and fp32 1/rms (T) instead of an fp32 copy; SwiGLU keeps gate's and up's
    outputs (2 x T x 176) instead of three intermediates; attention is unchanged (RoPE rotates in place, saving only
    the shared cos / sin)."""
    spec = spec_from_config(TINY, "tiny")
    liger = layer_saved(spec, method="lora", liger=True)
    plain = layer_saved(spec, method="lora")
    assert {k: v for k, v in liger.items() if "layernorm" in k} == {
        "input_layernorm.input": T * 64 * 2, "input_layernorm.rstd": T * 4,
        "post_attention_layernorm.input": T * 64 * 2, "post_attention_layernorm.rstd": T * 4}
    assert {k: v for k, v in liger.items() if k.startswith("mlp.")} == {"mlp.gate_output": T * 176 * 2,
                                                                        "mlp.up_output": T * 176 * 2}
    assert attention_part(liger) == attention_part(plain)
    assert sum(plain.values()) - sum(liger.values()) == 2 * T * 64 * (4 - 2) + T * 176 * 2


def test_liger_norm_under_checkpointing_keeps_no_second_layer_input():
    """Under checkpointing the recomputed input_layernorm's input is the layer's checkpointed input (no second copy);
    the post-attention norm's input is a fresh tensor, kept."""
    spec = spec_from_config(TINY, "tiny")
    saved = layer_saved(spec, method="lora", liger=True, grad_checkpointing=True)
    assert "input_layernorm.input" not in saved and saved["input_layernorm.rstd"] == T * 4
    assert saved["post_attention_layernorm.input"] == T * 64 * 2


def test_liger_full_fine_tuning_norm_keeps_nothing_normalised_and_mlp_backward_is_in_place():
    """Full fine-tuning: the HF norm also keeps the normalised tensor for its weight's gradient, Liger's computes it
    from its input and 1/rms; the layer's backward buffers lose two of the three MLP intermediates' gradients
    (Liger's SwiGLU backward writes them into its saved inputs)."""
    spec = spec_from_config(TINY, "tiny")
    assert "input_layernorm.normalised" in layer_saved(spec, method="full")
    assert "input_layernorm.normalised" not in layer_saved(spec, method="full", liger=True)
    training = TrainingSpec(method="full", batch_size=B, seq_len=S, liger=True)
    assert activation_profile(spec, training).layer_backward_scratch_bytes == (2 * 64 + 176) * T * 2


def test_phi3_liger_mlp_copies_gate_and_up():
    """Phi-3's fused gate_up_proj: Liger's MLP makes gate and up contiguous (two T x I copies) for its SwiGLU, in
    place of HF's fused (T x 2I) storage and the activation's output."""
    spec = get_model("phi-3-mini-4k-instruct")
    liger = layer_saved(spec, method="lora", liger=True)
    inter = T * spec.intermediate_size * 2
    assert (liger["mlp.gate_copy"], liger["mlp.up_copy"]) == (inter, inter) and "mlp.act_output" not in liger


GEMMA = {"model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_liger_gemma_layer_by_hand(model_type):
    """`--liger` on Gemma 2 / 3 (`apply_liger_kernel_to_gemma2` / `_gemma3_text`), LoRA q / v, bf16, b = 2, s = 64: each
    of the four (1 + w) RMSNorms keeps its bf16 input and fp32 1/rms (no fp32 copy, no fp32 (1 + w)); GEGLU keeps gate's
    and up's outputs; Gemma 3's q / k norms keep the projections' bf16 outputs and 1/rms per head and token; the loss
    is the fused linear cross-entropy, the final soft-cap inside its kernel (no tanh tensor)."""
    spec = spec_from_config({**GEMMA, "model_type": model_type}, "tiny-gemma")
    liger = layer_saved(spec, method="lora", liger=True)
    norms = {k: v for k, v in liger.items() if "layernorm" in k}
    assert norms == {f"{n}.{part}": T * (64 * 2 if part == "input" else 4)
                     for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                               "post_feedforward_layernorm") for part in ("input", "rstd")}
    assert {k: v for k, v in liger.items() if k.startswith("mlp.")} == {"mlp.gate_output": T * 176 * 2,
                                                                        "mlp.up_output": T * 176 * 2}
    if model_type == "gemma3_text":
        assert {k: v for k, v in liger.items() if "_norm." in k} == {
            "self_attn.q_norm.input": T * 64 * 2, "self_attn.q_norm.rstd": T * 4 * 4,
            "self_attn.k_norm.input": T * 32 * 2, "self_attn.k_norm.rstd": T * 2 * 4}
    profile = activation_profile(spec, TrainingSpec(method="lora", batch_size=B, seq_len=S, liger=True))
    assert not any(t.name.startswith("loss.logit_softcap") for t in profile.loss)
    assert {t.name for t in profile.loss} == {"loss.flce_grad_input"}


def test_liger_where_it_does_not_patch_or_is_not_modelled():
    """GPT-2: Liger has no patch, the Trainer applies none (the plan is unchanged, transformers' loss); Mixtral: its
    fused MoE experts are not modelled, refused."""
    gpt2 = get_model("gpt2")
    assert activation_profile(gpt2, TrainingSpec(liger=True)) == activation_profile(gpt2, TrainingSpec())
    with pytest.raises(PlannerInputError) as err:
        make_flow(get_model("mixtral-8x7b"), TrainingSpec(liger=True))
    assert err.value.field == "liger"


def test_liger_under_trl_keeps_trls_fused_head():
    """TRL 1.16's SFTTrainer turns Liger's fused linear cross-entropy off under use_liger_kernel and keeps its own
    fused LM head: the layers are Liger's, the loss TRL's."""
    spec = spec_from_config(TINY, "tiny")
    trl_liger = activation_profile(spec, TrainingSpec(batch_size=B, seq_len=S, loss="trl", liger=True))
    assert trl_liger.loss == activation_profile(spec, TrainingSpec(batch_size=B, seq_len=S, loss="trl")).loss
    assert trl_liger.layer == activation_profile(spec, TrainingSpec(batch_size=B, seq_len=S, liger=True)).layer
    assert any(t.name.startswith("loss.trl") for t in trl_liger.loss)


# ---------------------------------------------------------------------------------------------- DoRA


def test_dora_saved_by_hand():
    """PEFT's DoRA on q_proj (64 -> 64) and v_proj (64 -> 32), bf16 base, fp32 adapters, b = 2, s = 64: beside LoRA's
    tensors each keeps its base output (bf16, T x out), B A x (fp32, T x out) and three fp32 (out,) vectors (the norm,
    m / norm, m / norm - 1: the layer's input needs a gradient)."""
    spec = spec_from_config(TINY, "tiny")
    dora = layer_saved(spec, method="lora", lora=LoraSpec(use_dora=True))
    lora = layer_saved(spec, method="lora")
    extra = {k: v for k, v in dora.items() if k not in lora}
    assert extra == {"self_attn.q_proj.dora_base_output": T * 64 * 2, "self_attn.q_proj.dora_lora_result": T * 64 * 4,
                     "self_attn.q_proj.dora_scales": 3 * 64 * 4,
                     "self_attn.v_proj.dora_base_output": T * 32 * 2, "self_attn.v_proj.dora_lora_result": T * 32 * 4,
                     "self_attn.v_proj.dora_scales": 3 * 32 * 4}
    checkpointed = layer_saved(spec, method="lora", grad_checkpointing=True, lora=LoraSpec(use_dora=True))
    assert checkpointed["self_attn.q_proj.dora_recomputed_identity"] == (64 + 8) * 64 * 4


def test_dora_forward_transient_by_hand():
    """down_proj (176 -> 64), T = 128, r = 8: the base output (bf16) and the fp32 input cast held, the 176 x 176
    identity, A I, B A and the base weight's fp32 copy, then the larger of the norm's two out x in temporaries and the
    output's combination (three (out,) vectors, A x, four T x out fp32 products)."""
    from lora_planner.families.rules import dora_forward_scratch

    flow = make_flow(spec_from_config(TINY, "tiny"), TrainingSpec(method="lora", batch_size=B, seq_len=S,
                                                                   lora=LoraSpec(use_dora=True)))
    held = T * 64 * 2 + T * 176 * 4
    weights = 176 * 176 * 4 + 176 * 8 * 4 + 2 * 64 * 176 * 4
    combine = 3 * 64 * 4 + T * 8 * 4 + 4 * T * 64 * 4
    assert dora_forward_scratch(flow, 176, 64, 2, True) == held + weights + max(2 * 64 * 176 * 4, combine)


def test_dora_magnitude_is_trainable():
    """One fp32 magnitude per adapted linear's output: q_proj 64 + v_proj 32 per layer, 2 layers."""
    from lora_planner.memory import estimate_memory

    spec = spec_from_config(TINY, "tiny")
    plain = estimate_memory(spec, TrainingSpec(method="lora"))
    dora = estimate_memory(spec, TrainingSpec(method="lora", lora=LoraSpec(use_dora=True)))
    assert dora.trainable_params - plain.trainable_params == 2 * (64 + 32)


@pytest.mark.parametrize("settings, fragment", [(dict(load_in_8bit=True), "8-bit base"),
                                                (dict(dtype="fp32", amp="bf16"), "autocast")])
def test_dora_refusals(settings, fragment):
    with pytest.raises(PlannerInputError) as err:
        activation_profile(spec_from_config(TINY, "tiny"), TrainingSpec(**{"method": "lora", **settings},
                                                                        lora=LoraSpec(use_dora=True)))
    assert err.value.field == "use_dora" and fragment in err.value.problem


# ---------------------------------------------------------------------------------------------- SDPA's CUDA kernel

@pytest.mark.parametrize("model, training, kernel", [
    ("llama-3.1-8b", dict(), "flash"),  # bf16, no mask, head dim 128: grouped-query attention is fine for flash
    ("llama-3.1-8b", dict(dtype="fp32", amp="bf16"), "flash"),  # autocast: 16-bit q / k / v
    ("llama-3.1-8b", dict(dtype="fp32"), "efficient"),  # fp32: memory-efficient (grouped-query attention allowed)
    ("llama-2-7b", dict(dtype="fp32"), "efficient"),
    ("llama-3.1-8b", dict(padding=True), "efficient"),  # a mask: transformers repeats k / v, flash refuses masks
    ("phi-3-mini-4k", dict(dtype="fp32"), "efficient"),  # fp32, no GQA (32 kv heads)
    ("deepseek-v2-lite", dict(), "efficient"),  # q / k 192 wide, v 128: flash needs equal widths
    ("llama-3.1-8b", dict(device="cpu"), "cpu-flash"),
])
def test_sdpa_kernel_follows_torchs_order(model, training, kernel):
    """torch's dispatch (flash, memory-efficient, math; sdp_utils.cpp's checks) with transformers' enable_gqa."""
    from lora_planner.families.rules import sdpa_kernel

    spec = get_model(model)
    assert sdpa_kernel(make_flow(spec, TrainingSpec(**training)))[0] == kernel


@pytest.mark.parametrize("head_dim, training, kernel", [
    (18, dict(), "flash"),  # 16-bit, no mask: flash takes any head dim up to 256
    (18, dict(padding=True), "math"),  # a mask rules flash out; 18 is no multiple of 8: memory-efficient refuses
    (18, dict(dtype="fp32"), "math"),  # 18 is no multiple of 4 in fp32
    (20, dict(dtype="fp32"), "efficient"),
])
def test_sdpa_kernel_falls_back_to_math_on_unaligned_heads(head_dim, training, kernel):
    from lora_planner.families.rules import sdpa_kernel

    spec = spec_from_config({**TINY, "hidden_size": 4 * head_dim, "head_dim": head_dim}, "tiny-odd-heads")
    assert sdpa_kernel(make_flow(spec, TrainingSpec(**training)))[0] == kernel


def test_memory_efficient_log_sum_exp_is_padded_to_32_rows():
    """Llama-2-7B (32 heads) in fp32 at b = 2, s = 1,000: the memory-efficient kernel's log-sum-exp holds
    2 x 32 x 1,024 fp32 rows (1,000 rounded up to 32), flash's on bf16 2 x 32 x 1,000."""
    from lora_planner.families.rules import logsumexp_saved

    spec = get_model("llama-2-7b")
    efficient = make_flow(spec, TrainingSpec(dtype="fp32", batch_size=2, seq_len=1000))
    flash = make_flow(spec, TrainingSpec(batch_size=2, seq_len=1000))
    assert logsumexp_saved(efficient, 32).nbytes == 2 * 32 * 1024 * 4
    assert logsumexp_saved(flash, 32).nbytes == 2 * 32 * 1000 * 4


def test_sdpa_math_kernel_hand_count():
    """Llama-3.1-8B fp32 (math kernel), b = 1, s = 2,048, a layer whose q / k / v all need a gradient: the scaled q,
    the scaled repeated k and the repeated v (2,048 x 4,096 x 4 bytes each) and the S x S probabilities (32 heads x
    2,048^2 x 4 bytes); with only v needing a gradient, the probabilities alone."""
    from lora_planner.families.rules import sdpa_math

    flow = make_flow(get_model("llama-3.1-8b"), TrainingSpec(dtype="fp32", seq_len=2048))
    tokens_bytes, probs = 2048 * 4096 * 4, 32 * 2048 * 2048 * 4
    assert [(s.name, s.nbytes) for s in sdpa_math(flow, True, True, True)] == [
        ("attn.q_scaled", tokens_bytes), ("attn.k_scaled_repeated", tokens_bytes), ("attn.softmax", probs),
        ("attn.v_repeated", tokens_bytes)]
    assert [(s.name, s.nbytes) for s in sdpa_math(flow, False, False, True)] == [("attn.probs", probs)]


def test_flex_attention_full_fine_tuning_by_hand():
    """FlexAttention (modelled from torch 2.13's source), full fine-tuning, bf16, b = 2, s = 64, 4 heads of 16, 2 kv
    heads: q (T x 64), k and v at kv width (T x 32), the output (T x 64), the fp32 (b, heads, s) log-sum-exp, and
    o_proj's input, a copy (the output keeps q's head-major order); no padding of the head dim, no RNG state. fp32
    stays fp32 (no cast, unlike flash-attn). The BlockMask is model-level: 128-token blocks, one for s = 64."""
    spec = spec_from_config(TINY, "tiny")
    flex = attention_part(layer_saved(spec, method="full", attention="flex_attention"))
    assert flex == {"attn.q_rotated": T * 64 * 2, "attn.k_rotated": T * 32 * 2, "attn.v": T * 32 * 2,
                    "attn.output": T * 64 * 2, "attn.logsumexp": B * 4 * S * 4, "self_attn.o_proj.input": T * 64 * 2}
    fp32 = attention_part(layer_saved(spec, method="full", attention="flex_attention", dtype="fp32"))
    assert fp32["attn.q_rotated"] == T * 64 * 4
    model = {t.name: t.nbytes for t in activation_profile(spec, TrainingSpec(
        method="lora", batch_size=B, seq_len=S, attention="flex_attention")).model}
    assert model["attn.block_mask"] == 4 * B * 4 * (1 + 1)  # kv / q side, partial / full, counts + indices
    flow = make_flow(spec, TrainingSpec(method="lora", batch_size=B, seq_len=S, attention="flex_attention"))
    from lora_planner.families.rules import flex_backward_scratch

    assert flex_backward_scratch(flow) == 2 * T * 64 * 2 + 2 * T * 32 * 2 + B * 4 * S * 4 + T * 64 * 2


def test_flex_attention_block_mask_and_repeated_kv_by_hand():
    """Llama-3.1-8B at 2 x 4,096: 32 blocks a side, 4 x 2 x 4 x (32 + 32 x 32) bytes of BlockMask; Gemma 3 (sliding and
    full layers) has two. A head count that is not a power of two makes transformers repeat k and v (`repeat_kv`):
    they are kept at q width."""
    llama = activation_profile(get_model("llama-3.1-8b"), TrainingSpec(method="lora", batch_size=2, seq_len=4096,
                                                                       attention="flex_attention"))
    assert {t.name: t.nbytes for t in llama.model}["attn.block_mask"] == 4 * 2 * 4 * (32 + 32 * 32)
    gemma3 = activation_profile(get_model("gemma-3-1b"), TrainingSpec(method="lora", batch_size=2, seq_len=4096,
                                                                      attention="flex_attention"))
    assert {t.name: t.nbytes for t in gemma3.model}["attn.block_mask"] == 2 * 4 * 2 * 4 * (32 + 32 * 32)
    odd = spec_from_config({**TINY, "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1}, "odd")
    saved = attention_part(layer_saved(odd, method="full", attention="flex_attention"))
    assert saved["attn.k_rotated"] == saved["attn.v"] == saved["attn.q_rotated"] == T * 48 * 2


@pytest.mark.parametrize("spec, training, needle", [
    ("llama-3.1-8b", dict(device="cpu"), "no backward on the CPU"),
    ("gpt2", dict(), "not planned for gpt2"),
    ("tiny-dropout", dict(), "refuses dropout"),
])
def test_flex_attention_refusals(spec, training, needle):
    model = spec_from_config({**TINY, "attention_dropout": 0.1}, "tiny-dropout") if spec == "tiny-dropout" \
        else get_model(spec)
    with pytest.raises(PlannerInputError, match=needle):
        activation_profile(model, TrainingSpec(**({"method": "lora", "attention": "flex", "seq_len": 512}
                                                  | training)))


def test_qdora_forward_adds_the_dequantized_weight_by_hand():
    """DoRA on a 4-bit base without kbit preparation (bf16 stream, fp32 adapters) holds, beside LoRA-on-bf16 DoRA's
    forward transient, the weight `dequantize_module_weight` makes at the load dtype (out x in x 2 bytes)."""
    from lora_planner.families.rules import dora_forward_scratch

    spec = spec_from_config(TINY, "tiny")
    lora = LoraSpec(r=8, use_dora=True)
    plain = make_flow(spec, TrainingSpec(method="lora", batch_size=B, seq_len=S, lora=lora))
    qdora = make_flow(spec, TrainingSpec(method="qlora", kbit_prep=False, batch_size=B, seq_len=S, lora=lora))
    assert dora_forward_scratch(qdora, 64, 176, 2, True) - dora_forward_scratch(plain, 64, 176, 2, True) == 176 * 64 * 2


def test_liger_olmo2_patches_the_post_norms_not_q_k_norms():
    """`apply_liger_kernel_to_olmo2(model=...)` patches the instance's post-norms and final norm, not q_norm / k_norm:
    the post-norms keep their bf16 input and fp32 1/rms, the q / k norms their fp32 copies as without Liger."""
    spec = spec_from_config({**TINY, "model_type": "olmo2", "head_dim": 16}, "tiny-olmo2")
    liger = layer_saved(spec, method="lora", liger=True)
    plain = layer_saved(spec, method="lora")
    for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
        assert (liger[f"{name}.input"], liger[f"{name}.rstd"]) == (T * 64 * 2, T * 4)
        assert f"{name}.fp32_input" not in liger
    assert {k: v for k, v in liger.items() if "_norm." in k} == {k: v for k, v in plain.items() if "_norm." in k}

"""The memory model (`lora_planner.memory`): exact hand-computed phases on a tiny spec, QLoRA storage,
the seed's rule, and invariants over random settings (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.memory import CATEGORIES, PHASES, DeviceOverhead, estimate_memory, nf4_bytes
from lora_planner.params import module_inventory
from lora_planner.specs import LoraSpec, TrainingSpec

# 2 layers, hidden 8, 2 heads of 4 (1 kv head), MLP 12, vocab 100, untied: 2,600 parameters.
TINY = spec_from_config({"model_type": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 12,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}, "tiny")
B, S = 1, 4
T = B * S


def tiny_training(**kw) -> TrainingSpec:
    base = dict(dtype="bf16", optimizer="adamw", optimizer_impl="for-loop", batch_size=B, seq_len=S, device="cpu",
                lora=LoraSpec(r=2, target_modules=("q_proj", "v_proj")))
    base.update(kw)
    return TrainingSpec(**base)


def phase(estimate, name):
    return next(p.breakdown for p in estimate.phases if p.phase == name)


# Hand-computed pieces (bytes), bf16 weights, B=1, S=4, h=8, q=8, kv=4, I=12, V=100.
# parameters + RoPE inv_freq / original_inv_freq (2 each, head_dim 4), two fp32 tensors whatever the dtype
WEIGHTS_BF16 = 2600 * 2 + 2 * 2 * 4
# fp32 log_softmax, int64 targets, total weight. With B = 1 `labels[..., 1:].contiguous()` copies nothing: the
# targets nll_loss saves are a view of the padded (B, S + 1) labels, which live on with them.
LOSS_SAVED = T * 100 * 4 + B * (S + 1) * 8 + 4
LOSS_VALUE = SEED = 4  # the loss (0-d fp32), alive until backward() returns; backward's seed, ones_like(loss)
LOGITS_FP32 = T * 100 * 4
BATCH = 2 * T * 8
ROTARY = 2 * S * 4 * 2  # cos + sin, (1, S, head_dim) bf16
NORM_X = T * 8 * 4 + T * 4  # fp32 copy of the input + fp32 1/rms


def test_tiny_full_bf16_every_phase_by_hand():
    e = estimate_memory(TINY, tiny_training(method="full"))
    assert e.total_params == e.trainable_params == 2600
    # Per layer: 2 x (norm: fp32 input + rsqrt + bf16 normalised + bf16 output),
    # SDPA: q 64 + k 32 + v 32 + out 64 + fp32 logsumexp (1 x 2 heads x 4) 32; MLP: gate, act, up, product 96 each.
    layer = 2 * (NORM_X + 64 + 64) + (64 + 32 + 32 + 64 + 32) + 4 * 96
    assert layer == 1152
    assert e.activations.layer_bytes == e.activations.first_layer_bytes == layer
    model = BATCH + ROTARY + (NORM_X + 64) + 64  # final norm (+ normalised), lm_head input
    assert e.activations.model_bytes == model
    saved = 2 * layer + model + LOSS_SAVED + LOSS_VALUE
    states = 2 * 2600 * 2 + 21 * 4  # exp_avg + exp_avg_sq (bf16) + a 4-byte `step` for each of 21 tensors
    assert phase(e, "forward_end").as_dict() == {
        "weights": WEIGHTS_BF16, "gradients": 0, "optimizer_states": states, "activations": saved,
        # bf16 logits + their fp32 upcast (B = 1: no padded-labels copy; lm_head keeps its input: saved)
        "temporaries": T * 100 * 2 + LOGITS_FP32}
    # nll_loss's targets and total weight are freed once its backward ran: log_softmax's output and the loss stay
    assert phase(e, "backward_start").activations_bytes == saved - B * (S + 1) * 8 - 4
    assert phase(e, "backward_start").temporaries_bytes == SEED + 2 * LOGITS_FP32
    opt = phase(e, "optimizer_step")
    # for-loop AdamW: two temporary copies of the largest tensor (embedding / lm_head, 800 x 2 bytes).
    assert opt.as_dict() == {"weights": WEIGHTS_BF16, "gradients": 5200, "optimizer_states": states,
                             "activations": BATCH, "temporaries": 2 * 1600}
    assert e.peak_phase == "optimizer_step"
    assert e.peak_allocated_bytes == WEIGHTS_BF16 + 5200 + states + BATCH + 3200 == 24164
    assert e.seed_rule_bytes == 4 * 5200


def test_tiny_lora_bf16_every_phase_by_hand():
    e = estimate_memory(TINY, tiny_training(method="lora"))
    # q: 2 x (8 + 8), v: 2 x (8 + 4) per layer, fp32 adapters.
    assert e.trainable_params == 2 * (32 + 24) == 112
    adapters = 112 * 4
    lora_in = 2 * (T * 8 * 4 + T * 2 * 4)  # q and v: own fp32 input copy + fp32 A x, each
    sdpa = 64 + 32 + 32 + 64 + 32
    mlp = 3 * 96  # frozen down_proj keeps nothing
    layer = NORM_X + lora_in + sdpa + NORM_X + mlp
    first = lora_in + sdpa + NORM_X + mlp  # frozen embeddings: nothing reaches the first norm
    assert (e.activations.layer_bytes, e.activations.first_layer_bytes) == (layer, first) == (1120, 976)
    model = BATCH + ROTARY + NORM_X
    weights = WEIGHTS_BF16 + adapters
    states = 2 * adapters + 8 * 4
    # frozen lm_head keeps no input; LlamaForCausalLM.forward still holds the final hidden state (bf16) at the loss
    assert phase(e, "forward_end").temporaries_bytes == T * 100 * 2 + LOGITS_FP32 + T * 8 * 2
    start = phase(e, "backward_start")
    # log_softmax's output and the loss value; the targets and total weight went with nll_loss's backward
    kept = layer + first + model + LOGITS_FP32 + LOSS_VALUE
    assert start.as_dict() == {"weights": weights, "gradients": 0, "optimizer_states": states,
                               "activations": kept, "temporaries": SEED + 2 * LOGITS_FP32}
    assert e.peak_phase == "backward_start"
    assert e.peak_allocated_bytes == start.total_bytes == 13768
    m = 112 / (2600 + 112)
    assert e.trainable_fraction == pytest.approx(m)
    assert e.seed_rule_bytes == round((1 + 4 * m) * 5200)


def test_gradient_checkpointing_keeps_layer_inputs_and_recomputes_one_layer():
    plain = estimate_memory(TINY, tiny_training(method="full"))
    ckpt = estimate_memory(TINY, tiny_training(method="full", grad_checkpointing=True))
    assert ckpt.activations.checkpoint_per_layer_bytes == T * 8 * 2
    fwd = phase(ckpt, "forward_end").activations_bytes
    assert fwd == 2 * T * 8 * 2 + ckpt.activations.model_bytes + ckpt.activations.loss_bytes + LOSS_VALUE
    assert fwd < phase(plain, "forward_end").activations_bytes
    layers = phase(ckpt, "backward_layers").activations_bytes
    # the final norm's and lm_head's saved tensors went with their backward, before the layers'
    assert layers == 2 * T * 8 * 2 + ckpt.activations.model_bytes_below_head + ckpt.activations.layer_bytes + LOSS_VALUE
    assert ckpt.activations.model_bytes_below_head < ckpt.activations.model_bytes


def test_breakdown_at_peak_adds_up_and_every_phase_is_reported():
    e = estimate_memory(resolve_model("llama-3-8b"), TrainingSpec(method="lora", batch_size=4, seq_len=2048))
    assert tuple(p.phase for p in e.phases) == tuple(p for p in PHASES if p not in (
        "reference_forward", "generation", "scoring", "kl_forward"))  # (DPO's, GRPO's, KTO's only)
    assert sum(e.peak.breakdown.as_dict().values()) == e.peak_allocated_bytes
    assert set(e.peak.breakdown.as_dict()) == set(CATEGORIES)
    assert e.peak_allocated_bytes == max(p.breakdown.total_bytes for p in e.phases)


def test_nf4_storage_follows_the_qlora_paper():
    numel = 4096 * 4096
    # 4-bit values + one 8-bit constant per 64 + one fp32 constant per 256 blocks: 4.127 bits per parameter,
    # + the quantization state's code books and offset (16 + 1 + 256 fp32, measured on bitsandbytes 0.50.2).
    assert nf4_bytes(numel) == numel // 2 + numel // 64 + 4 * (numel // 64 // 256) + (16 + 1 + 256) * 4
    assert nf4_bytes(numel) * 8 / numel == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-3)


@pytest.mark.parametrize("kbit_prep, bytes_per_other_param", [(False, 2), (True, 4)])
def test_qlora_stores_linears_in_nf4_and_the_rest_at_16_or_32_bit(kbit_prep, bytes_per_other_param):
    """Without PEFT's prepare_model_for_kbit_training the embeddings, norms and lm_head stay bf16; with
    it (the default, as TRL runs QLoRA) they are cast to fp32: 2 x 131.07 M + 266 K params x 2 bytes more."""
    spec = resolve_model("llama-2-7b")
    q = estimate_memory(spec, TrainingSpec(method="qlora", kbit_prep=kbit_prep))
    linear_numel = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert q.weights_at_dtype_bytes == (32 * (4 * nf4_bytes(4096 * 4096) + 3 * nf4_bytes(4096 * 11008))
                                        + bytes_per_other_param * (6_738_415_616 - linear_numel))
    lora = estimate_memory(spec, TrainingSpec(method="lora"))
    assert q.peak_allocated_bytes < lora.peak_allocated_bytes


def test_kbit_prep_costs_about_2_gib_on_llama_3_1_8b():
    """The issue's case: the fp32 cast of 1.05 B embedding + lm_head parameters is +1.96 GiB of weights
    alone; the fp32 stream adds activations."""
    spec = resolve_model("llama-3.1-8b")
    on, off = (estimate_memory(spec, TrainingSpec(method="qlora", kbit_prep=k)) for k in (True, False))
    extra_weights = on.weights_at_dtype_bytes - off.weights_at_dtype_bytes
    assert extra_weights == 2 * (2 * 128256 * 4096 + 65 * 4096)  # embed + lm_head + 65 RMSNorms, 2 -> 4 bytes
    assert on.peak_allocated_bytes - off.peak_allocated_bytes > extra_weights


def test_kbit_prep_only_applies_to_qlora():
    spec = resolve_model("llama-3.2-1b")
    for method in ("full", "lora"):
        a, b = (estimate_memory(spec, TrainingSpec(method=method, kbit_prep=k)) for k in (True, False))
        assert a.phases == b.phases


def test_kbit_prep_weights_equal_a_real_prepared_bitsandbytes_model(tmp_path):
    """Every parameter that is not NF4 after peft.prepare_model_for_kbit_training is fp32; the first forward casts
    the quantized linears' biases back to bf16 for good; and the planner's non-NF4 bytes equal that steady state's
    storage (tiny Llama, real bitsandbytes 4-bit on its CPU backend)."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (test extra)")
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.hf_reference import hf_config

    config = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True}
    AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16,
                                                 quantization_config=quant)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    other = [p for p in model.parameters() if p.__class__.__name__ != "Params4bit"]
    assert {p.dtype for p in other} == {torch.float32}
    # bitsandbytes 0.50 `Linear4bit.forward`: x goes to the compute dtype, then `bias.data = bias.data.to(x.dtype)`.
    model.train()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    biases = {id(m.bias) for m in model.modules() if m.__class__.__name__ == "Linear4bit" and m.bias is not None}
    assert len(biases) == 2 * 4 and {p.dtype for p in other if id(p) in biases} == {torch.bfloat16}
    assert {p.dtype for p in other if id(p) not in biases} == {torch.float32}
    spec = spec_from_config(config, "tiny")
    planner_nf4 = sum(nf4_bytes(m.weight_numel_each) * m.count for m in module_inventory(spec)
                      if m.kind == "linear" and m.group != "lm_head")
    q = estimate_memory(spec, TrainingSpec(method="qlora"))
    assert q.weights_at_dtype_bytes - planner_nf4 == sum(p.numel() * p.element_size() for p in other)
    # Each NF4 tensor: its packed storage and every tensor of its quantization state, to the byte.
    measured_nf4 = 0
    for p in model.parameters():
        if p.__class__.__name__ == "Params4bit":
            qs = p.quant_state
            tensors = [p.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            measured_nf4 += sum(t.untyped_storage().nbytes() for t in tensors)
    assert measured_nf4 == planner_nf4


EMBED_7B = 32000 * 4096


@pytest.mark.parametrize("optimizer, state_bytes_per_param", [
    ("adamw", 2 * 2), ("sgd", 0), ("sgd_momentum", 2),
    # 8-bit: two 1-byte states + an fp32 absmax per 256 values, but the embedding's states stay fp32 (Trainer)
    ("adamw8bit", (2 + 2 * 4 / 256) * (1 - EMBED_7B / 6_738_415_616) + 8 * EMBED_7B / 6_738_415_616),
    ("paged_adamw8bit", (2 + 2 * 4 / 256) * (1 - EMBED_7B / 6_738_415_616) + 8 * EMBED_7B / 6_738_415_616)])
def test_optimizer_state_per_parameter_full_7b(optimizer, state_bytes_per_param):
    e = estimate_memory(resolve_model("llama-2-7b"), TrainingSpec(method="full", optimizer=optimizer))
    per_param = e.peak.breakdown.optimizer_states_bytes / e.trainable_params
    assert per_param == pytest.approx(state_bytes_per_param, rel=2e-3)


def test_foreach_scratch_is_one_copy_of_trainable_params():
    spec = resolve_model("llama-2-7b")
    foreach = estimate_memory(spec, TrainingSpec(method="full", optimizer_impl="foreach"))
    fused = estimate_memory(spec, TrainingSpec(method="full", optimizer_impl="fused"))
    assert phase(foreach, "optimizer_step").temporaries_bytes == 6_738_415_616 * 2
    assert phase(fused, "optimizer_step").temporaries_bytes == 0


def test_amp_keeps_fp32_master_weights_and_16_bit_copies():
    spec = resolve_model("gpt2")
    amp = estimate_memory(spec, TrainingSpec(method="full", dtype="fp32", amp="bf16"))
    assert amp.peak.breakdown.weights_bytes == 124_439_808 * 4
    names = {t.name for t in amp.activations.layer}
    assert "attn.c_attn.weight_autocast_copy" in names


def test_device_overhead_only_on_cuda():
    overhead = DeviceOverhead(cuda_context_bytes=100, allocator_fraction=0.5)
    cuda = estimate_memory(TINY, tiny_training(method="full", device="cuda"), overhead)
    cpu = estimate_memory(TINY, tiny_training(method="full", device="cpu"), overhead)
    assert cuda.device_overhead_bytes == 100 + -(-cuda.peak_allocated_bytes // 2)
    assert cpu.device_overhead_bytes == 0
    assert cpu.peak_device_bytes == cpu.peak_allocated_bytes


def test_all_linear_lora_can_need_more_activation_memory_than_full():
    """A measured fact, not a bug: each adapter keeps its own fp32 copy of its input on a bf16 base."""
    spec = resolve_model("llama-2-7b")
    full = estimate_memory(spec, TrainingSpec(method="full"))
    lora = estimate_memory(spec, TrainingSpec(method="lora", lora=LoraSpec(target_modules=("all-linear",))))
    assert lora.activations.layer_bytes > full.activations.layer_bytes


# ---------------------------------------------------------------------------------------------- invariants

MODELS = st.sampled_from(["llama-2-7b", "llama-3.2-1b", "qwen2.5-0.5b", "gemma-7b", "phi-2", "gpt2", "bloom-7b1",
                          "mistral-7b"])
SETTINGS = st.fixed_dictionaries({
    "dtype": st.sampled_from(["bf16", "fp16", "fp32"]),
    "optimizer": st.sampled_from(["adamw", "adamw8bit", "sgd", "adafactor"]),
    "optimizer_impl": st.sampled_from(["foreach", "for-loop", "fused"]),
    "batch_size": st.integers(1, 16),
    "seq_len": st.integers(1, 4096),
    "grad_checkpointing": st.booleans(),
    "attention": st.sampled_from(["sdpa", "eager"]),
    "device": st.sampled_from(["cuda", "cpu"]),
})


def _peak(name: str, method: str, settings_: dict, r: int = 8, targets=None) -> int:
    spec = resolve_model(name)
    if spec.family == "gpt2":  # learned positions: sequences end at n_positions (params.check_sequence_length)
        settings_ = {**settings_, "seq_len": min(settings_["seq_len"], spec.max_position_embeddings)}
    training = TrainingSpec(method=method, lora=LoraSpec(r=r, target_modules=targets), **settings_)
    return estimate_memory(spec, training).peak_allocated_bytes


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(MODELS, SETTINGS, st.sampled_from(["full", "lora", "qlora"]), st.sampled_from(["batch_size", "seq_len"]),
       st.integers(1, 64))
def test_peak_grows_with_batch_and_sequence(name, settings_, method, knob, extra):
    if method == "qlora" and settings_["dtype"] == "fp32":
        settings_ = {**settings_, "dtype": "bf16"}
    bigger = {**settings_, knob: settings_[knob] + extra}
    assert _peak(name, method, bigger) >= _peak(name, method, settings_)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(MODELS, SETTINGS, st.sampled_from(["lora", "qlora"]), st.integers(1, 64), st.integers(1, 64))
def test_peak_grows_with_rank(name, settings_, method, r, extra):
    if method == "qlora" and settings_["dtype"] == "fp32":
        settings_ = {**settings_, "dtype": "bf16"}
    assert _peak(name, method, settings_, r=r + extra) >= _peak(name, method, settings_, r=r)


ATTENTION_TARGETS = {"gpt2": ("c_attn",), "bloom-7b1": ("query_key_value",)}


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(MODELS, SETTINGS, st.integers(1, 64))
def test_lora_on_attention_never_needs_more_than_full(name, settings_, r):
    """Holds for attention targets and per-parameter optimizer state. It fails in two measured corners: with
    MLP targets (Phi's PEFT default includes fc1/fc2) the adapters' fp32 input copies can outweigh full
    fine-tuning's savings when activations dominate (next test), and with Adafactor's factored (tiny) state
    the fp32 adapters can outweigh it (so can plain SGD's, none at all) when the peak is the loss backward, before any gradient exists."""
    if settings_["optimizer"] in ("adafactor", "torch_adafactor", "sgd"):  # no per-parameter state
        settings_ = {**settings_, "optimizer": "adamw"}
    targets = ATTENTION_TARGETS.get(name, ("q_proj", "v_proj"))
    assert _peak(name, "lora", settings_, r=r, targets=targets) <= _peak(name, "full", settings_)


def test_lora_on_mlp_can_exceed_full_when_activations_dominate():
    settings_ = dict(dtype="bf16", optimizer="torch_adafactor", batch_size=12, seq_len=73, attention="eager", device="cpu")
    assert _peak("phi-2", "lora", settings_, r=1) > _peak("phi-2", "full", settings_)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(MODELS, SETTINGS, st.integers(1, 64))
def test_qlora_never_needs_more_than_lora(name, settings_, r):
    """Without kbit preparation; with it (fp32 embeddings and stream) QLoRA can exceed LoRA on small models,
    `tests/test_planner.py::test_qlora_as_trl_runs_it_can_exceed_lora_on_a_small_model`."""
    settings_ = {**settings_, "dtype": "bf16" if settings_["dtype"] == "fp32" else settings_["dtype"],
                 "kbit_prep": False}
    assert _peak(name, "qlora", settings_, r=r) <= _peak(name, "lora", settings_, r=r)


def test_training_spec_is_hashable_and_replace_keeps_validation():
    t = TrainingSpec()
    assert hash(t) == hash(replace(t))
    with pytest.raises(ValueError, match="batch_size"):
        replace(t, batch_size=0)


def test_embedding_tensors_are_marked_for_the_trainers_32_bit_8bit_optimizer_rule():
    """The Trainer keeps nn.Embedding states in 32-bit under 8-bit bitsandbytes optimizers: memory must
    tell the optimizer model which trainable tensors are embeddings."""
    from lora_planner.memory import trainable_groups

    groups = trainable_groups(resolve_model("llama-3-8b"), TrainingSpec(method="full", optimizer="adamw8bit"))
    assert [g.shape for g in groups if g.embedding] == [(128256, 4096)]


def test_lora_bias_is_trained_not_stored_twice():
    """PEFT's bias="all" on Qwen2.5-7B (q / k / v biases, 28 layers x (3,584 + 512 + 512) = 129,024, bf16): the weights
    stay as they are (the biases are base parameters), the gradients and the fused AdamW states grow by 2 and 4 bytes
    per bias (+ the fp32 `step` fused AdamW keeps on the device per tensor: 84 of them), and nothing is saved for
    backward (a bias's gradient is its output's, summed)."""
    spec = resolve_model("qwen2.5-7b")
    base = TrainingSpec(method="lora", seq_len=1024)
    plain, biased = estimate_memory(spec, base), estimate_memory(spec, replace(base, lora=LoraSpec(bias="all")))
    assert biased.trainable_params - plain.trainable_params == 129_024
    by_phase = {p.phase: p.breakdown for p in plain.phases}
    for p in biased.phases:
        assert p.breakdown.weights_bytes == by_phase[p.phase].weights_bytes
        assert p.breakdown.optimizer_states_bytes - by_phase[p.phase].optimizer_states_bytes == 2 * 129_024 * 2 + 84 * 4
    end = {p.phase: p.breakdown for p in biased.phases}["optimizer_step"]
    assert end.gradients_bytes - by_phase["optimizer_step"].gradients_bytes == 129_024 * 2
    assert biased.activations.model == plain.activations.model


def test_nf4_without_double_quantization():
    """bnb_4bit_use_double_quant=False (bitsandbytes 0.50.2 `quantize_4bit`, compress_statistics=False): the packed
    4-bit values, an fp32 absmax per 64 weights and the 16-entry fp32 code book: 4096 x 4096 -> 8,388,608 + 4 x
    262,144 + 64 = 9,437,248 bytes, 0.5625 bytes a weight (double quantization: 8,655,940); only the weights change."""
    assert nf4_bytes(4096 * 4096, double_quant=False) == 8_388_608 + 4 * 262_144 + 64 == 9_437_248
    assert nf4_bytes(4096 * 4096) == 8_388_608 + 262_144 + 4 * 1024 + 1092 == 8_655_940
    spec = resolve_model("llama-2-7b")
    dq = estimate_memory(spec, TrainingSpec(method="qlora", seq_len=512))
    plain = estimate_memory(spec, TrainingSpec(method="qlora", seq_len=512, double_quant=False))
    linears = [m for m in module_inventory(spec) if m.kind == "linear" and m.group != "lm_head"]
    extra = sum((nf4_bytes(m.weight_numel_each, False) - nf4_bytes(m.weight_numel_each)) * m.count for m in linears)
    assert plain.peak.breakdown.weights_bytes - dq.peak.breakdown.weights_bytes == extra > 0
    assert plain.activations == dq.activations


def test_int8_base_stores_int8_weights_with_fp32_row_scales():
    """LLM.int8 (`load_in_8bit`) on Llama-3.1-8B: every layer linear one byte per weight and an fp32 absmax per output
    row (bitsandbytes `Int8Params`: CB, SCB); kbit preparation casts the rest to fp32 (embeddings, lm_head, 65 norms),
    as for QLoRA. Without it they stay bf16."""
    spec = resolve_model("llama-3.1-8b")
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    rows = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096
    other = 2 * 128256 * 4096 + 65 * 4096
    for kbit_prep, e in ((True, 4), (False, 2)):
        plan = estimate_memory(spec, TrainingSpec(method="lora", load_in_8bit=True, kbit_prep=kbit_prep))
        assert plan.weights_at_dtype_bytes == 32 * (per_layer + 4 * rows) + e * other
    with pytest.raises(PlannerInputError, match="carries LoRA adapters"):
        TrainingSpec(method="qlora", load_in_8bit=True)
    for kw, field_ in ((dict(gpus=2, strategy="fsdp"), "strategy"),
                       (dict(grad_checkpointing=True, activation_offload="torchtune"), "activation_offload"),
                       (dict(load_in_8bit="yes"), "load_in_8bit")):
        with pytest.raises(PlannerInputError) as err:
            TrainingSpec(**({"method": "lora", "load_in_8bit": True} | kw))
        assert err.value.field == field_
    assert TrainingSpec(method="lora", load_in_8bit=True, gpus=2).resolved_strategy == "ddp"


def test_bnb_4bit_compute_dtype_adds_the_cast_copy_of_the_dequantized_weight():
    """`MatMul4Bit.backward` dequantizes at the load dtype, then casts to `bnb_4bit_compute_dtype`: with fp32 compute
    over bf16 weights both copies of the largest weight (Llama-3.1-8B's MLP, 14,336 x 4,096) live at once, 2 + 4
    bytes a weight instead of 2 (counted on top of the layer's buffers: an upper bound, README Known limitations)."""
    from lora_planner.step import step_components

    spec = resolve_model("llama-3.1-8b")
    base = step_components(spec, TrainingSpec(method="qlora"))
    fp32 = step_components(spec, TrainingSpec(method="qlora", bnb_4bit_compute_dtype="float32"))
    assert fp32.layer_scratch - base.layer_scratch == 14336 * 4096 * 4
    assert TrainingSpec(method="qlora", bnb_4bit_compute_dtype="torch.float16").matmul_4bit_dtype == "fp16"
    assert TrainingSpec(method="qlora").matmul_4bit_dtype == "bf16"
    with pytest.raises(PlannerInputError, match="bnb_4bit_compute_dtype"):
        TrainingSpec(method="qlora", bnb_4bit_compute_dtype="int4")


def test_the_cache_serves_full_fine_tuning_at_any_rank():
    """Full fine-tuning has no adapters: one cached estimate serves every rank (the page's "memory vs r" sweep), and it
    is the uncached estimate's."""
    from lora_planner.catalog import resolve_model
    from lora_planner.memory import estimate_memory_cached
    from lora_planner.specs import LoraSpec

    spec = resolve_model("llama-3.1-8b")
    first = estimate_memory_cached(spec, TrainingSpec(method="full", lora=LoraSpec(r=4, alpha=8.0)))
    assert estimate_memory_cached(spec, TrainingSpec(method="full", lora=LoraSpec(r=256))) is first
    assert first.phases == estimate_memory(spec, TrainingSpec(method="full", lora=LoraSpec(r=64))).phases
    lora = estimate_memory_cached(spec, TrainingSpec(method="lora", lora=LoraSpec(r=4)))
    assert estimate_memory_cached(spec, TrainingSpec(method="lora", lora=LoraSpec(r=256))) is not lora

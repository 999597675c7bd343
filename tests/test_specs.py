"""Validated settings (`lora_planner.specs`) and the error type (`lora_planner.errors`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_planner.defaults import DEFAULT_SEQ_LEN
from lora_planner.errors import PlannerInputError
from lora_planner.specs import (
    MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, MODEL_SIZE_LIMITS, LoraSpec, ModelSpec, TrainingSpec,
)


def test_defaults():
    t = TrainingSpec()
    assert (t.method, t.dtype, t.optimizer, t.batch_size, t.seq_len, t.device) == ("lora", "bf16", "adamw", 1, DEFAULT_SEQ_LEN, "cuda")
    # The Hugging Face Trainer's default optimizer, adamw_torch_fused, on every device.
    assert t.resolved_optimizer_impl == "fused" and TrainingSpec(device="cpu").resolved_optimizer_impl == "fused"
    assert "adamw_torch_fused" in t.optimizer_impl_reason
    # The other torch optimizers keep PyTorch's own choice.
    assert TrainingSpec(optimizer="sgd").resolved_optimizer_impl == "foreach"
    assert TrainingSpec(optimizer="sgd", device="cpu").resolved_optimizer_impl == "for-loop"
    assert t.compute_dtype == "bf16" and TrainingSpec(dtype="fp32", amp="fp16").compute_dtype == "fp16"
    assert LoraSpec(r=8).effective_alpha == 16 and LoraSpec(r=8, alpha=32).scaling == 4
    # rsLoRA: alpha / sqrt(r)
    assert LoraSpec(r=16, use_rslora=True).scaling == 8 and LoraSpec(r=4, alpha=6, use_rslora=True).scaling == 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="prefix"), "method"),
    (dict(dtype="int8"), "dtype"),
    (dict(optimizer="lion_4bit"), "optimizer"),
    (dict(optimizer="galore_adamw"), "optimizer"),  # refused: not modelled
    (dict(optimizer="rmsprop", optimizer_impl="fused"), "optimizer_impl"),  # torch's RMSprop has no fused kernel
    (dict(optimizer="adamw_torch_fused", optimizer_impl="foreach"), "optimizer_impl"),  # contradicts the name
    (dict(attention="flash_attention_3"), "attention"),  # refused until its kernel is modelled
    (dict(attention="flash_attention_2", device="cpu"), "attention"),  # flash-attn is CUDA only
    (dict(attention="flash_attention_2", dtype="fp32"), "attention"),  # and 16-bit only
    (dict(dtype="float64"), "dtype"),
    (dict(optimizer_impl="cuda-graph"), "optimizer_impl"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-5), "seq_len"),
    (dict(batch_size=True), "batch_size"),
    (dict(device="tpu"), "device"),
    (dict(attention="flex", device="cpu"), "attention"),  # FlexAttention has no backward on the CPU
    (dict(attention="flash_attention_3"), "attention"),
    (dict(amp="bf16"), "amp"),  # needs fp32 master weights
    (dict(dtype="fp32", amp="fp8"), "amp"),
    (dict(method="qlora", dtype="fp32"), "dtype"),
])
def test_training_spec_rejects(kwargs, field):
    with pytest.raises(PlannerInputError) as err:
        TrainingSpec(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_qlora_under_autocast_is_allowed():
    assert TrainingSpec(method="qlora", dtype="fp32", amp="bf16").compute_dtype == "bf16"


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=-1), "r"), (dict(r=2.5), "r"), (dict(alpha=0), "alpha"),
    (dict(target_modules=()), "target"), (dict(target_modules=("q_proj", " ")), "target"),
    (dict(adapter_dtype="fp8"), "adapter_dtype"), (dict(use_rslora="yes"), "use_rslora"),
])
def test_lora_spec_rejects(kwargs, field):
    with pytest.raises(PlannerInputError) as err:
        LoraSpec(**kwargs)
    assert err.value.field == field


def test_model_spec_rejects_kv_heads_that_do_not_divide_heads():
    with pytest.raises(PlannerInputError, match="num_key_value_heads"):
        ModelSpec(name="x", family="llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=3,
                  head_dim=2, intermediate_size=8, tie_word_embeddings=False)


def test_error_message_is_one_line_with_field_problem_and_fix():
    err = PlannerInputError("r", "must be positive", "pass --r 8")
    assert str(err) == "r: must be positive; pass --r 8" and "\n" not in str(err)


def test_default_optimizer_is_what_the_pinned_transformers_trainer_uses():
    """transformers' TrainingArguments picks `optim` on import (adamw_torch_fused on torch >= 2.8)."""
    transformers = pytest.importorskip("transformers")
    import dataclasses

    default = next(f.default for f in dataclasses.fields(transformers.TrainingArguments) if f.name == "optim")
    t = TrainingSpec(optimizer=default)
    assert (t.optimizer, t.resolved_optimizer_impl) == (TrainingSpec().optimizer, TrainingSpec().resolved_optimizer_impl)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(optimizer="adamw_torch_fused"), ("adamw", "fused")),
    (dict(optimizer="adamw_torch"), ("adamw", "foreach")),  # PyTorch's default on cuda
    (dict(optimizer="adamw_torch", device="cpu"), ("adamw", "for-loop")),
    (dict(optimizer=" ADAMW_8BIT "), ("adamw8bit", None)),
    (dict(optimizer="paged_adamw_32bit"), ("paged_adamw32bit", None)),
    (dict(optimizer="lion_8bit"), ("lion8bit", None)),
    (dict(optimizer="rmsprop_bnb"), ("rmsprop32bit", None)),
    (dict(optimizer="adamw_torch_fused", optimizer_impl="fused"), ("adamw", "fused")),
])
def test_hugging_face_optimizer_names_normalize(kwargs, expected):
    t = TrainingSpec(**kwargs)
    assert (t.optimizer, t.optimizer_impl) == expected
    assert replace(t) == t  # normalized values construct the same spec again


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dtype="bfloat16"), ("bf16", None)),
    (dict(dtype="float16"), ("fp16", None)),
    (dict(dtype="torch.float32", amp="bfloat16"), ("fp32", "bf16")),
    (dict(dtype="float32", amp="float16"), ("fp32", "fp16")),
])
def test_torch_dtype_spellings_normalize(kwargs, expected):
    t = TrainingSpec(**kwargs)
    assert (t.dtype, t.amp) == expected


def test_attention_spellings():
    assert TrainingSpec(attention=" SDPA ").attention == "sdpa"
    with pytest.raises(PlannerInputError, match="did you mean sdpa"):
        TrainingSpec(attention="spda")


# --------------------------------------------------------------------------------------------------
# ModelSpec: documented size bounds, dropouts, RoPE fraction, window and flags
# --------------------------------------------------------------------------------------------------

def _model(**edits) -> ModelSpec:
    fields = dict(name="x", family="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=96, tie_word_embeddings=False)
    return ModelSpec(**{**fields, **edits})


@pytest.mark.parametrize(("name", "key"), [
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
    ("intermediate_size", "intermediate_size"), ("max_position_embeddings", "max_position_embeddings"),
])
def test_model_sizes_are_bounded_at_their_documented_limits(name, key):
    limit = MODEL_SIZE_LIMITS[name]
    at_limit = {name: limit}
    if name == "num_heads":
        at_limit["num_kv_heads"] = 1
    if name == "num_kv_heads":
        at_limit["num_heads"] = limit
    assert getattr(_model(**at_limit), name) == limit
    for too_big in (limit + 1, 10**12, 10**15):
        with pytest.raises(PlannerInputError) as err:
            _model(**{**at_limit, name: too_big})
        assert err.value.field == key and "limit" in err.value.problem and "\n" not in str(err.value)


def test_the_limits_are_far_above_real_models():
    assert (MAX_LAYERS, MAX_WIDTH, MAX_HEADS, MAX_VOCAB, MAX_POSITIONS) == (2**14, 2**20, 2**16, 2**24, 2**26)
    # Llama-3.1-405B: 126 layers, 16384 hidden, 53248 MLP, 128 heads; Gemma: 256000 vocab; 10M context
    assert MAX_LAYERS > 100 * 126 and MAX_WIDTH > 16 * 53248 and MAX_VOCAB > 64 * 256000 and MAX_POSITIONS > 6 * 10**7


@pytest.mark.parametrize(("edits", "field"), [
    (dict(num_layers=0), "num_hidden_layers"),
    (dict(num_heads=-4), "num_attention_heads"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(vocab_size=True), "vocab_size"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(embedding_dropout=1.5), "embedding_dropout"),
    (dict(attention_dropout=float("inf")), "attention_dropout"),
    (dict(attention_dropout="0.1"), "attention_dropout"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(partial_rotary_factor=float("nan")), "partial_rotary_factor"),
    (dict(partial_rotary_factor=True), "partial_rotary_factor"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=4096.0), "sliding_window"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(attention_bias=1), "attention_bias"),
])
def test_model_spec_rejects(edits, field):
    with pytest.raises(PlannerInputError) as err:
        _model(**edits)
    assert err.value.field == field


@pytest.mark.parametrize("edits", [dict(dropout=0, embedding_dropout=1, attention_dropout=0.5),
                                   dict(partial_rotary_factor=1), dict(partial_rotary_factor=0.25),
                                   dict(sliding_window=None), dict(sliding_window=1)])
def test_model_spec_accepts_the_edges(edits):
    _model(**edits)


def test_use_reentrant_needs_checkpointing():
    assert TrainingSpec(grad_checkpointing=True, use_reentrant=True).use_reentrant
    with pytest.raises(PlannerInputError, match="use_reentrant"):
        TrainingSpec(use_reentrant=True)
    with pytest.raises(PlannerInputError, match="use_reentrant"):
        TrainingSpec(grad_checkpointing=True, use_reentrant="yes")

"""Validated settings (`lora_planner.specs`) and the error type (`lora_planner.errors`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_planner.defaults import DEFAULT_SEQ_LEN
from lora_planner.errors import PlannerInputError
from lora_planner.specs import LoraSpec, ModelSpec, TrainingSpec


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


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="prefix"), "method"),
    (dict(dtype="int8"), "dtype"),
    (dict(optimizer="lion_4bit"), "optimizer"),
    (dict(optimizer="galore_adamw"), "optimizer"),  # refused: not modelled
    (dict(optimizer="rmsprop", optimizer_impl="fused"), "optimizer_impl"),  # torch's RMSprop has no fused kernel
    (dict(optimizer="adamw_torch_fused", optimizer_impl="foreach"), "optimizer_impl"),  # contradicts the name
    (dict(attention="flash_attention_2"), "attention"),  # refused until its kernel is modelled
    (dict(dtype="float64"), "dtype"),
    (dict(optimizer_impl="cuda-graph"), "optimizer_impl"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-5), "seq_len"),
    (dict(batch_size=True), "batch_size"),
    (dict(device="tpu"), "device"),
    (dict(attention="flex"), "attention"),
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
    (dict(adapter_dtype="fp8"), "adapter_dtype"),
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

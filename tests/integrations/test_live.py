"""`live_setup` / `batch_shape` (`lora_planner.integrations.live`): the planner's settings read off a live model,
its PEFT config and the trainer's arguments."""

from __future__ import annotations

import pytest

from lora_planner.errors import PlannerInputError
from lora_planner.integrations.live import batch_shape, live_setup
from lora_planner.integrations.loop import _Args

from tests.integrations.tiny import lora, tiny_llama

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("batch, expected", [
    ({"input_ids": torch.zeros(4, 32, dtype=torch.long)}, (4, 32, False, False)),
    ({"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8)}, (2, 8, False, False)),
    ({"input_ids": torch.zeros(2, 8, dtype=torch.long),
      "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}, (2, 8, True, False)),
    # TRL's padding-free row: position_ids restart at each packed sequence, no mask
    ({"input_ids": torch.zeros(1, 10, dtype=torch.long),
      "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])}, (1, 10, False, True)),
])
def test_batch_shape(batch, expected):
    shape = batch_shape(batch)
    assert (shape["batch_size"], shape["seq_len"], shape["padding"], shape["packing"]) == expected


def test_batch_without_input_ids():
    with pytest.raises(PlannerInputError, match="input_ids"):
        batch_shape({"pixel_values": torch.zeros(1, 3)})


def test_lora_on_a_bf16_base():
    """PEFT keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype); the PEFT config's rank, alpha,
    targets, DoRA and rsLoRA; the model's checkpointing and attention; the arguments' optimizer."""
    model = tiny_llama(attn_implementation="eager").to(torch.bfloat16)
    model = lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True, use_rslora=True)
    model.gradient_checkpointing_enable()
    setup = live_setup(model, _Args({"optim": "adamw_8bit", "per_device_train_batch_size": 3}), device="cpu")
    t = setup.training
    assert (t.method, t.dtype, t.amp, t.lora.adapter_dtype, t.optimizer, t.batch_size) == \
        ("lora", "bf16", None, "fp32", "adamw8bit", 3)
    assert (t.lora.r, t.lora.alpha, sorted(t.lora.target_modules), t.lora.use_dora, t.lora.use_rslora) == \
        (4, 8.0, ["k_proj", "q_proj"], True, True)
    assert (t.grad_checkpointing, t.attention, t.device, t.loss) == (True, "eager", "cpu", "hf")
    assert setup.spec.hidden_size == 64 and setup.spec.num_layers == 2


def test_full_fine_tuning_under_autocast():
    """No adapter: full fine-tuning; fp32 weights with bf16=True are autocast (the note about the dtype the file does
    not say is dropped: the live weights say it)."""
    setup = live_setup(tiny_llama(), _Args({"bf16": True}))
    assert (setup.training.method, setup.training.dtype, setup.training.amp) == ("full", "fp32", "bf16")
    assert setup.not_modelled == ()


def test_not_modelled_is_carried():
    setup = live_setup(lora(tiny_llama(), lora_dropout=0.1), None)
    assert any(n.startswith("lora_dropout 0.1") for n in setup.not_modelled)

"""`plan_check` (`lora_planner.integrations.loop`) around a plain PyTorch loop: the optimizer's step hooks and the
model's forward hooks cut the phases, with no change to the loop; exact on the tracker."""

from __future__ import annotations

import pytest

from lora_planner.integrations import TrackerCounters, plan_check
from lora_planner.integrations.meter import PHASES
from lora_planner.profiler.records import read_records

from tests.integrations.tiny import lora, tiny_llama

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("method, checkpointing", [("lora", False), ("full", False), ("lora", True)])
def test_plain_loop(tmp_path, method, checkpointing):
    model = lora(tiny_llama()) if method == "lora" else tiny_llama()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    counters, out = TrackerCounters(), tmp_path / "runs.jsonl"
    counters.register_model(model)
    with counters, plan_check(model, optimizer, args={"optim": "adamw_torch_fused"}, steps=3, out=str(out),
                              counters=counters, log=lambda line: None) as meter:
        for _ in range(4):
            ids = torch.randint(0, 1000, (2, 96))
            model(input_ids=ids, labels=ids).loss.backward()  # the loss's graph goes with it, as in the Trainer
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert meter.done and len(meter.measured) == 3 and not optimizer._optimizer_step_pre_hooks
    t = meter.training
    assert (t.method, t.batch_size, t.seq_len, t.grad_checkpointing, t.padding) == (method, 2, 96, checkpointing, False)
    predicted = meter.predicted_phases()
    for phase in PHASES:
        assert abs(predicted[phase] / meter.measured[-1][phase] - 1) < 0.005, (phase, predicted, meter.measured[-1])
    (record,), _ = read_records(out)
    assert record["settings"]["grad_checkpointing"] is checkpointing


def test_no_gpu_prints_the_plan_only(capsys):
    """Without counters and without CUDA the plan is printed and nothing is hooked."""
    model = lora(tiny_llama())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lines = []
    with plan_check(model, optimizer, args={"per_device_train_batch_size": 4, "max_length": 256},
                    log=lines.append) as meter:
        ids = torch.randint(0, 1000, (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert meter.done and meter.measured == [] and not model._forward_hooks
    assert "batch 4 x 256 tokens (the arguments' batch)" in lines[0] and "no GPU" in lines[-1]

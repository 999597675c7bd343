"""The allocator check (`lora_planner.profiler.allocator`): the peak with no dispatch mode, and why it is needed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_planner.config_reader import spec_from_config
from lora_planner.memory import estimate_memory
from lora_planner.profiler.allocator import allocator_peak_above_start, peak_above_start
from lora_planner.profiler.runner import ProfileRequest, run_profile
from lora_planner.specs import LoraSpec, TrainingSpec


@pytest.mark.parametrize("events, peak", [
    ([], 0),
    ([(100, 100)], 100),
    # started with 50 allocated elsewhere: only what the step adds counts
    ([(100, 150), (40, 190), (-100, 90), (200, 290)], 240),
    # a step that frees more than it makes never reports a negative peak
    ([(-64, 0)], 0),
])
def test_peak_above_start_by_hand(events, peak):
    assert peak_above_start(events) == peak


def test_allocator_sees_every_allocation_and_free():
    def step():
        a = torch.empty(1000)  # 4,000 B
        b = torch.empty(500)   # 2,000 B
        del a
        c = torch.empty(2000)  # 8,000 B: b + c = 10,000 B is the high point
        return b, c
    assert allocator_peak_above_start(step) == 10_000


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stack_shape", [(8, 64, 32), (4, 128, 16)])
def test_a_dispatch_mode_makes_autograd_sum_gradients_out_of_place(stack_shape):
    """The eager experts loop in miniature: one stack, one `select` per expert. Without a mode autograd sums the
    per-expert full-size gradients in place (`input_buffer.cpp` `accumulate`); under any dispatch mode
    (`isTensorSubclassLike` is then true for every tensor) it adds out of place: exactly one stack more."""
    experts = stack_shape[0]
    torch.manual_seed(0)
    stack = torch.randn(*stack_shape, requires_grad=True)
    x = torch.randn(3, stack_shape[2])

    def step():
        loss = sum(torch.nn.functional.linear(x, stack[e]).sum() for e in range(experts))
        loss.backward()
        stack.grad = None

    def step_under_mode():
        with _PassThrough():
            step()

    plain, moded = allocator_peak_above_start(step), allocator_peak_above_start(step_under_mode)
    whole = stack.numel() * stack.element_size()
    one_slice = whole // experts
    scalars = 2 * 4  # the fp32 loss and backward's seed gradient
    # in place: the buffer, the next expert's full-size select_backward and its slice gradient still alive
    assert plain == 2 * whole + one_slice + scalars
    # out of place: the buffer, the next full-size gradient and their sum
    assert moded == 3 * whole + scalars


TINY_MIXTRAL = {"model_type": "mixtral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
                "num_experts_per_tok": 2}


@pytest.mark.parametrize("method, lora, low, high", [
    ("full", LoraSpec(), -0.005, 0.005),
    # LoRA on the stacks (PEFT's ParamWrapper, folded weights): a known over-count, +0.64 % (issue 12 stays open)
    ("lora", LoraSpec(r=8, target_modules=("all-linear",)), 0.0, 0.01),
])
def test_planner_matches_the_allocator_where_the_tracker_sums_out_of_place(method, lora, low, high):
    """The eager experts loop with trained stacks (issue 12), on a config small enough (vocabulary 128) that the loop's
    backward decides the peak: real CPU steps; the planner, given the measured routing, against the allocator's peak
    (`measured.allocator_peak_bytes`), which is below the tracker's (its out-of-place sums)."""
    spec = spec_from_config(TINY_MIXTRAL, "tiny-mixtral-v128")
    training = TrainingSpec(method=method, device="cpu", batch_size=2, seq_len=32, experts_implementation="eager",
                            lora=lora)
    record = run_profile(ProfileRequest(spec.name, spec, training, backend="hf", mode="cpu", steps=3))
    assert record["status"] == "ok", record.get("error")
    measured = record["measured"]
    routing = tuple(tuple(row) for row in measured["router_counts"])
    planned = estimate_memory(spec, replace(training, routing=routing)).peak_allocated_bytes
    assert low <= planned / measured["allocator_peak_bytes"] - 1 <= high, (planned, measured["allocator_peak_bytes"])
    assert measured["peak_bytes"] > measured["allocator_peak_bytes"]


TINY_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("chunks, batch, seq, checkpointing", [(4, 2, 16, False), (3, 2, 17, True), (8, 1, 16, False)])
def test_chunked_loss_full_fine_tuning_sums_the_head_gradient_as_the_engine_does(monkeypatch, chunks, batch, seq,
                                                                                  checkpointing):
    """torchtune's chunked loss under full fine-tuning (issue 13): each chunk writes a whole gradient of lm_head's
    weight, summed in place by the engine, out of place under the tracker. Real CPU steps: counted the tracker's way
    the plan equals the tracker to the byte, and the engine's way it is one (V, H) gradient less. (The allocator is no
    reference here: CPU's bmm, which runs the output layer on a (b, s_i, H) slice when b > 1, copies the weight
    expanded over the batch inside the kernel, b x V x H more than any tensor; CUDA's strided batched GEMM reads the
    stride-0 batch in place.)"""
    from functools import partial

    import lora_planner.activations as activations

    spec = spec_from_config(TINY_LLAMA, "tiny-llama")
    training = TrainingSpec(method="full", device="cpu", batch_size=batch, seq_len=seq, loss="chunked",
                            loss_chunks=chunks, grad_checkpointing=checkpointing)
    record = run_profile(ProfileRequest(spec.name, spec, training, backend="hf", mode="cpu", steps=2))
    assert record["status"] == "ok", record.get("error")
    measured = record["measured"]
    engine = estimate_memory(spec, training).peak_allocated_bytes
    monkeypatch.setattr(activations, "chunked_loss_moments", partial(activations.chunked_loss_moments, in_place=False))
    assert estimate_memory(spec, training).peak_allocated_bytes == measured["peak_bytes"]
    # the sums the engine does in place save at most one (V, H) bf16 weight gradient (none where the loss's
    # backward is not the peak: checkpointing's recompute here)
    assert 0 <= measured["peak_bytes"] - engine <= 1000 * 64 * 2

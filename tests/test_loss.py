"""The loss rules (`lora_planner.loss`): transformers' loss and torchtune's chunked one, by hand. Real steps and fake
traces hold them to measurements in `tests/profiler/test_runner.py` and `tests/profiler/test_allocator.py`."""

from __future__ import annotations

import pytest

from lora_planner.activations import make_flow
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.loss import causal_lm_loss_saved, check_chunked_loss, chunk_tokens, chunked_loss_moments
from lora_planner.specs import TrainingSpec


TINY_LLAMA_V1000 = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                     "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "num_key_value_heads": 2}, "tiny-llama")


@pytest.mark.parametrize("batch, seq, chunks, sizes", [(2, 16, 4, [8, 8, 8, 8]), (2, 17, 3, [12, 12, 10]),
                                                       (1, 17, 5, [4, 4, 3, 3, 3])])
def test_chunked_loss_by_hand(batch, seq, chunks, sizes):
    """torchtune's chunked loss (`loss.chunked_loss_moments`), LoRA, bf16 logits, V = 1,000: forward at the
    last chunk's nll_loss, every chunk's bf16 logits + its fp32 copy + all log_softmax outputs, + the running sum and
    the chunk's loss; backward at the last chunk's log_softmax backward, all log_softmax outputs + two fp32 gradients
    of that chunk, + the division's gradient (the moments are given on top of all the log_softmax outputs)."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=batch, seq_len=seq,
                                                    loss="chunked", loss_chunks=chunks))
    assert chunk_tokens(flow) == sizes
    tokens, v = batch * seq, 1000
    forward, backward, kept = chunked_loss_moments(flow)
    assert forward == tokens * v * 2 + sizes[-1] * v * 4 + 2 * 4
    assert backward == 2 * sizes[-1] * v * 4 + 4
    targets = tokens * 8 if batch == 1 else (tokens - sizes[-1]) * 8  # b = 1: the one labels tensor, views of it
    assert kept == tokens * v * 4 + targets + (chunks - 1) * 4


def test_chunked_loss_full_fine_tuning_by_hand():
    """Full fine-tuning, b = 2, 16 tokens in 4 chunks of 8, V = 1,000, H = 64, bf16: the heaviest moment is the third
    chunk's output-layer backward: the waiting (8, V) gradients of chunks 0-2, its (8, H) input gradient, its new
    (V, H) weight gradient and the sum of the last chunk's, less the targets and total weights gone; under a
    dispatch mode, after it, a third (V, H) copy (the out-of-place sum) beside chunks 0-1's."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="full", device="cpu", batch_size=2, seq_len=16,
                                                    loss="chunked", loss_chunks=4))
    weight_grad, saved_all = 1000 * 64 * 2, 32 * 1000 * 4
    gone = 24 * 8 + 3 * 4 + 4  # targets and total weights of chunks 0-2, the division's gradient
    _, backward, _ = chunked_loss_moments(flow, weight_grad)
    assert backward == 24 * 1000 * 2 + 8 * 64 * 2 + 2 * weight_grad - gone - saved_all + 4
    _, tracked, _ = chunked_loss_moments(flow, weight_grad, in_place=False)
    assert tracked == 16 * 1000 * 2 + 3 * weight_grad - gone - saved_all + 4



@pytest.mark.parametrize("batch, targets", [(2, 32 * 8), (1, 17 * 8)])
def test_transformers_loss_saves_log_softmax_targets_and_total_weight(batch, targets):
    """`ForCausalLMLoss`: fp32 log_softmax output; b > 1: the shifted labels' (b, s) copy; b = 1: a view of the padded
    (1, s + 1) labels; a 0-d fp32 total weight."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=batch, seq_len=16))
    saved = {item.name: item.nbytes for item in causal_lm_loss_saved(flow)}
    assert saved == {"loss.log_softmax_fp32": batch * 16 * 1000 * 4, "loss.targets": targets, "loss.total_weight": 4}


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
     "final_logit_softcapping"),
    ({"model_type": "granite", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "logits_scaling"),
])
def test_chunked_loss_refuses_heads_that_do_more_than_the_output_layer(config, needle):
    with pytest.raises(PlannerInputError, match=needle):
        check_chunked_loss(spec_from_config(config, "tiny"))

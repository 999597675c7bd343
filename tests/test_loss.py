"""The loss rules (`lora_planner.loss`): transformers' loss, torchtune's chunked and linear ones and litgpt's, by hand
(the fused ones: `tests/test_loss_fused.py`). Real steps and fake
traces hold them to measurements in `tests/profiler/test_runner.py` and `tests/profiler/test_allocator.py`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_planner.activations import activation_profile, make_flow
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.loss import (
    causal_lm_loss_saved, check_chunked_loss, chunk_tokens, chunked_loss_moments, linear_chunk_rows,
    linear_loss_moments, linear_loss_saved, litgpt_chunks, litgpt_logits_bytes, litgpt_loss_moments,
    litgpt_loss_saved, litgpt_retained_bytes, unsloth_chunk_count, unsloth_chunk_rows, unsloth_chunks,
    unsloth_loss_moments, unsloth_loss_saved,
)
from lora_planner.catalog import resolve_model
from lora_planner.specs import TrainingSpec, parse_loss


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




def test_linear_loss_by_hand():
    """torchtune main's LinearCrossEntropyLoss, LoRA, bf16, b = 2, s = 16, V = 1,000, H = 64, 4 chunks: n = 30 rows
    (each row's last label is the dataset's ignore) in chunks of 8, 8, 7, 7. Saved: every chunk's fp32 log_softmax
    (30 x 1,000 x 4), the targets and the row index (30 int64 each), 4 total weights. Forward peaks at the last
    chunk's nll_loss: the kept rows (30 x 64 bf16), its bf16 logits and fp32 upcast (7 x 1,000 x 6), its loss and the
    running sum. Backward peaks at the last chunk's log_softmax backward (two 7 x 1,000 fp32 gradients, the running
    sum's gradient) with every output kept but its total weight: the first chunk's moment holds 8 rows but has
    dropped the 22 later rows' outputs."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=16,
                                                    loss="linear", loss_chunks=4))
    assert linear_chunk_rows(flow) == [8, 8, 7, 7]
    assert {t.name: t.nbytes for t in linear_loss_saved(flow)} == {
        "loss.log_softmax_fp32": 30 * 1000 * 4, "loss.targets": 30 * 8, "loss.row_index": 30 * 8,
        "loss.total_weight": 16}
    saved = 30 * 1000 * 4 + 30 * 16 + 16
    forward, backward, kept = linear_loss_moments(flow)
    assert forward == 30 * 64 * 2 + 7 * 1000 * 6 + 2 * 4
    assert (backward, kept) == (2 * 7 * 1000 * 4 + 4, saved - 4)
    with pytest.raises(PlannerInputError, match="output layer"):
        activation_profile(TINY_LLAMA_V1000, TrainingSpec(method="full", device="cpu", loss="linear"))
    with pytest.raises(PlannerInputError, match="linear:N with N <= 30"):
        TrainingSpec(method="lora", batch_size=2, seq_len=16, loss="linear", loss_chunks=31)


def test_litgpt_loss_by_hand():
    """litgpt under Fabric, LoRA, bf16, b = 2, s = 40, V = 1,000, H = 64, 16-token chunks: 16, 16 and 8 positions,
    32, 32 and 14 rows after the shift. Kept across steps: the fp32 list (2 x 40 x 1,000 x 4). Saved: the fp32
    log_softmax of 78 rows, the targets' copies (78 int64) and 3 total weights. Forward peaks at Fabric's conversion:
    the new fp32 list (activations, beside the previous step's) and the bf16 list it copies. Backward peaks at the
    second chunk's log_softmax backward: two 32 x 1,000 fp32 gradients, the last chunk's waiting gradient (14 rows)
    and two 0-d gradients; kept then: the outputs of chunks 0 and 1, the first chunk's targets and total weight."""
    flow = make_flow(TINY_LLAMA_V1000, TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=40,
                                                    loss="litgpt", loss_chunk_tokens=16))
    assert litgpt_chunks(flow) == [16, 16, 8]
    assert litgpt_logits_bytes(flow) == 320_000
    saved = 78 * 1000 * 4 + 78 * 8 + 12
    assert sum(t.nbytes for t in litgpt_loss_saved(flow)) == saved
    forward_acts, forward, backward, kept = litgpt_loss_moments(flow)
    assert (forward_acts, forward) == (320_000 - saved, 2 * 40 * 1000 * 2)
    assert (backward, kept) == (2 * 32 * 4000 + 14 * 4000 + 8 - 4, 64 * 4000 + 32 * 8 + 4)
    assert litgpt_retained_bytes(flow) == (0, 0)
    checkpointed = make_flow(TINY_LLAMA_V1000, replace(flow.t, grad_checkpointing=True))
    assert litgpt_retained_bytes(checkpointed) == (80 * 64 * 2, 80 * 64 * 2)
    assert parse_loss("litgpt:64") == {"loss": "litgpt", "loss_chunk_tokens": 64}


def test_loss_spellings():
    assert parse_loss("linear_cross_entropy:4") == {"loss": "linear", "loss_chunks": 4}
    assert parse_loss("fused_lm_head") == parse_loss("TRL") == {"loss": "trl"}
    assert parse_loss("cut_cross_entropy") == parse_loss("CCE") == {"loss": "cce"}
    assert parse_loss("liger") == parse_loss("FLCE") == {"loss": "fused-linear"}
    with pytest.raises(PlannerInputError):
        parse_loss("fused-linear:4")


@pytest.mark.parametrize("rows, vocab, target_gib, chunks", [
    (8192, 128_256, 4.0, 1),  # 3.91 GiB of fp32 logits fit one 4 GiB chunk
    (16_384, 128_256, 4.0, 4),  # 7.83 GiB: 1.96 -> rounded up to a multiple of 4
    (8193 * 4, 128_256, 4.0, 4),  # 15.66 GiB: 3.92 -> 4
    (65_536, 128_256, 4.0, 8),  # 31.3 GiB: 7.83 -> 8
    (128, 1000, 0.0001, 8),  # 4.77 -> 8
    (128, 1000, 4.0, 1),
    (2 * 2**30 // 4, 1, 2.0, 1),  # exactly the target: one chunk
])
def test_unsloth_chunk_rule_by_hand(rows, vocab, target_gib, chunks):
    """`get_chunk_size`: rows x V x 4 bytes over the target, 1 when it fits, else up to a multiple of 4."""
    assert unsloth_chunk_count(rows, vocab, target_gib) == chunks


def test_unsloth_loss_by_hand():
    """Unsloth's fused cross-entropy, LoRA, bf16, b = 2, s = 64, V = 1,000, H = 64: N = 128 rows in 3 forced chunks
    (torch.chunk: 43, 43, 42). Saved: the input gradient (128 x 64 bf16). Eager forward: the labels (128 int64), three
    fp32 scalars and the chunk's backward: three fp32 43 x 1,000 buffers and the bf16 cast of the gradient. Compiled:
    the 43 x 1,000 bf16 logits (their gradient in place) and the 43 x 64 bf16 input gradient. Backward: three fp32
    scalars and the scaled input gradient."""
    training = TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=64, loss="unsloth-eager",
                            loss_target_gib=None, loss_chunks=3)
    flow = make_flow(TINY_LLAMA_V1000, training)
    assert unsloth_chunk_rows(flow) == [43, 43, 42]
    assert {t.name: t.nbytes for t in unsloth_loss_saved(flow)} == {"loss.input_gradient": 128 * 64 * 2}
    assert unsloth_loss_moments(flow) == (128 * 8 + 12 + 43 * 1000 * (12 + 2), 12 + 128 * 64 * 2)
    compiled = make_flow(TINY_LLAMA_V1000, replace(training, loss="unsloth"))
    assert unsloth_loss_moments(compiled) == (128 * 8 + 12 + 43 * 1000 * 2 + 43 * 64 * 2, 12 + 128 * 64 * 2)
    # fp32 logits: no cast back; the input gradient's matmul beside the three fp32 buffers decides
    fp32 = make_flow(TINY_LLAMA_V1000, replace(training, dtype="fp32"))
    assert unsloth_loss_moments(fp32)[0] == 128 * 8 + 12 + 43 * 1000 * 12 + 43 * 64 * 4
    # the default target: min(half the free memory, 4 GiB), the cap planned
    llama = resolve_model("llama-3.1-8b")
    assert unsloth_chunks(llama, TrainingSpec(method="lora", batch_size=2, seq_len=4096, loss="unsloth")) == 1
    assert unsloth_chunks(llama, TrainingSpec(method="lora", batch_size=4, seq_len=4096, loss="unsloth")) == 4
    assert unsloth_chunks(llama, TrainingSpec(method="lora", batch_size=4, seq_len=4096, loss="unsloth",
                                              loss_target_gib=1.0)) == 8


@pytest.mark.parametrize("settings, needle", [
    (dict(method="full"), "trained output layer"),
    (dict(dtype="fp32", amp="bf16"), "autocast"),
    (dict(liger=True), "liger"),
])
def test_unsloth_loss_refusals(settings, needle):
    with pytest.raises(PlannerInputError, match=needle):
        activation_profile(TINY_LLAMA_V1000, TrainingSpec(**({"device": "cpu", "method": "lora", "loss": "unsloth"}
                                                              | settings)))


def test_unsloth_loss_spellings():
    assert parse_loss("unsloth") == parse_loss("unsloth_fused_ce") == {"loss": "unsloth"}
    assert parse_loss("unsloth_eager:3") == {"loss": "unsloth-eager", "loss_chunks": 3, "loss_target_gib": None}
    assert parse_loss("unsloth:2.5GB") == parse_loss("unsloth:2.5gib") == {"loss": "unsloth", "loss_target_gib": 2.5}
    for bad in ("unsloth:0gb", "unsloth:xgb", "unsloth:-1", "unsloth:infgb"):
        with pytest.raises(PlannerInputError, match="loss"):
            parse_loss(bad)
    with pytest.raises(PlannerInputError, match="loss_target_gib"):
        TrainingSpec(loss="unsloth", loss_target_gib=0)

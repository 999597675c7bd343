"""What the training loss keeps and holds (pure): transformers' `ForCausalLMLoss`, torchtune's chunked
cross-entropy, Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy (the last two modelled from source).

- transformers 5.24 (`loss/loss_utils.py` `ForCausalLMLoss` -> `fixed_cross_entropy`): the logits upcast to fp32,
  log_softmax keeps its fp32 output, nll_loss the shifted targets and the total weight (`causal_lm_loss_saved`); its
  backward holds three fp32 B x S x V tensors at once (`lora_planner.activations` assembles the moments).
- torchtune's `CEWithChunkedOutputLoss` as its SFT recipes run it (`TrainingSpec.loss` "chunked"; the profiler runs
  it for real, `lora_planner.profiler.losses`, whose docstring has the source): the same log_softmax outputs, but one
  chunk's fp32 copy and gradients at a time (`chunked_loss_saved`, `chunked_loss_moments`).
- torchtune main's `LinearCrossEntropyLoss` ("linear", run for real by the profiler too): the ignored rows dropped,
  then the output layer and the fp32 upcast over row chunks (`linear_loss_saved`, `linear_loss_moments`).
- litgpt's under Lightning Fabric ("litgpt", run for real too): 128-token chunks of the output layer, Fabric's fp32
  copy of each, the list kept by the loop from step to step (`litgpt_loss_saved`, `litgpt_loss_moments`).
- Unsloth's fused cross-entropy ("unsloth", "unsloth-eager"): the input gradient computed in forward chunk by chunk
  (`unsloth_loss_saved`, `unsloth_loss_moments`): eager run for real, the compiled default modelled from the code
  inductor generates for the chunk.
- Liger's fused linear cross-entropy, Apple's Cut Cross-Entropy and TRL's fused LM head: `lora_planner.loss_fused`.

Checked byte for byte against real CPU steps and full-size fake traces (`tests/profiler/test_runner.py`,
`tests/profiler/test_allocator.py`) and by hand (`tests/test_loss.py`).

Known limitations: Unsloth's target is planned at its 4 GiB cap (a GPU with less than 8 GiB free at the first loss
chunks finer: an upper bound); its compiled chunk is modelled from inductor's CPU code (CUDA's Triton kernels are not
measured). The chunked loss is modelled eager (`torch.compile` of it saves other tensors); LoRA on lm_head
and full fine-tuning under autocast with it are refused (their gradients are summed over the chunks in ways not
modelled yet), as are models whose head does more than the output layer (`check_chunked_loss`).
"""

from __future__ import annotations

import math

from lora_planner.errors import PlannerInputError
from lora_planner.families.rules import FP32, Flow, SavedTensor, loss_that_runs
from lora_planner.specs import ModelSpec, TrainingSpec


def check_chunked_loss(spec: ModelSpec) -> None:
    """The chunked loss replaces the causal-LM head by the output layer alone: a model whose head does more (Gemma 2's
    logit soft-capping, Granite's logit scaling) would not be the model any more."""
    extra = "final_logit_softcapping" if spec.final_logit_softcapping is not None else \
        "logits_scaling" if spec.family == "granite" else None  # `GraniteForCausalLM` always divides its logits
    if extra:
        raise PlannerInputError("loss", f"{spec.name}'s head applies {extra} after the output layer, which the chunked "
                                        "loss (the output layer alone, torchtune's) leaves out",
                                "use --loss hf for this model")


def output_layer_calls(flow: Flow) -> int:
    """How many times the output layer runs (each call under autocast casts and keeps a frozen weight's copy)."""
    if flow.t.loss == "litgpt":
        return len(litgpt_chunks(flow))
    return flow.t.loss_chunks


def chunk_tokens(flow: Flow) -> list[int]:
    """Tokens in each of the chunked loss's chunks: `tensor_split(n, dim=1)` of the sequence gives the first s mod n
    chunks one position more, times the batch."""
    q, r = divmod(flow.s, flow.t.loss_chunks)
    return [flow.b * (q + (1 if i < r else 0)) for i in range(flow.t.loss_chunks)]


def chunked_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What torchtune's `CEWithChunkedOutputLoss` saves (`lora_planner.profiler.losses`): every chunk's fp32
    log_softmax output (T x V x 4 in all, as transformers' loss), each chunk's targets (`reshape(-1)` of a (b, s_i)
    slice of the shifted labels: copies when b > 1, else views of the one (1, s) tensor) and total weight, and the
    target count the final division keeps."""
    return (SavedTensor("loss.log_softmax_fp32", flow.tokens * flow.spec.vocab_size * FP32),
            SavedTensor("loss.targets", flow.tokens * 8), SavedTensor("loss.total_weight", flow.t.loss_chunks * FP32),
            SavedTensor("loss.target_count", 8))


def chunk_targets_are_views(flow: Flow) -> bool:
    """A (b, s_i) slice of the (b, s) labels is contiguous, so `reshape(-1)` is a view, when b = 1 or one chunk."""
    return flow.b == 1 or flow.t.loss_chunks == 1


def chunked_loss_moments(flow: Flow, head_grad_bytes: int = 0, in_place: bool = True) -> tuple[int, int, int]:
    """The chunked loss's transients (module `lora_planner.profiler.losses`): (forward scratch at its heaviest op,
    backward scratch at its heaviest op, what the loss keeps then), expressed like the "hf" loss's on top of all
    chunks' saved log_softmax outputs. n_j: chunk j's tokens, V the vocabulary, e the logits' bytes.

    Forward, chunk j's nll_loss: every chunk's logits (the output layer ran over all of them first), chunk j's fp32
    copy (none when the logits are fp32) and the log_softmax outputs of chunks 0..j.

    Backward: autograd runs the newest ready node first, and every chunk's loss ops are newer than every chunk's
    output-layer op, so all the chunks' losses go back first, last chunk first, each leaving its (n_j, V) gradient
    (e bytes) waiting at the output layer; chunk j's log_softmax backward holds the log_softmax outputs of chunks
    0..j, two (n_j, V) fp32 gradients and the waiting gradients of chunks after j. Then the output layer goes back,
    chunk by chunk, last first. With a trained output layer (`head_grad_bytes` = its weight's gradient, full
    fine-tuning) each chunk writes a whole weight gradient, which autograd sums into the first one's
    (`torch/csrc/autograd/input_buffer.cpp`: in place; `in_place=False`, what a dispatch mode such as the exact
    tracker sees: out of place, a third copy); chunk j's backward then holds the gradients still waiting (chunks
    0..j), its input gradient, its new weight gradient and the sum so far (chunks after j; their saved inputs and
    input gradients, both (n, H), trade places)."""
    v, e, h = flow.spec.vocab_size, flow.e_compute, flow.spec.hidden_size
    sizes = chunk_tokens(flow)
    logits_all = flow.tokens * v * e
    saved_all = flow.tokens * v * FP32
    upcast = FP32 if e != FP32 else 0
    last = sizes[-1]
    if chunk_targets_are_views(flow):
        targets_left = flow.tokens * 8 if len(sizes) > 1 else 0  # the one labels tensor, while any chunk keeps it
    else:
        targets_left = (flow.tokens - last) * 8
    kept_extra = targets_left + (len(sizes) - 1) * FP32
    forward, backward, before = 0, 0, 0
    for j, n in enumerate(sizes):
        before += n
        forward = max(forward, logits_all + n * v * upcast + before * v * FP32)
        backward = max(backward, before * v * FP32 + 2 * n * v * FP32 + (flow.tokens - before) * v * e)
        if head_grad_bytes:
            # the chunks' targets and total weights are gone by now; with b = 1 the chunks are views of one hidden
            # state, kept whole until the last of them is done, so the input gradients add to it
            gone = kept_extra + (FP32 if len(sizes) > 1 else 0)  # and the division's gradient
            # (the saved inputs are per-chunk copies, n x H x e, unless b = 1 without autocast: then the chunks are
            # views of the one hidden state, kept whole; the input gradients are the stream's, fp32 under autocast)
            after = flow.tokens - before
            per_token = h * e if flow.b == 1 and not flow.amp else h * (flow.e_stream - e)
            summed = j < len(sizes) - 1  # a chunk after j has written its weight gradient already
            backward = max(backward, before * v * e + n * h * e + head_grad_bytes * (2 if summed else 1)
                           + after * per_token - gone)
            if summed and not in_place:
                backward = max(backward, (before - n) * v * e + 3 * head_grad_bytes + (after + n) * per_token - gone)
    # what the loss keeps at its own backward's peak: every chunk's log_softmax output, and the targets and total
    # weights of the chunks backward has not reached (b = 1: one labels tensor, kept while any chunk keeps it)
    kept = saved_all + kept_extra
    # Forward, at the last chunk's nll_loss: that chunk's loss and (several chunks) the running sum; the loss value
    # does not exist yet (`loss_value_at_forward_end`). Backward (several chunks): the division's gradient (0-d fp32)
    # beside the chunk's (measured, tests/profiler/test_runner.py).
    several = len(sizes) > 1
    return (forward - saved_all + FP32 * (2 if several else 1), backward - saved_all + (FP32 if several else 0),
            kept)


def causal_lm_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What transformers 5.24's `ForCausalLMLoss` (`loss/loss_utils.py`) saves: log_softmax's fp32 output (kept
    by nll_loss too), the shifted int64 targets and the total weight. `labels = pad(labels, (0, 1), value=-100)`
    (b x (s+1) int64, held by the local `labels` until the loss returns), `shift_labels = labels[...,
    1:].contiguous()`: a b x s copy, the targets nll_loss saves. With b = 1 the slice is already contiguous (a
    size-1 dimension's stride does not count), so `contiguous()` copies nothing and the saved targets are a view
    of the padded (s+1) labels, which then live on with them. (Traced profiles subtract this from what they
    measured, `lora_planner.traced`.)"""
    targets = flow.tokens * 8 if flow.b > 1 else (flow.s + 1) * 8
    return (SavedTensor("loss.log_softmax_fp32", flow.tokens * flow.spec.vocab_size * FP32),
            SavedTensor("loss.targets", targets), SavedTensor("loss.total_weight", FP32))


def refuse_trained_head(flow: Flow, what: str) -> None:
    """The losses planned with a frozen output layer only: full fine-tuning, LoRA, a copy (`modules_to_save`) or
    trainable tokens on lm_head are refused, naming the loss (`what`)."""
    if flow.full or any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters | flow.trained_paths) or \
            any(layer.module.group == "lm_head" for layer in flow.token_layers):
        raise PlannerInputError("loss", f"{what} is not modelled yet", "train adapters only, lm_head frozen, or use "
                                                                       "--loss hf")


def loss_kind(spec: ModelSpec, training) -> str:
    """The loss that runs for `spec` (`rules.loss_that_runs`: Liger's fused one where `--liger` patches the family)."""
    from lora_planner.families import family_rules  # lazily: families import this module's neighbours

    return loss_that_runs(family_rules(spec.family), training)


# ---------------------------------------------------------------------------------------------- torchtune's linear CE
# torchtune main's `LinearCrossEntropyLoss` as its LoRA recipes run it (pytorch/torchtune @bd2a0fc
# `torchtune/modules/loss/cross_entropy_loss.py` l.19-188, `recipes/lora_finetune_single_device.py` `_loss_step`
# l.584-602; the labels come shifted from the dataset, `datasets/_sft.py` l.165-176): the model skips its output
# layer and returns the final hidden state (held by the recipe until the loss returns); the loss drops the ignored
# rows (`index_select` of the hidden state, n x H, and of the targets, n int64; the hidden's index kept for backward),
# splits them with `tensor_split(N, dim=0)` and runs, chunk by chunk, the output layer, the fp32 upcast and
# `F.cross_entropy(..., reduction="sum")`: a chunk's logits and upcast are freed when it returns, its log_softmax output
# is kept. Run for real on CPU by the profiler (`lora_planner.profiler.losses.linear_cross_entropy_loss`).


def shifted_rows(flow: Flow) -> int:
    """The rows whose shifted target exists: every row's last position is dropped by the shift (a padded batch is
    planned full, its padding counted as targets; a packed batch is one row). torchtune's linear loss, Cut
    Cross-Entropy and TRL's fused LM head keep exactly these."""
    return flow.tokens - flow.b


def linear_chunk_rows(flow: Flow) -> list[int]:
    """`tensor_split(N, dim=0)` of the n rows: the first n mod N chunks one row more."""
    q, r = divmod(shifted_rows(flow), flow.t.loss_chunks)
    return [q + (1 if i < r else 0) for i in range(flow.t.loss_chunks)]


def check_linear_loss(flow: Flow) -> None:
    """What `--loss linear` does not model yet, refused with the reason."""
    check_chunked_loss(flow.spec)
    refuse_trained_head(flow, "torchtune's linear cross-entropy with a trained output layer")


def linear_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """Every chunk's fp32 log_softmax output (n x V x 4 in all), the kept targets (n int64, their chunks' views saved
    by nll_loss), the hidden state's row index (n int64, `IndexSelectBackward`) and each chunk's total weight."""
    n = shifted_rows(flow)
    return (SavedTensor("loss.log_softmax_fp32", n * flow.spec.vocab_size * FP32),
            SavedTensor("loss.targets", n * 8), SavedTensor("loss.row_index", n * 8),
            SavedTensor("loss.total_weight", flow.t.loss_chunks * FP32))


def linear_loss_moments(flow: Flow) -> tuple[int, int, int]:
    """(forward scratch on top of everything the loss saves, backward scratch, what the loss keeps then), V the
    vocabulary, e the logits' bytes, chunk j of c_j rows; measured exact on CPU (tests/profiler/test_runner.py).

    Forward peaks at chunk j's nll_loss: the kept rows (n x H, the stream's dtype), chunk j's logits and fp32 upcast,
    the log_softmax outputs and total weights of chunks 0..j, chunk j's loss value and the running sum: the larger j,
    the more outputs (every chunk within one row of the others).

    Backward runs chunk by chunk, last first (each chunk's nodes are newer than the previous chunk's); chunk j's
    log_softmax backward holds two (c_j, V) fp32 gradients, the input gradients of the chunks already done (waiting at
    the split, c_i x H in the stream's dtype) and, for j > 0, the running sum's gradient for the chunks before it; the
    loss then keeps the outputs of chunks 0..j, the total weights of chunks 0..j-1 and the row index, and the targets
    while a chunk before j still has a view of them."""
    v, h, e, s = flow.spec.vocab_size, flow.spec.hidden_size, flow.e_compute, flow.e_stream
    sizes, n = linear_chunk_rows(flow), shifted_rows(flow)
    saved_all = sum(t.nbytes for t in linear_loss_saved(flow))
    upcast = FP32 if e != FP32 else 0
    chunks, done, forward, backward = len(sizes), 0, 0, (-1, 0, 0)
    for j, c in enumerate(sizes):
        done += c
        later = (n - done) * v * FP32
        forward = max(forward, n * h * s + c * v * (e + upcast) - later - (chunks - j - 1) * FP32 + 2 * FP32)
        kept = saved_all - later - (chunks - j) * FP32 - (n * 8 if j == 0 else 0)
        scratch = 2 * c * v * FP32 + (n - done) * h * s + (FP32 if j > 0 else 0)
        if kept + scratch > sum(backward[1:]):
            backward = (j, kept, scratch)
    return forward, backward[2], backward[1]


# ---------------------------------------------------------------------------------------------- litgpt's loss
# litgpt's LoRA fine-tuning loss under Lightning Fabric (Lightning-AI/litgpt v0.5.13 `litgpt/finetune/lora.py` `fit`
# l.355-359, `litgpt/utils.py` `chunked_cross_entropy` l.302-351, `litgpt/model.py` `GPT.forward` l.177-181;
# Lightning 2.6.1 `lightning/fabric/wrappers.py` `_FabricModule.forward`, `plugins/precision/half.py` `convert_output`):
# the output layer over `lm_head_chunk_size` = 128-token sequence chunks, Fabric's fp32 copy of every chunk (made while
# the 16-bit list is referenced), the loop's `logits` keeping the fp32 list from one step to the next, and per chunk
# `cross_entropy(..., reduction="none")` on the fp32 logits. Run for real by the profiler
# (`profiler.losses.LitgptLoss`).


def litgpt_chunks(flow: Flow) -> list[int]:
    """The sequence chunks of `x.split(N, dim=1)`: N tokens each, the last what is left."""
    q, r = divmod(flow.s, flow.t.loss_chunk_tokens)
    return [flow.t.loss_chunk_tokens] * q + ([r] if r else [])


def check_litgpt_loss(flow: Flow) -> None:
    check_chunked_loss(flow.spec)
    if flow.t.resolved_strategy not in (None, "ddp", "ddp-zero1"):
        raise PlannerInputError("loss", f"litgpt's loss with {flow.t.resolved_strategy} is not modelled yet (its "
                                        "logits kept from step to step)", "plan it on one GPU or with DDP")
    refuse_trained_head(flow, "litgpt's loss with a trained output layer")


def litgpt_retained_bytes(flow: Flow) -> tuple[int, int]:
    """What the kept list's autograd graph holds besides it, from the step's optimizer step to the next step's
    conversion (activations, temporaries): under checkpointing the embedding output that transformers'
    `enable_input_require_grads` made a leaf, held by its AccumulateGrad node, and the gradient accumulated into it
    (measured on CPU)."""
    if not flow.t.grad_checkpointing or flow.full:
        return 0, 0
    leaf = flow.tokens * flow.spec.hidden_size * flow.e_stream
    return leaf, leaf


def litgpt_logits_bytes(flow: Flow) -> int:
    """The fp32 list of every chunk's logits, b x s x V x 4, which the training loop keeps across steps."""
    return flow.b * flow.s * flow.spec.vocab_size * FP32


def litgpt_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """Every chunk's fp32 log_softmax output (b x (s - 1) x V x 4 in all: the shift drops the last chunk's last
    position), the targets (reshaped copies of `targets[..., 1:]` chunks when b > 1, views of the batch's labels at
    b = 1) and each chunk's total weight."""
    targets = flow.b * (flow.s - 1) * 8 if flow.b > 1 else 0
    return (SavedTensor("loss.log_softmax_fp32", flow.b * (flow.s - 1) * flow.spec.vocab_size * FP32),
            SavedTensor("loss.targets", targets), SavedTensor("loss.total_weight", len(litgpt_chunks(flow)) * FP32))


def litgpt_loss_moments(flow: Flow) -> tuple[int, int, int, int]:
    """(activations at the loss's forward peak less what the loss saves, the forward's temporaries, the backward's
    temporaries, what the loss keeps then), on top of the kept fp32 list (`litgpt_logits_bytes`, counted at every
    phase); V the vocabulary, e the logits' bytes, rows_j = b x the chunk's positions (the last one shifted).
    Measured exact on CPU (tests/profiler/test_runner.py).

    Forward: the output layer's last chunk (the final hidden state still held) or Fabric's conversion, the new fp32 list
    beside the previous step's (still the loop's `logits`) and, when the logits are 16-bit, the 16-bit list it copies
    (nothing of the loss saved yet); or the last chunk's nll_loss: every
    output, the loop's list, the last chunk's reshape (a copy when b > 1: the shifted view is not contiguous), the
    per-token losses and their concatenation at its sum.

    Backward, chunk j's log_softmax backward (chunks in reverse): two (rows_j, V) fp32 gradients, the fp32 gradients of
    the chunks done (waiting at Fabric's conversion, whose nodes are older than every chunk's loss), the seed and the
    division's gradient; the loss then keeps the outputs of chunks 0..j and the targets and total weights of chunks
    0..j-1."""
    v, e, b = flow.spec.vocab_size, flow.e_compute, flow.b
    sizes = litgpt_chunks(flow)
    rows = [b * n for n in sizes[:-1]] + [b * (sizes[-1] - 1)]
    saved = litgpt_loss_saved(flow)
    saved_all = sum(t.nbytes for t in saved)
    logits = litgpt_logits_bytes(flow)
    sixteen = b * flow.s * v * e if e != FP32 else 0  # the model's 16-bit logits, before Fabric's copies
    # the output layer's last chunk, the final hidden state still there (in fp32 the logits are the kept list)
    # (before the loop's `logits` is reassigned, the previous step's graph still holds what it retains)
    held_acts, held_temps = litgpt_retained_bytes(flow)
    head = ((logits if not sixteen else 0) - saved_all + held_acts,
            flow.tokens * flow.spec.hidden_size * flow.e_stream + sixteen + held_temps)
    convert = (logits - saved_all + held_acts, sixteen + held_temps)
    losses = sum(rows) * FP32  # the per-token losses (reduction "none")
    # at `torch.cat(loss_chunks).sum()`: the losses, their concatenation, the int64 target count and the sum
    nll = (0, (rows[-1] * v * FP32 if b > 1 else 0) + 2 * losses + 8 + FP32)
    forward = max(head, convert, nll, key=sum)
    targets = [r * 8 if b > 1 else 0 for r in rows]
    backward, outputs_after = (0, 0), 0
    for j in range(len(rows) - 1, -1, -1):
        kept = saved_all - outputs_after - sum(targets[j:]) - (len(rows) - j) * FP32
        # (the seed's, and for j > 0 one more 0-d gradient waiting for the chunks before it; measured)
        scratch = 2 * rows[j] * v * FP32 + outputs_after + (2 if j > 0 else 1) * FP32
        if kept + scratch > sum(backward):
            backward = (kept, scratch)
        outputs_after += rows[j] * v * FP32
    return forward[0], forward[1], backward[1] - FP32, backward[0]


# ---------------------------------------------------------------------------------------------- Unsloth's fused CE
# Unsloth's fused cross-entropy (unslothai/unsloth-zoo @ce232d6 `unsloth_zoo/fused_losses/cross_entropy_loss.py`): the
# patched causal-LM forward hands the final hidden state, lm_head's weight and the labels to `UnslothFusedLoss`, which
# shifts the labels into a new (N,) int64 tensor (the hidden state is not shifted: every row's last position runs with
# an ignored target), preallocates the input gradient (N x H, `torch.empty_like(hidden_states)`), splits the N = b x s
# rows with `torch.chunk(n_chunks)` and per chunk runs `torch.func.grad_and_value` of `compute_fused_ce_loss` (the
# output layer in the weight's dtype, `.float()`, `cross_entropy(reduction="sum") / divisor`), copying the chunk's input
# gradient into the buffer; it saves only that buffer, and backward multiplies it by the incoming scale (out of place).
# "unsloth-eager" (`UNSLOTH_FUSED_CE_COMPILE_DISABLE=1`) is run for real on CPU by the profiler
# (`lora_planner.profiler.losses.unsloth_fused_ce_loss`). "unsloth", the default, compiles each chunk's step
# (`torch.compile(accumulate_chunk, dynamic=True, fullgraph=True)`, l.347-360): modelled from the code inductor
# generates for it (torch 2.13, `experiments/unsloth/compiled_chunk.py` and its note): the chunk's logits, one
# fused kernel that writes their gradient in place (`buf5 = buf0; del buf0  # reuse`) beside three fp32 per-row
# buffers, then the input gradient's matmul (c x H), with the logits' buffer still alive.

UNSLOTH_TARGET_CAP_GIB = 4.0  # `_get_chunk_multiplier`: min(half the free GPU memory, 4 GiB)


def unsloth_chunk_count(rows: int, vocab_size: int, target_gib: float) -> int:
    """`get_chunk_size` (l.151-173): the full fp32 logits (rows x V x 4 bytes) over the target, 1 when they fit, else
    rounded up to a multiple of 4; computed in the same floating-point steps as Unsloth's."""
    multiplier = (vocab_size * 4 / 1024 / 1024 / 1024) / target_gib / 4
    exact = rows * multiplier * 4
    if exact <= 1.0 + 1e-9:
        return 1
    return math.ceil(exact / 4 - 1e-9) * 4


def unsloth_chunks(spec: ModelSpec, training: TrainingSpec) -> int:
    """The chunk count the run uses: Unsloth's rule for the target (`TrainingSpec.loss_target_gib`), or the forced
    count (`loss_chunks`)."""
    if training.loss_target_gib is None:
        return training.loss_chunks
    return unsloth_chunk_count(training.tokens, spec.vocab_size, training.loss_target_gib)


def unsloth_chunk_rows(flow: Flow) -> list[int]:
    """`torch.chunk(n)` of the N rows: chunks of ceil(N / n) rows, the last what is left (fewer chunks when n does not
    divide evenly)."""
    n = flow.tokens
    size = -(-n // unsloth_chunks(flow.spec, flow.t))
    return [min(size, n - start) for start in range(0, n, size)]


def check_unsloth_loss(flow: Flow) -> None:
    """What `--loss unsloth` / `unsloth-eager` does not model yet, refused with the reason: a head doing more than the
    output layer (Unsloth passes soft-capping and logit scaling into each chunk: not modelled), a trained output layer (its
    gradient is accumulated in forward), autocast over fp32 weights (Unsloth loads the model in 16 bits)."""
    check_chunked_loss(flow.spec)
    refuse_trained_head(flow, "Unsloth's fused cross-entropy with a trained output layer")
    if flow.amp:
        raise PlannerInputError("loss", "Unsloth's fused cross-entropy under autocast over fp32 weights is not "
                                        "modelled (Unsloth loads the model in 16 bits)",
                                "use --dtype bf16 (or fp16) without --amp")


def unsloth_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """The input gradient computed in forward (N x H, the hidden state's dtype): all it saves for backward."""
    return (SavedTensor("loss.input_gradient", flow.tokens * flow.spec.hidden_size * flow.e_stream),)


def unsloth_loss_moments(flow: Flow) -> tuple[int, int]:
    """(forward scratch on top of the input gradient it saves, backward scratch); eager measured exact on CPU
    (tests/profiler/test_runner.py), compiled modelled from inductor's code. c the largest chunk's rows, V the
    vocabulary, H the hidden size, e the output layer's dtype (the logits').

    Compiled: the chunk's logits (c x V at e, their gradient written in place) beside the larger of the fused kernel's
    three fp32 (c,) buffers and a scalar, and the input gradient (c x H at e).

    Forward: the shifted labels (N int64), the divisor, the seed `torch.func.grad_and_value` differentiates from and
    the chunk's loss (three fp32 scalars), and the heavier of the chunk's two backward moments: `.float()`'s gradient
    cast back to e beside log_softmax's output, nll_loss's gradient and log_softmax's input gradient (three fp32
    c x V; with fp32 logits there is no cast), or the output layer's input gradient (c x H at e) beside those fp32
    buffers but the one the cast replaced. The logits and their upcast are freed when the chunk's forward returns.

    Backward: the seed, the mean of the incoming gradient and the scale factor (fp32 scalars), and the scaled input
    gradient (N x H, out of place)."""
    v, h, e = flow.spec.vocab_size, flow.spec.hidden_size, flow.e_compute
    c = max(unsloth_chunk_rows(flow))
    if flow.t.loss == "unsloth":
        chunk = c * v * e + max(3 * c * FP32 + FP32, c * h * e)
    else:
        cast = c * v * e if e != FP32 else 0
        chunk = max(3 * c * v * FP32 + cast, 2 * c * v * FP32 + (cast or c * v * FP32) + c * h * e)
    forward = flow.tokens * 8 + 3 * FP32 + chunk
    backward = 3 * FP32 + flow.tokens * h * flow.e_stream
    return forward, backward

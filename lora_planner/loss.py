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
- Liger's fused linear cross-entropy, Apple's Cut Cross-Entropy and TRL's fused LM head ("fused-linear", "cce",
  "trl"): Triton kernels, modelled from their source (each section below cites it) and pinned by hand counts.

Checked byte for byte against real CPU steps and full-size fake traces (`tests/profiler/test_runner.py`,
`tests/profiler/test_allocator.py`) and by hand (`tests/test_loss.py`).

Known limitations: the chunked loss is modelled eager (`torch.compile` of it saves other tensors); LoRA on lm_head
and full fine-tuning under autocast with it are refused (their gradients are summed over the chunks in ways not
modelled yet), as are models whose head does more than the output layer (`check_chunked_loss`).
"""

from __future__ import annotations

from lora_planner.errors import PlannerInputError
from lora_planner.families.rules import FP32, Flow, SavedTensor, loss_that_runs
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec


def check_chunked_loss(spec: ModelSpec) -> None:
    """The chunked loss replaces the causal-LM head by the output layer alone: a model whose head does more (Gemma 2's
    logit soft-capping, Granite's logit scaling) would not be the model any more."""
    extra = "final_logit_softcapping" if spec.final_logit_softcapping is not None else \
        "logits_scaling" if spec.family == "granite" else None  # `GraniteForCausalLM` always divides its logits
    if extra:
        raise PlannerInputError("loss", f"{spec.name}'s head applies {extra} after the output layer, which the chunked "
                                        "loss (the output layer alone, torchtune's) leaves out",
                                "use --loss hf for this model")


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


# ---------------------------------------------------------------------------------------------- fused linear CE
# Liger-Kernel's `LigerFusedLinearCrossEntropyFunction` as transformers' Trainer runs it (`use_liger_kernel=True`, or
# `--loss fused-linear` alone), modelled from its source (linkedin/Liger-Kernel @ead96b6, Triton: not run here):
# - `src/liger_kernel/transformers/model/loss_utils.py` `LigerForCausalLMLoss`: `labels = F.pad(labels, (0, 1))`
#   (b x (s+1) int64, held by the local until the loss returns) and `shift_labels = labels[..., 1:].contiguous()`
#   (a copy when b > 1), the final norm's output viewed (N, H); the Trainer passes `num_items_in_batch`, so
#   reduction "sum" and a division after.
# - `src/liger_kernel/ops/fused_linear_cross_entropy.py` `fused_linear_cross_entropy_forward`: the gradients are
#   computed in forward. `grad_input = zeros_like(_input)` (N x H, saved for backward: it *is* the input gradient),
#   `grad_weight` (V x H in the weight's dtype, only when lm_head trains), `loss_1d` (N fp32) and `target_mask` (N
#   bool); the rows in chunks of C = next_pow2(ceil(N / ceil(V / H))) (L64-70): each chunk's logits (C x V, the
#   matmul dtype, no fp32 copy: the kernel upcasts in registers and writes the gradient in place), the previous
#   chunk's still referenced until L212 (two at once), the input gradient's matmul (C x H), and with a trained
#   lm_head `grad_weight += torch.mm(...).float()` (L257): a V x H temporary in the matmul dtype plus its fp32 copy.
# - backward (`fused_linear_cross_entropy_backward`): scales the saved gradients in place; allocates nothing.
# Nothing of the logits, the hidden state or lm_head's input is saved.


def loss_kind(spec: ModelSpec, training) -> str:
    """The loss that runs for `spec` (`rules.loss_that_runs`: Liger's fused one where `--liger` patches the family)."""
    from lora_planner.families import family_rules  # lazily: families import this module's neighbours

    return loss_that_runs(family_rules(spec.family), training)


def flce_chunk_rows(flow: Flow) -> int:
    """Liger's chunk size: next_pow2(ceil(N / ceil(V / H))) rows (`fused_linear_cross_entropy.py` L64-70)."""
    n, v, h = flow.tokens, flow.spec.vocab_size, flow.spec.hidden_size
    rows = -(-n // -(-v // h))
    return 1 << (rows - 1).bit_length()


def check_fused_linear_loss(flow: Flow) -> None:
    """What `--loss fused-linear` does not model yet, refused with the reason."""
    spec = flow.spec
    if spec.family == "granite":
        raise PlannerInputError("loss", "Liger has no fused linear cross-entropy for Granite (its logits are scaled; "
                                        "`apply_liger_kernel_to_granite` raises with it)", "use --loss hf")
    if any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters):
        raise PlannerInputError("loss", "Liger's fused linear cross-entropy reads lm_head.weight directly, so a LoRA "
                                        "adapter on lm_head would be skipped", "leave lm_head out of the targets")
    if flow.amp:
        raise PlannerInputError("loss", "the fused linear cross-entropy under autocast (its per-chunk casts of the "
                                        "output weight) is not modelled yet", "use bf16 weights without --amp")
    if spec.lm_head_bias:
        raise PlannerInputError("loss", "the fused linear cross-entropy with an lm_head bias is not modelled yet",
                                "use --loss hf for this model")


def flce_saved(flow: Flow, head_weight_bytes: int) -> tuple[SavedTensor, ...]:
    """What the fused linear cross-entropy keeps for backward: the input gradient (N x H in the final hidden state's
    dtype) and, when lm_head trains, its weight gradient (`head_weight_bytes`: V x H in the weight's dtype), which
    autograd then takes as lm_head's `.grad`."""
    saved = (SavedTensor("loss.flce_grad_input", flow.tokens * flow.spec.hidden_size * flow.e_stream),)
    if head_weight_bytes:
        saved += (SavedTensor("loss.flce_grad_weight", head_weight_bytes),)
    return saved


def flce_forward_scratch(flow: Flow, head_weight_bytes: int) -> int:
    """The fused loss's transients at its heaviest moment, on top of what it saves: the labels (padded b x (s+1) and
    shifted b x s when b > 1), `loss_1d` and `target_mask` (N x 5), then the larger of two chunks' logits at once and
    one chunk's logits beside the input gradient's matmul (C x H) or, with a trained lm_head, the weight gradient's
    V x H matmul in the weight's dtype and its fp32 copy (`fused_linear_cross_entropy.py` L114-257)."""
    n, v, h = flow.tokens, flow.spec.vocab_size, flow.spec.hidden_size
    c, e = min(flce_chunk_rows(flow), n), flow.e_stream  # the logits come in the input's (= the weight's) dtype
    labels = flow.b * (flow.s + 1) * 8 + (n * 8 if flow.b > 1 else 0)
    # with a trained lm_head: the V x H matmul in the weight's dtype, and its fp32 copy unless it is fp32 already
    upcast = v * h * FP32 if head_weight_bytes and head_weight_bytes != v * h * FP32 else 0
    second = head_weight_bytes + upcast if head_weight_bytes else c * h * e
    return labels + n * (FP32 + 1) + max(2 * c * v * e, c * v * e + second)


# ---------------------------------------------------------------------------------------------- Cut Cross-Entropy
# Apple's Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`, impl "cce", the default off macOS), as its
# transformers patch and axolotl's cut_cross_entropy plugin call it (`apply_lce(hidden_states, lm_head.weight, labels,
# shift=True)`, the patched forward returning `logits=None`), modelled from its source (apple/ml-cross-entropy @d42911f;
# axolotl's fork @5f0c7a7 allocates the same; Triton, not run here):
# - `cce.py` `cce_linear_cross_entropy` / `LinearCrossEntropyFunction.forward` (l.48-162): `valids`, the K rows whose
#   shifted target is not ignored (`utils.py` l.44-49: built from index products and a sum, int64), the log-sum-exp of
#   every row (fp32, K; `cce_lse_forward.py` l.181-201: the logits live only in the kernel's registers) and, for the
#   gradient filter, the vocabulary's average logit (fp32, V); then the target logits (fp32, K, `indexed_dot.py`
#   l.123) and the loss in place of them; `ctx.save_for_backward(e, c, bias, lse, targets, valids, logit_avg)`
#   (l.141): the hidden state e itself (N x H) is kept, the weight c is the parameter, the targets the batch's labels.
# - backward (`cce.py` l.171-179, `cce_backward.py` l.346-521): `argsort(logit_avg).to(int32)` (V int64, then V int32),
#   `de = zeros_like(e)` (N x H, e's dtype; fp32 only with `accum_e_fp32`, not the default) and its lock array
#   (int32, ceil(K / 128) x ceil(H / 64)); `dc` (V x H) only when the output weight trains.
# No (N, V) tensor exists at any moment.


def cce_rows(flow: Flow) -> int:
    """K: the rows whose shifted target exists, every row's last position dropped by the shift (a padded batch is
    planned full, its padding counted as targets; a packed batch is one row)."""
    return flow.tokens - flow.b


def check_cce_loss(flow: Flow) -> None:
    """What `--loss cce` does not model yet, refused with the reason."""
    spec = flow.spec
    if spec.final_logit_softcapping is not None or spec.family == "granite":
        raise PlannerInputError("loss", f"{spec.name}'s head transforms its logits (soft-capping or scaling), which "
                                        "the planned Cut Cross-Entropy call does not", "use --loss hf for this model")
    if flow.full or any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters | flow.trained_paths) or \
            any(layer.module.group == "lm_head" for layer in flow.token_layers):
        raise PlannerInputError("loss", "Cut Cross-Entropy with a trained output layer (its V x H gradient in "
                                        "backward) is not modelled yet", "train adapters only, lm_head frozen")
    if flow.amp:
        raise PlannerInputError("loss", "Cut Cross-Entropy under autocast (Apple's casts e and c, axolotl's fork "
                                        "refuses fp32) is not modelled yet", "use bf16 weights without --amp")
    if spec.lm_head_bias:
        raise PlannerInputError("loss", "Cut Cross-Entropy with an lm_head bias is not modelled yet",
                                "use --loss hf for this model")
    if flow.e_stream == FP32:
        raise PlannerInputError("loss", "Cut Cross-Entropy computes in 16-bit (axolotl's fork asserts bf16 / fp16 "
                                        "inputs; an fp32 stream comes from --dtype fp32 or QLoRA's kbit preparation)",
                                "use --dtype bf16, and with QLoRA --no-kbit-prep (axolotl casts back to bf16)")


def cce_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What Cut Cross-Entropy keeps for backward: the final hidden state (N x H, the stream's dtype), the per-row
    log-sum-exp (fp32, K), `valids` (int64, K) and the average logit per vocabulary entry (fp32, V)."""
    k = cce_rows(flow)
    return (SavedTensor("loss.cce_hidden", flow.tokens * flow.spec.hidden_size * flow.e_stream),
            SavedTensor("loss.cce_lse", k * FP32), SavedTensor("loss.cce_valids", k * 8),
            SavedTensor("loss.cce_logit_avg", flow.spec.vocab_size * FP32))


def cce_forward_scratch(flow: Flow) -> int:
    """On top of what it saves, at its heaviest forward moment: the target logits (fp32, K), which become the loss in
    place, and the loss value."""
    return cce_rows(flow) * FP32 + FP32


def cce_backward_scratch(flow: Flow) -> int:
    """The backward's buffers on top of the saved tensors: the vocabulary order (V int32) beside its int64 argsort
    first, then the input gradient (N x H, the stream's dtype) and its locks."""
    v, h = flow.spec.vocab_size, flow.spec.hidden_size
    locks = -(-cce_rows(flow) // 128) * -(-h // 64) * 4
    return v * 4 + max(v * 8, flow.tokens * h * flow.e_stream + locks)


# ---------------------------------------------------------------------------------------------- TRL's fused LM head
# TRL 1.16's fused LM head (`trl/trainer/utils.py` `add_fused_lm_head`, l.1548-1700; `trl/kernels/chunked_logprob.py`
# `ChunkedLogProbFunction`), what `SFTTrainer` runs by default (`sft_trainer.py` l.1142-1147, `compute_loss` l.1611:
# `outputs = model(**inputs, fused_lm_head=True)`, loss = -log_probs.sum() / tokens; the outputs requested: log_probs,
# entropy, is_top1), modelled from its source (Triton on CUDA; not run here):
# - the patched forward runs the backbone (lm_head skipped), shifts (`last_hidden_state[:, :-1]`, `labels[:, 1:]`),
#   `mask = labels != -100` (bool) and on a Triton device keeps only the valid rows: `hidden_states[mask]` (K x H, a
#   copy in the stream's dtype) and `labels[mask]` (K int64);
# - forward: seven fp32 K-vectors of online log-sum-exp statistics and one projection buffer `mm_buf` of min(K, 4,096)
#   x 32,768 in the compute dtype (`TOKEN_CHUNK_SIZE`, `_CHUNKED_LOGPROB_CHUNK_SIZE`: 32,768 columns even when V is
#   smaller); each 4,096-token chunk cast to the compute dtype and each 32,768-row slice of the weight too (copies only
#   when the dtypes differ: autocast over fp32 weights); the Triton kernel folds a tile in registers; then log_z,
#   log_probs, entropy (via a K temporary) and is_top1 (two bool temporaries); `ctx.save_for_backward(hidden,
#   weight, bias, targets, log_z, entropy)`;
# - backward: `grad_hidden = zeros(K, H, fp32)`, a new `mm_buf`, each tile recomputed and turned into the logits'
#   gradient in place, `addmm(..., out_dtype=fp32)` into grad_hidden (no copies on CUDA from torch 2.8), and
#   `grad_hidden.to(hidden.dtype)` before its locals go.
TRL_TOKEN_CHUNK = 4096  # `TOKEN_CHUNK_SIZE`
TRL_VOCAB_CHUNK = 32768  # `_CHUNKED_LOGPROB_CHUNK_SIZE`


def trl_rows(flow: Flow) -> int:
    """K: the shifted targets (every one counted valid: padding is planned as tokens)."""
    return flow.tokens - flow.b


def check_trl_loss(flow: Flow) -> None:
    """What `--loss trl` does not model yet, refused with the reason."""
    if flow.full or any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters | flow.trained_paths) or \
            any(layer.module.group == "lm_head" for layer in flow.token_layers):
        raise PlannerInputError("loss", "TRL's fused LM head with a trained output layer (its fp32 V x H gradient) is "
                                        "not modelled yet", "train adapters only, lm_head frozen")


def _trl_buffers(flow: Flow) -> tuple[int, int, int]:
    """(K, the projection buffer's bytes, the larger per-tile copy: a token chunk's or a weight slice's cast to the
    compute dtype when it differs)."""
    k, h, e_c = trl_rows(flow), flow.spec.hidden_size, flow.e_compute
    mm = min(k, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * e_c
    chunk = min(k, TRL_TOKEN_CHUNK) * h * e_c if flow.e_stream != e_c else 0
    weight_bytes = FP32 if flow.kbit_fp32 else BYTES_PER_ELEMENT[flow.t.dtype]  # lm_head's (kbit prep: fp32)
    weight = min(flow.spec.vocab_size, TRL_VOCAB_CHUNK) * h * e_c if weight_bytes != e_c else 0
    return k, mm, chunk + weight


def trl_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What TRL's fused LM head keeps for backward: the valid rows of the final hidden state (K x H, the stream's
    dtype), their int64 targets, fp32 log_z and entropy, and the bool label mask (b x (s - 1)) the indexing and the
    scatter back keep."""
    k = trl_rows(flow)
    return (SavedTensor("loss.trl_hidden", k * flow.spec.hidden_size * flow.e_stream),
            SavedTensor("loss.trl_targets", k * 8), SavedTensor("loss.trl_log_z", k * FP32),
            SavedTensor("loss.trl_entropy", k * FP32), SavedTensor("loss.trl_mask", flow.b * (flow.s - 1)))


def trl_forward_scratch(flow: Flow) -> int:
    """On top of what it saves (log_z and entropy not yet there in the tile loop): the seven statistics and the
    projection buffer, with the tile copies in the loop (7 x 4 K - 8 K + copies) or log_probs and entropy's
    temporary after it (7 x 4 K + 8 K)."""
    k, mm, copies = _trl_buffers(flow)
    return 7 * k * FP32 + mm + max(copies - 2 * k * FP32, 2 * k * FP32)


def trl_backward_scratch(flow: Flow) -> int:
    """At the end of its backward: the incoming gradient of log_probs (K fp32), the fp32 input gradient (K x H), the
    projection buffer, and the cast of the gradient to the stream's dtype (none when fp32) or, in the tile loop, the
    tile copies."""
    k, mm, copies = _trl_buffers(flow)
    h = flow.spec.hidden_size
    cast = k * h * flow.e_stream if flow.e_stream != FP32 else 0
    return k * FP32 + k * h * FP32 + mm + max(copies, cast)


# ---------------------------------------------------------------------------------------------- torchtune's linear CE
# torchtune main's `LinearCrossEntropyLoss` as its LoRA recipes run it (pytorch/torchtune @bd2a0fc
# `torchtune/modules/loss/cross_entropy_loss.py` l.19-188, `recipes/lora_finetune_single_device.py` `_loss_step`
# l.584-602; the labels come shifted from the dataset, `datasets/_sft.py` l.165-176): the model skips its output
# layer and returns the final hidden state (held by the recipe until the loss returns); the loss drops the ignored
# rows (`index_select` of the hidden state, n x H, and of the targets, n int64; the hidden's index kept for backward),
# splits them with `tensor_split(N, dim=0)` and runs, chunk by chunk, the output layer, the fp32 upcast and
# `F.cross_entropy(..., reduction="sum")`: a chunk's logits and upcast are freed when it returns, its log_softmax output
# is kept. Run for real on CPU by the profiler (`lora_planner.profiler.losses.linear_cross_entropy_loss`).


def linear_rows(flow: Flow) -> int:
    """n: the rows the loss keeps, every target valid but each row's last (the dataset's shift)."""
    return flow.tokens - flow.b


def linear_chunk_rows(flow: Flow) -> list[int]:
    """`tensor_split(N, dim=0)` of the n rows: the first n mod N chunks one row more."""
    q, r = divmod(linear_rows(flow), flow.t.loss_chunks)
    return [q + (1 if i < r else 0) for i in range(flow.t.loss_chunks)]


def check_linear_loss(flow: Flow) -> None:
    """What `--loss linear` does not model yet, refused with the reason."""
    check_chunked_loss(flow.spec)
    if flow.full or any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters | flow.trained_paths) or \
            any(layer.module.group == "lm_head" for layer in flow.token_layers):
        raise PlannerInputError("loss", "torchtune's linear cross-entropy with a trained output layer is not modelled "
                                        "yet", "train adapters only, lm_head frozen, or use --loss chunked")


def linear_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """Every chunk's fp32 log_softmax output (n x V x 4 in all), the kept targets (n int64, their chunks' views saved
    by nll_loss), the hidden state's row index (n int64, `IndexSelectBackward`) and each chunk's total weight."""
    n = linear_rows(flow)
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
    sizes, n = linear_chunk_rows(flow), linear_rows(flow)
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

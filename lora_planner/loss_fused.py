"""Fused losses that never hold the whole logits (pure), each modelled from its implementation's source because it is
a Triton kernel that cannot run here, and pinned by hand counts (`tests/test_loss_fused.py`):

- Liger's `LigerFusedLinearCrossEntropyFunction` ("fused-linear", `--liger`): the input gradient computed in forward,
  chunk by chunk (`flce_*`);
- Apple's Cut Cross-Entropy ("cce", axolotl's cut_cross_entropy plugin): no logits at any moment, the hidden state kept
  and its gradient made in backward (`cce_*`);
- TRL 1.16's fused LM head ("trl", SFTTrainer's default): the valid rows kept, logits only as tiles (`trl_*`).

Each section below cites the repository, commit, file and lines it was read from. The plan's notes say these are
modelled, not measured (`lora_planner.planner.plan_warnings`).

Known limitations: a trained output layer is refused by CCE and TRL (their V x H gradients), autocast and fp32 streams
by CCE; Liger under autocast; the kernels' own scratch (registers, cuBLAS workspaces) is not memory the allocator sees.
"""

from __future__ import annotations

from lora_planner.errors import PlannerInputError
from lora_planner.families.rules import FP32, Flow, SavedTensor
from lora_planner.loss import refuse_trained_head, shifted_rows
from lora_planner.objectives import FUSED_HEAD_OUTPUTS
from lora_planner.specs import BYTES_PER_ELEMENT


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


def _refuse_autocast_and_bias(flow: Flow, name: str, autocast_why: str) -> None:
    if flow.amp:
        raise PlannerInputError("loss", f"{name} under autocast ({autocast_why}) is not modelled yet",
                                "use bf16 weights without --amp")
    if flow.spec.lm_head_bias:
        raise PlannerInputError("loss", f"{name} with an lm_head bias is not modelled yet", "use --loss hf for this model")


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
    _refuse_autocast_and_bias(flow, "the fused linear cross-entropy", "its per-chunk casts of the output weight")


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


def check_cce_loss(flow: Flow) -> None:
    """What `--loss cce` does not model yet, refused with the reason."""
    spec = flow.spec
    if spec.final_logit_softcapping is not None or spec.family == "granite":
        raise PlannerInputError("loss", f"{spec.name}'s head transforms its logits (soft-capping or scaling), which "
                                        "the planned Cut Cross-Entropy call does not", "use --loss hf for this model")
    refuse_trained_head(flow, "Cut Cross-Entropy with a trained output layer (its V x H gradient in backward)")
    _refuse_autocast_and_bias(flow, "Cut Cross-Entropy", "Apple's casts e and c, axolotl's fork refuses fp32")
    if flow.e_stream == FP32:
        raise PlannerInputError("loss", "Cut Cross-Entropy computes in 16-bit (axolotl's fork asserts bf16 / fp16 "
                                        "inputs; an fp32 stream comes from --dtype fp32 or QLoRA's kbit preparation)",
                                "use --dtype bf16, and with QLoRA --no-kbit-prep (axolotl casts back to bf16)")


def cce_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What Cut Cross-Entropy keeps for backward: the final hidden state (N x H, the stream's dtype), the per-row
    log-sum-exp (fp32, K), `valids` (int64, K) and the average logit per vocabulary entry (fp32, V)."""
    k = shifted_rows(flow)
    return (SavedTensor("loss.cce_hidden", flow.tokens * flow.spec.hidden_size * flow.e_stream),
            SavedTensor("loss.cce_lse", k * FP32), SavedTensor("loss.cce_valids", k * 8),
            SavedTensor("loss.cce_logit_avg", flow.spec.vocab_size * FP32))


def cce_forward_scratch(flow: Flow) -> int:
    """On top of what it saves, at its heaviest forward moment: the target logits (fp32, K), which become the loss in
    place, and the loss value."""
    return shifted_rows(flow) * FP32 + FP32


def cce_backward_scratch(flow: Flow) -> int:
    """The backward's buffers on top of the saved tensors: the vocabulary order (V int32) beside its int64 argsort
    first, then the input gradient (N x H, the stream's dtype) and its locks."""
    v, h = flow.spec.vocab_size, flow.spec.hidden_size
    locks = -(-shifted_rows(flow) // 128) * -(-h // 64) * 4
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
#
# On a device without Triton (CPU) the same function runs its torch fallback (`_forward_tile`, `_backward_tile`,
# chunked_logprob.py l.211-305), measured with the exact tracker on real TRL steps (`tests/profiler/test_trl_steps.py`):
# the patched forward scores every position (`compact` False, utils.py l.1640-1660: `hidden_states.reshape(-1, H)`, a
# copy, `labels.clamp(min=0)`, a copy), each tile folded as whole fp32 tensors: the tile's upcast and the transform's
# two products, z, the bool `before_target` (a local until the fold returns) with its negation and masked copy,
# `z - max` and its exp, `e * z`: 13 bytes a tile element at the heaviest op with is_top1 requested (12 without);
# after the call each output is `x.view(mask.shape).masked_fill(~mask, 0)` (a new tensor, and a saved `~mask` for each
# differentiable one). Its backward (`_backward_tile`) holds y, z, log_p, p, grad, is_target (bool), and the
# subtraction's and product's fp32 temporaries: 29 bytes a tile element.
TRL_TOKEN_CHUNK = 4096  # `TOKEN_CHUNK_SIZE`
TRL_VOCAB_CHUNK = 32768  # `_CHUNKED_LOGPROB_CHUNK_SIZE`


def trl_outputs(flow: Flow) -> tuple[str, ...]:
    """The outputs the trainer asks of the fused head (`objectives.FUSED_HEAD_OUTPUTS`)."""
    return FUSED_HEAD_OUTPUTS[flow.t.objective]


def trl_compact(flow: Flow) -> bool:
    """`_use_triton(device)`: on CUDA only the valid rows go through the kernel; on CPU every position does."""
    return flow.t.device != "cpu"


def check_trl_loss(flow: Flow) -> None:
    """What `--loss trl` does not model yet, refused with the reason: full fine-tuning is planned (the trained output
    layer's fp32 V x H gradient, `trl_backward_scratch`) but for a tied output layer, and LoRA, a copy or trainable
    tokens on lm_head are not."""
    if flow.full and flow.spec.tie_word_embeddings:
        raise PlannerInputError("loss", "TRL's fused LM head with a tied, trained output layer is not modelled yet",
                                "train adapters (--method lora), or use --loss hf")
    if flow.full:
        return
    refuse_trained_head(flow, "TRL's fused LM head with a trained output layer (its fp32 V x H gradient)")


def trl_rows(flow: Flow) -> int:
    """K, the rows the fused head scores: every shifted position, but on a Triton device (`trl_compact`) only the
    valid labels' for GRPO, whose labels mask everything before the completion (`labels[:, :-logits_to_keep] = -100`,
    grpo_trainer.py l.1495-1496): batch x completion tokens (SFT and DPO: every position, an upper bound on CUDA)."""
    if trl_compact(flow) and flow.t.objective == "grpo":
        return flow.b * flow.t.grpo.max_completion_length
    return shifted_rows(flow)


def _trl_buffers(flow: Flow) -> tuple[int, int, int]:
    """(K, the projection buffer's bytes, the larger per-tile copy: a token chunk's or a weight slice's cast to the
    compute dtype when it differs)."""
    k, h, e_c = trl_rows(flow), flow.spec.hidden_size, flow.e_compute
    mm = min(k, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * e_c
    chunk = min(k, TRL_TOKEN_CHUNK) * h * e_c if flow.e_stream != e_c else 0
    weight_bytes = FP32 if flow.kbit_fp32 else BYTES_PER_ELEMENT[flow.t.dtype]  # lm_head's (kbit prep: fp32)
    weight = min(flow.spec.vocab_size, TRL_VOCAB_CHUNK) * h * e_c if weight_bytes != e_c else 0
    return k, mm, chunk + weight


def _trl_tile(flow: Flow) -> tuple[int, int]:
    """(rows, columns) of the fallback's largest tile: a token chunk by the vocabulary's first chunk."""
    return min(trl_rows(flow), TRL_TOKEN_CHUNK), min(flow.spec.vocab_size, TRL_VOCAB_CHUNK)


def trl_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What TRL's fused LM head keeps for backward: the rows of the final hidden state it scored (K x H, the stream's
    dtype: the valid ones gathered on CUDA, all of them reshaped on CPU), their int64 targets, fp32 log_z and entropy
    (log_z again when entropy is not asked for), and the bool label mask (b x (s - 1)) the indexing and the scatter
    back keep on CUDA, or the negated mask each differentiable output's `masked_fill` keeps on CPU."""
    k = trl_rows(flow)
    entropy = "entropy" in trl_outputs(flow)
    masks = (1 + entropy) if not trl_compact(flow) else 1
    return (SavedTensor("loss.trl_hidden", k * flow.spec.hidden_size * flow.e_stream),
            SavedTensor("loss.trl_targets", k * 8), SavedTensor("loss.trl_log_z", k * FP32),
            SavedTensor("loss.trl_entropy", k * FP32 if entropy else 0),
            SavedTensor("loss.trl_mask", masks * flow.b * (flow.s - 1)))


def trl_held_outputs_bytes(flow: Flow) -> int:
    """The outputs the forward returns beside the loss, (b, s - 1) each: fp32 log_probs, entropy, mean_logits, bool
    is_top1, and the bool label mask (`FusedCausalLMOutput.label_mask`), held by the trainer's loss code."""
    per = flow.b * (flow.s - 1)
    return sum(per * (1 if name == "is_top1" else FP32) for name in trl_outputs(flow)) + per


def trl_forward_scratch(flow: Flow, outputs: tuple[str, ...] | None = None) -> int:
    """On top of what it saves (log_z and entropy not yet there in the tile loop): the seven statistics and the
    projection buffer, with the tile copies in the loop (7 x 4 K - 8 K + copies) or log_probs and entropy's
    temporary after it (7 x 4 K + 8 K). On CPU, the tile loop's fold instead (module comment), beside the label mask."""
    k, mm, copies = _trl_buffers(flow)
    if trl_compact(flow):
        return 7 * k * FP32 + mm + max(copies - 2 * k * FP32, 2 * k * FP32)
    outputs = trl_outputs(flow) if outputs is None else outputs
    n, cols = _trl_tile(flow)
    chunk = n * flow.spec.hidden_size * flow.e_compute if flow.e_stream != flow.e_compute else 0
    per_element = 13 if "is_top1" in outputs else 12
    return 7 * k * FP32 + mm + chunk + per_element * n * cols + 16 * n + k - _cpu_saved_after_loop(k, outputs)


def _cpu_saved_after_loop(k: int, outputs: tuple[str, ...]) -> int:
    """On CPU, what the head saves only after its tile loop: fp32 log_z (and entropy), and the negated label mask of
    each differentiable output (log_probs, entropy)."""
    differentiable = 1 + ("entropy" in outputs)
    return differentiable * k * (FP32 + 1)


def trl_backward_scratch(flow: Flow) -> int:
    """At the end of its backward: the incoming gradient of log_probs (K fp32), the fp32 input gradient (K x H), the
    projection buffer, and the cast of the gradient to the stream's dtype (none when fp32) or, in the tile loop, the
    tile copies. On CPU, the fallback's tile (module comment) beside the weight slice's cast."""
    k, mm, copies = _trl_buffers(flow)
    h = flow.spec.hidden_size
    cast = k * h * flow.e_stream if flow.e_stream != FP32 else 0
    head = upcast = 0
    n, cols = _trl_tile(flow)
    if flow.full:  # the trained output layer: an fp32 V x H gradient from the start, cast to the weight's dtype last
        v, e_w = flow.spec.vocab_size, BYTES_PER_ELEMENT[flow.t.dtype]
        head, cast = v * h * FP32, cast + (v * h * e_w if e_w != FP32 else 0)
        # on CPU its accumulation, after the fold, upcasts the tile (transposed) and the token chunk (`_addmm_fp32`)
        upcast = (n * cols + n * h) * FP32 if flow.e_compute != FP32 else 0
    if trl_compact(flow):
        return k * FP32 + k * h * FP32 + head + mm + max(copies, cast)
    return k * FP32 + k * h * FP32 + head + mm + max(copies + max(29 * n * cols, upcast), cast)


def trl_no_grad_head_bytes(flow: Flow, outputs: tuple[str, ...] | None = None) -> int:
    """The fused head's heaviest moment in a no-grad pass (DPO's reference pass), beyond the weights: the backbone's
    output (b x s x H) and the scored rows' hidden state (gathered or reshaped, K x H), their targets and the label
    mask, then the tile loop (`trl_forward_scratch` with nothing saved). `outputs`: the head's (a reference model's
    own head asks for log_probs only, `add_fused_lm_head`'s default); the trainer's by default."""
    outputs = trl_outputs(flow) if outputs is None else outputs
    k, h = trl_rows(flow), flow.spec.hidden_size
    # (on CPU the label mask is in the scratch already: it is not saved there)
    inputs = flow.tokens * h * flow.e_stream + k * h * flow.e_stream + k * 8 + (k if trl_compact(flow) else 0)
    not_saved = _cpu_saved_after_loop(k, outputs) if not trl_compact(flow) else 2 * k * FP32
    return inputs + trl_forward_scratch(flow, outputs) + not_saved


def no_grad_pass_bytes(flow: Flow, weights_cached: bool = False, outputs: tuple[str, ...] | None = None,
                       mask_bytes: int = 0) -> int:
    """A no-grad forward through TRL's fused head (a reference, scoring or KL pass): the heavier of one decoder
    layer's moment (`inference.no_grad_layer_peak_bytes`, beside the padded batch's bool mask when no graph keeps it
    already) and the head's (`trl_no_grad_head_bytes`: the mask is gone by then)."""
    from lora_planner.inference import no_grad_layer_peak_bytes

    return max(mask_bytes + no_grad_layer_peak_bytes(flow, weights_cached), trl_no_grad_head_bytes(flow, outputs))

"""What ORPO's and CPO's (SimPO's) loss code keeps and holds (pure): the whole logits of the pair's two rows.

TRL 1.16's `ORPOTrainer` (`trl/experimental/orpo/orpo_trainer.py`) and `CPOTrainer` (`trl/experimental/cpo/
cpo_trainer.py`, `loss_type` "sigmoid" for CPO, "simpo" for SimPO) share one code path, read from their source (the
facts, with line numbers, are in `docs/research/issue17_orpo_simpo_kto.md` §1, §2, §4, §6):

- `concatenated_forward`: `model(concatenated_input_ids, attention_mask=..., use_cache=False)` over the 2B rows (chosen
  first) with no labels, so the output layer projects every position: (2B, T, V) logits. Under Accelerate's native
  AMP (`bf16=True`, TRL's default, not DeepSpeed) `prepare_model` wraps the forward in autocast and then in
  `convert_outputs_to_fp32` (accelerate/accelerator.py l.1824-1835, utils/operations.py l.889-931): the 16-bit logits
  (autocast's, or 16-bit weights') are copied to fp32 once the autocast region has exited, both alive during the copy,
  and the loss code sees fp32 (`logits_bytes`);
- the NLL term (ORPO always, l.782-800; CPO when `cpo_alpha` != 0, its default 1.0 even for SimPO, l.842-845):
  `logits[..., :-1, :].contiguous()` of the chosen half (a B x (T-1) x V copy, freed when the function returns) and
  `nn.CrossEntropyLoss`, whose log_softmax output (B (T-1) x V, the logits' dtype) is kept with the shifted targets;
- `get_batch_logps`: `labels[:, 1:].clone()`, the mask, `torch.where(labels == -100, 0, labels)` and TRL's
  `selective_log_softmax(logits[:, :-1, :], labels)` (`trl/trainer/utils.py` l.538-601):
  - on CUDA with Triton (`_fused_logprob_entropy`, `trl/kernels/logprob_entropy.py` l.148-246; modelled, not run
    here): per-row statistics only, but the kernel saves the logits view itself (all_logits alive until its backward),
    the index, log_z and the expected logit; its backward makes the logits' gradient (2B x (T-1) x V, contiguous);
  - on CPU with fp32 logits: `torch.gather` (saving the logits and the index) and a per-row `torch.logsumexp` over
    `for lg in logits` (an unbind; inside each op one (T-1) x V temporary, `(self - maxes).exp_()`, which is no op's
    output and not counted: the exact tracker, which measures op outputs, does not see it); in backward the rows' gradients are stacked
    (2B x (T-1) x V) while gather's backward makes a zeros tensor and scatter_add's copy of it: three at once beside
    the kept logits, the heaviest moment of the step (measured: `tests/profiler/test_trl_steps.py`);
- the odds-ratio / SimPO / sigmoid losses work on (B,) vectors (nothing the planner counts); the metrics are
  reductions of views.

Then the backward through the NLL term: the chosen half's gradient grows back to (B, T, V) and (2B, T, V) by the
slices' backward and is added to the log-probs' (in place on a device; out of place under a dispatch mode such as
the exact tracker: a third (2B, T, V) tensor), then Accelerate's cast's backward (the 16-bit gradient) and the output
layer's.

Known limitations: 16-bit weights under TRL's `bf16=True` autocast are planned as 16-bit weights without autocast
(ops autocast runs in fp32 inside the layers are not counted), but for the logits' conversion; 16-bit logits
(`bf16=False` over 16-bit weights, DeepSpeed) are not planned; the prompt's collated ids and mask are not counted (the
planner has one length; the chosen and rejected sides are counted at it, each padded to its own longest in TRL); MoE's
router loss (`output_router_logits`) is not added to these objectives' moments; the CUDA path is modelled from the
Triton kernel's source and has not been measured here (no GPU lent).
"""

from __future__ import annotations

from lora_planner.families.rules import FP32, Flow, SavedTensor



def logits_bytes(flow: Flow) -> int:
    """Bytes an element of the logits the loss code sees: fp32. TRL's configs default to `bf16=True` (`not fp16`,
    `trl/trainer/base_config.py` l.107-110), Accelerate's native AMP then converts the 16-bit logits of 16-bit weights
    or of autocast to fp32; fp32 weights without autocast give fp32 logits. (16-bit logits need `bf16=False` over
    16-bit weights, or DeepSpeed: not planned.)"""
    return FP32


def converted(flow: Flow) -> bool:
    """Whether the output layer's logits are 16-bit, copied to fp32 by Accelerate's `convert_outputs_to_fp32`."""
    return flow.e_compute != FP32


def has_nll(flow: Flow) -> bool:
    """ORPO always adds the chosen rows' NLL; CPO / SimPO unless `cpo_alpha` is 0 (`cpo_trainer.py` l.842-845)."""
    return flow.t.objective == "orpo" or flow.t.cpo_alpha != 0


def triton(flow: Flow) -> bool:
    """`selective_log_softmax` runs TRL's Triton kernel on CUDA / XPU (`_supports_trl_loss_kernel`), the torch
    fallback on CPU."""
    return flow.t.device != "cpu"


def _sizes(flow: Flow) -> tuple[int, int, int, int, int]:
    """(R rows, T, V, B pairs, e the logits' bytes)."""
    return flow.b, flow.s, flow.spec.vocab_size, flow.b // 2, logits_bytes(flow)


def preference_loss_saved(flow: Flow) -> tuple[SavedTensor, ...]:
    """What the loss code keeps for backward: the logits (gather's / the kernel's input), the NLL's log_softmax output
    and shifted targets (a copy; a view of the (2B, T) labels when B = 1) and total weight, the log-probs' index
    (int64, 2B x (T-1)), per-row statistics (CPU: each row's logsumexp; Triton: log_z and the expected logit), the
    label mask and the per-row token counts of the average."""
    r, t, v, b, e = _sizes(flow)
    rows = r * (t - 1)
    saved = [SavedTensor("loss.logits", r * t * v * e), SavedTensor("loss.logps_index", rows * 8),
             SavedTensor("loss.logps_stats", rows * FP32 * (2 if triton(flow) else 1)),
             SavedTensor("loss.label_mask", rows), SavedTensor("loss.token_counts", r * 8)]
    if has_nll(flow):
        targets = b * (t - 1) * 8 if b > 1 else r * t * 8
        saved += [SavedTensor("loss.nll_log_softmax", b * (t - 1) * v * e), SavedTensor("loss.nll_targets", targets),
                  SavedTensor("loss.total_weight", FP32)]
    return tuple(saved)


def preference_batch_bytes(flow: Flow) -> int:
    """The collated batch beyond input ids and labels (`DPODataCollatorWithPadding`, int64): the chosen and rejected
    rows' masks (each side padded to its own longest, taken as T). The prompt's ids and mask (2 x B x its tokens) are
    not counted: the planner has no prompt length (the sides' padding, taken as T, outweighs them in the runs
    measured)."""
    return flow.b * flow.s * 8


def preference_loss_moments(flow: Flow, head_held: int) -> tuple[int, int, int]:
    """(forward scratch on top of what the loss saves, the loss's bytes kept at its backward's peak, the backward's
    scratch on top of them), each moment also holding `concatenated_forward`'s own tensors (the concatenated ids,
    mask and labels, the labels' copies: int64, 2B x T each).

    Forward, the heaviest of: the output layer's logits beside what the model's forward still holds (`head_held`: the
    final hidden state when the output layer does not save it, autocast's cached casts), Accelerate's fp32 copy beside the 16-bit logits (autocast; nothing saved yet), the NLL's
    log_softmax beside its contiguous copy, the log-probs' last row (CPU: two (T-1) x V fp32 temporaries beside the
    gathered values).

    Backward, the heaviest of: (CPU) the stacked rows' gradient, gather's zeros and scatter_add's copy beside the
    logits and the NLL's output; (Triton) the kernel's logits gradient beside them; the NLL term's (B, T, V) and
    (2B, T, V) gradients beside the waiting one (a third copy on CPU, out of place under the tracker); the cast back to
    16 bits (autocast)."""
    r, t, v, b, e = _sizes(flow)
    full, shifted = r * t * v * e, r * (t - 1) * v * e
    saved = sum(i.nbytes for i in preference_loss_saved(flow))
    nll = b * (t - 1) * v * e if has_nll(flow) else 0
    local = 4 * r * t * 8  # concatenated ids, mask, labels, and the labels TRL builds from them
    moments = [saved, r * t * v * flow.e_compute + head_held]
    if converted(flow):
        moments.append(r * t * v * flow.e_compute + full)
    if nll:
        # (with one pair the chosen row's shifted slice is contiguous already: `.contiguous()` copies nothing)
        moments.append(full + (2 if b > 1 else 1) * nll + b * (t - 1) * 8)
    # the log-probs' end: the kernel's log-probs and entropy (Triton), or the gathered logits and the stacked
    # logsumexps (CPU; logsumexp's own (T-1) x V temporary inside the op is not an op output: not counted)
    moments.append(saved + 2 * r * (t - 1) * FP32)
    forward = max(moments) + local - saved
    kept = full + nll
    if triton(flow):
        grads = shifted  # the kernel's gradient of the logits view
        moment = kept + grads
    else:
        moment = kept + 3 * shifted
    if nll:
        # the NLL path, after the log-probs': the waiting (2B, T, V) gradient, then the chosen half's grown back to
        # (2B, T, V) beside it and (the tracker's) sum
        moment = max(moment, (3 if not triton(flow) else 2) * full + b * t * v * e)
    if converted(flow):
        moment = max(moment, full + r * t * v * flow.e_compute)
    return forward, kept, moment - kept

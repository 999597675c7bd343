"""Training losses other than transformers' own, run on the Hugging Face model the profiler builds.

`chunked_output_loss`: torchtune's chunked cross-entropy as its SFT recipes run it (torchtune
`torchtune/modules/transformer.py` `TransformerDecoder.chunked_output`, `torchtune/modules/loss/
ce_chunked_output_loss.py` `CEWithChunkedOutputLoss`, `recipes/lora_finetune_single_device.py` `_loss_step`):

- the decoder's final hidden state h (after the final norm) goes through the output layer one sequence chunk at a
  time, `[output(chunk) for chunk in h.tensor_split(n, dim=1)]`: every chunk's logits (the compute dtype) are made
  before the loss starts and live in that list until the loss returns; h itself is a local of the model's forward;
- the labels are shifted by the recipe, not the loss: `torch.hstack((labels[..., 1:], ignore[:b]))`, a new (b, s)
  int64 tensor;
- the loss counts the targets (`(labels != ignore_index).sum()`), splits the labels the same way
  (`reshape(-1)` of each (b, s_i) chunk: a copy when b > 1) and sums `F.cross_entropy(chunk.float(), labels,
  reduction="sum")` over the chunks (the fp32 upcast of one chunk at a time), then divides by the count.

transformers' model runs unchanged below the output layer (`get_decoder()`, `get_output_embeddings()`, PEFT's
adapters included), so only the loss differs from `model(**batch).loss`. Models whose causal-LM head does more than
the output layer (Gemma 2's logit soft-capping, Granite's logit scaling) are refused by `TrainingSpec`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lora_planner.loss import unsloth_chunk_count

IGNORE_INDEX = -100


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def chunked_output_loss(model: torch.nn.Module, batch: dict[str, Any], chunks: int) -> torch.Tensor:
    """torchtune's `CEWithChunkedOutputLoss` over `chunks` output chunks (module docstring)."""
    base = _base(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # the ids and the collator's mask / positions
    logits = _chunked_output(base, inputs, chunks)
    labels = batch["labels"]
    ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    labels = torch.hstack((labels[..., 1:], ignore))
    del ignore
    return _ce_with_chunked_output(logits, labels, chunks)


def _chunked_output(base: torch.nn.Module, inputs: dict[str, Any], chunks: int) -> list[torch.Tensor]:
    hidden = base.get_decoder()(**inputs).last_hidden_state
    head = base.get_output_embeddings()
    return [head(chunk) for chunk in hidden.tensor_split(chunks, dim=1)]


def _ce_with_chunked_output(logits: list[torch.Tensor], labels: torch.Tensor, chunks: int) -> torch.Tensor:
    total_elements = (labels != IGNORE_INDEX).sum()
    label_chunks = [chunk.reshape(-1) for chunk in labels.tensor_split(chunks, dim=1)]
    logit_chunks = [chunk.reshape(-1, chunk.size(-1)) for chunk in logits]
    total_loss: torch.Tensor | float = 0.0
    for logits_chunk, labels_chunk in zip(logit_chunks, label_chunks):
        total_loss += F.cross_entropy(logits_chunk.float(), labels_chunk, ignore_index=IGNORE_INDEX, reduction="sum")
    return total_loss / total_elements


def linear_cross_entropy_loss(model: torch.nn.Module, batch: dict[str, Any], chunks: int) -> torch.Tensor:
    """torchtune main's `LinearCrossEntropyLoss` as its LoRA recipes run it (pytorch/torchtune
    `torchtune/modules/loss/cross_entropy_loss.py`, `recipes/lora_finetune_single_device.py` `_loss_step`): the batch's
    labels come shifted (its dataset shifts them, `datasets/_sft.py`; `batch_factory` builds them so), the model
    skips its output layer and the loss drops the ignored rows, then runs the output layer, the fp32 upcast and the
    summed cross-entropy over `chunks` row chunks, dividing by the valid count."""
    base = _base(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = base.get_decoder()(**inputs).last_hidden_state
    loss = _linear_ce(outputs, batch["labels"], base.get_output_embeddings(), chunks)
    del outputs
    return loss


def _linear_ce(outputs: torch.Tensor, targets: torch.Tensor, projection: torch.nn.Module,
               chunks: int) -> torch.Tensor:
    total_valid_tokens = torch.where(targets != IGNORE_INDEX)[0].numel()
    targets = targets.reshape(-1)
    outputs = outputs.reshape(-1, outputs.shape[-1])
    indices = torch.where(targets != IGNORE_INDEX)[0]
    outputs = outputs.index_select(0, indices)
    targets = targets.index_select(0, indices)
    total_loss = torch.tensor(0.0, device=targets.device)
    for hidden_chunk, target_chunk in zip(outputs.tensor_split(chunks, dim=0), targets.tensor_split(chunks, dim=0)):
        logits = projection(hidden_chunk)
        total_loss += F.cross_entropy(logits.float(), target_chunk, reduction="sum", ignore_index=IGNORE_INDEX)
        del logits
    return total_loss / total_valid_tokens


class LitgptLoss:
    """litgpt's fine-tuning loss as `litgpt/finetune/lora.py` runs it (Lightning-AI/litgpt v0.5.13 `fit`, l.355-359;
    `litgpt/utils.py` `chunked_cross_entropy`, l.302-351; `litgpt/model.py` `GPT.forward`, l.177-181) under Lightning
    Fabric (`lightning/fabric/wrappers.py` `_FabricModule.forward`, `plugins/precision/half.py` `convert_output`):

    - the model returns `[lm_head(x_i) for x_i in x.split(chunk, dim=1)]` (its final hidden state x freed on return);
    - Fabric converts every floating output to the default dtype (fp32) while the 16-bit list is still referenced;
    - the training loop's `logits` keeps the list from one step to the next (no `del`): the previous step's list lives
      until the new one is assigned (`self.logits` here);
    - `logits[-1] = logits[-1][..., :-1, :]` and `chunked_cross_entropy(logits, targets[..., 1:])`: per chunk
      `cross_entropy(..., reduction="none")` on the fp32 logits, then `cat(...).sum() / count`."""

    def __init__(self, chunk_tokens: int, forward_context: Callable[[], Any] = nullcontext) -> None:
        self.chunk_tokens = chunk_tokens
        self.forward_context = forward_context  # Fabric's precision context (autocast for bf16-mixed), forward only
        self.logits: list[torch.Tensor] | None = None

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        base = _base(model)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.forward_context():
            logits = _litgpt_head(base, inputs, self.chunk_tokens)
        logits = [t.to(torch.get_default_dtype()) if torch.is_floating_point(t) else t for t in logits]
        self.logits = logits
        logits[-1] = logits[-1][..., :-1, :]
        return _litgpt_chunked_cross_entropy(logits, batch["labels"][..., 1:])


def _litgpt_head(base: torch.nn.Module, inputs: dict[str, Any], chunk_tokens: int) -> list[torch.Tensor]:
    hidden = base.get_decoder()(**inputs).last_hidden_state
    head = base.get_output_embeddings()
    return [head(chunk) for chunk in hidden.split(chunk_tokens, dim=1)]


def _litgpt_chunked_cross_entropy(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    logit_chunks = [chunk.reshape(-1, chunk.size(-1)) for chunk in logits]
    target_chunks = [chunk.reshape(-1) for chunk in targets.split(logits[0].size(1), dim=1)]
    loss_chunks = [F.cross_entropy(logit_chunk, target_chunk, ignore_index=IGNORE_INDEX, reduction="none")
                   for logit_chunk, target_chunk in zip(logit_chunks, target_chunks)]
    non_masked_elems = (targets != IGNORE_INDEX).sum()
    return torch.cat(loss_chunks).sum() / non_masked_elems.maximum(torch.ones_like(non_masked_elems))


def unsloth_fused_ce_loss(model: torch.nn.Module, batch: dict[str, Any], target_gib: float | None,
                          chunks: int) -> torch.Tensor:
    """Unsloth's fused cross-entropy as its patched causal-LM forwards call it (unslothai/unsloth-zoo @ce232d6
    `unsloth_zoo/fused_losses/cross_entropy_loss.py`: `unsloth_fused_ce_loss` l.535-591, `UnslothFusedLoss` l.181-531,
    `compute_fused_ce_loss` l.69-135), run eager (`UNSLOTH_FUSED_CE_COMPILE_DISABLE=1`; by default it compiles each
    chunk's step): the backbone's final hidden state goes in, the output layer never runs on its own. The chunks:
    `get_chunk_size`'s count for the per-chunk target (`lora_planner.loss.unsloth_chunk_count`), or `chunks` when the
    target is None (as `UNSLOTH_CE_LOSS_N_CHUNKS` forces them)."""
    base = _base(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs).last_hidden_state
    weight = base.get_output_embeddings().weight
    if target_gib is not None:
        chunks = unsloth_chunk_count(hidden.shape[0] * hidden.shape[1], weight.shape[0], target_gib)
    loss = _UnslothFusedLoss.apply(hidden, weight, batch["labels"], chunks)
    del hidden
    return loss


def _unsloth_chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        divisor: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """`compute_fused_ce_loss` with the labels already shifted, no bias, scaling or soft-capping: the chunk's logits in
    the weight's dtype, their fp32 upcast, a summed cross-entropy over the divisor."""
    logits = F.linear(hidden.to(dtype=weight.dtype), weight)
    loss = F.cross_entropy(logits.view(-1, weight.shape[0]).float().contiguous(), labels.view(-1).contiguous(),
                           reduction="sum", ignore_index=IGNORE_INDEX)
    loss = loss / divisor
    return loss, (loss.detach(),)


class _UnslothFusedLoss(torch.autograd.Function):
    """`UnslothFusedLoss` for a frozen output layer: the labels shifted into a new tensor, the input gradient
    preallocated (N x H, the hidden state's dtype), each row chunk's loss and input gradient computed in forward by
    `torch.func.grad_and_value` and copied into it; backward only scales that buffer (out of place)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunks: int) -> torch.Tensor:
        shifted = torch.empty_like(labels)
        shifted[..., :-1] = labels[..., 1:]
        shifted[..., -1] = IGNORE_INDEX
        shifted = shifted.view(-1)
        divisor = (shifted != IGNORE_INDEX).sum()
        divisor = divisor.to(dtype=torch.float32)
        grad_inputs = torch.empty_like(hidden)
        accumulated = torch.zeros(1, device=hidden.device)[0]
        hd = hidden.shape[-1]

        def accumulate_chunk(grad_j: torch.Tensor, hidden_j: torch.Tensor, labels_j: torch.Tensor) -> None:
            step = torch.func.grad_and_value(_unsloth_chunk_loss, argnums=(0,), has_aux=True)
            (chunk_grad,), (_, (unscaled,)) = step(hidden_j, weight, labels_j, divisor)
            accumulated.add_(unscaled)
            grad_j[:] = chunk_grad

        for grad_j, hidden_j, labels_j in zip(torch.chunk(grad_inputs.view(-1, hd), chunks, dim=0),
                                              torch.chunk(hidden.reshape(-1, hd), chunks, dim=0),
                                              torch.chunk(shifted, chunks, dim=0)):
            accumulate_chunk(grad_j, hidden_j, labels_j)
        ctx.save_for_backward(grad_inputs)
        return accumulated

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_inputs,) = ctx.saved_tensors
        scale_factor = grad_output.detach().float().mean() / 1.0
        return grad_inputs * scale_factor, None, None, None

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

"""GPT-2 (transformers' modeling_gpt2.py): learned absolute positions (`wpe`, ending at n_positions), fused
`c_attn` (Conv1D, h -> 3h), LayerNorm with bias, `gelu_new` MLP, dropout on the embeddings, the attention
probabilities and both residual branches (0.1 by default).
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.rules import (
    FP32, Flow, SavedTensor, dropout_mask, logsumexp_saved, norm, plain_mlp, softmax_saved,
)
from lora_planner.specs import ModelSpec

PREFIX = "transformer.h.0."


def layout(spec: ModelSpec) -> list[Module]:
    h, n, layer = spec.hidden_size, spec.num_layers, PREFIX
    return [
        Module("transformer.wte", "embedding", "embeddings", spec.vocab_size, h),
        Module("transformer.wpe", "embedding", "embeddings", spec.max_position_embeddings, h),
        Module(layer + "ln_1", "norm", "norms", h, h, True, n),
        Module(layer + "attn.c_attn", "linear", "attention", h, 3 * h, True, n),
        Module(layer + "attn.c_proj", "linear", "attention", h, h, True, n),
        Module(layer + "ln_2", "norm", "norms", h, h, True, n),
        Module(layer + "mlp.c_fc", "linear", "mlp", h, spec.intermediate_size, True, n),
        Module(layer + "mlp.c_proj", "linear", "mlp", spec.intermediate_size, h, True, n),
        Module("transformer.ln_f", "norm", "norms", h, h, True),
    ]


def _attention(flow: Flow, needs_grad: bool) -> list[SavedTensor]:
    """GPT-2's q, k, v are views of the c_attn output. SDPA with attention dropout has no fused CPU
    kernel: the math fallback upcasts q, k, v to fp32 and keeps fp32 S x S probabilities, mask and dropped
    probabilities. On CUDA the flash / efficient kernels keep q, k, v (the c_attn output), the output and
    the log-sum-exp (dropout is replayed from the RNG state). Eager keeps the c_attn output and the S x S
    softmax (plus dropout mask and dropped probabilities), its softmax in the activation dtype."""
    flow.note_attention(needs_grad, needs_grad, needs_grad)
    if not needs_grad:
        return []
    tokens, h, e = flow.tokens, flow.spec.hidden_size, flow.e_compute
    scores = flow.b * flow.spec.num_heads * flow.s * flow.s
    qkv = SavedTensor("attn.c_attn_output", tokens * 3 * h * e)
    if flow.t.attention == "eager":
        return [qkv, *softmax_saved(flow, True, fp32_softmax=False)]
    if flow.t.device == "cpu" and flow.spec.attention_dropout > 0:
        return [SavedTensor("attn.qkv_fp32", 3 * tokens * h * FP32), SavedTensor("attn.probs_fp32", scores * FP32),
                SavedTensor("attn.dropout_mask_fp32", scores * FP32),
                SavedTensor("attn.probs_dropped_fp32", scores * FP32)]
    return [qkv, SavedTensor("attn.output", tokens * h * e),
            logsumexp_saved(flow, flow.spec.num_heads)]


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """LayerNorm, fused c_attn, attention, c_proj, residual dropout, LayerNorm, MLP, dropout."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved = norm(flow, "ln_1", x_needs_grad)
    own, keeps = flow.linear(p + "attn.c_attn", flow.e_stream, x_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("ln_1.output", tokens * h * flow.e_stream))
    attn_needs_grad = x_needs_grad or flow.trains(p + "attn.c_attn")
    saved += _attention(flow, attn_needs_grad)
    own, keeps = flow.linear(p + "attn.c_proj", e, attn_needs_grad)
    saved += own
    fused_output_reused = flow.t.attention == "sdpa" and not (flow.t.device == "cpu" and spec.attention_dropout > 0)
    if keeps and not (fused_output_reused and attn_needs_grad):
        saved.append(SavedTensor("attn.c_proj.input", tokens * h * e))  # heads merged into a copy
    mid_needs_grad = attn_needs_grad or flow.trains(p + "attn.c_proj")
    saved += dropout_mask(flow, "attn.resid_dropout", tokens * h, spec.dropout, mid_needs_grad, e)
    saved += norm(flow, "ln_2", mid_needs_grad)
    mlp_saved, keeps_x, out_grad = plain_mlp(flow, p + "mlp.c_fc", p + "mlp.c_proj", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("ln_2.output", tokens * h * flow.e_stream))
    saved += dropout_mask(flow, "mlp.dropout", tokens * h, spec.dropout, out_grad, e)
    return saved


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """wpe's indices (full fine-tuning), the embedding dropout's mask; under checkpointing with frozen
    embeddings, the position ids the checkpoint's closure keeps and the embedding output that
    `enable_input_require_grads` turns into a graph input that stays alive."""
    spec, tokens, h, s = flow.spec, flow.tokens, flow.spec.hidden_size, flow.s
    saved = []
    if flow.full:
        saved.append(SavedTensor("embeddings.position_ids", s * 8))
    saved += dropout_mask(flow, "embeddings.dropout", tokens * h, spec.embedding_dropout, embeddings_need_grad,
                          flow.e_stream)
    if flow.t.grad_checkpointing and not flow.full:
        saved += [SavedTensor("checkpoint.position_ids", s * 8),
                  SavedTensor("embeddings.output", tokens * h * flow.e_stream)]
    return saved


FAMILY = Family(model_types=("gpt2",), layout=layout, layer=layer, peft_default_targets=("c_attn",),
                layer_prefix=PREFIX, last_linear="mlp.c_proj", positions="learned", norm="layer",
                model_level=model_level, residual_dropout=True,
                mask_refused="its fused c_attn SDPA path with a padding mask is not measured yet",
                flash_refused="its fused c_attn views under flash-attn are not modelled yet")

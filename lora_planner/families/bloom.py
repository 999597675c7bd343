"""BLOOM (transformers' modeling_bloom.py): ALiBi (no position parameters), a LayerNorm after the embeddings,
fused `query_key_value`, eager attention only (the ALiBi bias is added to the scores), LayerNorm with bias,
GELU MLP of 4 x hidden.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.rules import (
    Flow, SavedTensor, layer_norm, norm, normed_attention_input, output_projection, plain_mlp, softmax_saved,
)
from lora_planner.specs import ModelSpec

PREFIX = "transformer.h.0."


def layout(spec: ModelSpec) -> list[Module]:
    h, n, layer = spec.hidden_size, spec.num_layers, PREFIX
    return [
        Module("transformer.word_embeddings", "embedding", "embeddings", spec.vocab_size, h),
        Module("transformer.word_embeddings_layernorm", "norm", "norms", h, h, True),
        Module(layer + "input_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "self_attention.query_key_value", "linear", "attention", h, 3 * h, True, n),
        Module(layer + "self_attention.dense", "linear", "attention", h, h, True, n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "mlp.dense_h_to_4h", "linear", "mlp", h, spec.intermediate_size, True, n),
        Module(layer + "mlp.dense_4h_to_h", "linear", "mlp", spec.intermediate_size, h, True, n),
        Module("transformer.ln_f", "norm", "norms", h, h, True),
    ]


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """LayerNorm, fused query_key_value, eager ALiBi attention (S x S kept), dense, MLP."""
    tokens, e, h = flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved, (attn_needs_grad,) = normed_attention_input(flow, p + "self_attention.", ("query_key_value",), x_needs_grad)
    flow.note_attention(attn_needs_grad, attn_needs_grad, attn_needs_grad)
    if attn_needs_grad:
        # q, k, v are strided views of the fused output; reshaping them for baddbmm / bmm copies each.
        saved += [SavedTensor("attn.q", tokens * h * e), SavedTensor("attn.k", tokens * h * e),
                  SavedTensor("attn.v", tokens * h * e), *softmax_saved(flow, True)]
    own, mid_needs_grad = output_projection(flow, p + "self_attention.dense", h, attn_needs_grad)
    saved += own
    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, keeps_x, _ = plain_mlp(flow, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    return saved


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """The LayerNorm after the embeddings; under checkpointing, the (b, 1, s, s) causal mask and the ALiBi
    bias that non-reentrant checkpointing keeps as every layer's arguments (BLOOM always builds the mask:
    its attention is eager whatever `attn_implementation` says)."""
    saved = layer_norm(flow, "word_embeddings_layernorm", embeddings_need_grad)
    if flow.t.grad_checkpointing:
        if flow.t.attention != "eager":  # with eager, `activations` counts the mask for every family
            saved.append(SavedTensor("checkpoint.attention_mask", flow.b * flow.s * flow.s * flow.e_stream))
        saved.append(SavedTensor("checkpoint.alibi", flow.b * flow.spec.num_heads * flow.s * flow.e_stream))
    return saved


FAMILY = Family(model_types=("bloom",), layout=layout, layer=layer, peft_default_targets=("query_key_value",),
                layer_prefix=PREFIX, last_linear="mlp.dense_4h_to_h", positions="alibi", norm="layer",
                model_level=model_level,
                mask_refused="BLOOM builds its ALiBi mask itself, not measured with padding or packing yet",
                flash_refused="transformers 5.24 has no flash-attention path for BLOOM (its ALiBi attention is eager "
                              "only)")

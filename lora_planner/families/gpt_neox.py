"""GPT-NeoX (transformers 5.24 models/gpt_neox/modeling_gpt_neox.py): Pythia, GPT-NeoX-20B.

`GPTNeoXLayer.forward`: with `use_parallel_residual` (the default, every Pythia and NeoX-20B)
x + dropout(attn(input_layernorm(x))) + dropout(mlp(post_attention_layernorm(x))), both LayerNorms (with bias) reading
the same x; without it the sequential pre-norm block (the MLP's LayerNorm reads x + attn). `GPTNeoXAttention`: one
fused `query_key_value` (h -> 3h, `attention_bias`, default True, also on `dense`), its output viewed as (b, s,
heads, 3 x head) and transposed, so q, k and v are interleaved per head (`qkv.chunk(3, dim=-1)`: strided views of
the one output); partial rotary (`rotary_pct`, 0.25: `apply_rotary_pos_emb` rotates the first rotary_ndims channels
and `torch.cat`s the rest back, so q and k are fresh (b, heads, s, head)-contiguous tensors); MLP `dense_h_to_4h`
-> `hidden_act` (gelu: F.gelu keeps its input) -> `dense_4h_to_h` with biases; `hidden_dropout` on the embeddings
(`GPTNeoXModel.emb_dropout`) and on both branches (`post_attention_dropout`, `post_mlp_dropout`),
`attention_dropout` on the probabilities. The output head is `lm_head` in transformers 5.24 (the checkpoints'
`embed_out`, renamed on load), untied unless `tie_word_embeddings`. The layer registers its norms before attention
and MLP (`GPTNeoXLayer.__init__`).

What autograd keeps (measured, tests/test_activations.py):
- SDPA (`integrations/sdpa_attention.py`): the fresh q and k, v, the output and the log-sum-exp. v is a strided
  view of the fused output, so the whole (b, s, 3h) `query_key_value` output storage stays alive (as GPT-2's
  `c_attn`). The output is (b, heads, s, head)-contiguous (q comes from torch.cat), so `dense` reads a copy.
- eager (`eager_attention_forward`): as Llama's eager rule with as many kv heads as heads: q, k, the fp32 softmax and
  its 16-bit copy, v copied by matmul's reshape (the strided view cannot be folded into bmm's batch).
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.rules import (
    Flow, SavedTensor, dropout_mask, eager_attention, layer_norm, norm, normed_attention_input,
    logsumexp_saved, output_projection, plain_mlp,
)
from lora_planner.specs import ModelSpec

PREFIX = "gpt_neox.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`gpt_neox.embed_in`, per layer two LayerNorms (bias), fused q/k/v, dense, the 4h MLP (bias always)."""
    h, n, layer = spec.hidden_size, spec.num_layers, PREFIX
    return [
        Module("gpt_neox.embed_in", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "attention.query_key_value", "linear", "attention", h, 3 * h, spec.attention_bias, n),
        Module(layer + "attention.dense", "linear", "attention", h, h, spec.attention_out_bias, n),
        Module(layer + "mlp.dense_h_to_4h", "linear", "mlp", h, spec.intermediate_size, True, n),
        Module(layer + "mlp.dense_4h_to_h", "linear", "mlp", spec.intermediate_size, h, True, n),
        Module("gpt_neox.final_layer_norm", "norm", "norms", h, h, True),
    ]


def _attention(flow: Flow, needs_grad: bool) -> list[SavedTensor]:
    """q, k, v from the fused projection (see the module docstring)."""
    if flow.t.attention == "eager":
        flow.note_attention(needs_grad, needs_grad, needs_grad)
        return eager_attention(flow, needs_grad, needs_grad, needs_grad)
    flow.note_attention(needs_grad, needs_grad, needs_grad)
    if not needs_grad:
        return []
    tokens, h, e = flow.tokens, flow.spec.hidden_size, flow.e_compute
    return [
        SavedTensor("attn.q_rotated", tokens * h * e),
        SavedTensor("attn.k_rotated", tokens * h * e),
        SavedTensor("attn.query_key_value_output", tokens * 3 * h * e),  # v: a strided view of it
        SavedTensor("attn.output", tokens * h * e),
        logsumexp_saved(flow, flow.spec.num_heads),
    ]


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """LayerNorm -> fused qkv -> partial RoPE -> attention -> dense -> dropout, and the MLP branch (parallel: on a
    second LayerNorm of the same input; sequential: on the LayerNorm of x + attention)."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved, (attn_needs_grad,) = normed_attention_input(flow, p + "attention.", ("query_key_value",), x_needs_grad)
    saved += _attention(flow, attn_needs_grad)
    own, attn_out_grad = output_projection(flow, p + "attention.dense", h, attn_needs_grad)  # heads merged: a copy
    saved += own
    saved += dropout_mask(flow, "attn.post_attention_dropout", tokens * h, spec.dropout, attn_out_grad, e)

    if spec.parallel_residual:
        # post_attention_layernorm reads the same x: its input is already kept (or not needed).
        mlp_in_grad = x_needs_grad
        saved += [s for s in layer_norm(flow, "post_attention_layernorm", x_needs_grad) if not s.name.endswith(".input")]
    else:
        mlp_in_grad = attn_out_grad
        saved += norm(flow, "post_attention_layernorm", mlp_in_grad)
    mlp_saved, keeps_x, mlp_out_grad = plain_mlp(flow, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h", mlp_in_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    saved += dropout_mask(flow, "mlp.post_mlp_dropout", tokens * h, spec.dropout, mlp_out_grad, e)
    return saved


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """`GPTNeoXModel.emb_dropout` (hidden_dropout) keeps its mask; with a mask, under checkpointing with frozen
    embeddings, the embedding output that `enable_input_require_grads` made a graph leaf stays alive beside the
    dropped copy that layer 0 checkpoints."""
    spec, tokens, h = flow.spec, flow.tokens, flow.spec.hidden_size
    saved = dropout_mask(flow, "embeddings.dropout", tokens * h, spec.embedding_dropout, embeddings_need_grad,
                         flow.e_stream)
    if flow.t.grad_checkpointing and not flow.full and spec.embedding_dropout > 0:
        saved.append(SavedTensor("embeddings.output", tokens * h * flow.e_stream))
    return saved


FAMILY = Family(model_types=("gpt_neox",), layout=layout, layer=layer, peft_default_targets=("query_key_value",),
                layer_prefix=PREFIX, last_linear="mlp.dense_4h_to_h", positions="rope", norm="layer",
                model_level=model_level, residual_dropout=True,
                mask_refused="its fused query_key_value SDPA path with a padding mask is not measured yet",
                flash_refused="its fused query_key_value views under flash-attn are not modelled yet")

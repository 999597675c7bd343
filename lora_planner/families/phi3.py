"""Phi-3 (transformers' models/phi3/modeling_phi3.py): Phi-3-mini / medium, Phi-3.5-mini, Phi-4, Phi-4-mini.

A Llama-like pre-norm layer (RMSNorm, `Phi3RMSNorm`: weight only) with two fused projections:

- `Phi3Attention.forward`: `qkv_proj` (h -> (heads + 2 kv heads) x head_dim, no bias) whose output is sliced
  into q, k and v *views*; `apply_rotary_pos_emb` rotates the first `int(head_dim x partial_rotary_factor)`
  channels (Phi-4-mini: 0.75) and ends in `torch.cat`, so q and k are fresh (b, heads, s, dim)-contiguous
  tensors, while v stays a view of the qkv output: SDPA keeps v, hence the whole (b, s, q + 2 kv) storage;
  eager's probs @ v keeps a copy of v (`repeat_kv`'s under GQA, else matmul's reshape of the strided view).
  The attention output is then (b, heads, s, dim)-contiguous and `reshape(...).contiguous()` copies it for
  `o_proj`.
- `Phi3MLP.forward`: `gate_up_proj` (h -> 2 x intermediate), `chunk(2)` into gate and up *views*: the
  activation keeps gate and the product keeps up, both views of one (b, s, 2 x intermediate) storage, plus
  the activation's output; `down_proj` reads the fresh product.
- `Phi3DecoderLayer.forward`: `resid_attn_dropout` / `resid_mlp_dropout` (nn.Dropout(resid_pdrop)) on both
  branch outputs before the residual adds. `embd_pdrop` is in Phi3Config but Phi3Model never applies it.

Sliding window (`Phi3Config.sliding_window`; Phi-3-mini-4k / medium-4k: 2047, so --seq-len >= 2047 materialises it):
`Phi3Model.forward` builds every layer's mask with `create_sliding_window_causal_mask`. From --seq-len >= window on,
SDPA gets the mask (the shared rules of `lora_planner.families.rules`, "sliding windows"): with GQA (Phi-3-medium,
Phi-4-mini) `repeat_kv` copies k and v to every head and SDPA keeps those copies instead of the qkv storage; without
GQA (Phi-3-mini, Phi-3.5-mini) k and v go in as they are (v still a view of the qkv output); either way SDPA keeps
its additive (b, 1, s, s) mask. Eager attention: one additive mask as for any window-less model.

PEFT 0.21.2 has no default LoRA targets for phi3 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
the plan assumes the fused `qkv_proj` (the attention's q, k and v at once) and says so.
Registration order (`Phi3Attention.__init__`: o_proj before qkv_proj; the layer's norms after attention
and MLP) is the layout order, which DeepSpeed's flat buffers follow.
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.rules import (
    FLASH, FLEX, Flow, SavedTensor, dropout_mask, flash_attention, flex_attention, masked_sdpa, norm,
    normed_attention_input, logsumexp_saved, output_projection, sdpa_kernel, sdpa_mask_applies, sdpa_math, sliding_model_level,
    softmax_saved,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """`model.layers.N.self_attn.{o_proj,qkv_proj}`, `mlp.{gate_up_proj,down_proj}`, RMSNorms; no biases."""
    h, n, layer, inter = spec.hidden_size, spec.num_layers, PREFIX, spec.intermediate_size
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "self_attn.o_proj", "linear", "attention", spec.q_size, h, False, n),
        Module(layer + "self_attn.qkv_proj", "linear", "attention", h, spec.q_size + 2 * spec.kv_size, False, n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "mlp.gate_up_proj", "linear", "mlp", h, 2 * inter, False, n),
        Module(layer + "mlp.down_proj", "linear", "mlp", inter, h, False, n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def _attention(flow: Flow, needs_grad: bool) -> list[SavedTensor]:
    """q, k, v from one fused projection (see the module docstring): q and k are fresh RoPE outputs, v a view
    of the qkv output, so SDPA, keeping v, keeps the qkv storage; eager keeps copies."""
    flow.note_attention(needs_grad, needs_grad, needs_grad)
    if not needs_grad:
        return []
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    if flow.t.attention == "eager":
        gqa = spec.num_kv_heads != spec.num_heads
        saved = [SavedTensor("attn.q_rotated", tokens * spec.q_size * e)]
        # repeat_kv copies k and v to every head under GQA; without GQA k is the RoPE output and v the view.
        saved.append(SavedTensor("attn.k_repeated" if gqa else "attn.k_rotated",
                                 tokens * (spec.q_size if gqa else spec.kv_size) * e))
        saved += softmax_saved(flow, True)
        # probs @ v: torch.matmul folds v to 3-d for bmm, and v, a strided view of the qkv output, is copied by
        # that reshape (or is repeat_kv's copy already): the copy is what is kept, not the qkv storage. With one
        # row (b = 1, e.g. packed) the fold is a view: then v keeps the whole qkv storage (measured, packed rows).
        if not gqa and flow.b == 1:
            saved.append(SavedTensor("attn.qkv_output", tokens * (spec.q_size + 2 * spec.kv_size) * e))
        else:
            saved.append(SavedTensor("attn.v_repeated" if gqa else "attn.v_copy",
                                     tokens * (spec.q_size if gqa else spec.kv_size) * e))
        return saved
    if flow.t.attention == FLASH:
        # v goes in as the view it is (unit last stride), keeping the qkv storage, unless transformers' cast to the
        # flash dtype copied it (QLoRA's fp32 stream)
        qkv = tokens * (spec.q_size + 2 * spec.kv_size) * e
        return flash_attention(flow, spec.q_size, spec.kv_size, qkv if flow.e_attention == e else None)
    if flow.t.attention == FLEX:  # v goes in as the view it is, keeping the qkv storage
        return flex_attention(flow, spec.q_size, spec.kv_size, tokens * (spec.q_size + 2 * spec.kv_size) * e)
    if sdpa_kernel(flow)[0] == "math":  # fp32 on CUDA with grouped-query attention (`rules.sdpa_kernel`)
        return sdpa_math(flow, True, True, True)
    if sdpa_mask_applies(flow) and spec.num_kv_heads != spec.num_heads:
        # A materialised mask (seq_len >= sliding_window, padding, packing): repeat_kv copies k and v to every head,
        # so SDPA keeps those copies, not the qkv storage (`rules.masked_sdpa`).
        return masked_sdpa(flow, spec.q_size)
    saved = [
        SavedTensor("attn.q_rotated", tokens * spec.q_size * e),
        SavedTensor("attn.k_rotated", tokens * spec.kv_size * e),
        SavedTensor("attn.qkv_output", tokens * (spec.q_size + 2 * spec.kv_size) * e),  # v's storage
        SavedTensor("attn.output", tokens * spec.q_size * e),
        logsumexp_saved(flow, spec.num_heads),
    ]
    if sdpa_mask_applies(flow):  # without GQA, k and v go in as they are; the additive mask comes on top
        saved.append(SavedTensor("attn.additive_mask", flow.b * flow.s * flow.s * e))
    return saved


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """RMSNorm, fused qkv_proj, partial RoPE, attention, o_proj, residual dropout; RMSNorm, fused gate_up_proj,
    act(gate) * up, down_proj, residual dropout."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = PREFIX
    saved, (attn_needs_grad,) = normed_attention_input(flow, p + "self_attn.", ("qkv_proj",), x_needs_grad)
    saved += _attention(flow, attn_needs_grad)
    own, mid_needs_grad = output_projection(flow, p + "self_attn.o_proj", spec.q_size, attn_needs_grad)  # a copy
    saved += own
    saved += dropout_mask(flow, "attn.resid_dropout", tokens * h, spec.dropout, mid_needs_grad, e)

    saved += norm(flow, "post_attention_layernorm", mid_needs_grad)
    own, keeps = flow.linear(p + "mlp.gate_up_proj", flow.e_stream, mid_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    inner_grad = mid_needs_grad or flow.trains(p + "mlp.gate_up_proj")
    inter = tokens * spec.intermediate_size * e
    if inner_grad and flow.liger:
        # Liger's `LigerPhi3SwiGLUMLP`: `chunk(2)` views made contiguous (`ensure_contiguous`: copies) for
        # `LigerSiLUMulFunction`, which keeps both (Liger-Kernel transformers/swiglu.py, ops/swiglu.py)
        saved += [SavedTensor("mlp.gate_copy", inter), SavedTensor("mlp.up_copy", inter)]
    elif inner_grad:
        # act(gate) keeps gate, act(gate) * up keeps up and act(gate): gate and up are views of one storage.
        saved += [SavedTensor("mlp.gate_up_output", 2 * inter), SavedTensor("mlp.act_output", inter)]
    own, keeps = flow.linear(p + "mlp.down_proj", e, inner_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.down_proj.input", inter))
    out_grad = inner_grad or flow.trains(p + "mlp.down_proj")
    saved += dropout_mask(flow, "mlp.resid_dropout", tokens * h, spec.dropout, out_grad, e)
    return saved


FAMILY = Family(model_types=("phi3",), layout=layout, layer=layer, peft_default_targets=("qkv_proj",),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms",
                norms_registered_last=True, residual_dropout=True, peft_has_default=False,
                model_level=sliding_model_level, models_sliding_window=True,
                liger="modelled")

"""Phi (transformers' modeling_phi.py, Phi-1 / 1.5 / 2): one LayerNorm per layer (with bias), attention and MLP in
parallel on its output, partial rotary, biases everywhere (lm_head too), residual dropout (`resid_pdrop`).
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.rules import (
    Flow, SavedTensor, attention_core, attention_projections, dropout_mask, norm, output_projection, plain_mlp,
)
from lora_planner.specs import ModelSpec

PREFIX = "model.layers.0."


def layout(spec: ModelSpec) -> list[Module]:
    """LayerNorm with bias, parallel attention + MLP, one norm a layer, optional q/k LayerNorms."""
    h, n, layer = spec.hidden_size, spec.num_layers, PREFIX
    modules = [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, True, n),
        Module(layer + "self_attn.q_proj", "linear", "attention", h, spec.q_size, True, n),
        Module(layer + "self_attn.k_proj", "linear", "attention", h, spec.kv_size, True, n),
        Module(layer + "self_attn.v_proj", "linear", "attention", h, spec.kv_size, True, n),
        Module(layer + "self_attn.dense", "linear", "attention", spec.q_size, h, True, n),
        Module(layer + "mlp.fc1", "linear", "mlp", h, spec.intermediate_size, True, n),
        Module(layer + "mlp.fc2", "linear", "mlp", spec.intermediate_size, h, True, n),
        Module("model.final_layernorm", "norm", "norms", h, h, True),
    ]
    if spec.qk_layernorm:
        width = h // spec.num_heads  # PhiAttention sizes these by hidden / heads, not head_dim
        modules += [
            Module(layer + "self_attn.q_layernorm", "norm", "norms", width, width, True, n),
            Module(layer + "self_attn.k_layernorm", "norm", "norms", width, width, True, n),
        ]
    return modules


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One LayerNorm, then attention and MLP in parallel on its output, partial rotary."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    p = PREFIX
    saved = norm(flow, "input_layernorm", x_needs_grad)
    own, keeps_normed, (q_grad, k_grad, v_grad) = attention_projections(
        flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), x_needs_grad)
    saved += own
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += attention_core(flow, q_grad, k_grad, v_grad)
    # Partial RoPE ends in torch.cat, so q is (b, heads, s, dim)-contiguous and so is the attention
    # output: the (b, s, hidden) input of `dense` is a copy.
    own, attn_out_grad = output_projection(flow, p + "self_attn.dense", spec.q_size, attn_needs_grad)
    saved += own
    saved += dropout_mask(flow, "attn.resid_dropout", tokens * spec.hidden_size, spec.dropout, attn_out_grad, e)
    mlp_saved, keeps_mlp_x, mlp_out_grad = plain_mlp(flow, p + "mlp.fc1", p + "mlp.fc2", x_needs_grad)
    saved += mlp_saved
    saved += dropout_mask(flow, "mlp.resid_dropout", tokens * spec.hidden_size, spec.dropout, mlp_out_grad, e)
    if keeps_normed or keeps_mlp_x:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * flow.e_stream))
    return saved


FAMILY = Family(model_types=("phi",), layout=layout, layer=layer,
                peft_default_targets=("q_proj", "v_proj", "fc1", "fc2"),
                layer_prefix=PREFIX, last_linear="mlp.fc2", positions="rope", norm="layer",
                norms_registered_last=True, residual_dropout=True,
                mask_refused="its SDPA path with a padding mask is not measured yet",
                flash_refused="its partial-rotary q / k layouts under flash-attn are not modelled yet")

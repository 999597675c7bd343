"""Gemma 3 text towers (transformers 5.24 models/gemma3/modeling_gemma3.py, model_type `gemma3_text`):
google/gemma-3-1b-pt / -it (`Gemma3ForCausalLM`).

The layer is Gemma 2's (`lora_planner.families.gemma2.sandwich_layer`: four (1 + w) fp32 RMSNorms around attention
and the gelu_pytorch_tanh gated MLP) with q / k norms: `Gemma3Attention.forward` applies `q_norm` / `k_norm`
(`Gemma3RMSNorm(head_dim)`, (1 + w) in fp32, cast back) to the (b, heads, s, head_dim) views of the q / k
projections before RoPE. Each keeps, when its input needs a gradient, the fp32 copy of the projection output,
1/rms per head and token and the fp32 (1 + w); when its weight trains, the fp32 normalised tensor.

Attention: SDPA (the default, `_supports_sdpa = True`) or eager. No logit soft-capping by default (Gemma 3's configs
set both caps to null); `Gemma3Attention` never passes `attn_logit_softcapping` to the attention function, so that
key changes nothing (the reader leaves it out), while `final_logit_softcapping`, when set, is applied by
`Gemma3ForCausalLM.forward` as in Gemma 2 (counted with the loss).

Local / global layers (`layer_types`, by default 5 sliding-window layers then one full, `sliding_window_pattern`
6 in `Gemma3TextConfig.__post_init__`) and two RoPE bases: `Gemma3RotaryEmbedding` builds one inv_freq pair per
kind (`rope_local_base_freq` for sliding layers, `rope_theta` for full ones) and `Gemma3TextModel.forward` computes
both cos / sin tables up front, each alive for the whole forward (`Family.rotary_per_layer_type`). Masks: the
shared sliding-window rules (`lora_planner.families.rules`, "sliding windows"):
- SDPA, full layers: no mask (`is_causal`), SDPA with `enable_gqa` (head_dim <= 256): `rules.sdpa`.
- SDPA, sliding layers: from seq_len >= sliding_window on, a materialised mask: the layer keeps the repeated k / v
  and SDPA's additive (b, 1, s, s) mask instead of the kv-wide k / v (`rules.masked_sdpa`); under checkpointing the
  (1, 1, s, s) bool mask is kept as the layers' argument (`rules.mask_arguments`).
- eager: both kinds get a (b, 1, s, s) additive mask, transient unless checkpointing keeps them (as Gemma 2).

Liger (`apply_liger_kernel_to_gemma3_text`): Gemma 2's patch (`lora_planner.families.gemma2`) and `LigerRMSNormForGemma3`
on q_norm / k_norm too (`_head_norm`). Modelled, not measured.

PEFT 0.21.2's default LoRA targets for gemma3_text: q_proj, v_proj (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
Known limitations: only the text tower (`Gemma3ForCausalLM`); the multimodal `gemma3` wrappers (4B / 12B / 27B:
`Gemma3ForConditionalGeneration`, a SigLIP vision tower and projector beside the language model) are not modelled;
`use_bidirectional_attention` (EmbeddingGemma) is not modelled (the reader refuses it). What is assumed for CUDA's
memory-efficient kernel with the additive mask: see `lora_planner.families.rules` ("sliding windows").
"""

from __future__ import annotations

from lora_planner.families.base import Family, Module
from lora_planner.families.gemma2 import PREFIX, sandwich_layer
from lora_planner.families.gemma2 import layout as gemma2_layout
from lora_planner.families.rules import FP32, Flow, SavedTensor, attention_core, fused_output_reused, mask_arguments
from lora_planner.specs import ModelSpec


def layout(spec: ModelSpec) -> list[Module]:
    """Gemma 2's modules with `Gemma3Attention`'s q_norm and k_norm (registered after o_proj)."""
    modules = gemma2_layout(spec)
    at = next(i for i, m in enumerate(modules) if m.path.endswith("o_proj")) + 1
    d, n = spec.head_dim, spec.num_layers
    modules[at:at] = [Module(PREFIX + "self_attn.q_norm", "norm", "norms", d, d, count=n),
                      Module(PREFIX + "self_attn.k_norm", "norm", "norms", d, d, count=n)]
    return modules


def _head_norm(flow: Flow, name: str, width: int, x_needs_grad: bool) -> list[SavedTensor]:
    tokens, d = flow.tokens, flow.spec.head_dim
    if flow.liger:
        # `LigerRMSNormForGemma3` (offset 1, gemma casting mode): the projection's output (a (tokens x heads, d) view,
        # the compute dtype) and fp32 1/rms per head and token; nothing normalised for a trained weight
        return [SavedTensor(f"{name}.input", tokens * width * flow.e_compute),
                SavedTensor(f"{name}.rstd", tokens * (width // d) * FP32)] if x_needs_grad or flow.full else []
    saved: list[SavedTensor] = []
    if x_needs_grad:
        saved += [SavedTensor(f"{name}.fp32_input", tokens * width * FP32),
                  SavedTensor(f"{name}.rsqrt", tokens * (width // d) * FP32),
                  SavedTensor(f"{name}.one_plus_weight", d * FP32)]
    if flow.full:
        saved.append(SavedTensor(f"{name}.normalised", tokens * width * FP32))
    return saved


def qk_head_norms(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """`q_norm` / `k_norm` on the projections' outputs (see the module docstring)."""
    spec = flow.spec
    q_grad = x_needs_grad or flow.trains(PREFIX + "self_attn.q_proj")
    k_grad = x_needs_grad or flow.trains(PREFIX + "self_attn.k_proj")
    return (_head_norm(flow, "self_attn.q_norm", spec.q_size, q_grad)
            + _head_norm(flow, "self_attn.k_norm", spec.kv_size, k_grad))


def layer(flow: Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One Gemma 3 decoder layer: its attention core depends on its kind (`Flow.layer_type`) and the mask
    (`rules.attention_core`)."""
    return sandwich_layer(flow, x_needs_grad, head_norms=qk_head_norms, attention=attention_core,
                          reads_saved_output=fused_output_reused(flow))


def model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """Under checkpointing, the sliding layers' mask argument (`rules.mask_arguments`)."""
    return mask_arguments(flow)


FAMILY = Family(model_types=("gemma3_text",), layout=layout, layer=layer, peft_default_targets=("q_proj", "v_proj"),
                layer_prefix=PREFIX, last_linear="mlp.down_proj", positions="rope", norm="rms_gemma",
                model_level=model_level, scalar_buffers=1, saves_after_last_linear=True,
                rotary_per_layer_type=True, models_sliding_window=True, liger="modelled")

"""What a model family declares: its modules (`Module`, the parameter layout) and its rules (`Family`).

A family is one transformers architecture (or several that share a layer, such as Llama, Mistral, Qwen2 and
Gemma). Its module under `lora_planner/families/` declares, in one place, everything the planner needs to
know about it: the parameter-holding modules with transformers' paths (`layout`), what one decoder layer
keeps for backward (`layer`, built from the shared op rules of `lora_planner.families.rules`), what lives
outside the layers (`model_level`), PEFT's default LoRA targets, and the few facts other models read (the
position scheme, the final norm, the layer's last matmul, the order transformers registers norms in).
Config parsing (the config.json keys and their defaults) lives in `lora_planner.catalog`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from lora_planner.specs import ModelSpec

# "experts": a stack of per-expert weights held as one 3-D parameter (transformers 5.24's fused MoE experts,
# `MixtralExperts.gate_up_proj`: experts x out x in); "router": a 2-D weight that is a bare `nn.Parameter` of a
# custom module (`MixtralTopKRouter.weight`), not an `nn.Linear` (so PEFT's all-linear does not see it).
ModuleKind = Literal["linear", "embedding", "norm", "experts", "router"]
ModuleGroup = Literal["embeddings", "attention", "mlp", "norms", "lm_head"]
GROUPS: tuple[ModuleGroup, ...] = ("embeddings", "attention", "mlp", "norms", "lm_head")
Positions = Literal["rope", "learned", "alibi"]
# Llama RMSNorm, Gemma's (1 + w) in fp32, OLMo 2's w x in fp32 (`(weight * x).to(input_dtype)`), LayerNorm
NormKind = Literal["rms", "rms_gemma", "rms_fp32", "layer"]


class SavedTensor(NamedTuple):  # a NamedTuple, not a dataclass: profiles build thousands of these per grid
    """A tensor autograd keeps for backward (or a buffer alive at a phase), by what it is and its size."""

    name: str
    nbytes: int


# A family's rules take a `lora_planner.families.rules.Flow` (the settings, the adapted modules and the rule for
# linears); typed Any here so that this module stays below the rules it describes.
LayerRule = Callable[[Any, bool], list[SavedTensor]]


@dataclass(frozen=True)
class Module:
    """One module (repeated `count` times, once per layer for per-layer modules).

    `path` is the Hugging Face path of the first instance (layer 0); for linears `in_features` x
    `out_features` is the weight shape, for embeddings `in_features` is the vocabulary, for norms both
    are the normalised width. For "experts" (a 3-D parameter, `path` is the parameter's own name) each of the
    `experts` experts maps `in_features` to `out_features` (the bias, when there is one, is experts x out).
    """

    path: str
    kind: ModuleKind
    group: ModuleGroup
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    tied: bool = False  # shares its weight with another module (tied lm_head): no parameters of its own
    experts: int = 1  # "experts" modules: how many experts the 3-D parameter stacks
    # The decoder layers the module is in, when not 0..count-1 (an MoE model's expert layers next to dense ones).
    layers: tuple[int, ...] = ()
    # LoRA only: the rank multiplier PEFT's MoE conversion gives this module (`rank_pattern`, gate_up_proj: 2).
    lora_rank_scale: int = 1
    # Kept in fp32 whatever the model's dtype (transformers' `_keep_in_fp32_modules_strict`: DeepSeek's router weight).
    fp32: bool = False

    @property
    def params_each(self) -> int:
        if self.tied:  # the weight is another module's; a bias stays its own (Phi's lm_head, tied)
            return self.out_features if self.bias else 0
        if self.kind == "norm":
            return self.out_features * (2 if self.bias else 1)
        return self.experts * (self.in_features * self.out_features + (self.out_features if self.bias else 0))

    @property
    def params(self) -> int:
        return self.params_each * self.count

    @property
    def weight_numel_each(self) -> int:
        """Elements of the weight matrix alone (what QLoRA quantizes; biases stay 16-bit)."""
        return 0 if self.tied else self.experts * self.in_features * self.out_features

    @property
    def parameter_name(self) -> str:
        """The weight's name in `model.named_parameters()` (layer 0): what PEFT's `target_parameters` match."""
        return self.path if self.kind == "experts" else self.path + ".weight"

    @property
    def layer_indices(self) -> tuple[int, ...] | range:
        return self.layers or range(self.count)

    def lora_numel(self, r: int) -> int:
        """LoRA parameters of one instance at rank r: r (in + out) (Hu et al. 2021); for "experts", PEFT's
        `ParamWrapper` (`peft/tuners/lora/layer.py`: lora_A (r E, in), lora_B (out, r E)) at r x `lora_rank_scale`."""
        rank = r * self.lora_rank_scale
        return rank * self.experts * (self.in_features + self.out_features)

    def layer_path(self, layer: int) -> str:
        """The path of this module in `layer` (per-layer paths are stored for layer 0)."""
        return self.path.replace(".0.", f".{layer}.", 1) if self.count > 1 or ".0." in self.path else self.path

    def matching_layers(self, target: str) -> frozenset[int]:
        """The layers where PEFT's rule matches: the full module name equals the target or ends with
        '.' + target (`peft.tuners.tuners_utils.check_target_module_exists`)."""
        matched = set()
        for layer in self.layer_indices:
            path = self.layer_path(layer)
            if path == target or path.endswith("." + target):
                matched.add(layer)
        return frozenset(matched)


def attention_modules(spec: ModelSpec, prefix: str, qkv_bias: bool, out_bias: bool) -> list[Module]:
    """A Llama-style attention's `self_attn.{q,k,v,o}_proj` in registration order (q: heads x head_dim wide,
    k and v: kv heads x head_dim, o back to hidden), repeated once per layer; `prefix` is the layer-0 path."""
    h, n = spec.hidden_size, spec.num_layers
    return [Module(prefix + "self_attn.q_proj", "linear", "attention", h, spec.q_size, qkv_bias, n),
            Module(prefix + "self_attn.k_proj", "linear", "attention", h, spec.kv_size, qkv_bias, n),
            Module(prefix + "self_attn.v_proj", "linear", "attention", h, spec.kv_size, qkv_bias, n),
            Module(prefix + "self_attn.o_proj", "linear", "attention", spec.q_size, h, out_bias, n)]


def no_model_level(flow: Any, embeddings_need_grad: bool) -> list[SavedTensor]:
    return []


@dataclass(frozen=True)
class Family:
    """The rules of one model family (see the module docstring). Paths are transformers' (layer 0)."""

    model_types: tuple[str, ...]  # transformers' `model_type`s these rules cover
    layout: Callable[[ModelSpec], list[Module]]  # every parameter-holding module but lm_head, in model order
    layer: LayerRule  # what one decoder layer keeps (flow, whether the layer's input needs a gradient)
    # PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING; where PEFT has none (`peft_has_default`
    # False: get_peft_model then asks for target_modules), the documented choice this tool plans with.
    peft_default_targets: tuple[str, ...]
    layer_prefix: str  # "model.layers.0." or "transformer.h.0."
    last_linear: str  # the layer's last matmul, after `layer_prefix`: checkpointing never re-runs it
    positions: Positions  # RoPE (extrapolates), a learned table (ends at max_position_embeddings), ALiBi
    norm: NormKind  # the layers' and the final norm
    # Saved tensors outside the layers that only this family has (embedding dropout, an embedding norm, ...).
    model_level: LayerRule = no_model_level
    norms_registered_last: bool = False  # decoder-layer norms registered after attention and MLP
    residual_dropout: bool = False  # dropout (spec.dropout) after attention and MLP outputs
    scalar_buffers: int = 0  # buffers besides RoPE's (Gemma's `embed_scale`)
    # Bytes of buffers whose dtype does not follow the model's (a traced model's bool causal mask, fp32 tables).
    fixed_buffer_bytes: int = 0
    # Elements of fp32 buffers whose size depends on the model (DeepSeek-V3's per-layer `e_score_correction_bias`).
    fp32_buffers: Callable[[ModelSpec], int] | None = None
    peft_has_default: bool = True
    rotary_fp32: bool = False  # RoPE's cos / sin stay fp32 whatever the dtype (OLMo 2's rotary embedding)
    # the layer's projections read its input itself, no norm before them (OLMo 2's post-norm layers)
    linear_reads_layer_input: bool = False
    # RoPE's cos / sin are half the rotary width (gpt-oss: `GptOssRotaryEmbedding.forward` does not repeat the
    # frequencies, `_apply_rotary_emb` rotates the two halves with them).
    rotary_half_tables: bool = False
    # An op after the layer's last matmul saves tensors (OLMo 2's norm of the MLP output), so checkpointing's
    # recompute runs through that matmul too.
    saves_after_last_linear: bool = False
    sdpa: bool = True  # transformers 5.24 accepts attn_implementation="sdpa" (Gemma 2: no, `_supports_sdpa = False`)
    # Why attn_implementation="flash_attention_2" is refused for the family (empty: planned, `rules.flash_attention`).
    flash_refused: str = ""
    # Why --padding / --packing (a materialised attention mask) are refused for the family (empty: planned).
    mask_refused: str = ""
    # `use_liger_kernel=True` (`--liger`): "modelled" (Liger's RMSNorm / RoPE / SwiGLU-GEGLU patches, the rules'
    # `liger_*`), "" (Liger has no patch for the family: the Trainer applies nothing), else why it is refused.
    liger: str = ""
    rotary_per_layer_type: bool = False  # a RoPE table per `layer_types` kind (Gemma 3: local and global bases)
    # The layer rules count what a window past --seq-len allocates (`rules.attention_core` / `rules.mask_arguments`);
    # a family without it gets the planner's "not counted" note when --seq-len exceeds its window.
    models_sliding_window: bool = False
    # PEFT 0.21.2's transformers-v5 MoE conversion (`peft/utils/transformers_weight_conversion.py`,
    # `_MOE_TARGET_MODULE_MAPPING` and `_MOE_FUSED_TARGETS`, from transformers' `conversion_mapping`): the v4 module
    # names it rewrites into `target_parameters` (v4 name -> parameter name), and the parameters fused from several
    # v4 names (which get rank and alpha x that many through `rank_pattern` / `alpha_pattern`). Empty: no conversion.
    moe_conversion: tuple[tuple[str, str], ...] = ()
    moe_fused: tuple[tuple[str, tuple[str, ...]], ...] = ()

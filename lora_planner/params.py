"""Exact parameter and LoRA accounting, module by module (pure).

`module_inventory` lists every parameter-holding module of a `ModelSpec` with the path Hugging Face
`transformers` gives it, so totals equal `sum(p.numel() for p in model.parameters())` of the real model
(tied output embeddings counted once, as `parameters()` deduplicates them), and LoRA targets are matched
exactly as PEFT matches them: a target name matches a module whose full path equals it or ends with
"." + name (`peft.tuners.tuners_utils.check_target_module_exists`).

LoRA adds A (r x in) and B (out x r) to each targeted module: r * (in + out) parameters (Hu et al. 2021,
arXiv 2106.09685, Sec. 4; PEFT's default `bias="none"` adds no bias). For fused projections
(GPT-2's `c_attn`, BLOOM's `query_key_value`) one adapter spans the fused width. The trainable fraction
m is trainable / (base + adapters), which is what PEFT's `get_nb_trainable_parameters` reports.

Known limitations: embeddings can be LoRA targets (PEFT's `lora_embedding_A/B`, same r * (in + out)),
norms cannot; `modules_to_save`, DoRA and rank patterns are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lora_planner.errors import PlannerInputError
from lora_planner.specs import ModelSpec

ModuleKind = Literal["linear", "embedding", "norm"]
ModuleGroup = Literal["embeddings", "attention", "mlp", "norms", "lm_head"]
GROUPS: tuple[ModuleGroup, ...] = ("embeddings", "attention", "mlp", "norms", "lm_head")
ALL_LINEAR = "all-linear"

# PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: used when no target is given.
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj", "fc1", "fc2"), "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
}


@dataclass(frozen=True)
class Module:
    """One module (repeated `count` times, once per layer for per-layer modules).

    `path` is the Hugging Face path of the first instance (layer 0); for linears `in_features` x
    `out_features` is the weight shape, for embeddings `in_features` is the vocabulary, for norms both
    are the normalised width.
    """

    path: str
    kind: ModuleKind
    group: ModuleGroup
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    tied: bool = False  # shares its weight with another module (tied lm_head): no parameters of its own

    @property
    def params_each(self) -> int:
        if self.tied:
            return 0
        if self.kind == "norm":
            return self.out_features * (2 if self.bias else 1)
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def params(self) -> int:
        return self.params_each * self.count

    @property
    def weight_numel_each(self) -> int:
        """Elements of the weight matrix alone (what QLoRA quantizes; biases stay 16-bit)."""
        return 0 if self.tied else self.in_features * self.out_features

    def matches(self, target: str) -> bool:
        """PEFT's rule: the full module name equals the target or ends with '.' + target."""
        return self.path == target or self.path.endswith("." + target)


def _llama_like(spec: ModelSpec) -> list[Module]:
    """Llama / Mistral / Qwen2 / Gemma: `model.layers.N.{self_attn,mlp}.*`, RMSNorm (weight only)."""
    h, n, layer = spec.hidden_size, spec.num_layers, "model.layers.0."
    return [
        Module("model.embed_tokens", "embedding", "embeddings", spec.vocab_size, h),
        Module(layer + "input_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "self_attn.q_proj", "linear", "attention", h, spec.q_size, spec.attention_bias, n),
        Module(layer + "self_attn.k_proj", "linear", "attention", h, spec.kv_size, spec.attention_bias, n),
        Module(layer + "self_attn.v_proj", "linear", "attention", h, spec.kv_size, spec.attention_bias, n),
        Module(layer + "self_attn.o_proj", "linear", "attention", spec.q_size, h, spec.attention_out_bias, n),
        Module(layer + "post_attention_layernorm", "norm", "norms", h, h, count=n),
        Module(layer + "mlp.gate_proj", "linear", "mlp", h, spec.intermediate_size, spec.mlp_bias, n),
        Module(layer + "mlp.up_proj", "linear", "mlp", h, spec.intermediate_size, spec.mlp_bias, n),
        Module(layer + "mlp.down_proj", "linear", "mlp", spec.intermediate_size, h, spec.mlp_bias, n),
        Module("model.norm", "norm", "norms", h, h),
    ]


def _phi(spec: ModelSpec) -> list[Module]:
    """Phi (transformers' PhiForCausalLM): LayerNorm with bias, parallel attention + MLP, one norm a layer."""
    h, n, layer = spec.hidden_size, spec.num_layers, "model.layers.0."
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
        modules += [
            Module(layer + "self_attn.q_layernorm", "norm", "norms", spec.head_dim, spec.head_dim, True, n),
            Module(layer + "self_attn.k_layernorm", "norm", "norms", spec.head_dim, spec.head_dim, True, n),
        ]
    return modules


def _gpt2(spec: ModelSpec) -> list[Module]:
    """GPT-2: learned positions, fused `c_attn` (Conv1D, h -> 3h), LayerNorm with bias."""
    h, n, layer = spec.hidden_size, spec.num_layers, "transformer.h.0."
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


def _bloom(spec: ModelSpec) -> list[Module]:
    """BLOOM: ALiBi (no position parameters), a LayerNorm after the embeddings, fused `query_key_value`."""
    h, n, layer = spec.hidden_size, spec.num_layers, "transformer.h.0."
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


_LAYOUTS = {"llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like, "gemma": _llama_like,
            "phi": _phi, "gpt2": _gpt2, "bloom": _bloom}


def module_inventory(spec: ModelSpec) -> tuple[Module, ...]:
    """Every parameter-holding module of the model, lm_head last."""
    modules = _LAYOUTS[spec.family](spec)
    modules.append(Module("lm_head", "linear", "lm_head", spec.hidden_size, spec.vocab_size,
                          spec.lm_head_bias, tied=spec.tie_word_embeddings))
    return tuple(modules)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    by_group: dict[str, int]


def count_params(spec: ModelSpec) -> ParamCounts:
    """Base-model parameters in total and by group (embeddings, attention, mlp, norms, lm_head)."""
    by_group = dict.fromkeys(GROUPS, 0)
    for module in module_inventory(spec):
        by_group[module.group] += module.params
    return ParamCounts(total=sum(by_group.values()), by_group=by_group)


def linear_leaf_names(spec: ModelSpec) -> tuple[str, ...]:
    """The short names a user can target (e.g. q_proj, c_attn), in model order."""
    names = [m.path.rsplit(".", 1)[-1] for m in module_inventory(spec) if m.kind == "linear"]
    return tuple(dict.fromkeys(names))


def resolve_targets(spec: ModelSpec, targets: tuple[str, ...] | None) -> tuple[Module, ...]:
    """The modules LoRA adapts (None: PEFT's default for the family). Every target must match something:
    PEFT only fails when *none* match, which silently drops a misspelt name; this planner rejects each
    unknown name instead."""
    targets = PEFT_DEFAULT_TARGETS[spec.family] if targets is None else targets
    inventory = module_inventory(spec)
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise PlannerInputError("target", f"{ALL_LINEAR!r} cannot be combined with other names",
                                    f"pass either {ALL_LINEAR} or a list of module names")
        # PEFT's all-linear: every Linear / Conv1D except the output layer (`get_output_embeddings`).
        return tuple(m for m in inventory if m.kind == "linear" and m.group != "lm_head")
    chosen: list[Module] = []
    for target in targets:
        hits = [m for m in inventory if m.matches(target)]
        if not hits:
            raise PlannerInputError(
                "target", f"no module named {target!r} in {spec.name} ({spec.family})",
                f"choose from {', '.join(linear_leaf_names(spec))} or {ALL_LINEAR}",
            )
        norms = [m for m in hits if m.kind == "norm"]
        if norms:
            raise PlannerInputError("target", f"{target!r} is a norm layer, which LoRA cannot adapt",
                                    f"choose from {', '.join(linear_leaf_names(spec))}")
        chosen.extend(m for m in hits if m not in chosen)
    return tuple(chosen)


@dataclass(frozen=True)
class LoraCounts:
    """LoRA parameter counts; `trainable_fraction` is m = trainable / (base + trainable) as PEFT prints it."""

    r: int
    target_modules: tuple[Module, ...]
    trainable_params: int
    base_params: int

    @property
    def all_params(self) -> int:
        return self.base_params + self.trainable_params

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.all_params


def lora_params(spec: ModelSpec, r: int, targets: tuple[str, ...] | None) -> LoraCounts:
    """Trainable parameters of a LoRA adapter of rank r on `targets` (equals PEFT's count)."""
    modules = resolve_targets(spec, targets)
    for module in modules:
        width = min(module.in_features, module.out_features)
        if r > width:
            raise PlannerInputError(
                "r", f"rank {r} exceeds the width {width} of {module.path.rsplit('.', 1)[-1]} "
                     f"({module.in_features} x {module.out_features})",
                f"use r <= {width}",
            )
    trainable = sum(module.count * r * (module.in_features + module.out_features) for module in modules)
    return LoraCounts(r=r, target_modules=modules, trainable_params=trainable,
                      base_params=count_params(spec).total)


def rank_for_trainable_fraction(spec: ModelSpec, fraction: float, targets: tuple[str, ...] | None) -> int:
    """Smallest r whose trainable fraction m reaches `fraction` (m grows linearly in r)."""
    per_rank = lora_params(spec, 1, targets).trainable_params
    base = count_params(spec).total
    # m = r p / (B + r p)  =>  r = m B / (p (1 - m))
    if not 0 < fraction < 1:
        raise PlannerInputError("trainable-fraction", f"must be in (0, 1), got {fraction}", "pass e.g. 0.05")
    exact = fraction * base / (per_rank * (1 - fraction))
    return max(1, -int(-exact // 1))

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

from dataclasses import dataclass, replace
from functools import lru_cache
from math import ceil
from types import MappingProxyType
from typing import Mapping

from lora_planner.errors import PlannerInputError
from lora_planner.families import FAMILY_RULES, family_rules
from lora_planner.families.base import GROUPS, Module  # noqa: F401 (Module: re-exported)
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec

ALL_LINEAR = "all-linear"

# PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, as each family declares it: used when no target
# is given.
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    model_type: family.peft_default_targets for model_type, family in FAMILY_RULES.items()}


@lru_cache(maxsize=256)  # specs are frozen; grids evaluate the same model thousands of times
def module_inventory(spec: ModelSpec) -> tuple[Module, ...]:
    """Every parameter-holding module of the model, lm_head last."""
    modules = family_rules(spec.family).layout(spec)
    modules.append(Module("lm_head", "linear", "lm_head", spec.hidden_size, spec.vocab_size,
                          spec.lm_head_bias, tied=spec.tie_word_embeddings))
    return tuple(modules)


def rotary_dim(spec: ModelSpec) -> int:
    """Channels of each head that RoPE rotates (Phi rotates a fraction; GPT-2 and BLOOM have no RoPE)."""
    if family_rules(spec.family).positions != "rope":
        return 0
    return int(spec.head_dim * spec.partial_rotary_factor)


def rotary_tables(spec: ModelSpec) -> int:
    """How many RoPE tables the model builds: one, or one per attention kind in `layer_types` where the family
    rotates each kind with its own base (`Family.rotary_per_layer_type`: Gemma 3's local and global RoPE,
    `Gemma3RotaryEmbedding.__init__` loops over `sorted(set(config.layer_types))`)."""
    if family_rules(spec.family).rotary_per_layer_type and spec.layer_types:
        return len(set(spec.layer_types))
    return 1


def buffer_numel(spec: ModelSpec) -> int:
    """Elements of the model's buffers, stored in the model dtype: RoPE's `inv_freq` and
    `original_inv_freq` (`torch.arange(0, rotary_dim, 2)`: ceil(rotary_dim / 2) each, per table) and the
    family's scalars (Gemma's `embed_scale`)."""
    return 2 * ((rotary_dim(spec) + 1) // 2) * rotary_tables(spec) + family_rules(spec.family).scalar_buffers


def buffer_bytes(spec: ModelSpec, dtype: str) -> int:
    """Bytes of the model's buffers as transformers 5.24 keeps them (two separate storages per RoPE table, not
    one shared; checked on every family's tiny model, `tests/test_params.py`). RoPE's `inv_freq` and
    `original_inv_freq` stay fp32 whatever the model dtype: `LlamaRotaryEmbedding.__init__`
    (models/llama/modeling_llama.py, and every RoPE family's copy) registers `nn.Buffer(inv_freq)` and
    `nn.Buffer(inv_freq.clone())`, computed by `torch.arange(0, dim, 2, dtype=torch.float)`, so a 16-bit
    `from_config` / `from_pretrained` leaves them fp32 (and DeepSpeed 0.19.8 `engine._configure_distributed_model`
    casts parameters only, "preserve fp32 buffers (e.g. rotary inv_freq)"). The family's scalars are made by
    `torch.tensor(...)` under the model's default dtype (Gemma's `embed_scale`, `GemmaTextScaledWordEmbedding`):
    `dtype`. GPT-2 and BLOOM have no buffers in 5.24 (GPT-2's causal `bias` mask is gone)."""
    rope = 2 * ((rotary_dim(spec) + 1) // 2) * rotary_tables(spec) * 4
    family = family_rules(spec.family)
    return rope + family.scalar_buffers * BYTES_PER_ELEMENT[dtype] + family.fixed_buffer_bytes


def check_sequence_length(spec: ModelSpec, seq_len: int) -> None:
    """Refuse a sequence longer than a learned position table: transformers 5.24 models/gpt2/modeling_gpt2.py
    GPT2Model builds `wpe = nn.Embedding(config.max_position_embeddings, ...)` and looks up
    `position_ids = arange(seq_len)`, so position max_position_embeddings has no row (IndexError on the CPU, a
    device-side assert on CUDA). RoPE families run longer sequences (the rotation extrapolates; `plan_warnings`
    says so), BLOOM's ALiBi has no limit. Called wherever a ModelSpec meets a TrainingSpec
    (`lora_planner.step.step_components`), so every estimate, plan, sweep and recommendation gets it."""
    limit = spec.max_position_embeddings
    if family_rules(spec.family).positions == "learned" and seq_len > limit:
        raise PlannerInputError(
            "seq_len", f"{seq_len:,} tokens is longer than {spec.name}'s learned position table "
                       f"(max_position_embeddings / n_positions {limit:,}); transformers' GPT2Model fails on position "
                       f"{limit:,} (IndexError)", f"use a seq_len <= {limit:,}")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    by_group: Mapping[str, int]  # read-only: results are cached and shared


@lru_cache(maxsize=256)
def count_params(spec: ModelSpec) -> ParamCounts:
    """Base-model parameters in total and by group (embeddings, attention, mlp, norms, lm_head)."""
    by_group = dict.fromkeys(GROUPS, 0)
    for module in module_inventory(spec):
        by_group[module.group] += module.params
    return ParamCounts(total=sum(by_group.values()), by_group=MappingProxyType(by_group))


def targetable_names(spec: ModelSpec) -> tuple[str, ...]:
    """The short names a user can target (e.g. q_proj, c_attn, embed_tokens), in model order."""
    names = [m.path.rsplit(".", 1)[-1] for m in module_inventory(spec) if m.kind != "norm"]
    return tuple(dict.fromkeys(names))


@lru_cache(maxsize=1024)
def _layer_index(path: str) -> int | None:
    """The layer index PEFT reads from a module name for `layers_to_transform`: the first numbered
    segment after a named one (`peft.tuners.tuners_utils.check_target_module_exists`, `layers_pattern`
    unset: `re.match(r".*?\\.[^.]*\\.(?P<idx>\\d+)\\.", key)`); None for modules outside the layers."""
    parts = path.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and i >= 2:
            return int(parts[i])
    return None


@lru_cache(maxsize=4096)
def adapted_layers(spec: ModelSpec, targets: tuple[str, ...] | None,
                   layers_to_transform: tuple[int, ...] | None = None) -> tuple[tuple[Module, frozenset[int]], ...]:
    """Each module LoRA adapts (its layer-0 inventory entry) with the layers it is adapted in, matched as
    PEFT matches (`check_target_module_exists`): a full name equal to a target always matches (so does
    "lm_head"); a name ending in "." + target matches only in `layers_to_transform` when that is set
    (modules outside the decoder layers have no layer index and drop out). None targets: PEFT's default.

    Every target must match something: PEFT only fails when *none* match, which silently drops a
    misspelt name; this planner rejects each unknown name instead.
    """
    targets = PEFT_DEFAULT_TARGETS[spec.family] if targets is None else targets
    inventory = module_inventory(spec)
    if layers_to_transform is not None:
        bad = [i for i in layers_to_transform if not 0 <= i < spec.num_layers]
        if not layers_to_transform or bad:
            raise PlannerInputError("layers_to_transform", f"no layer {bad[0] if bad else '(empty list)'} in "
                                    f"{spec.name}, which has {spec.num_layers} layers (0-{spec.num_layers - 1})",
                                    f"pass layer indices from 0 to {spec.num_layers - 1}")
    keep = None if layers_to_transform is None else frozenset(layers_to_transform)
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise PlannerInputError("target", f"{ALL_LINEAR!r} cannot be combined with other names",
                                    f"pass either {ALL_LINEAR} or a list of module names")
        # PEFT's all-linear: every Linear / Conv1D except the output layer (`get_output_embeddings`).
        chosen = [m for m in inventory if m.kind == "linear" and m.group != "lm_head"]
        if keep is not None:
            # LoraConfig.__post_init__ (peft/tuners/lora/config.py): "`layers_to_transform` cannot be used
            # when `target_modules` is a str", and all-linear is one.
            names = ",".join(dict.fromkeys(m.path.rsplit(".", 1)[-1] for m in chosen))
            raise PlannerInputError("layers_to_transform", "PEFT refuses it with target_modules='all-linear' "
                                    "(a string target)", f"list the modules instead: --target {names}")
        return tuple((m, frozenset(range(m.count))) for m in chosen)
    choices = ", ".join(targetable_names(spec))
    layers_by_path: dict[str, set[int]] = {}
    for target in targets:
        hits = {m: m.matching_layers(target) for m in inventory}
        hits = {m: layers for m, layers in hits.items() if layers}
        if not hits:
            raise PlannerInputError("target", f"no module named {target!r} in {spec.name} ({spec.family})",
                                    f"choose from {choices} or {ALL_LINEAR}")
        if any(m.kind == "norm" for m in hits):
            raise PlannerInputError("target", f"{target!r} is a norm layer, which LoRA cannot adapt",
                                    f"choose from {choices}")
        if keep is not None:
            hits = {m: frozenset(i for i in layers if m.layer_path(i) == target
                                 or _layer_index(m.layer_path(i)) in keep) for m, layers in hits.items()}
            hits = {m: layers for m, layers in hits.items() if layers}
            if not hits:
                raise PlannerInputError(
                    "target", f"{target!r} matches nothing in layers_to_transform {list(layers_to_transform)}"
                              " (modules outside the decoder layers have no layer index)",
                    "drop it from the targets or widen layers_to_transform")
        for m, layers in hits.items():
            layers_by_path.setdefault(m.path, set()).update(layers)
    return tuple((m, frozenset(layers_by_path[m.path])) for m in inventory if m.path in layers_by_path)


def resolve_targets(spec: ModelSpec, targets: tuple[str, ...] | None,
                    layers_to_transform: tuple[int, ...] | None = None) -> tuple[Module, ...]:
    """The modules LoRA adapts (see `adapted_layers`), each with `count` = the number of layers it is
    adapted in (a target such as "layers.3.self_attn.q_proj" picks one layer, as in PEFT)."""
    return tuple(replace(m, count=len(layers)) for m, layers in adapted_layers(spec, targets, layers_to_transform))


def is_per_layer(module: Module) -> bool:
    """Whether the module repeats in every decoder layer (its path is stored for layer 0)."""
    return ".0." in module.path


@lru_cache(maxsize=1024)
def adapters_by_layer(spec: ModelSpec, targets: tuple[str, ...] | None, layers_to_transform: tuple[int, ...] | None,
                      ) -> tuple[tuple[frozenset[str], ...], frozenset[str]]:
    """(for each decoder layer, the layer-0 paths of the modules adapted in it; the adapted modules outside
    the layers, such as embeddings or lm_head)."""
    per_layer: list[set[str]] = [set() for _ in range(spec.num_layers)]
    outside: set[str] = set()
    for m, layers in adapted_layers(spec, targets, layers_to_transform):
        if not is_per_layer(m):
            outside.add(m.path)
            continue
        for i in layers:
            per_layer[i].add(m.path)
    return tuple(frozenset(p) for p in per_layer), frozenset(outside)


def target_description(spec: ModelSpec, targets: tuple[str, ...] | None,
                       layers_to_transform: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """What LoRA adapts, as a reader would say it: "self_attn.q_proj (all 32 layers)",
    "self_attn.q_proj (layer 3)", "self_attn.q_proj (layers 0-3, 8)", "lm_head"."""
    out = []
    for m, layers in adapted_layers(spec, targets, layers_to_transform):
        if not is_per_layer(m):
            out.append(m.path)
            continue
        name = m.path.split(".0.", 1)[1]
        if len(layers) == spec.num_layers:
            out.append(f"{name} (all {spec.num_layers} layers)" if spec.num_layers > 1 else name)
        else:
            out.append(f"{name} ({'layer' if len(layers) == 1 else 'layers'} {_ranges(sorted(layers))})")
    return tuple(out)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3, 8"."""
    parts, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


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


@lru_cache(maxsize=4096)
def lora_params(spec: ModelSpec, r: int, targets: tuple[str, ...] | None,
                layers_to_transform: tuple[int, ...] | None = None) -> LoraCounts:
    """Trainable parameters of a LoRA adapter of rank r on `targets` (equals PEFT's count)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise PlannerInputError("r", f"must be a positive integer, got {r!r}", "pass e.g. --r 8")
    modules = resolve_targets(spec, targets, layers_to_transform)
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


def max_rank(spec: ModelSpec, targets: tuple[str, ...] | None) -> int:
    """The largest r every targeted module allows (r <= min(in, out))."""
    return min(min(m.in_features, m.out_features) for m in resolve_targets(spec, targets))


def rank_for_trainable_fraction(spec: ModelSpec, fraction: float, targets: tuple[str, ...] | None) -> int:
    """Smallest r whose trainable fraction m (as PEFT computes it) reaches `fraction`."""
    if not 0 < fraction < 1:
        raise PlannerInputError("trainable-fraction", f"must be in (0, 1), got {fraction}", "pass e.g. 0.05")
    per_rank = lora_params(spec, 1, targets).trainable_params
    base = count_params(spec).total
    # m = r p / (B + r p) >= f  <=>  r >= f B / (p (1 - f)); start there, then settle float rounding exactly.
    r = max(1, ceil(fraction * base / (per_rank * (1 - fraction))))

    def reaches(rank: int) -> bool:
        return rank * per_rank / (base + rank * per_rank) >= fraction

    while r > 1 and reaches(r - 1):
        r -= 1
    while not reaches(r):
        r += 1
    limit = max_rank(spec, targets)
    if r > limit:
        best = limit * per_rank / (base + limit * per_rank)
        raise PlannerInputError(
            "trainable-fraction", f"{fraction:g} needs r={r}, above the largest rank {limit} of these targets "
                                  f"(which reaches m={best:.4g})",
            "target more modules (e.g. --target all-linear) or ask for a smaller fraction")
    return r

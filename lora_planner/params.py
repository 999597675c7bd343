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

`modules_to_save` (the input embeddings and the output layer, `modules_to_save`), the base biases PEFT's `bias`
trains (`trained_biases`), the rows `trainable_token_indices` trains (`trainable_token_layers`) and DoRA's magnitudes
are counted where the step's trainable tensors are (`lora_planner.step`).

Known limitations: embeddings can be LoRA targets (PEFT's `lora_embedding_A/B`, same r * (in + out)),
norms cannot; `modules_to_save` of other modules, `ensure_weight_tying` and user rank patterns are not modelled.
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
from lora_planner.specs import BYTES_PER_ELEMENT, MAX_R, LoraSpec, ModelSpec

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
    family = family_rules(spec.family)
    extra = family.fp32_buffers(spec) if family.fp32_buffers else 0
    return 2 * ((rotary_dim(spec) + 1) // 2) * rotary_tables(spec) + family.scalar_buffers + extra


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
    extra = family.fp32_buffers(spec) * 4 if family.fp32_buffers else 0  # DeepSeek-V3's e_score_correction_bias
    return rope + family.scalar_buffers * BYTES_PER_ELEMENT[dtype] + family.fixed_buffer_bytes + extra


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
    # What one token passes through: `total` less the routed experts it is not sent to (equal to `total` for a
    # dense model). Memory needs `total` (every expert is resident); FLOPs follow `active`.
    active: int = 0


@lru_cache(maxsize=256)
def count_params(spec: ModelSpec) -> ParamCounts:
    """Base-model parameters in total and by group (embeddings, attention, mlp, norms, lm_head), and active per
    token: every MoE layer sends a token to k of its E routed experts, so (E - k) / E of each expert stack (weights
    and biases) is idle for it; routers, shared experts, dense layers, attention, embeddings and lm_head all count
    (the convention of the Qwen and OLMoE model cards; gpt-oss's and DeepSeek's cards leave the input embedding
    out, `embedding_free_active_params`)."""
    by_group = dict.fromkeys(GROUPS, 0)
    idle = 0
    for module in module_inventory(spec):
        by_group[module.group] += module.params
        if module.kind == "experts":
            idle += module.params // spec.num_experts * (spec.num_experts - spec.num_experts_per_tok)
    total = sum(by_group.values())
    return ParamCounts(total=total, by_group=MappingProxyType(by_group), active=total - idle)


def embedding_free_active_params(spec: ModelSpec) -> int:
    """Active parameters without the input embedding table (a lookup, no FLOPs): how gpt-oss's and DeepSeek-V3's
    model cards count "active"."""
    return count_params(spec).active - count_params(spec).by_group["embeddings"]


def targetable_names(spec: ModelSpec) -> tuple[str, ...]:
    """The short names a user can target (e.g. q_proj, c_attn, embed_tokens), in model order; for an MoE family
    with PEFT's conversion, the v4 names it maps onto the experts and the router (gate_proj, w1, gate, ...)."""
    names = [m.path.rsplit(".", 1)[-1] for m in module_inventory(spec) if m.kind in ("linear", "embedding")]
    names += [old for old, _ in family_rules(spec.family).moe_conversion]
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


def peft_moe_conversion(spec: ModelSpec, targets: tuple[str, ...], target_parameters: tuple[str, ...] | None,
                        ) -> tuple[tuple[str, ...], dict[str, int]]:
    """PEFT 0.21.2's transformers-v5 MoE conversion (`peft/utils/transformers_weight_conversion.py`,
    `_convert_peft_config_moe`, run by `inject_adapter` before matching): v4 names of the experts and the router
    (gate_proj / up_proj / down_proj / gate; Mixtral's w1 / w3 / w2 / gate) move from the module targets to
    `target_parameters` (gate_up_proj, down_proj, gate.weight); "all-linear" is first resolved to the leaf names of
    the model's nn.Linear modules plus every v4 name (`_resolve_string_target_modules`). A parameter fused from
    several v4 names gets rank (and alpha) x that many (`rank_pattern`), and naming only some of them is refused.
    Returns (module targets left, {parameter target: rank multiplier}); families without a conversion pass through."""
    family = family_rules(spec.family)
    params = {t: 1 for t in target_parameters or ()}
    if not family.moe_conversion:
        return targets, params
    mapping, fused = dict(family.moe_conversion), dict(family.moe_fused)
    if targets == (ALL_LINEAR,):
        linears = [m for m in module_inventory(spec) if m.kind == "linear" and m.group != "lm_head"]
        targets = tuple(dict.fromkeys([m.path.rsplit(".", 1)[-1] for m in linears] + list(mapping)))
    left: list[str] = []
    matched: dict[str, set[str]] = {}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            left.append(target)
            continue
        params.setdefault(mapping[old], 1)
        matched.setdefault(mapping[old], set()).add(old)
    for new, olds in fused.items():
        present = matched.get(new, set())
        if 0 < len(present) < len(olds):
            missing = ", ".join(sorted(set(olds) - present))
            raise PlannerInputError("target", f"PEFT cannot convert {', '.join(sorted(present))} without also "
                                              f"targeting {missing}: transformers 5 fuses them into {new}",
                                    f"add {missing} to the targets")
        if len(present) == len(olds) > 1:
            params[new] = len(olds)
    return tuple(left), params


def _parameter_targets(spec: ModelSpec, params: dict[str, int]) -> dict[Module, tuple[frozenset[int], int]]:
    """Expert and router weights matched by PEFT's `target_parameters` (`BaseTuner._inject_parameters`: the
    parameter's full name equals the target or ends with "." + target, in every layer; `layers_to_transform` does
    not apply), each with its layers and rank multiplier."""
    hits: dict[Module, tuple[frozenset[int], int]] = {}
    for target, scale in params.items():
        found = False
        for m in module_inventory(spec):
            suffix = "" if m.kind == "experts" else ".weight"
            keys = {i: m.layer_path(i) + suffix for i in m.layer_indices}
            layers = frozenset(i for i, key in keys.items() if key == target or key.endswith("." + target))
            if not layers:
                continue
            if m.kind not in ("experts", "router"):
                raise PlannerInputError("target_parameters", f"{target!r} matches {m.parameter_name}, a {m.kind} weight",
                                        "name nn.Linear modules in --target; target_parameters is for MoE experts "
                                        "and routers")
            found = True
            hits[m] = (layers, scale)
        if not found:
            names = ", ".join(dict.fromkeys(m.parameter_name.split(".0.", 1)[-1] for m in module_inventory(spec)
                                            if m.kind in ("experts", "router"))) or "none in this model"
            raise PlannerInputError("target_parameters", f"no expert or router parameter named {target!r} in "
                                    f"{spec.name}", f"choose from {names}")
    return hits


@lru_cache(maxsize=4096)
def adapted_layers(spec: ModelSpec, targets: tuple[str, ...] | None,
                   layers_to_transform: tuple[int, ...] | None = None,
                   target_parameters: tuple[str, ...] | None = None,
                   ) -> tuple[tuple[Module, frozenset[int]], ...]:
    """Each module LoRA adapts (its layer-0 inventory entry) with the layers it is adapted in, matched as
    PEFT matches (`check_target_module_exists`): a full name equal to a target always matches (so does
    "lm_head"); a name ending in "." + target matches only in `layers_to_transform` when that is set
    (modules outside the decoder layers have no layer index and drop out). None targets: PEFT's default.
    MoE families first go through PEFT's v4 -> v5 conversion (`peft_moe_conversion`); expert and router weights
    reached through `target_parameters` come back with their `lora_rank_scale`.

    Every target must match something: PEFT only fails when *none* match, which silently drops a
    misspelt name; this planner rejects each unknown name instead.
    """
    targets = PEFT_DEFAULT_TARGETS[spec.family] if targets is None else targets
    if ALL_LINEAR in targets and len(targets) > 1:
        raise PlannerInputError("target", f"{ALL_LINEAR!r} cannot be combined with other names",
                                f"pass either {ALL_LINEAR} or a list of module names")
    all_linear = targets == (ALL_LINEAR,)
    if all_linear and layers_to_transform is not None:
        # LoraConfig.__post_init__ (peft/tuners/lora/config.py): "`layers_to_transform` cannot be used
        # when `target_modules` is a str", and all-linear is one.
        names = ",".join(dict.fromkeys(m.path.rsplit(".", 1)[-1] for m in module_inventory(spec)
                                       if m.kind == "linear" and m.group != "lm_head"))
        raise PlannerInputError("layers_to_transform", "PEFT refuses it with target_modules='all-linear' "
                                "(a string target)", f"list the modules instead: --target {names}")
    targets, params = peft_moe_conversion(spec, targets, target_parameters)
    by_module = {m: (layers, scale) for m, (layers, scale) in _parameter_targets(spec, params).items()}
    if all_linear:
        # PEFT's all-linear: every Linear / Conv1D except the output layer (`get_output_embeddings`); after an MoE
        # conversion, the linear leaf names the conversion left (`peft_moe_conversion`).
        converted = bool(family_rules(spec.family).moe_conversion)
        chosen = [m for m in module_inventory(spec) if m.kind == "linear" and m.group != "lm_head"
                  and (not converted or m.path.rsplit(".", 1)[-1] in targets)]
        for m in chosen:
            by_module[m] = (frozenset(m.layer_indices), 1)
    elif targets:
        for m, layers in _module_targets(spec, targets, layers_to_transform).items():
            by_module[m] = (layers, 1)
    return tuple((replace(m, lora_rank_scale=by_module[m][1]) if by_module[m][1] != 1 else m, by_module[m][0])
                 for m in module_inventory(spec) if m in by_module)


def _module_targets(spec: ModelSpec, targets: tuple[str, ...],
                    layers_to_transform: tuple[int, ...] | None) -> dict[Module, frozenset[int]]:
    """Modules named in `target_modules` (see `adapted_layers`)."""
    inventory = module_inventory(spec)
    if layers_to_transform is not None:
        bad = [i for i in layers_to_transform if not 0 <= i < spec.num_layers]
        if not layers_to_transform or bad:
            raise PlannerInputError("layers_to_transform", f"no layer {bad[0] if bad else '(empty list)'} in "
                                    f"{spec.name}, which has {spec.num_layers} layers (0-{spec.num_layers - 1})",
                                    f"pass layer indices from 0 to {spec.num_layers - 1}")
    keep = None if layers_to_transform is None else frozenset(layers_to_transform)
    choices = ", ".join(targetable_names(spec))
    found: dict[Module, set[int]] = {}
    for target in targets:
        hits = {m: m.matching_layers(target) for m in inventory if m.kind not in ("experts", "router")}
        hits = {m: layers for m, layers in hits.items() if layers}
        if not hits:
            extra = ""
            if any(m.kind in ("experts", "router") and m.matching_layers(target) for m in inventory):
                extra = f" module ({target} is an MoE parameter: pass it as --target-parameters {target})"
            raise PlannerInputError("target", f"no module named {target!r} in {spec.name} ({spec.family}){extra}",
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
            found.setdefault(m, set()).update(layers)
    return {m: frozenset(layers) for m, layers in found.items()}


def resolve_targets(spec: ModelSpec, targets: tuple[str, ...] | None,
                    layers_to_transform: tuple[int, ...] | None = None,
                    target_parameters: tuple[str, ...] | None = None) -> tuple[Module, ...]:
    """The modules LoRA adapts (see `adapted_layers`), each with `count` = the number of layers it is
    adapted in (a target such as "layers.3.self_attn.q_proj" picks one layer, as in PEFT)."""
    return tuple(replace(m, count=len(layers), layers=())
                 for m, layers in adapted_layers(spec, targets, layers_to_transform, target_parameters))


def is_per_layer(module: Module) -> bool:
    """Whether the module repeats in every decoder layer (its path is stored for layer 0)."""
    return ".0." in module.path


@lru_cache(maxsize=1024)
def adapters_by_layer(spec: ModelSpec, targets: tuple[str, ...] | None, layers_to_transform: tuple[int, ...] | None,
                      target_parameters: tuple[str, ...] | None = None,
                      ) -> tuple[tuple[frozenset[str], ...], frozenset[str]]:
    """(for each decoder layer, the layer-0 paths of the modules adapted in it; the adapted modules outside
    the layers, such as embeddings or lm_head)."""
    per_layer: list[set[str]] = [set() for _ in range(spec.num_layers)]
    outside: set[str] = set()
    for m, layers in adapted_layers(spec, targets, layers_to_transform, target_parameters):
        if not is_per_layer(m):
            outside.add(m.path)
            continue
        for i in layers:
            per_layer[i].add(m.path)
    return tuple(frozenset(p) for p in per_layer), frozenset(outside)


def target_description(spec: ModelSpec, targets: tuple[str, ...] | None,
                       layers_to_transform: tuple[int, ...] | None = None,
                       target_parameters: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """What LoRA adapts, as a reader would say it: "self_attn.q_proj (all 32 layers)",
    "self_attn.q_proj (layer 3)", "self_attn.q_proj (layers 0-3, 8)", "lm_head"; MoE parameters as PEFT's
    target_parameters with their rank: "mlp.experts.gate_up_proj [r=32] (all 48 layers)"."""
    out = []
    for m, layers in adapted_layers(spec, targets, layers_to_transform, target_parameters):
        if not is_per_layer(m):
            out.append(m.path)
            continue
        name = m.parameter_name.split(".0.", 1)[1] if m.kind in ("experts", "router") else m.path.split(".0.", 1)[1]
        if m.lora_rank_scale != 1:
            name += f" [rank x{m.lora_rank_scale}]"
        if len(layers) == len(m.layer_indices) == spec.num_layers:
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
                layers_to_transform: tuple[int, ...] | None = None,
                target_parameters: tuple[str, ...] | None = None) -> LoraCounts:
    """Trainable parameters of a LoRA adapter of rank r on `targets` (equals PEFT's count). A rank above a
    targeted linear's width is refused (it adds nothing a lower rank would not); PEFT itself accepts it, and so does
    this function for 1-wide scalar gates (Qwen2-MoE's shared_expert_gate, which all-linear picks) and MoE
    parameters."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise PlannerInputError("r", f"must be a positive integer, got {r!r}", "pass e.g. --r 8")
    modules = resolve_targets(spec, targets, layers_to_transform, target_parameters)
    checked = tuple(m for m in modules if _rank_bounded(m))
    for module in checked:
        width = min(module.in_features, module.out_features)
        if r > width:
            raise PlannerInputError(
                "r", f"rank {r} exceeds the width {width} of {module.path.rsplit('.', 1)[-1]} "
                     f"({module.in_features} x {module.out_features})",
                f"use r <= {width}",
            )
    trainable = sum(module.count * module.lora_numel(r) for module in modules)
    return LoraCounts(r=r, target_modules=modules, trainable_params=trainable,
                      base_params=count_params(spec).total)


def modules_to_save(spec: ModelSpec, names: tuple[str, ...] | None) -> tuple[Module, ...]:
    """The modules PEFT's `modules_to_save` names (suffix match on the path, as PEFT's `_check_target_module_exists`
    does): the input embeddings and the output layer are planned; anything else is refused with the reason."""
    if not names:
        return ()
    found: list[Module] = []
    for name in names:
        name = name.strip()
        hits = [m for m in module_inventory(spec) if m.path == name or m.path.endswith("." + name)]
        if not hits:
            outside = [m.path.rsplit(".", 1)[-1] for m in module_inventory(spec)
                       if m.kind == "embedding" or m.group == "lm_head"]
            raise PlannerInputError("modules_to_save", f"{spec.name} has no module {name!r}",
                                    f"use one of {', '.join(dict.fromkeys(outside))}")
        for m in hits:
            if not (m.kind == "embedding" and m.group == "embeddings" or m.group == "lm_head") or m.count > 1:
                raise PlannerInputError("modules_to_save", f"{name!r} is not planned yet (only the input "
                                                           "embeddings and the output layer are)",
                                        "pass e.g. --modules-to-save embed_tokens,lm_head")
            if m not in found:
                found.append(m)
    return tuple(found)


def trained_biases(spec: ModelSpec, lora: LoraSpec) -> tuple[tuple[Module, frozenset[int]], ...]:
    """The base biases PEFT's `bias` trains, each with the layers it trains in (PEFT 0.21.2
    `peft/tuners/tuners_utils.py` `BaseTuner._mark_only_adapters_as_trainable`): "lora_only", the biases of the
    adapted linears, in the layers they are adapted in; "all", every parameter whose name is or ends in "bias" (norms'
    included); "none", none. No copy is made: the base parameter itself gets a gradient and optimizer state."""
    if lora.bias == "none":
        return ()
    if lora.bias == "lora_only":
        return tuple((m, layers) for m, layers in adapted_layers(spec, lora.target_modules, lora.layers_to_transform,
                                                                  lora.target_parameters)
                     if m.bias and m.kind == "linear")
    return tuple((m, frozenset(m.layer_indices) if is_per_layer(m) else frozenset())
                 for m in module_inventory(spec) if m.bias)


def bias_numel(m: Module) -> int:
    """Elements of one instance's bias (an "experts" parameter's: experts x out)."""
    return m.experts * m.out_features


@dataclass(frozen=True)
class TokenLayer:
    """A module PEFT's `trainable_token_indices` wraps (`TrainableTokensWrapper`): `tokens` rows trained, with a delta
    of their own or, for an output layer tied to the input embeddings, the embeddings' (`shared`)."""

    module: Module
    tokens: int
    shared: bool = False


def trainable_token_layers(spec: ModelSpec, lora: LoraSpec) -> tuple[TokenLayer, ...]:
    """The modules PEFT 0.21.2 wraps for `trainable_token_indices` (`peft/utils/other.py`
    `set_additional_trainable_modules`): the list form names the input embeddings; a dict names modules (suffix match).
    On a tied model, once the input embeddings are wrapped and a named output layer (if any) asks for the same
    indices, the output layer is wrapped too, sharing the embeddings' delta (`tied_adapter`); otherwise every named
    module has its own. A module also in `modules_to_save` is refused, as PEFT refuses it."""
    if not lora.trainable_token_indices:
        return ()
    inventory = module_inventory(spec)
    embedding = next(m for m in inventory if m.kind == "embedding" and m.group == "embeddings")
    head = next((m for m in inventory if m.group == "lm_head"), None)
    named: dict[Module, tuple[int, ...]] = {}
    for name, indices in lora.trainable_token_indices:
        hits = [embedding] if not name else [m for m in (embedding, head) if m is not None
                                             and (m.path == name or m.path.endswith("." + name))]
        if not hits:
            raise PlannerInputError("trainable_token_indices", f"{spec.name} has no embedding or output layer named "
                                                               f"{name!r}",
                                    f"name {embedding.path.rsplit('.', 1)[-1]}"
                                    + (f" or {head.path}" if head else "") + ", or pass a list of token ids alone")
        for m in hits:
            named[m] = tuple(sorted(set(indices)))
    for m, indices in named.items():
        if indices[-1] >= spec.vocab_size:
            raise PlannerInputError("trainable_token_indices", f"token {indices[-1]:,} is past {spec.name}'s "
                                                               f"vocabulary of {spec.vocab_size:,}",
                                    f"pass token ids below {spec.vocab_size:,}")
    saved = {m.path for m in modules_to_save(spec, lora.modules_to_save)}
    if any(m.path in saved for m in named):
        raise PlannerInputError("trainable_token_indices", "a module is both in modules_to_save and given trainable "
                                                           "tokens (PEFT refuses it)", "drop one of the two")
    layers = [TokenLayer(m, len(indices)) for m, indices in named.items()]
    if spec.tie_word_embeddings and head is not None and embedding in named \
            and named.get(head, named[embedding]) == named[embedding]:
        layers = [layer for layer in layers if layer.module is not head]
        layers.append(TokenLayer(head, len(named[embedding]), shared=True))
    return tuple(layers)


def max_rank(spec: ModelSpec, targets: tuple[str, ...] | None) -> int:
    """The largest r every targeted module allows (r <= min(in, out)); MAX_R when nothing is checked
    (see `lora_params`)."""
    widths = [min(m.in_features, m.out_features) for m in resolve_targets(spec, targets) if _rank_bounded(m)]
    return min(widths) if widths else MAX_R


def _rank_bounded(m: Module) -> bool:
    """Whether the planner bounds r by this adapted module's width (see `lora_params`)."""
    return m.kind in ("linear", "embedding") and min(m.in_features, m.out_features) > 1


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

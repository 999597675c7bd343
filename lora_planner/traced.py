"""Traced profiles: the planner's rules for a causal LM that no family module describes (pure, no torch).

For a `config.json` whose `model_type` has no analytic rule (`lora_planner.families`), the profiler traces the
model once (`lora_planner.profiler.trace_family`, the only part that imports torch) and this module turns what it
recorded into a `Family` like the hand-written ones, so `ModelSpec`, parameters, PEFT targeting, activations, the
step's phases and the peak work unchanged:

- the layout: every parameter-holding module of the model built on the meta device (path, kind, shape, bias,
  how many layers repeat it; lm_head tied or not) and the buffers' element count;
- per settings (method, dtype, autocast, attention, adapter dtype, rank, adapted modules in a layer and outside,
  gradient checkpointing): the bytes one decoder layer saves for backward (with and without a gradient at its
  input), and the model-level bytes before the layers, in the final norm + lm_head, in the loss, and held outside
  autograd's saved tensors (checkpointing's arguments), each an exact integer polynomial in the micro-batch b and
  the sequence length s over the basis `BASIS` (solved from reduced-depth fake traces, checked on held-out shapes).

A profile is cached as JSON under `cache_dir()` (`$LORA_PLAN_TRACE_CACHE`, else `$XDG_CACHE_HOME/lora_planner/traced`,
else `~/.cache/lora_planner/traced`), keyed by the memory-relevant fields of the config (`normalised_config`) and the
torch / transformers / peft versions; from then on planning reads it without importing torch. Settings a plan needs
that the cache lacks are traced on first use (torch needed then) and added to the file.

Known limitations: the traces run PyTorch's CPU kernels under FakeTensorMode, so a CUDA plan gets CPU semantics
where they differ (LayerNorm's saved statistics in the input dtype, not fp32); QLoRA and `layers_to_transform` are
refused (bitsandbytes cannot run under fake tensors; per-layer adapter sets are not traced); modules other than
Linear / Conv1D / Embedding / 1-D norms, layers that differ from each other, and an output layer not named
`lm_head` are refused; dropout is traced as configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from copy import copy
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from importlib import metadata, util
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.families.base import Family, Module, SavedTensor

ENV_CACHE = "LORA_PLAN_TRACE_CACHE"
INSTALL_HINT = "pip install 'lora-planner[profile]'"
PROFILE_VERSION = 2  # bump when the file layout or what is traced changes
# Monomials of (b = sequences per micro-batch, s = tokens per sequence) every traced byte count is fitted on:
# per token (b s), attention's S x S per sequence (b s^2), a shared S x S mask (s^2), per sequence, per position
# (RoPE tables), constant.
BASIS = ("b*s", "b*s*s", "s*s", "b", "s", "1")
Poly = tuple[int, ...]
# Keys that never change a parameter or an activation size: dropped before hashing, so a re-saved config with
# other token ids or a newer transformers_version hits the same cache entry.
IRRELEVANT_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "bos_token_id",
    "eos_token_id", "use_cache", "initializer_range", "auto_map", "task_specific_params", "id2label", "label2id",
    "_attn_implementation_autoset", "quantization_config"})


# config.json keys of the depth, and keys only the Hub / the loader read (never passed to the config class).
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
BUILD_ONLY_KEYS = ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
                   "quantization_config")


def evaluate(poly: Poly, b: int, s: int) -> int:
    """A fitted byte count at micro-batch b and sequence length s."""
    return sum(c * m for c, m in zip(poly, monomials(b, s)))


def monomials(b: int, s: int) -> tuple[int, ...]:
    return (b * s, b * s * s, s * s, b, s, 1)


def solve_exact(points: list[tuple[int, int]], values: list[int]) -> Poly:
    """The integer coefficients over `BASIS` through (b, s) -> bytes, by Gauss-Jordan elimination in fractions on
    the first len(BASIS) independent points; every other point must fit too. Raises ValueError when the bytes are
    not such a polynomial (the traced model is not shape-regular)."""
    n = len(BASIS)
    rows = [[Fraction(x) for x in monomials(b, s)] + [Fraction(v)] for (b, s), v in zip(points, values)]
    pivots: list[int] = []
    matrix = [r[:] for r in rows]
    r = 0
    for col in range(n):
        pivot = next((i for i in range(r, len(matrix)) if matrix[i][col] != 0), None)
        if pivot is None:
            raise ValueError(f"the trace shapes do not determine the {BASIS[col]} term")
        matrix[r], matrix[pivot] = matrix[pivot], matrix[r]
        lead = matrix[r][col]
        matrix[r] = [x / lead for x in matrix[r]]
        for i in range(len(matrix)):
            if i != r and matrix[i][col] != 0:
                factor = matrix[i][col]
                matrix[i] = [x - factor * y for x, y in zip(matrix[i], matrix[r])]
        pivots.append(col)
        r += 1
    coeffs = [matrix[i][n] for i in range(n)]
    if any(c.denominator != 1 for c in coeffs):
        raise ValueError(f"non-integer coefficients {[str(c) for c in coeffs]}")
    poly = tuple(int(c) for c in coeffs)
    for (b, s), v in zip(points, values):
        if evaluate(poly, b, s) != v:
            raise ValueError(f"held-out shape b={b} s={s}: fitted {evaluate(poly, b, s)} bytes, traced {v}")
    return poly


@dataclass(frozen=True)
class ModelLevel:
    """Model-level bytes of one settings key (each a `Poly`): saved before / between the layers (embeddings, masks,
    tensors several layers share), in the final norm and lm_head, in the loss, alive after the forward outside
    the saved tensors (checkpointing's other arguments), and, under checkpointing, what each checkpointed layer
    keeps (`checkpoint_layer`: its input, which non-reentrant checkpointing saves through autograd's hooks)."""

    before_layers: Poly
    head: Poly
    loss: Poly
    held: Poly
    checkpoint_layer: Poly


@dataclass(frozen=True)
class TracedProfile:
    """What one traced model_type config needs for planning (see the module docstring)."""

    model_type: str
    config_hash: str
    versions: dict[str, str]  # torch / transformers / peft
    created: str  # ISO 8601, UTC
    trace_s: float  # seconds the layout trace took
    config: dict[str, Any]  # the normalised config.json it was built from
    sizes: dict[str, Any]  # ModelSpec's fields: vocab_size, hidden_size, num_layers, ...
    modules: tuple[Module, ...]  # every parameter-holding module but lm_head, layer 0's path for per-layer ones
    buffer_numel: int  # elements of the buffers that follow the model dtype
    fixed_buffer_bytes: int  # bytes of the others (fp32 tables, bool masks), whatever the dtype
    peft_default_targets: tuple[str, ...]
    peft_has_default: bool
    layer_prefix: str
    last_linear: str
    layers: dict[str, Poly] = field(default_factory=dict)  # "<settings>|grad=0/1" -> a layer's saved bytes
    model_levels: dict[str, ModelLevel] = field(default_factory=dict)  # "<settings>|gc=0/1" -> ModelLevel

    @property
    def family_id(self) -> str:
        """The `ModelSpec.family` this profile is registered under: unique per config and versions."""
        return f"{self.model_type}.traced-{self.config_hash[:10]}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = PROFILE_VERSION
        data["modules"] = [asdict(m) for m in self.modules]
        data["model_levels"] = {k: asdict(v) for k, v in self.model_levels.items()}
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> TracedProfile:
        data = dict(data)
        if data.pop("format", None) != PROFILE_VERSION:
            raise ValueError("another profile format")
        known = {f.name for f in fields(Module)} - {"layers"}  # a cache may name fields a newer Module dropped
        data["modules"] = tuple(Module(**{k: v for k, v in m.items() if k in known},
                                       layers=tuple(m.get("layers", ()))) for m in data["modules"])
        data["peft_default_targets"] = tuple(data["peft_default_targets"])
        data["layers"] = {k: tuple(v) for k, v in data["layers"].items()}
        data["model_levels"] = {k: ModelLevel(**{**v, **{n: tuple(v[n]) for n in ("before_layers", "head", "loss", "held", "checkpoint_layer")}})
                                for k, v in data["model_levels"].items()}
        return TracedProfile(**data)


# ---------------------------------------------------------------------------------------------- keys and cache


def normalised_config(config: dict[str, Any]) -> dict[str, Any]:
    """The memory-relevant fields of a config.json (everything but `IRRELEVANT_KEYS`), sorted."""
    return {k: config[k] for k in sorted(config) if k not in IRRELEVANT_KEYS}


def library_versions() -> dict[str, str]:
    """torch / transformers / peft versions as installed (package metadata: nothing is imported)."""
    versions = {}
    for name in ("torch", "transformers", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def config_hash(config: dict[str, Any], versions: dict[str, str]) -> str:
    text = json.dumps({"config": normalised_config(config), "versions": versions, "format": PROFILE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora_planner" / "traced"


def cache_path(model_type: str, digest: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_type)[:60]
    return cache_dir() / f"{safe}-{digest[:16]}.json"


def load_cached(config: dict[str, Any]) -> TracedProfile | None:
    """The cached profile of this config under the installed versions, or None (absent, unreadable, stale)."""
    digest = config_hash(config, library_versions())
    path = cache_path(str(config.get("model_type")), digest)
    try:
        profile = TracedProfile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return profile if profile.config_hash == digest else None


def save(profile: TracedProfile) -> None:
    """Write the profile atomically (a concurrent reader sees the old file or the new one)."""
    path = cache_path(profile.model_type, profile.config_hash)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.to_json(), indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:
        print(f"lora-plan: could not cache the traced profile in {path.parent} ({err.strerror}); set "
              f"{ENV_CACHE} to a writable folder", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- settings keys


def settings_key(flow: Any) -> str:
    """The settings that change what is saved, from a `rules.Flow` (layer-relative adapter names)."""
    t = flow.t
    if t.method == "qlora":
        raise PlannerInputError("method", f"QLoRA is not traced for {flow.spec.family} (bitsandbytes cannot run "
                                          "under fake tensors)", "plan full or lora for this model")
    lora = t.lora
    if t.method == "full":
        return f"full|{t.dtype}|{t.amp or '-'}|{t.attention}"
    if len(set(flow.layer_adapters)) > 1:
        raise PlannerInputError("layers_to_transform", f"layer-specific adapters are not traced for {flow.spec.family}",
                                "adapt the same modules in every layer (drop --layers-to-transform)")
    profile = profile_of(flow.spec.family)
    prefix = profile.layer_prefix
    layer = sorted(p[len(prefix):] for p in (flow.layer_adapters[0] if flow.layer_adapters else ()))
    outside = sorted(flow.outside_adapters)
    return (f"lora|{t.dtype}|{t.amp or '-'}|{t.attention}|{lora.adapter_dtype}|r{lora.r}|"
            f"L:{','.join(layer)}|O:{','.join(outside)}")


def parse_key(key: str) -> dict[str, Any]:
    """A settings key back into the settings the tracer builds (inverse of `settings_key`)."""
    parts = key.split("|")
    out: dict[str, Any] = {"method": parts[0], "dtype": parts[1], "amp": None if parts[2] == "-" else parts[2],
                           "attention": parts[3]}
    if parts[0] == "lora":
        out.update(adapter_dtype=parts[4], r=int(parts[5][1:]),
                   layer_targets=tuple(x for x in parts[6][2:].split(",") if x),
                   outside_targets=tuple(x for x in parts[7][2:].split(",") if x))
    return out


# ---------------------------------------------------------------------------------------------- registry

_PROFILES: dict[str, TracedProfile] = {}


def profile_of(family_id: str) -> TracedProfile:
    return _PROFILES[family_id]


def is_traced(family_id: str) -> bool:
    return family_id in _PROFILES


def _tracer() -> Any:
    """The tracer module, or one line saying how to get torch."""
    missing = [name for name in ("torch", "transformers", "peft") if util.find_spec(name) is None]
    if missing:
        raise PlannerInputError("model", f"this model_type has no built-in rule and tracing it needs {missing[0]}, "
                                         "which is not installed", f"{INSTALL_HINT} (then the first plan traces and "
                                                                  "caches the model)")
    from lora_planner.profiler import trace_family

    return trace_family


def _ensure(profile: TracedProfile, key: str, gc: bool) -> TracedProfile:
    """The profile with the traces of `key` (a layer's and the model level's), tracing them on first use."""
    model_key = f"{key}|gc={int(gc)}"
    needs_layers = not any(k.startswith(key + "|grad=") for k in profile.layers)
    if not needs_layers and model_key in profile.model_levels:
        return profile
    tracer = _tracer()
    start = time.perf_counter()
    print(f"lora-plan: tracing {profile.model_type} for {key.replace('|', ' ')}{' + checkpointing' if gc else ''} "
          "(first use of these settings)...", file=sys.stderr, flush=True)
    layers, levels = dict(profile.layers), dict(profile.model_levels)
    if needs_layers:
        layers.update(tracer.trace_layers(profile, key))
    if model_key not in levels:
        levels[model_key] = tracer.trace_model_level(profile, key, gc)
    profile = replace(profile, layers=layers, model_levels=levels)
    print(f"lora-plan: traced in {time.perf_counter() - start:.1f} s; cached in {cache_path(profile.model_type, profile.config_hash)}",
          file=sys.stderr, flush=True)
    _PROFILES[profile.family_id] = profile
    save(profile)
    return profile


def _note_input_grads(flow: Any, profile: TracedProfile, x_needs_grad: bool) -> None:
    """Which linears get a gradient at their input (what `throughput.step_flops` reads for a layer without an input
    gradient). The trace records bytes, not the data flow, so this approximates it: every linear registered after
    the layer's first adapted one (registration order, which transformers keeps close to forward order)."""
    seen_adapter = x_needs_grad
    any_attention = False
    for m in profile.modules:
        if m.kind != "linear" or not m.path.startswith(profile.layer_prefix):
            continue
        flow.input_grads[m.path] = seen_adapter
        if flow.adapted(m.path):
            seen_adapter = True
            any_attention |= m.group == "attention"
    flow.note_attention(any_attention or x_needs_grad, any_attention or x_needs_grad, any_attention or x_needs_grad)


def _layer_rule(family_id: str) -> Any:
    def layer(flow: Any, x_needs_grad: bool) -> list[SavedTensor]:
        """One decoder layer's saved bytes, as traced: with a gradient at the input, or without (LoRA's layer 0)."""
        key = settings_key(flow)
        profile = _ensure(profile_of(family_id), key, flow.t.grad_checkpointing)
        if flow.input_grads is not None:
            _note_input_grads(flow, profile, x_needs_grad)
        poly = profile.layers.get(f"{key}|grad={int(x_needs_grad)}")
        if poly is None:  # checkpointing with adapters outside the layers only: no traced layer had an input gradient
            raise PlannerInputError("target", f"{family_id} is traced without a gradient into its layers for these "
                                              "targets", "add a target inside the layers (e.g. q_proj) or drop "
                                                         "--grad-checkpointing")
        return [SavedTensor("traced.layer", evaluate(poly, flow.b, flow.s))]
    return layer


def _model_level_rule(family_id: str) -> Any:
    def model_level(flow: Any, embeddings_need_grad: bool) -> list[SavedTensor]:
        """Everything outside the layers, as traced, net of what `activations._model_level` adds generically
        (the batch is not traced; the final norm's and lm_head's rules and checkpointing's eager mask are
        subtracted so the totals are the traced ones)."""
        from lora_planner.loss import causal_lm_loss_saved  # the generic rules the totals are net of
        from lora_planner.families.rules import norm

        if flow.loss != "hf":
            raise PlannerInputError("loss", f"a traced profile records transformers' own loss, not --loss {flow.loss}",
                                    "use --loss hf for this model")

        key = settings_key(flow)
        gc = flow.t.grad_checkpointing
        profile = _ensure(profile_of(family_id), key, gc)
        level = profile.model_levels[f"{key}|gc={int(gc)}"]
        b, s, tokens = flow.b, flow.s, flow.tokens
        generic_head = sum(t.nbytes for t in norm(flow, "final_norm", True))
        own, keeps = flow.linear("lm_head", flow.e_stream, True)
        generic_head += sum(t.nbytes for t in own) + (tokens * flow.spec.hidden_size * flow.e_stream if keeps else 0)
        generic_mask = b * s * s * flow.e_stream if gc and flow.t.attention == "eager" else 0
        # The step counts `checkpoint_per_layer_bytes` (the layer input) per checkpointed layer; what a traced
        # checkpointed layer keeps beyond that (or short of it) is the model's, once per layer.
        checkpoint_extra = flow.spec.num_layers * (evaluate(level.checkpoint_layer, b, s)
                                                   - tokens * flow.spec.hidden_size * flow.e_stream) if gc else 0
        # What activations.activation_profile counts for the loss: only a model's own difference from it (none for
        # transformers' ForCausalLMLoss) is added here, taken at b >= 2 where the fit was made (at b = 1 the
        # generic rule's (s + 1)-long targets are right and the fitted b s terms are not).
        fit_flow = flow
        if flow.b == 1:
            fit_flow = copy(flow)
            fit_flow.b, fit_flow.tokens = 2, 2 * flow.s
        generic_loss = sum(t.nbytes for t in causal_lm_loss_saved(fit_flow))
        before = evaluate(level.before_layers, b, s) + evaluate(level.held, b, s) + checkpoint_extra - generic_mask
        head = evaluate(level.head, b, s) - generic_head
        loss = evaluate(level.loss, fit_flow.b, s) - generic_loss
        saved = [SavedTensor("traced.model_level", before)]
        if head:
            saved.append(SavedTensor("final_norm.traced_difference", head))
        if loss:
            saved.append(SavedTensor("lm_head.traced_loss_difference", loss))
        return saved
    return model_level


def _layout(profile: TracedProfile) -> Any:
    def layout(spec: Any) -> list[Module]:
        return [replace(m, count=spec.num_layers) if m.count > 1 or m.path.startswith(profile.layer_prefix) else m
                for m in profile.modules]
    return layout


def register(profile: TracedProfile) -> None:
    """Make the profile's family known to `ModelSpec`, `family_rules` and PEFT's default targets."""
    from lora_planner import params, specs
    from lora_planner.families import FAMILY_RULES

    family_id = profile.family_id
    if family_id in _PROFILES and _PROFILES[family_id] is not profile:
        # keep the richer of the two (a later load may lack settings traced in this process)
        old = _PROFILES[family_id]
        profile = replace(profile, layers={**old.layers, **profile.layers},
                          model_levels={**old.model_levels, **profile.model_levels})
    _PROFILES[family_id] = profile
    FAMILY_RULES[family_id] = Family(
        model_types=(family_id,), layout=_layout(profile), layer=_layer_rule(family_id),
        peft_default_targets=profile.peft_default_targets, layer_prefix=profile.layer_prefix,
        last_linear=profile.last_linear, positions="alibi",  # no RoPE tables or position limit added generically
        norm="layer", model_level=_model_level_rule(family_id), scalar_buffers=profile.buffer_numel,
        fixed_buffer_bytes=profile.fixed_buffer_bytes,
        peft_has_default=profile.peft_has_default,
        flash_refused="a traced model runs on the CPU under fake tensors, where flash-attn does not exist",
        mask_refused="traced profiles are recorded without an attention mask")
    params.PEFT_DEFAULT_TARGETS[family_id] = profile.peft_default_targets
    specs.REGISTERED_FAMILIES.add(family_id)


def spec_of(profile: TracedProfile, name: str) -> Any:
    from lora_planner.specs import ModelSpec

    register(profile)
    return ModelSpec(name=name, family=profile.family_id, **profile.sizes)


def traced_spec(config: dict[str, Any], name: str) -> Any:
    """The `ModelSpec` of a config.json whose model_type has no analytic rule: from the cache, or traced now."""
    model_type = config.get("model_type")
    if config.get("is_encoder_decoder"):
        raise unsupported(name, model_type, "an encoder-decoder model (is_encoder_decoder)")
    profile = load_cached(config)
    if profile is None:
        tracer = _tracer()
        start = time.perf_counter()  # importing torch and transformers is most of it
        try:
            tracer.check_config(config, name)
            print(f"lora-plan: {model_type!r} has no built-in rule: tracing its layout with transformers...",
                  file=sys.stderr, flush=True)
            profile = tracer.trace_layout(config, name)
        except PlannerInputError as err:
            if "unsupported model_type" in err.problem:
                raise
            raise unsupported(name, model_type, err.problem) from None
        profile = replace(profile, trace_s=round(time.perf_counter() - start, 3))
        print(f"lora-plan: traced {model_type} in {profile.trace_s:.1f} s", file=sys.stderr, flush=True)
        save(profile)
    return spec_of(profile, name)


def unsupported(name: str, model_type: Any, reason: str) -> PlannerInputError:
    """The one line for a config neither a family module nor the tracer can plan."""
    from lora_planner.specs import FAMILIES

    return PlannerInputError(f"{name}: model_type", f"unsupported model_type {model_type!r}: {reason}",
                             f"supported families are {', '.join(FAMILIES)}, and any decoder-only causal LM "
                             "transformers can build (traced)")


def reduced_config(profile: TracedProfile, num_layers: int) -> dict[str, Any]:
    """The profile's config at another depth (what `hf_backend.hf_config_dict` builds a traced spec from)."""
    config = {k: v for k, v in profile.config.items() if k not in BUILD_ONLY_KEYS}
    key = next((k for k in DEPTH_KEYS if k in config), "num_hidden_layers")
    return {**config, key: num_layers, "use_cache": False}


def traced_note(family_id: str, device: str = "cuda") -> str | None:
    """What a plan says about a traced profile (None for analytic families). On a CUDA plan it adds that the traces
    ran PyTorch's CPU kernels, and, when a traced layer keeps a b x s x s term under SDPA (Falcon: fp32 scores
    per head, from the materialised mask it always passes, `FalconAttention.forward`; CUDA's fused kernels keep
    none), that the activations are then an upper bound there."""
    if family_id not in _PROFILES:
        return None
    p = _PROFILES[family_id]
    v = p.versions
    note = (f"{p.model_type} has no built-in rule: its profile was traced with torch {v['torch']}, transformers "
            f"{v['transformers']}, peft {v['peft']} on {p.created} (fake-tensor traces of reduced-depth copies, "
            f"cached in {cache_path(p.model_type, p.config_hash)}); QLoRA is not planned for traced models")
    if device == "cuda":
        note += "; the traces follow PyTorch's CPU kernels"
        scores = BASIS.index("b*s*s")
        if any(poly[scores] > 0 for key, poly in p.layers.items() if "|sdpa|" in key):
            note += (" and this model's SDPA call keeps S x S attention scores per layer there (as CPU SDPA does "
                     "for some masked calls): on CUDA, whose fused kernels keep no scores, the activations are an "
                     "upper bound")
    return note


def traced_info(family_id: str) -> dict[str, Any] | None:
    """The same, for --json."""
    if family_id not in _PROFILES:
        return None
    p = _PROFILES[family_id]
    return {"model_type": p.model_type, "versions": dict(p.versions), "created": p.created,
            "cache": str(cache_path(p.model_type, p.config_hash))}

"""Trace a causal LM that no family module describes: its layout on the meta device, and what its steps save
under FakeTensorMode (the traced path of `lora_planner.traced`, which stores and reads what this returns).

- `trace_layout`: builds the config with `AutoModelForCausalLM.from_config` on the meta device (transformers
  5.24) and records every parameter-holding module (Linear / Conv1D / Embedding / 1-D norms; path, shape, bias,
  per-layer count), the tied lm_head, the buffers, and PEFT's default targets for the model_type.
- `trace_layers` / `trace_model_level`: build a 3-layer copy at full width exactly as the profiler does
  (`lora_planner.profiler.hf_backend.build_hf_model`: dtype, attention, PEFT LoRA, checkpointing), materialise it
  under FakeTensorMode and run one training forward for each of `SHAPES`. Every tensor autograd saves
  (`torch.autograd.graph.saved_tensors_hooks`) is attributed, by storage, to the context that saved it (before the
  layers, layer i, the final norm + lm_head, the loss; a storage several layers save, such as RoPE's cos / sin,
  is the model's), and `LiveTensorTracker` gives what is alive after the forward beyond the saved tensors
  (arguments checkpointing keeps, such as the position ids; the checkpointed layers' own inputs reach the hooks,
  so under checkpointing a layer context holds its input). Each byte count is then solved exactly for its coefficients over
  `lora_planner.traced.BASIS` and checked on the shapes the solve did not need.

Why three layers: layer 0 sees no input gradient under LoRA (frozen embeddings) and layers 1 and 2 do; a tensor
two layers save is shared (model level), which one layer of a kind cannot show.

Known limitations: CPU kernels (FakeTensorMode on the CPU device; a CPU-only torch cannot fake CUDA tensors), so
CUDA-only kernel choices are not seen (LayerNorm's statistics: input dtype here, fp32 on CUDA); QLoRA is not traced
(bitsandbytes packs real weights); fake and real CPU kernels can differ (a per-head q / k LayerNorm under CPU
autocast keeps 40 bytes per token more on real tensors in stablelm).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from lora_planner.errors import PlannerInputError
from lora_planner.families.base import Module
from lora_planner.profiler.hf_backend import build_hf_model, materialize, require_hf
from lora_planner.profiler.tracker import LiveTensorTracker, hf_fake_parity
from lora_planner.specs import LoraSpec, ModelSpec, TrainingSpec
from lora_planner.traced import (
    BUILD_ONLY_KEYS, ModelLevel, Poly, TracedProfile, config_hash, library_versions, normalised_config, parse_key,
    solve_exact, spec_of, unsupported,
)

TRACE_LAYERS = 3
# (b, s) shapes: six determine the six coefficients, the other two check them. No b = 1: there the loss's shifted
# labels (`labels[..., 1:].contiguous()`, loss/loss_utils.py ForCausalLMLoss) are already contiguous and stay a
# view of the padded (s + 1)-token labels, 8 bytes more than any polynomial gives; the generic loss rule
# (`activations.activation_profile`) counts that case, and the traced loss is only its difference from that rule.
SHAPES: tuple[tuple[int, int], ...] = ((2, 16), (3, 16), (2, 24), (4, 24), (3, 32), (2, 40), (4, 40), (3, 48))


def _config_object(config: dict[str, Any], name: str) -> Any:
    transformers, _ = require_hf()
    model_type = config.get("model_type")
    kwargs = {k: v for k, v in config.items() if k not in BUILD_ONLY_KEYS and k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError):
        raise unsupported(name, model_type, f"not known to transformers {transformers.__version__}") from None
    except Exception as err:  # noqa: BLE001 - a config class validator: one line naming it
        raise PlannerInputError(f"{name}: config.json", f"transformers refuses it: {type(err).__name__}: "
                                f"{str(err)[:160]}", "fix the config.json") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise unsupported(name, model_type, "an encoder-decoder model (is_encoder_decoder)")
    if type(cfg) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise unsupported(name, model_type, "transformers cannot build it as a causal LM (AutoModelForCausalLM has "
                                            "no class for it: a vision-only, encoder or other model)")
    return cfg


def check_config(config: dict[str, Any], name: str) -> None:
    """Refuse, in one line, what cannot be traced: a model_type transformers does not know, an encoder-decoder
    model, one `AutoModelForCausalLM` has no class for (vision-only, encoders)."""
    _config_object(config, name)


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one with num_hidden_layers identical children."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0 \
                and len({type(m) for m in module}) == 1:
            return path, module
    raise PlannerInputError("model", "no list of decoder layers found in the traced model",
                            "this architecture cannot be traced; write a family module for it")


def _describe(path: str, module: nn.Module, group: str) -> Module:
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    extra = set(params) - {"weight", "bias"}
    if weight is None or extra:
        raise PlannerInputError("model", f"module {path} ({type(module).__name__}) holds parameters "
                                f"{sorted(params)} the traced layout cannot describe", "write a family module for it")
    if isinstance(module, nn.Embedding):
        return Module(path, "embedding", "embeddings", module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.Linear):
        return Module(path, "linear", group, module.in_features, module.out_features, bias is not None)
    if type(module).__name__ == "Conv1D" and weight.dim() == 2:  # transformers' GPT-2 style (in, out) weight
        return Module(path, "linear", group, weight.shape[0], weight.shape[1], bias is not None)
    if weight.dim() == 1 and (bias is None or bias.shape == weight.shape):
        return Module(path, "norm", "norms", weight.numel(), weight.numel(), bias is not None)
    raise PlannerInputError("model", f"module {path} ({type(module).__name__}, weight {tuple(weight.shape)}) is not a "
                            "Linear, Embedding or norm", "write a family module for this architecture")


def _group(relative: str) -> str:
    return "attention" if "attn" in relative or "attention" in relative else "mlp"


def trace_layout(config: dict[str, Any], name: str) -> TracedProfile:
    """The layout part of a traced profile (no settings traced yet)."""
    transformers, _ = require_hf()
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    cfg = _config_object(config, name)
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    except Exception as err:  # noqa: BLE001 - the model class refuses the config: one line
        raise PlannerInputError(f"{name}: config.json", f"transformers cannot build it: {type(err).__name__}: "
                                f"{str(err)[:160]}", "fix the config.json") from None
    layers = cfg.num_hidden_layers
    list_path, layer_list = _decoder_layers(model, layers)
    prefix = f"{list_path}.0."
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    head_path = next((p for p, m in model.named_modules() if m is out), None)
    if head_path != "lm_head" or not isinstance(out, nn.Linear) or not isinstance(inp, nn.Embedding):
        raise PlannerInputError("model", f"the output layer is {head_path!r} ({type(out).__name__}), not an "
                                "lm_head Linear", "write a family module for this architecture")
    modules: list[Module] = []
    per_layer: dict[int, list[tuple]] = {i: [] for i in range(layers)}
    for path, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)) or module is out:
            continue
        if path.startswith(list_path + "."):
            index, relative = path[len(list_path) + 1:].split(".", 1)
            m = _describe(path, module, _group(relative))
            per_layer[int(index)].append((relative, m.kind, m.in_features, m.out_features, m.bias))
            if index == "0":
                modules.append(replace(m, count=layers))
        else:
            modules.append(_describe(path, module, "mlp"))
    if any(per_layer[i] != per_layer[0] for i in per_layer):
        raise PlannerInputError("model", "its decoder layers differ from each other (the traced layout assumes "
                                "identical layers)", "write a family module for this architecture")
    tied = out.weight is inp.weight
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    kv = int(getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads)
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1  # Falcon's multi-query attention (FalconAttention: num_kv_heads 1 unless the new architecture)
    kv = kv if heads % kv == 0 else heads
    hidden = inp.embedding_dim
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_hidden_size", None) or 4 * hidden
    sizes = dict(vocab_size=inp.num_embeddings, hidden_size=hidden, num_layers=layers, num_heads=heads,
                 num_kv_heads=kv, head_dim=int(getattr(cfg, "head_dim", None) or hidden // heads),
                 intermediate_size=int(intermediate), tie_word_embeddings=tied,
                 max_position_embeddings=int(getattr(cfg, "max_position_embeddings", None) or 2048),
                 lm_head_bias=out.bias is not None)
    linear_names = [m.path[len(prefix):] for m in modules if m.kind == "linear" and m.path.startswith(prefix)]
    short = {n.rsplit(".", 1)[-1] for n in linear_names}
    model_type = str(config["model_type"])
    default = PEFT_TARGETS.get(model_type)
    if default:
        targets, has_default = tuple(default), True
    elif {"q_proj", "v_proj"} <= short:
        targets, has_default = ("q_proj", "v_proj"), False
    else:
        targets, has_default = ("all-linear",), False
    # Built in bf16: a buffer in bf16 follows the model dtype (planned at --dtype); any other (fp32 RoPE tables,
    # a bool causal mask such as GPT-BigCode's max_positions^2 `bias`) keeps its bytes whatever the dtype.
    buffers = sum(b.numel() for _, b in model.named_buffers() if b.dtype == torch.bfloat16)
    fixed_buffer_bytes = sum(b.numel() * b.element_size() for _, b in model.named_buffers() if b.dtype != torch.bfloat16)
    versions = library_versions()
    return TracedProfile(
        model_type=model_type, config_hash=config_hash(config, versions), versions=versions,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), trace_s=0.0,
        config=normalised_config(config), sizes=sizes, modules=tuple(modules), buffer_numel=buffers,
        fixed_buffer_bytes=fixed_buffer_bytes,
        peft_default_targets=targets, peft_has_default=has_default, layer_prefix=prefix,
        last_linear=linear_names[-1] if linear_names else "")


# ---------------------------------------------------------------------------------------------- saved tensors


def _training(settings: dict[str, Any], gc_on: bool) -> TrainingSpec:
    lora = LoraSpec()
    if settings["method"] == "lora":
        targets = settings["layer_targets"] + settings["outside_targets"]
        lora = LoraSpec(r=settings["r"], target_modules=targets, adapter_dtype=settings["adapter_dtype"])
    return TrainingSpec(method=settings["method"], dtype=settings["dtype"], amp=settings["amp"], device="cpu",
                        attention=settings["attention"], grad_checkpointing=gc_on, lora=lora)


_MEMO: dict[tuple[str, str, bool], dict[str, Poly]] = {}


def _trace(profile: TracedProfile, key: str, gc_on: bool) -> dict[str, Poly]:
    """Per context ("layer0".."layer2", "before", "head", "loss", "held"), the fitted bytes."""
    memo = (profile.config_hash, key, gc_on)
    if memo in _MEMO:
        return _MEMO[memo]
    from torch._subclasses.fake_tensor import FakeTensorMode  # private API, as runner.measure_fake uses it

    settings = parse_key(key)
    spec: ModelSpec = spec_of(profile, f"{profile.model_type} (trace)")
    spec = replace(spec, num_layers=TRACE_LAYERS)
    training = _training(settings, gc_on)
    torch.manual_seed(0)
    try:
        model = build_hf_model(spec, training, "meta")
    except PlannerInputError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. a class without SDPA: one line naming transformers' reason
        raise PlannerInputError("attention" if "attention" in str(err) else "model",
                                f"transformers cannot build {profile.model_type} with these settings: "
                                f"{type(err).__name__}: {str(err)[:160]}", "try --attention eager") from None
    samples: dict[str, list[int]] = {}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), hf_fake_parity():
            model = materialize(model, spec)
            for b, s in SHAPES:
                for context, nbytes in _one_forward(model, spec, training, b, s).items():
                    samples.setdefault(context, []).append(nbytes)
    except PlannerInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a forward that fails under fake tensors: one line, not a traceback
        raise PlannerInputError("model", f"tracing {profile.model_type} failed under fake tensors: "
                                f"{type(err).__name__}: {str(err)[:160]}", "write a family module for it") from None
    del model
    gc.collect()
    fitted = {}
    for context, values in samples.items():
        try:
            fitted[context] = solve_exact(list(SHAPES), values)
        except ValueError as err:
            raise PlannerInputError("model", f"the traced {context} bytes of {profile.model_type} are not a polynomial "
                                    f"in batch and sequence ({err})", "write a family module for it") from None
    _MEMO[memo] = fitted
    return fitted


def _one_forward(model: nn.Module, spec: ModelSpec, training: TrainingSpec, b: int, s: int) -> dict[str, int]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, layer_list = _decoder_layers(base, TRACE_LAYERS)
    head = base.get_output_embeddings()
    exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    ids = torch.randint(0, spec.vocab_size, (b, s))
    labels = ids.clone()
    exclude |= {ids.untyped_storage()._cdata, labels.untyped_storage()._cdata}
    current: list[str] = ["before"]
    handles = []
    for index, layer in enumerate(layer_list):
        def enter(module, args, index=index):
            current[0] = f"layer{index}"

        def leave(module, args, output, index=index):
            current[0] = "head" if index == TRACE_LAYERS - 1 else "before"

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    handles.append(head.register_forward_hook(lambda module, args, output: current.__setitem__(0, "loss")))
    sizes: dict[int, int] = {}
    savers: dict[int, set[str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in exclude and st.nbytes():
            sizes[key] = int(st.nbytes())
            savers.setdefault(key, set()).add(current[0])
        return t.detach()

    autocast = torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[training.amp]) \
        if training.amp else contextlib.nullcontext()
    try:
        with LiveTensorTracker(adopt_unknown_inputs=False) as tracker:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                loss = model(input_ids=ids, labels=labels).loss
            gc.collect()
            live = {k: rec.nbytes for k, rec in tracker._live.items()}
    finally:
        for h in handles:
            h.remove()
    loss_key = loss.untyped_storage()._cdata
    out = {f"layer{i}": 0 for i in range(TRACE_LAYERS)}
    out.update(before=0, head=0, loss=0)
    for key, who in savers.items():
        if len(who) == 1:
            where = next(iter(who))
        elif who <= {"head", "loss"}:
            where = "head"
        else:
            where = "before"  # shared by several layers (RoPE's cos / sin): the model's
        out[where] += sizes[key]
    out["held"] = sum(n for k, n in live.items() if k not in savers and k not in exclude and k != loss_key)
    del loss
    return out


def trace_layers(profile: TracedProfile, key: str) -> dict[str, Poly]:
    """A decoder layer's saved bytes for `key`, without ("grad=0", layer 0 under LoRA with frozen embeddings) and
    with ("grad=1") a gradient at its input."""
    fitted = _trace(profile, key, False)
    if fitted["layer1"] != fitted["layer2"]:
        raise PlannerInputError("model", f"the traced layers 1 and 2 of {profile.model_type} save different bytes",
                                "write a family module for it")
    settings = parse_key(key)
    # Layer 0's input needs a gradient when the embeddings train (full, or an adapter on them); later layers' also
    # when layer 0 holds an adapter (activations._layer_runs).
    first_grad = settings["method"] == "full" or any(
        t != "lm_head" and "embed" in t for t in settings.get("outside_targets", ()))
    rest_grad = first_grad or bool(settings.get("layer_targets"))
    out = {f"{key}|grad={int(rest_grad)}": fitted["layer1"]}
    if first_grad != rest_grad:
        out[f"{key}|grad={int(first_grad)}"] = fitted["layer0"]
    elif fitted["layer0"] != fitted["layer1"]:
        raise PlannerInputError("model", f"the traced layers 0 and 1 of {profile.model_type} save different bytes",
                                "write a family module for it")
    return out


def trace_model_level(profile: TracedProfile, key: str, gc_on: bool) -> ModelLevel:
    """What lives outside the layers for `key`, with or without gradient checkpointing."""
    fitted = _trace(profile, key, gc_on)
    return ModelLevel(before_layers=fitted["before"], head=fitted["head"], loss=fitted["loss"], held=fitted["held"],
                      checkpoint_layer=fitted["layer1"] if gc_on else (0,) * len(fitted["layer1"]))

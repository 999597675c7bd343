"""Saved activations (`lora_planner.activations`) against what PyTorch autograd really saves.

For tiny random-init `transformers` models (and their PEFT LoRA versions, `lora_dropout=0`) one training
forward runs under `torch.autograd.graph.saved_tensors_hooks`; every saved tensor is counted once per
untyped storage (views share one), parameters, buffers and the batch are left out, and each storage is
attributed to the decoder layer that saved it (forward hooks on the layers; a storage saved by several
layers, e.g. rotary cos/sin, counts outside the layers). The planner's numbers must match EXACTLY:

* layer 0's bytes == `first_layer_bytes`, layer 1's (and layer 2's) == `layer_bytes`; under gradient
  checkpointing the real per-layer save is the checkpointed input, `checkpoint_per_layer_bytes`;
* everything saved outside the layers == `model_bytes + loss_bytes` minus the batch (`batch_bytes`: the
  input ids are the caller's tensors, not activations) and minus what non-reentrant checkpointing keeps
  alive through the recompute closure rather than as a saved tensor (layer kwargs: rotary cos/sin, the
  materialised causal mask, BLOOM's ALiBi). Those closure-kept tensors are measured separately, with a
  storage-level live tracker (`TorchDispatchMode` + `weakref.finalize`), at the start of backward.

Everything runs on the CPU, so the planner is asked with `TrainingSpec(device="cpu")` (dropout masks in
the activation dtype, SDPA's CPU math fallback for GPT-2's attention dropout).
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from lora_planner.activations import ActivationProfile, activation_profile
from lora_planner.config_reader import spec_from_config
from lora_planner.families import family_rules
from lora_planner.specs import LoraSpec, TrainingSpec
from tests.hf_reference import hf_config, peft_targets

B, S, V, R = 3, 20, 1000, 4
NUM_LAYERS = 3

# Tiny configs: h=64, I=176, 4 heads of 16, 2 kv heads where the family has GQA (GPT-2 / BLOOM do not;
# BLOOM's MLP is 4h whatever the config says). GPT-2 keeps its real dropout defaults (0.1 everywhere).
_LLAMA_LIKE = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": NUM_LAYERS,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "max_position_embeddings": 128}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_LLAMA_LIKE},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE},
    "mistral": {"model_type": "mistral", **_LLAMA_LIKE},  # keeps MistralConfig's sliding window (4096 > S)
    "gemma": {"model_type": "gemma", **_LLAMA_LIKE},
    "phi": {"model_type": "phi", **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
            "partial_rotary_factor": 0.5},
    "gpt2": {"model_type": "gpt2", "vocab_size": V, "n_embd": 64, "n_inner": 176, "n_layer": NUM_LAYERS,
             "n_head": 4, "n_positions": 128},
    "bloom": {"model_type": "bloom", "vocab_size": V, "hidden_size": 64, "n_layer": NUM_LAYERS, "n_head": 4},
    # gpt_neox: Pythia's defaults (parallel residual, rotary_pct 0.25, no dropout); the sequential block with
    # hidden / attention dropout and no attention biases
    "gpt_neox": {"model_type": "gpt_neox", "vocab_size": V, "hidden_size": 64, "intermediate_size": 176,
                 "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 128},
    "gpt_neox_seq": {"model_type": "gpt_neox", "vocab_size": V, "hidden_size": 64, "intermediate_size": 176,
                     "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 128,
                     "use_parallel_residual": False, "attention_bias": False, "hidden_dropout": 0.1,
                     "rotary_pct": 0.5},
    "gpt_neox_drop": {"model_type": "gpt_neox", "vocab_size": V, "hidden_size": 64, "intermediate_size": 176,
                      "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 128,
                      "hidden_dropout": 0.1, "attention_dropout": 0.1},
    # granite: Granite 3.x's multipliers, tied embeddings, GQA
    "granite": {"model_type": "granite", **_LLAMA_LIKE, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
                "residual_multiplier": 0.22, "attention_multiplier": 0.015625, "tie_word_embeddings": True},
    # phi3: fused qkv_proj / gate_up_proj, Phi-4-mini's partial rotary (0.75), residual dropout; pad_token_id
    # null (Phi3Config's 32000 is outside the tiny vocabulary)
    "phi3": {"model_type": "phi3", **_LLAMA_LIKE, "partial_rotary_factor": 0.75, "resid_pdrop": 0.1,
             "pad_token_id": None},
    "phi3_mha": {"model_type": "phi3", **_LLAMA_LIKE, "num_key_value_heads": 4, "pad_token_id": None},
    # starcoder2: the released models' 0.1 dropouts (embeddings, residual, attention), biases, LayerNorm
    "starcoder2": {"model_type": "starcoder2", **_LLAMA_LIKE, "residual_dropout": 0.1, "embedding_dropout": 0.1,
                   "attention_dropout": 0.1},
    "starcoder2_nodrop": {"model_type": "starcoder2", **_LLAMA_LIKE},
    # qwen3: q / k RMSNorm per head; the wide variant has heads x head_dim above hidden (as Qwen3-0.6B: 16 x 128 >
    # 1024), biases on q / k / v / o and tied embeddings
    "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE},
    "qwen3_wide": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": 32, "attention_bias": True,
                   "tie_word_embeddings": True},
    # olmo2: post-norms, q / k RMSNorm over the full widths; olmo2_mha: no GQA, biased attention
    "olmo2": {"model_type": "olmo2", **_LLAMA_LIKE},
    "olmo2_mha": {"model_type": "olmo2", **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
                  "num_key_value_heads": 4, "attention_bias": True},
    # smollm3: NoPE layers (no RoPE) mixed with RoPE layers: layer 1 (smollm3) / layer 0 (smollm3_nope0, with
    # biases on q / k / v / o, untied; two RoPE layers, so that cos / sin count outside the layers, as the planner
    # counts them); pad_token_id null (SmolLM3Config's 128004 is outside the tiny vocabulary)
    "smollm3": {"model_type": "smollm3", **_LLAMA_LIKE, "no_rope_layers": [1, 0, 1], "pad_token_id": None},
    "smollm3_nope0": {"model_type": "smollm3", **_LLAMA_LIKE, "no_rope_layers": [0, 1, 1], "attention_bias": True,
                      "tie_word_embeddings": False, "pad_token_id": None},
    # gemma2: four (1 + w) norms, attention and final logit soft-capping, eager attention only (transformers refuses
    # sdpa); gemma2_swa: a 8-token window below S (the sliding layers' mask differs: nothing more is saved), biases
    "gemma2": {"model_type": "gemma2", **_LLAMA_LIKE},
    "gemma2_swa": {"model_type": "gemma2", **_LLAMA_LIKE, "sliding_window": 8, "attention_bias": True,
                   "query_pre_attn_scalar": 24, "tie_word_embeddings": False},
    # gemma3_text: q / k norms, local / global layers with two RoPE tables, an 8-token window below S: SDPA's
    # sliding layers get a mask (repeated k / v, an additive mask); layer 0 sliding (gemma3) or full (gemma3_local,
    # with final logit soft-capping)
    "gemma3": {"model_type": "gemma3_text", **_LLAMA_LIKE, "sliding_window": 8,
               "layer_types": ["sliding_attention", "full_attention", "full_attention"]},
    "gemma3_local": {"model_type": "gemma3_text", **_LLAMA_LIKE, "sliding_window": 8, "final_logit_softcapping": 30.0,
                     "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    "gemma3_nowin": {"model_type": "gemma3_text", **_LLAMA_LIKE},  # 5:1 pattern: three sliding layers, window 4096
    # one kv head (Gemma 3 1B): repeat_kv before the masked SDPA is a view, so k / v keep their kv-wide storage
    "gemma3_mqa": {"model_type": "gemma3_text", **_LLAMA_LIKE, "num_key_value_heads": 1, "sliding_window": 8,
                   "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    # Sliding windows below S (8 < 20) in the other families: SDPA's sliding layers get a materialised mask (repeated
    # k / v, an additive mask). Mistral, StarCoder2, Phi-3: every layer; Qwen2 / Qwen3: layers from max_window_layers
    # (1) on; SmolLM3: its NoPE layer (0) with use_sliding_window (two RoPE layers, so that cos / sin count outside).
    "mistral_swa": {"model_type": "mistral", **_LLAMA_LIKE, "sliding_window": 8},
    "starcoder2_swa": {"model_type": "starcoder2", **_LLAMA_LIKE, "sliding_window": 8, "residual_dropout": 0.1,
                       "embedding_dropout": 0.1, "attention_dropout": 0.1},
    "starcoder2_swa_nodrop": {"model_type": "starcoder2", **_LLAMA_LIKE, "sliding_window": 8},
    "phi3_swa": {"model_type": "phi3", **_LLAMA_LIKE, "partial_rotary_factor": 0.75, "sliding_window": 8,
                 "pad_token_id": None},
    "phi3_mha_swa": {"model_type": "phi3", **_LLAMA_LIKE, "num_key_value_heads": 4, "sliding_window": 8,
                     "pad_token_id": None},  # Phi-3-mini: no GQA, so k / v stay as they are (v: the qkv storage)
    "qwen2_swa": {"model_type": "qwen2", **_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": 8,
                  "max_window_layers": 1},
    "qwen3_swa": {"model_type": "qwen3", **_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": 8,
                  "max_window_layers": 1},
    "smollm3_swa": {"model_type": "smollm3", **_LLAMA_LIKE, "no_rope_layers": [0, 1, 1], "use_sliding_window": True,
                    "sliding_window": 8, "pad_token_id": None},
    # Mixture of experts (lora_planner/families/moe.py): 8 experts, top-2. mixtral: fp32 router scores, always
    # renormalised; qwen3_moe: per-head q / k norms, renormalised bf16 scores, head_dim x heads above hidden;
    # olmoe: whole-width q / k norms, scores not renormalised; qwen2_moe: a shared expert with a sigmoid gate, q / k / v
    # biases, a dense MLP in layer 1 (mlp_only_layers)
    "mixtral": {"model_type": "mixtral", **_LLAMA_LIKE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", **_LLAMA_LIKE, "head_dim": 32, "moe_intermediate_size": 48,
                  "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True},
    "olmoe": {"model_type": "olmoe", **{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
              "intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **_LLAMA_LIKE, "moe_intermediate_size": 48, "num_experts": 8,
                  "num_experts_per_tok": 2, "shared_expert_intermediate_size": 80, "mlp_only_layers": [1]},
}

# Planner model-level items that non-reentrant checkpointing keeps alive through the closure over the
# layer's keyword arguments (invisible to saved_tensors_hooks). GPT-2 passes its causal mask
# positionally, so checkpoint saves it as an input (visible) and it is not in this list.
_CLOSURE_ITEMS = {"rotary.cos_sin", "checkpoint.attention_mask", "checkpoint.alibi", "checkpoint.position_ids",
                  "embeddings.output", "checkpoint.sliding_attention_mask"}


def closure_items(family: str) -> set[str]:
    return _CLOSURE_ITEMS - {"checkpoint.attention_mask"} if family == "gpt2" else set(_CLOSURE_ITEMS)


@dataclass(frozen=True)
class Case:
    family: str
    mode: str = "bf16"  # "fp32" | "bf16" | "amp" (fp32 weights under torch.autocast bf16)
    method: str = "full"  # "full" | "lora" (the family's default targets) | "lora_all" ("all-linear")
    attention: str = "sdpa"
    gc: bool = False
    targets: tuple[str, ...] | None = None  # explicit LoRA targets (else by `method`)
    layers: tuple[int, ...] | None = None  # PEFT's layers_to_transform
    quantized: bool = False  # QLoRA: a real bitsandbytes NF4 base (CPU backend)
    kbit_prep: bool = True  # with quantized: PEFT's prepare_model_for_kbit_training
    experts: str = "grouped_mm"  # MoE models: transformers' experts implementation
    target_parameters: tuple[str, ...] | None = None  # PEFT's target_parameters (MoE experts / routers)

    @property
    def id(self) -> str:
        extra = (["gc"] if self.gc else []) + ([",".join(self.targets)] if self.targets else []) \
            + ([f"layers{list(self.layers)}"] if self.layers else []) \
            + (["nf4" + ("-kbitprep" if self.kbit_prep else "")] if self.quantized else []) \
            + ([self.experts] if self.experts != "grouped_mm" else []) \
            + (["params:" + ",".join(self.target_parameters)] if self.target_parameters else [])
        return "-".join([self.family, self.mode, self.method, self.attention] + extra)

    def lora_targets(self) -> tuple[str, ...] | None:
        return self.targets or (("all-linear",) if self.method == "lora_all" else None)

    def training(self) -> TrainingSpec:
        return TrainingSpec(
            method="full" if self.method == "full" else ("qlora" if self.quantized else "lora"),
            dtype="bf16" if self.mode == "bf16" else "fp32",
            amp="bf16" if self.mode == "amp" else None,
            batch_size=B, seq_len=S, grad_checkpointing=self.gc, device="cpu", attention=self.attention,
            lora=LoraSpec(r=R, alpha=2 * R, target_modules=self.lora_targets(), layers_to_transform=self.layers,
                          target_parameters=self.target_parameters),
            kbit_prep=self.kbit_prep, experts_implementation=self.experts,
        )


# ------------------------------------------------------------------------------------------------
# measurement


@dataclass
class Measured:
    layers: dict[int, int]  # layer index -> bytes saved by that layer alone
    outside: int  # saved outside the layers (or by several layers): embeddings, rotary, norm, lm_head, loss
    items: dict[str, list[tuple[str, tuple[int, ...], int]]]  # where -> [(dtype, shape, nbytes)], for messages
    closure_kept: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)  # see LiveStorages
    closure_alive_after_backward: int = 0  # how many of those outlive backward + `del loss`


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates, until it is freed (weakref.finalize on the untyped storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[str, tuple[int, ...], int, int]] = {}  # ptr -> (dtype, shape, nbytes, uid)
        self._uid = 0

    def _free(self, ptr: int, uid: int) -> None:
        if ptr in self.live and self.live[ptr][3] == uid:
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and ptr not in self.live:
                    self._uid += 1
                    self.live[ptr] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), nbytes, self._uid)
                    weakref.finalize(st, self._free, ptr, self._uid)
        return out


def build_model(case: Case, tmp_dir: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case.mode == "bf16" else torch.float32
    # A class transformers builds without SDPA (Gemma 2) is built with transformers' default: eager.
    sdpa_ok = family_rules(CONFIGS[case.family]["model_type"]).sdpa
    moe = {"experts_implementation": case.experts} if "num_experts_per_tok" in CONFIGS[case.family] else {}
    model = AutoModelForCausalLM.from_config(hf_config(CONFIGS[case.family]), dtype=dtype,
                                             attn_implementation=case.attention if sdpa_ok else None, **moe)
    if case.quantized:
        model = quantized_model(model, case, tmp_dir)
    model.config.use_cache = False
    if case.gc:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "gradient_checkpointing_enable is deprecated"
            # non-reentrant (transformers' default); also calls enable_input_require_grads()
            model.gradient_checkpointing_enable()
    if case.method != "full":
        targets = peft_targets(case.lora_targets()) if case.lora_targets() else None  # None: PEFT's default
        rules = family_rules(CONFIGS[case.family]["model_type"])
        if targets is None and "num_experts_per_tok" in CONFIGS[case.family] and (rules.moe_conversion or not rules.peft_has_default):
            # MoE: PEFT 0.21.2 has no default for most, and its MoE conversion empties Mixtral's under transformers 5
            targets = list(rules.peft_default_targets)
        lora = LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                          layers_to_transform=list(case.layers) if case.layers else None,
                          target_parameters=list(case.target_parameters) if case.target_parameters else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Conv1D fan_in_fan_out notice
            model = get_peft_model(model, lora)
    model.train()
    return model


def quantized_model(model: torch.nn.Module, case: Case, tmp_dir: str | None) -> torch.nn.Module:
    """The same weights reloaded as QLoRA does (bitsandbytes NF4, double quantization, bf16 compute),
    then, with `kbit_prep`, PEFT's `prepare_model_for_kbit_training` as PEFT's QLoRA recipe calls it."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    assert tmp_dir is not None
    model.save_pretrained(tmp_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdpa_ok = family_rules(CONFIGS[case.family]["model_type"]).sdpa  # else transformers' default: eager
        model = AutoModelForCausalLM.from_pretrained(tmp_dir, device_map="cpu", dtype=torch.bfloat16,
                                                     quantization_config=quant,
                                                     attn_implementation=case.attention if sdpa_ok else None)
        if case.kbit_prep:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.gc)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None) or getattr(base, "gpt_neox", None) or base.transformer
    return inner.layers if hasattr(inner, "layers") else inner.h


def measure(case: Case, live: bool = False, tmp_dir: str | None = None) -> Measured:
    """One training forward (labels = input ids, `out` dropped as the Trainer does), then backward."""
    model = build_model(case, tmp_dir)
    torch.manual_seed(1)
    input_ids = torch.randint(0, V, (B, S))
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), input_ids]}

    current: list[int | None] = [None]
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        def enter(module, args, index=index):
            current[0] = index

        def leave(module, args, output):
            current[0] = None

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave, always_call=True)]

    saved: dict[int, tuple[str, tuple[int, ...], int]] = {}
    savers: dict[int, set[int | None]] = {}
    # A storage saved by a node that the forward itself frees (a dead branch: DeepSeek-V3's router discards the
    # values of its group top-k, freeing those nodes and what they saved) is not kept for backward; forgetting it
    # also keeps a later tensor that reuses its address from being merged with it.
    uids: dict[int, int] = {}
    in_forward, counter = [True], [0]
    ever_saved: set[int] = set()  # every address saved, freed or not (what the closure check leaves out, as before)

    def forget(ptr: int, uid: int) -> None:
        if in_forward[0] and uids.get(ptr) == uid:
            del saved[ptr], savers[ptr], uids[ptr]

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in exclude or st.nbytes() == 0:
            return t
        if ptr not in saved:
            saved[ptr] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), st.nbytes())
            savers[ptr] = set()
            counter[0] += 1
            uids[ptr] = uid = counter[0]
            weakref.finalize(st, forget, ptr, uid)
        savers[ptr].add(current[0])
        ever_saved.add(ptr)
        return t.detach()  # no output -> grad_fn -> output cycle

    tracker = LiveStorages() if live else contextlib.nullcontext()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if case.mode == "amp" else contextlib.nullcontext()
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        gc.collect()  # `out` (logits) is gone: what is alive now is what backward needs
        in_forward[0] = False
        closure_ptrs: set[int] = set()
        if live:
            keep = {loss.untyped_storage().data_ptr()} | ever_saved | exclude
            closure_ptrs = set(tracker.live) - keep
        closure_kept = sorted(tracker.live[p][:3] for p in closure_ptrs)
        # by (address, allocation id): a freed closure tensor's address reused by a gradient is not the same storage
        closure_ids = {(p, tracker.live[p][3]) for p in closure_ptrs}
        loss.backward()
        del loss
        gc.collect()
        alive_ids = {(p, info[3]) for p, info in tracker.live.items()} if live else set()
        closure_alive_after_backward = len(closure_ids & alive_ids)
    for h in handles:
        h.remove()

    layers: dict[int, int] = {i: 0 for i in range(NUM_LAYERS)}
    outside = 0
    items: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
    for ptr, info in saved.items():
        who = savers[ptr]
        if len(who) == 1 and None not in who:
            (index,) = who
            layers[index] += info[2]
            where = f"layer{index}"
        else:
            outside += info[2]
            where = "outside"
        items.setdefault(where, []).append(info)
    return Measured(layers, outside, items, closure_kept, closure_alive_after_backward)


def planner(case: Case) -> ActivationProfile:
    return activation_profile(spec_from_config(CONFIGS[case.family], "tiny-" + case.family), case.training())


def expected(case: Case, profile: ActivationProfile) -> dict[str, int]:
    """What saved_tensors_hooks must see, per the planner."""
    per_layer = profile.checkpoint_per_layer_bytes
    hidden_from_hooks = sum(item.nbytes for item in profile.model if item.name in closure_items(case.family))
    return {
        "layer0": per_layer if case.gc else profile.first_layer_bytes,
        "layer1": per_layer if case.gc else profile.layer_bytes,
        "outside": profile.model_bytes + profile.loss_bytes - profile.batch_bytes
                   - (hidden_from_hooks if case.gc else 0),
    }


# ------------------------------------------------------------------------------------------------
# the matrix: each family with bf16 full / bf16 LoRA plus fp32 or AMP; Llama across every axis

CASES = [
    # llama: dtype modes, methods, attention, checkpointing
    Case("llama", "bf16", "full"),
    Case("llama", "bf16", "lora"),
    Case("llama", "bf16", "lora_all"),
    Case("llama", "fp32", "full"),
    Case("llama", "fp32", "lora"),
    Case("llama", "amp", "full"),
    Case("llama", "amp", "lora"),
    Case("llama", "amp", "lora_all"),
    Case("llama", "bf16", "full", "eager"),
    Case("llama", "bf16", "lora", "eager"),
    Case("llama", "fp32", "lora_all", "eager"),
    Case("llama", "amp", "lora", "eager"),
    Case("llama", "bf16", "full", gc=True),
    Case("llama", "bf16", "lora", gc=True),
    Case("llama", "amp", "lora_all", gc=True),
    Case("llama", "bf16", "full", "eager", gc=True),
    Case("llama", "amp", "lora", "eager", gc=True),
    # qwen2 (q/k/v biases), mistral, gemma (GeGLU, 1 + w RMSNorm, tied embeddings)
    Case("qwen2", "bf16", "full"),
    Case("qwen2", "bf16", "lora"),
    Case("qwen2", "fp32", "lora_all"),
    Case("mistral", "bf16", "full"),
    Case("mistral", "bf16", "lora"),
    Case("mistral", "amp", "full"),
    Case("gemma", "bf16", "full"),
    Case("gemma", "bf16", "lora"),
    Case("gemma", "amp", "lora"),
    Case("gemma", "fp32", "full", "eager"),
    # phi: LayerNorm, parallel block, partial rotary; PEFT default targets q, v, fc1, fc2
    Case("phi", "bf16", "full"),
    Case("phi", "bf16", "lora"),
    Case("phi", "fp32", "full", "eager"),
    Case("phi", "amp", "lora_all"),
    # gpt2: dropout 0.1 (embeddings, attention, residual), Conv1D, fused c_attn
    Case("gpt2", "bf16", "full"),
    Case("gpt2", "bf16", "lora"),
    Case("gpt2", "fp32", "full"),
    Case("gpt2", "amp", "lora"),
    Case("gpt2", "bf16", "full", "eager"),
    Case("gpt2", "fp32", "lora_all", "eager"),
    Case("gpt2", "bf16", "lora", "eager", gc=True),
    # bloom: eager only (ALiBi), fused query_key_value
    Case("bloom", "bf16", "full", "eager"),
    Case("bloom", "bf16", "lora", "eager"),
    Case("bloom", "amp", "full", "eager"),
    Case("bloom", "fp32", "lora_all", "eager", gc=True),
    # gpt_neox: fused interleaved query_key_value (v a view of it), partial rotary, parallel residual
    Case("gpt_neox", "bf16", "full"),
    Case("gpt_neox", "bf16", "lora"),
    Case("gpt_neox", "fp32", "lora_all"),
    Case("gpt_neox", "amp", "lora_all"),
    Case("gpt_neox", "bf16", "full", "eager"),
    Case("gpt_neox", "amp", "lora", "eager"),
    Case("gpt_neox", "bf16", "lora", gc=True),
    Case("gpt_neox", "bf16", "full", gc=True),
    Case("gpt_neox_seq", "bf16", "full"),
    Case("gpt_neox_seq", "bf16", "lora"),
    Case("gpt_neox_seq", "fp32", "lora_all", "eager"),
    Case("gpt_neox_seq", "bf16", "lora", gc=True),
    Case("gpt_neox_drop", "bf16", "full", "eager"),
    Case("gpt_neox_drop", "bf16", "lora_all", "eager"),
    # granite: the Llama layer with scalar multipliers; PEFT has no default: q_proj, v_proj
    Case("granite", "bf16", "full"),
    Case("granite", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("granite", "fp32", "lora_all"),
    Case("granite", "amp", "lora", targets=("q_proj", "v_proj")),
    Case("granite", "bf16", "full", "eager"),
    Case("granite", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),
    Case("granite", "amp", "lora_all", "eager", gc=True),
    # phi3: fused qkv_proj (q, k, v views) and gate_up_proj (chunked); PEFT has no default: the fused qkv_proj
    Case("phi3", "bf16", "full"),
    Case("phi3", "bf16", "lora", targets=("qkv_proj",)),
    Case("phi3", "bf16", "lora_all"),
    Case("phi3", "amp", "lora_all"),
    Case("phi3", "fp32", "full", "eager"),
    Case("phi3", "bf16", "lora", "eager", targets=("qkv_proj",)),
    Case("phi3_mha", "bf16", "full", "eager"),
    Case("phi3_mha", "bf16", "lora", targets=("qkv_proj",)),
    Case("phi3", "bf16", "lora", gc=True, targets=("qkv_proj",)),
    Case("phi3", "amp", "full", gc=True),
    # starcoder2: LayerNorm, biased q/k/v/o, c_fc -> gelu_pytorch_tanh -> c_proj; PEFT has no default: q, v
    Case("starcoder2", "bf16", "full"),
    Case("starcoder2", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("starcoder2", "fp32", "lora_all"),
    Case("starcoder2", "amp", "lora", targets=("q_proj", "v_proj")),
    Case("starcoder2", "bf16", "full", "eager"),
    Case("starcoder2", "fp32", "lora_all", "eager"),
    Case("starcoder2_nodrop", "bf16", "full"),
    Case("starcoder2_nodrop", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("starcoder2", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),
    Case("starcoder2_nodrop", "bf16", "full", "eager", gc=True),
    # qwen3: Llama's layer + per-head q / k RMSNorm (PEFT default q_proj, v_proj)
    Case("qwen3", "bf16", "full"),
    Case("qwen3", "bf16", "lora"),
    Case("qwen3", "bf16", "lora_all"),
    Case("qwen3", "fp32", "lora_all"),
    Case("qwen3", "amp", "lora_all"),
    Case("qwen3", "amp", "full"),
    Case("qwen3", "bf16", "full", "eager"),
    Case("qwen3", "fp32", "lora", "eager"),
    Case("qwen3", "bf16", "lora", targets=("k_proj",)),
    Case("qwen3_wide", "bf16", "full"),
    Case("qwen3_wide", "bf16", "lora"),
    Case("qwen3", "bf16", "lora", gc=True),
    Case("qwen3", "bf16", "full", "eager", gc=True),
    # olmo2: post-norms (fp32 product), q / k RMSNorm over the whole widths; PEFT has no default: q_proj, v_proj
    Case("olmo2", "bf16", "full"),
    Case("olmo2", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("olmo2", "bf16", "lora_all"),
    Case("olmo2", "fp32", "full"),
    Case("olmo2", "fp32", "lora_all"),
    Case("olmo2", "amp", "lora_all"),
    Case("olmo2", "amp", "full"),
    Case("olmo2", "bf16", "full", "eager"),
    Case("olmo2", "amp", "lora", "eager", targets=("q_proj", "v_proj")),
    Case("olmo2", "bf16", "lora", targets=("o_proj", "down_proj")),
    Case("olmo2_mha", "bf16", "full"),
    Case("olmo2_mha", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("olmo2", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),
    Case("olmo2", "bf16", "full", gc=True),
    # smollm3: Llama's layer; NoPE layers save what RoPE layers save. PEFT has no default: q_proj, v_proj
    Case("smollm3", "bf16", "full"),
    Case("smollm3", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("smollm3", "bf16", "lora_all"),
    Case("smollm3", "fp32", "lora_all"),
    Case("smollm3", "amp", "lora_all"),
    Case("smollm3", "amp", "full"),
    Case("smollm3", "bf16", "full", "eager"),
    Case("smollm3", "fp32", "lora", "eager", targets=("q_proj", "k_proj")),
    Case("smollm3", "amp", "lora", "eager", targets=("q_proj", "v_proj")),
    Case("smollm3_nope0", "bf16", "full"),
    Case("smollm3_nope0", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("smollm3_nope0", "bf16", "full", "eager"),
    Case("smollm3_nope0", "fp32", "lora_all", "eager"),
    Case("smollm3", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),
    Case("smollm3_nope0", "bf16", "full", "eager", gc=True),
    # gemma2: eager attention whatever is asked (sdpa is planned and built as eager); PEFT default q_proj, v_proj
    Case("gemma2", "bf16", "full"),
    Case("gemma2", "bf16", "lora"),
    Case("gemma2", "bf16", "lora_all"),
    Case("gemma2", "fp32", "lora_all"),
    Case("gemma2", "amp", "lora_all"),
    Case("gemma2", "amp", "full"),
    Case("gemma2", "bf16", "full", "eager"),
    Case("gemma2_swa", "bf16", "full", "eager"),
    Case("gemma2_swa", "bf16", "lora", "eager"),
    Case("gemma2_swa", "fp32", "lora", "eager", targets=("k_proj", "o_proj")),
    Case("gemma2", "bf16", "lora", "eager", gc=True),
    Case("gemma2_swa", "bf16", "full", "eager", gc=True),
    # gemma3_text: q / k norms; sliding layers past the window under SDPA
    Case("gemma3", "bf16", "full"),
    Case("gemma3", "bf16", "lora"),
    Case("gemma3", "bf16", "lora_all"),
    Case("gemma3", "fp32", "lora_all"),
    Case("gemma3", "amp", "lora_all"),
    Case("gemma3", "amp", "full"),
    Case("gemma3", "bf16", "full", "eager"),
    Case("gemma3", "fp32", "lora", "eager"),
    Case("gemma3_local", "bf16", "full"),
    Case("gemma3_local", "bf16", "lora"),
    Case("gemma3_local", "amp", "lora_all"),
    Case("gemma3_nowin", "bf16", "full"),
    Case("gemma3_nowin", "bf16", "lora"),
    Case("gemma3", "bf16", "lora", gc=True),
    Case("gemma3_local", "bf16", "full", gc=True),
    Case("gemma3_local", "bf16", "lora", "eager", gc=True),
    Case("gemma3_mqa", "bf16", "full"),
    Case("gemma3_mqa", "bf16", "lora"),
    Case("gemma3_mqa", "bf16", "lora", "eager"),
    # sliding windows below S in the other families (SDPA: a materialised mask on the sliding layers)
    Case("mistral_swa", "bf16", "full"),
    Case("mistral_swa", "bf16", "lora"),
    Case("mistral_swa", "amp", "lora_all"),
    Case("mistral_swa", "bf16", "lora", "eager"),
    Case("mistral_swa", "bf16", "lora", gc=True),
    Case("starcoder2_swa", "bf16", "full"),  # attention dropout on the CPU: SDPA's math path, with the mask
    Case("starcoder2_swa", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("starcoder2_swa_nodrop", "bf16", "full"),
    Case("starcoder2_swa_nodrop", "fp32", "lora_all"),
    Case("starcoder2_swa_nodrop", "bf16", "lora", "eager", targets=("q_proj", "v_proj")),
    Case("phi3_swa", "bf16", "full"),
    Case("phi3_swa", "bf16", "lora", targets=("qkv_proj",)),
    Case("phi3_swa", "amp", "lora_all"),
    Case("phi3_swa", "bf16", "full", "eager"),
    Case("phi3_mha_swa", "bf16", "full"),
    Case("phi3_mha_swa", "bf16", "lora", targets=("qkv_proj",)),
    Case("qwen2_swa", "bf16", "full"),
    Case("qwen2_swa", "bf16", "lora"),
    Case("qwen2_swa", "fp32", "lora_all"),
    Case("qwen2_swa", "bf16", "full", "eager"),
    Case("qwen2_swa", "bf16", "lora", "eager", gc=True),
    Case("qwen3_swa", "bf16", "full"),
    Case("qwen3_swa", "bf16", "lora"),
    Case("qwen3_swa", "amp", "lora_all"),
    Case("qwen3_swa", "bf16", "full", gc=True),
    Case("smollm3_swa", "bf16", "full"),
    Case("smollm3_swa", "bf16", "lora", targets=("q_proj", "v_proj")),
    Case("smollm3_swa", "bf16", "lora", "eager", targets=("q_proj", "v_proj")),
    Case("smollm3_swa", "bf16", "full", gc=True),
]


@pytest.fixture(scope="module", autouse=True)
def _determinism():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _describe(measured: Measured, where: str) -> str:
    return "; ".join(f"{d}{list(s)}={n}" for d, s, n in sorted(measured.items.get(where, []), key=str))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_saved_bytes_match_planner(case: Case):
    measured = measure(case)
    profile = planner(case)
    want = expected(case, profile)
    if case.family.startswith("gemma3"):
        _rotary_outside(measured)  # a RoPE table used by one layer only (local / global kinds) is still shared
    got = {"layer0": measured.layers[0], "layer1": measured.layers[1], "outside": measured.outside}
    for where in ("layer0", "layer1", "outside"):
        names = {"layer0": profile.first_layer, "layer1": profile.layer, "outside": profile.model + profile.loss}
        assert got[where] == want[where], (
            f"{case.id} {where}: measured {got[where]} B, planner {want[where]} B "
            f"(diff {want[where] - got[where]:+d}); measured: {_describe(measured, where)}; "
            f"planner: {[(i.name, i.nbytes) for i in names[where]]}")
    # every layer past the first is like layer 1 (the planner's `layer`)
    assert all(measured.layers[i] == measured.layers[1] for i in range(2, NUM_LAYERS)), measured.layers


def _rotary_outside(measured: Measured) -> None:
    """Count RoPE's cos / sin ((1, 1, S, d) views) outside the layers, where the planner counts them, even when
    a single layer saved them (Gemma 3 with one layer of a kind: its table is that layer's alone)."""
    for i in range(NUM_LAYERS):
        items = measured.items.get(f"layer{i}", [])
        rotary = [item for item in items if len(item[1]) == 4 and item[1][:3] == (1, 1, S)]
        for item in rotary:
            items.remove(item)
            measured.layers[i] -= item[2]
            measured.outside += item[2]
            measured.items.setdefault("outside", []).append(item)


# ------------------------------------------------------------------------------------------------
# what non-reentrant checkpointing keeps alive outside saved tensors (the open question)

def _closure_name(case: Case, dtype: str, shape: tuple[int, ...]) -> str:
    """The planner item a closure-kept storage belongs to, recognised by its shape."""
    if dtype == "int64" and shape == (S,):
        return "checkpoint.position_ids"  # the layers' `position_ids` kwarg
    if case.family in ("gpt2", "granite", "gpt_neox_drop", "starcoder2") and shape == (B, S, 64):
        return "embeddings.output"  # made a graph input by enable_input_require_grads
    if shape in ((B, 1, S, S), (1, 1, S, S)):  # (1, 1, S, S): Gemma 3's bool sliding-window mask (SDPA)
        return "checkpoint.attention_mask"
    if len(shape) == 3 and shape[:2] == (1, S):
        return "rotary.cos_sin"
    if case.family == "bloom" and shape == (B * 4, 1, S):
        return "checkpoint.alibi"
    return f"unmodelled {dtype}{list(shape)}"


CLOSURE_CASES = [
    Case("llama", "bf16", "full", "eager", gc=True),
    Case("llama", "amp", "lora", "eager", gc=True),
    Case("llama", "bf16", "full", "sdpa", gc=True),
    Case("llama", "fp32", "lora", "sdpa", gc=True),
    Case("phi", "bf16", "lora", "eager", gc=True),
    Case("gpt2", "bf16", "full", "eager", gc=True),
    # With LoRA, `enable_input_require_grads` (called by gradient_checkpointing_enable) turns GPT-2's
    # token-embedding output (B, S, h) into a leaf that requires grad, kept alive by the graph. Llama-style
    # models save that same storage as layer 0's checkpointed input and BLOOM's embedding LayerNorm saves
    # it, so only GPT-2 (wte + wpe, then dropout) holds it on top.
    Case("gpt2", "bf16", "lora", "eager", gc=True),
    Case("bloom", "bf16", "full", "eager", gc=True),
    # The same leaf behind Granite's embedding_multiplier and GPT-NeoX's embedding dropout (none without dropout).
    Case("gpt_neox", "bf16", "lora", gc=True),
    Case("gpt_neox_drop", "bf16", "lora", "eager", gc=True),
    Case("granite", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),
    Case("granite", "bf16", "full", gc=True),
    Case("qwen3", "bf16", "lora", gc=True),
    Case("olmo2", "bf16", "full", "eager", gc=True),  # OLMo 2's cos / sin stay fp32
    Case("starcoder2", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),  # its embedding dropout: the leaf too
    Case("phi3", "bf16", "full", "eager", gc=True),
    Case("gemma2_swa", "bf16", "lora", "eager", gc=True),  # the full and the sliding layers' masks
    Case("gemma3", "bf16", "lora", gc=True),  # SDPA: the sliding layers' bool mask; two RoPE tables
    Case("gemma3_local", "bf16", "full", "eager", gc=True),
    Case("smollm3", "bf16", "lora", gc=True, targets=("q_proj", "v_proj")),  # a NoPE layer between RoPE layers
    Case("mistral_swa", "bf16", "lora", gc=True),  # SDPA past the window: the (1, 1, S, S) bool mask
    Case("qwen2_swa", "bf16", "lora", "eager", gc=True),  # full and sliding layers: two (B, 1, S, S) masks
]


def _case_id(param) -> str:
    return (param.values[0] if hasattr(param, "values") else param).id


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=_case_id)
def test_checkpoint_closure_keeps_layer_kwargs_alive(case: Case):
    """Non-reentrant checkpointing keeps the layers' keyword arguments alive through its recompute closure
    until backward: storages alive at the start of backward that no saved tensor holds must be exactly the
    planner's rotary cos/sin, materialised causal mask (eager; BLOOM always) and ALiBi tensor."""
    measured = measure(case, live=True)
    profile = planner(case)
    kept: dict[str, int] = {}
    for dtype, shape, nbytes in measured.closure_kept:
        name = _closure_name(case, dtype, shape)
        kept[name] = kept.get(name, 0) + nbytes
    predicted: dict[str, int] = {}
    for item in profile.model:
        if item.name in closure_items(case.family):
            # Gemma's sliding-window layers' mask has the full layers' mask's shape: told apart by size only
            name = "checkpoint.attention_mask" if item.name == "checkpoint.sliding_attention_mask" else item.name
            predicted[name] = predicted.get(name, 0) + item.nbytes
    assert kept == predicted, (case.id, measured.closure_kept)
    assert measured.closure_alive_after_backward == 0  # released with the graph


# ------------------------------------------------------------------------------------------------
# LoRA on some layers only: a layer-specific target or PEFT's layers_to_transform. Nothing upstream of
# the first adapted layer needs a gradient, so layers below it keep nothing; every layer is compared.

LAYER_CASES = [
    Case("llama", "bf16", "lora", targets=("layers.2.self_attn.q_proj",)),
    Case("llama", "bf16", "lora", targets=("layers.1.mlp.down_proj", "layers.2.self_attn.v_proj")),
    Case("llama", "bf16", "lora", layers=(1,)),
    Case("llama", "fp32", "lora", layers=(1, 2), targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")),
    Case("llama", "amp", "lora", targets=("layers.1.self_attn.q_proj",)),
    Case("llama", "bf16", "lora", layers=(2,), gc=True),
    Case("gpt2", "bf16", "lora", targets=("h.2.attn.c_attn",)),
    Case("phi", "bf16", "lora", layers=(1,), targets=("dense", "fc1", "fc2")),
    Case("qwen3", "bf16", "lora", targets=("layers.1.self_attn.k_proj",)),
    Case("olmo2", "bf16", "lora", layers=(1, 2), targets=("v_proj", "o_proj")),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_saved_bytes_follow_the_adapted_layers(case: Case):
    measured = measure(case)
    profile = planner(case)
    # RoPE's cos/sin are shared by every layer that needs them; when a single layer does, the hooks see
    # them saved by that layer alone. The planner counts them outside the layers either way.
    layers, outside = dict(measured.layers), measured.outside
    for i in range(NUM_LAYERS):
        rotary = sum(n for _, shape, n in measured.items.get(f"layer{i}", []) if len(shape) == 4 and shape[:2] == (1, 1))
        layers[i] -= rotary
        outside += rotary
    for i in range(NUM_LAYERS):
        want = profile.checkpoint_per_layer_bytes if case.gc else profile.layer_saved_bytes(i)
        assert layers[i] == want, (case.id, i, layers, _describe(measured, f"layer{i}"))
    want_outside = expected(case, profile)["outside"]
    assert outside == want_outside, (case.id, outside, want_outside, _describe(measured, "outside"))


# ------------------------------------------------------------------------------------------------
# QLoRA on a real bitsandbytes NF4 base (its CPU backend): the 4-bit matmul keeps only the packed weight;
# after PEFT's prepare_model_for_kbit_training the stream and every op between matmuls run in fp32.

QLORA_CASES = [
    Case("llama", "bf16", "lora", quantized=True),
    Case("llama", "bf16", "lora", quantized=True, kbit_prep=False),
    Case("llama", "bf16", "lora_all", quantized=True),
    Case("llama", "bf16", "lora", quantized=True, gc=True),
    Case("qwen2", "bf16", "lora_all", quantized=True, kbit_prep=False),
    Case("gemma", "bf16", "lora", quantized=True),
    Case("phi3", "bf16", "lora", quantized=True, targets=("qkv_proj",)),
    Case("qwen3", "bf16", "lora_all", quantized=True),
    Case("olmo2", "bf16", "lora", quantized=True, targets=("q_proj", "v_proj")),
    Case("olmo2", "bf16", "lora_all", quantized=True, kbit_prep=False),
    Case("gemma2", "bf16", "lora", quantized=True),  # eager attention, soft-caps in fp32 after kbit preparation
    Case("gemma3", "bf16", "lora_all", quantized=True),  # a sliding layer past the window (SDPA mask, repeated k/v)
    # MoE: bitsandbytes quantizes the nn.Linear layers only; kbit preparation casts the expert stacks to fp32
    Case("qwen3_moe", "bf16", "lora", quantized=True),
    Case("mixtral", "bf16", "lora_all", quantized=True, kbit_prep=False),
]


@pytest.mark.parametrize("case", QLORA_CASES, ids=[c.id for c in QLORA_CASES])
def test_qlora_saved_bytes_match_bitsandbytes(case: Case, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA measurements need bitsandbytes (test extra)")
    measured = measure(case, tmp_dir=str(tmp_path))
    if case.family.startswith("gemma3"):
        _rotary_outside(measured)
    profile = planner(case)
    want = expected(case, profile)
    got = {"layer0": measured.layers[0], "layer1": measured.layers[1], "outside": measured.outside}
    assert got == want, (case.id, got, want, {w: _describe(measured, w) for w in ("layer0", "layer1", "outside")},
                         [(i.name, i.nbytes) for i in profile.model + profile.loss])


# ------------------------------------------------------------------------------------------------
# Mixture of experts (lora_planner/families/moe.py): the router, the fused experts under both implementations
# (grouped_mm: static shapes; eager: a loop over the experts that received tokens), LoRA on the experts through
# PEFT's target_parameters (the folded weight each adapted expert stack keeps), a shared expert and a dense layer.
# Every layer is compared (qwen2_moe's layer 1 is dense).

MOE_CASES = [
    Case(family, "bf16", method, gc=gc, experts=experts)
    for family in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
    for method, gc, experts in (("full", False, "grouped_mm"), ("lora", False, "grouped_mm"),
                                ("lora_all", False, "grouped_mm"), ("full", False, "eager"),
                                ("lora_all", False, "eager"), ("lora_all", True, "grouped_mm"))
] + [
    Case("mixtral", "fp32", "lora_all"),
    Case("qwen3_moe", "bf16", "lora", "eager"),
    Case("qwen2_moe", "bf16", "lora", targets=("q_proj", "v_proj"),
         target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")),
    Case("olmoe", "bf16", "lora", targets=("o_proj",), target_parameters=("mlp.experts.down_proj",)),
    Case("mixtral", "bf16", "lora", targets=("w1", "w3")),  # the experts' gate_up_proj alone, at rank 2r
]

# gpt_oss (lora_planner/families/gpt_oss.py): eager attention only (sinks: a softmax over S + 1 columns and its row
# max), biased q / k / v / o, a biased router (softmax over the k top logits), biased transposed experts with the
# clamped SwiGLU; sliding / full layers alternate (window 8 < S). PEFT has no default (q_proj, v_proj) and no MoE
# conversion (all-linear = q / k / v / o); the experts and the router through target_parameters.
CONFIGS["gpt_oss"] = {"model_type": "gpt_oss", **_LLAMA_LIKE, "intermediate_size": 48, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "sliding_window": 8}
_GPT_OSS_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_CASES += [
    Case("gpt_oss", "bf16", method, "eager", gc=gc, experts=experts)
    for method, gc, experts in (("full", False, "grouped_mm"), ("lora", False, "grouped_mm"),
                                ("lora_all", False, "grouped_mm"), ("full", False, "eager"),
                                ("lora", False, "eager"), ("lora_all", False, "eager"),
                                ("lora_all", True, "grouped_mm"), ("full", True, "grouped_mm"))
] + [
    Case("gpt_oss", "fp32", "lora_all", "eager"),
    Case("gpt_oss", "fp32", "full", "eager", experts="eager"),
    # autocast (fp32 weights): the sink softmax in fp32 plus its 16-bit copy, the router's autocast copies, 16-bit
    # routing weights beside fp32 experts
    Case("gpt_oss", "amp", "full", "eager"),
    Case("gpt_oss", "amp", "lora_all", "eager"),
    Case("gpt_oss", "amp", "lora", "eager", targets=("v_proj",)),
    Case("gpt_oss", "bf16", "lora", "eager", targets=("v_proj",)),  # layer 0: only v needs a gradient
    Case("gpt_oss", "bf16", "lora", "eager", targets=("all-linear",), target_parameters=_GPT_OSS_EXPERTS),
    Case("gpt_oss", "bf16", "lora", "eager", targets=("all-linear",), target_parameters=_GPT_OSS_EXPERTS,
         experts="eager"),
    Case("gpt_oss", "bf16", "lora", "eager", targets=("o_proj",), target_parameters=("mlp.router.weight",)),
    Case("gpt_oss", "bf16", "lora", "eager", gc=True, targets=("q_proj", "v_proj"),
         target_parameters=("mlp.experts.down_proj",)),
]


# deepseek_v3 / deepseek_v2 (lora_planner/families/deepseek.py): multi-head latent attention (q / k heads 16 + 8 wide,
# v heads 12: SDPA takes the CPU math path), layer 0 dense (first_k_dense_replace), two shared experts of 24, an fp32
# router: V3 sigmoid + group-limited top-k (4 groups, 3 kept) and renormalised, V2 softmax greedy top-k; V3 with
# q_lora_rank (q_a_proj / q_a_layernorm / q_b_proj), V2 with one q_proj (V2-Lite). PEFT has no default (this tool's
# kv_a_proj_with_mqa, kv_b_proj, o_proj); all-linear through the qwen2_moe conversion (experts + router, not the
# shared experts nor the dense MLP).
_DEEPSEEK = {**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}, "num_key_value_heads": 4,
             "moe_intermediate_size": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
             "v_head_dim": 12, "n_shared_experts": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1}
CONFIGS["deepseek_v3"] = {"model_type": "deepseek_v3", **_DEEPSEEK, "q_lora_rank": 32, "n_routed_experts": 8,
                          "n_group": 4, "topk_group": 3}
CONFIGS["deepseek_v2"] = {"model_type": "deepseek_v2", **_DEEPSEEK, "q_lora_rank": None, "n_routed_experts": 8}
# V2's group_limited_greedy router, attention / MLP biases, q_lora_rank
CONFIGS["deepseek_v2_glg"] = {"model_type": "deepseek_v2", **_DEEPSEEK, "q_lora_rank": 32, "n_routed_experts": 8,
                              "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                              "attention_bias": True, "mlp_bias": True}
_DEEPSEEK_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_CASES += [
    Case(family, "bf16", method, attention, gc=gc, experts=experts)
    for family in ("deepseek_v3", "deepseek_v2")
    for method, attention, gc, experts in (
        ("full", "sdpa", False, "grouped_mm"), ("full", "eager", False, "grouped_mm"), ("full", "sdpa", False, "eager"),
        ("lora", "sdpa", False, "grouped_mm"), ("lora", "eager", False, "eager"),
        ("lora_all", "sdpa", False, "grouped_mm"), ("lora_all", "eager", False, "eager"),
        ("full", "sdpa", True, "grouped_mm"), ("lora_all", "eager", True, "grouped_mm"))
] + [
    Case("deepseek_v3", "fp32", "full", "eager"),
    Case("deepseek_v3", "fp32", "lora_all", "sdpa"),
    Case("deepseek_v2_glg", "bf16", "full", "eager"),
    Case("deepseek_v2_glg", "bf16", "lora_all"),
    # the experts and the router only (layer 0 and the attention save nothing: the embeddings need no gradient)
    Case("deepseek_v3", "bf16", "lora", targets=("gate_proj", "up_proj", "down_proj")),
    Case("deepseek_v3", "bf16", "lora", "eager", targets=("o_proj",),
         target_parameters=(*_DEEPSEEK_EXPERTS, "mlp.gate.weight")),
    Case("deepseek_v2", "bf16", "lora", targets=("q_proj",), target_parameters=("mlp.experts.down_proj",),
         experts="eager"),
    Case("deepseek_v3", "bf16", "lora", "eager", targets=("kv_b_proj",)),  # q needs no gradient in layer 0
]


@pytest.mark.parametrize("case", MOE_CASES, ids=[c.id for c in MOE_CASES])
def test_moe_saved_bytes_match_planner(case: Case):
    measured = measure(case)
    profile = planner(case)
    layers, outside = dict(measured.layers), measured.outside
    for i in range(NUM_LAYERS):  # RoPE's cos / sin seen by one layer only: the planner counts them outside
        rotary = sum(n for _, shape, n in measured.items.get(f"layer{i}", []) if len(shape) == 4 and shape[:2] == (1, 1))
        layers[i] -= rotary
        outside += rotary
    for i in range(NUM_LAYERS):
        want = profile.checkpoint_per_layer_bytes if case.gc else profile.layer_saved_bytes(i)
        assert layers[i] == want, (case.id, i, layers[i], want, _describe(measured, f"layer{i}"),
                                   [(t.name, t.nbytes) for t in profile.layer_runs[0][1]])
    want_outside = expected(case, profile)["outside"]
    assert outside == want_outside, (case.id, outside, want_outside, _describe(measured, "outside"))


TINY_MIXTRAL = spec_from_config({"model_type": "mixtral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "num_local_experts": 8, "num_experts_per_tok": 2}, "tiny-mixtral-v128")
GATE_UP, DOWN = 8 * 192 * 64 * 2, 8 * 64 * 96 * 2  # the bf16 (E, 2I, H) and (E, H, I) stacks: 196,608 and 98,304 B


@pytest.mark.parametrize("method, lora, routing, trained", [
    # full fine-tuning: both stacks' buffers, and from the second expert on a new gate_up gradient beside them
    ("full", LoraSpec(), "balanced", (GATE_UP, DOWN)),
    ("full", LoraSpec(), ((16, 16, 0, 0, 0, 0, 0, 0), (16, 16, 0, 0, 0, 0, 0, 0)), (GATE_UP, DOWN)),
    # LoRA on down_proj only (PEFT's ParamWrapper): its folded weight's buffer and the next expert's
    ("lora", LoraSpec(r=8, target_modules=("q_proj",), target_parameters=("mlp.experts.down_proj",)), "balanced",
     (DOWN,)),
    # attention-only LoRA: no stack needs a gradient
    ("lora", LoraSpec(r=8, target_modules=("q_proj",)), "balanced", ()),
])
def test_eager_experts_stack_gradients_by_hand(method, lora, routing, trained):
    """`moe.eager_stack_gradient_bytes` (each expert's `select_backward` writes a whole stack; autograd sums them in
    place: the buffers plus the largest's next gradient and its slice); under a dispatch mode (`in_place=False`) the
    sum is one more copy of the largest, the slice gone."""
    from lora_planner.activations import make_flow
    from lora_planner.families.moe import eager_stack_gradient_bytes
    training = TrainingSpec(method=method, device="cpu", batch_size=2, seq_len=32, experts_implementation="eager",
                            routing=routing, lora=lora)
    flow = make_flow(TINY_MIXTRAL, training)
    prefix = "model.layers.0.mlp.experts."
    paths = [prefix + "gate_up_proj", prefix + "down_proj"]
    adapted = paths if method == "full" else [p for p in paths if p in flow.layer_adapters[-1]]
    largest = max(trained, default=0)
    # in place: the buffers, the next expert's whole largest stack and the (out, in) slice it was made from
    assert eager_stack_gradient_bytes(flow, adapted) == sum(trained) + largest + largest // 8
    assert eager_stack_gradient_bytes(flow, adapted, in_place=False) == sum(trained) + 2 * largest



# ---------------------------------------------------------------------------------------------- LoRA outside layers

def _vocab_llama(vocab: int = 32000):
    return spec_from_config({"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 176,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, "v-llama")


@pytest.mark.parametrize("settings, expected", [
    # T = 2 x 48 = 96 tokens, r = 8: A's gathered rows, tokens x r fp32 adapters
    (dict(), [("embed_tokens.lora_A_output", 96 * 8 * 4)]),
    # autocast: the 16-bit copies of A's rows (96 x 8 x 2) and of B (h x r = 64 x 8 x 2)
    (dict(dtype="fp32", amp="bf16"), [("embed_tokens.lora_A_output_autocast_copy", 96 * 8 * 2),
                                      ("embed_tokens.lora_B_autocast_copy", 64 * 8 * 2)]),
    # checkpointing: the base output kept as a leaf (96 x 64, bf16 stream)
    (dict(grad_checkpointing=True), [("embed_tokens.lora_A_output", 96 * 8 * 4),
                                     ("embed_tokens.base_output_leaf", 96 * 64 * 2)]),
])
def test_embedding_lora_saved_hand_count(settings, expected):
    from lora_planner.activations import embedding_lora_saved, make_flow

    t = TrainingSpec(method="lora", device="cpu", batch_size=2, seq_len=48, **settings,
                     lora=LoraSpec(r=8, target_modules=("embed_tokens", "q_proj")))
    assert [(s.name, s.nbytes) for s in embedding_lora_saved(make_flow(_vocab_llama(1000), t))] == expected


@pytest.mark.parametrize("settings, forward, backward", [
    # bf16 base, fp32 adapters, T = 2, V = 32,000, r = 8: forward base logits (2) + B's output and its scaled copy (4
    # each) per logit; backward B's gradient V x r x 4, the loss value, the logits' gradient (2) + its scaled copy (4),
    # the input gradient T x r x 4, the seed
    (dict(), (0, 2 * 32000 * 10), (32000 * 8 * 4, 4, 2 * 32000 * 6 + 2 * 8 * 4 + 4)),
    # fp32: 12 and 8 bytes per logit
    (dict(dtype="fp32"), (0, 2 * 32000 * 12), (32000 * 8 * 4, 4, 2 * 32000 * 8 + 2 * 8 * 4 + 4)),
    # autocast: 16-bit logits, B's output and scaled copy; B's 16-bit copy and A x's released, their gradients live
    (dict(dtype="fp32", amp="bf16"), (0, 2 * 32000 * 6),
     (32000 * 8 * 4, 4 - (32000 + 2) * 8 * 2, (32000 + 2) * 8 * 2 + 2 * 32000 * 2 + 4)),
])
def test_head_moments_hand_count(settings, forward, backward):
    from lora_planner.activations import head_moments, make_flow

    t = TrainingSpec(method="lora", device="cpu", batch_size=1, seq_len=2, **settings,
                     lora=LoraSpec(r=8, target_modules=("lm_head", "q_proj")))
    assert head_moments(make_flow(_vocab_llama(), t)) == (forward, backward)
    no_head = TrainingSpec(method="lora", device="cpu", batch_size=1, seq_len=2, **settings)
    assert head_moments(make_flow(_vocab_llama(), no_head)) == ((0, 0), (0, 0, 0))


@pytest.mark.parametrize("config, kept_per_token", [
    # Llama: the attention's input, o_proj's, the MLP's and down_proj's (H + H + H + I)
    ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 176}, 64 * 3 + 176),
    # Phi-2: fc1 reads the attention's input (one LayerNorm); dense's and fc2's own
    ({"model_type": "phi", "hidden_size": 64, "intermediate_size": 176}, 64 * 2 + 176),
    # OLMo 2: the projections read the layer's (checkpointed) input itself: o_proj's, the MLP's and down_proj's
    ({"model_type": "olmo2", "hidden_size": 64, "intermediate_size": 176}, 64 * 2 + 176),
])
def test_int8_checkpointed_layers_keep_their_8bit_inputs_by_hand(config, kept_per_token):
    """Under non-reentrant checkpointing each LLM.int8 matmul's context attribute keeps its input (measured:
    `tests/profiler/test_runner.py` INT8_CASES): per layer every distinct input of an 8-bit linear, fp32 after kbit
    preparation, beside the checkpointed layer input."""
    from lora_planner.activations import int8_checkpoint_held_bytes, make_flow

    spec = spec_from_config({"vocab_size": 1000, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 4, **config}, "tiny")
    training = TrainingSpec(method="lora", load_in_8bit=True, batch_size=2, seq_len=64, grad_checkpointing=True)
    held = int8_checkpoint_held_bytes(make_flow(spec, training))
    assert held == 2 * 64 * kept_per_token * 4
    profile = activation_profile(spec, training)
    assert profile.checkpoint_per_layer_bytes == 2 * 64 * 64 * 4 + held
    assert int8_checkpoint_held_bytes(make_flow(spec, TrainingSpec(method="lora", load_in_8bit=True))) == 0


def test_int8_refuses_what_it_does_not_model():
    from lora_planner.errors import PlannerInputError

    moe = spec_from_config({"model_type": "mixtral", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "num_local_experts": 4, "num_experts_per_tok": 2}, "tiny-moe")
    with pytest.raises(PlannerInputError, match="MoE"):
        activation_profile(moe, TrainingSpec(method="lora", load_in_8bit=True))
    llama = spec_from_config({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 4}, "tiny")
    with pytest.raises(PlannerInputError, match="8-bit base"):
        activation_profile(llama, TrainingSpec(method="lora", load_in_8bit=True, lora=LoraSpec(r=8, use_dora=True)))


# The layer loop's settings: models with alike layers, sliding / full attention layers, dense layers among MoE ones,
# adapters on some layers only, on the embeddings, under checkpointing and the eager experts loop.
LAYER_LOOP_CASES = [
    ("llama-3.1-8b", TrainingSpec(method="lora")),
    ("llama-3.1-8b", TrainingSpec(method="full", grad_checkpointing=True)),
    ("llama-3.1-8b", TrainingSpec(method="lora", lora=LoraSpec(r=4, layers_to_transform=(3, 4, 9, 30)))),
    ("llama-3.1-8b", TrainingSpec(method="lora", lora=LoraSpec(r=4, target_modules=("embed_tokens", "q_proj")))),
    ("gemma-2-9b", TrainingSpec(method="lora", lora=LoraSpec(r=8, layers_to_transform=(1, 2, 3, 20)))),
    ("mistral-7b", TrainingSpec(method="qlora", grad_checkpointing=True)),
    ("deepseek-v2-lite", TrainingSpec(method="lora", lora=LoraSpec(r=8, target_modules=("all-linear",)))),
    ("deepseek-v2-lite", TrainingSpec(method="full", experts_implementation="eager", routing="worst")),
    ("gpt-oss-20b", TrainingSpec(method="lora", experts_implementation="eager", grad_checkpointing=True)),
]


@pytest.mark.parametrize("model,training", LAYER_LOOP_CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_layer_loops_equal_the_plain_per_layer_loops(model, training):
    """`_layer_runs` and `_layer_backward_scratch_each` take alike consecutive layers together; they give what one
    pass per layer gives (the plain loops below), and the step's recompute moment likewise."""
    from lora_planner.activations import _layer_backward_scratch, _layer_backward_scratch_each, _layer_runs, make_flow
    from lora_planner.catalog import resolve_model
    from lora_planner.families.moe import backward_order_counts, eager_loop_freed_bytes
    from lora_planner.step import _activation_offload, _recompute_moment

    spec = resolve_model(model)
    flow = make_flow(spec, training)
    for first_needs_grad in (False, True):
        runs, needs_grad, built = [], first_needs_grad, {}
        for index, (adapters, layer_type) in enumerate(zip(flow.layer_adapters,
                                                           spec.layer_types or (None,) * spec.num_layers)):
            key = (adapters, needs_grad, layer_type, spec.is_moe_layer(index))
            if key not in built:
                layer_flow = flow.in_layer(adapters)
                layer_flow.layer_type, layer_flow.moe_layer = layer_type, key[3]
                saved = tuple(flow.family.layer(layer_flow, needs_grad))
                built[key] = next((other for other in built.values() if other == saved), saved)
            if runs and runs[-1][1] is built[key]:
                runs[-1][0] += 1
            else:
                runs.append([1, built[key]])
            needs_grad = needs_grad or bool(adapters)
        assert _layer_runs(flow, first_needs_grad) == tuple((count, saved) for count, saved in runs)
    runs = _layer_runs(flow, True)
    saved_each = [saved for count, saved in runs for _ in range(count)]
    expected, moe_index = [], 0
    for i in range(spec.num_layers):
        moe_layer = spec.is_moe_layer(i)
        order = backward_order_counts(spec, flow.tokens, training.routing, moe_index) \
            if moe_layer and training.experts_implementation == "eager" else None
        freed = eager_loop_freed_bytes(saved_each[i], flow.tokens * spec.num_experts_per_tok, *order) if order else 0
        expected.append(_layer_backward_scratch(flow, moe_layer, freed))
        moe_index += moe_layer
    assert _layer_backward_scratch_each(flow, runs) == tuple(expected)
    if training.grad_checkpointing:
        acts = activation_profile(spec, training)
        offload = _activation_offload(spec, training, acts)
        moments, index = [], 0
        for count, saved in acts.layer_runs:
            for i in range(index, index + count):
                moments.append((ActivationProfile.total(saved) + (offload.held(i) - offload.kept)
                                * acts.checkpoint_per_layer_bytes, acts.backward_scratch_bytes(i)))
            index += count
        assert _recompute_moment(acts, offload) == max(moments, key=sum)

"""The profiler's `builtin` backend: a small Llama-style decoder written in plain PyTorch.

The model is built from a `ModelSpec` and follows Hugging Face `transformers`' `LlamaForCausalLM`
(also used for Mistral and Qwen2) closely enough that autograd saves the same tensors for backward.
That means the same op sequence, not only the same maths:

- parameter names and shapes follow `named_parameters()` of the HF model (`model.embed_tokens`,
  `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`, the two
  RMSNorms per layer, `model.norm`, `lm_head`), and so does the registration order;
- RMSNorm upcasts to fp32 and multiplies by the weight after casting back;
- RoPE tables `cos`/`sin` of shape (1, S, head_dim) are computed once per forward in the activation
  dtype from fp32 `inv_freq` / `original_inv_freq` buffers (kept fp32, as transformers keeps them);
- SDPA is called with `is_causal=True` and, for grouped-query attention, `enable_gqa=True` (what
  transformers does without a padding mask); the eager variant repeats k/v, builds a materialised
  (B, 1, S, S) additive causal mask once per forward, and runs the softmax in fp32;
- the loss is transformers' `ForCausalLMLoss`: fp32 logits, labels padded with -100 and shifted;
- gradient checkpointing checkpoints each layer's `forward` with non-reentrant
  `torch.utils.checkpoint`, passing only the hidden states positionally (the rest through a
  `functools.partial`, as `GradientCheckpointingLayer` does), and makes the embedding output
  require grad when the embeddings are frozen (`enable_input_require_grads`).

`LoRALinear` mirrors PEFT's `lora.Linear.forward` (the input is cast to the adapter dtype, fp32
adapters by default even on a 16-bit base, and the sum is cast back to the base output dtype).

Meta-device construction is supported: build with `device="meta"`, then `model.to_empty(device=...)`
and `init_weights(model)`; tied embeddings are re-tied after every `_apply` (`to`, `to_empty`, ...).

Only Llama-like families are supported here (llama, mistral, qwen2); Gemma, Phi, GPT-2 and BLOOM are
profiled with the `hf` backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_planner.errors import PlannerInputError
from lora_planner.params import adapted_layers, module_inventory
from lora_planner.specs import ModelSpec

__all__ = [
    "BUILTIN_FAMILIES",
    "Attention",
    "CausalLMOutput",
    "DecoderLM",
    "DecoderLayer",
    "DecoderModel",
    "LoRALinear",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_lora",
    "build_builtin_model",
    "causal_lm_loss",
    "init_weights",
]

AttentionImpl = Literal["sdpa", "eager"]
BUILTIN_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "eager")
INITIALIZER_RANGE = 0.02  # transformers' default `initializer_range`
IGNORE_INDEX = -100


# ---- building blocks ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """`LlamaRMSNorm`: fp32 normalisation, weight applied after casting back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class RotaryEmbedding(nn.Module):
    """`LlamaRotaryEmbedding` (default RoPE): fp32 `inv_freq` and `original_inv_freq` of head_dim / 2."""

    def __init__(self, head_dim: int, base: float = 10000.0, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.attention_scaling = 1.0  # default RoPE: unused scaling, kept to replay the same ops
        inv_freq = self._inv_freq(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def _inv_freq(self, device: torch.device | str | None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.base ** exponent)

    def reset_parameters(self) -> None:
        """Recompute the buffers in place (after `to_empty` they hold garbage)."""
        with torch.no_grad():
            inv_freq = self._inv_freq(self.inv_freq.device)
            self.inv_freq.copy_(inv_freq)
            self.original_inv_freq.copy_(inv_freq)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, d) -> (B, heads, S, d), a copy when n_rep > 1 (transformers' `repeat_kv`)."""
    batch, kv_heads, seq, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, head_dim)


def eager_causal_mask(batch: int, seq: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers' `eager_mask` without padding: a materialised (B, 1, S, S) additive mask in `dtype`."""
    arange = torch.arange(seq, device=device)
    allowed = (arange[None, :] <= arange[:, None]).view(1, 1, seq, seq).expand(batch, -1, seq, seq)
    return torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)


class Attention(nn.Module):
    """`LlamaAttention` with transformers' `sdpa_attention_forward` or `eager_attention_forward`."""

    def __init__(self, spec: ModelSpec, attention: AttentionImpl = "sdpa", *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads
        self.num_key_value_groups = spec.num_heads // spec.num_kv_heads
        self.scaling = spec.head_dim ** -0.5
        self.attention_dropout = spec.attention_dropout
        self.attention = attention
        self.q_proj = nn.Linear(spec.hidden_size, spec.q_size, bias=spec.attention_bias, **kw)
        self.k_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=spec.attention_bias, **kw)
        self.v_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=spec.attention_bias, **kw)
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=spec.attention_out_bias, **kw)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        dropout = self.attention_dropout if self.training else 0.0
        if self.attention == "eager":
            out = self._eager(q, k, v, attention_mask, dropout)
        else:
            out = self._sdpa(q, k, v, attention_mask, dropout)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout: float) -> torch.Tensor:
        kwargs = {}
        if self.num_key_value_groups > 1:
            if mask is None and k.shape[-1] == v.shape[-1] <= 256:  # transformers' `use_gqa_in_sdpa`
                kwargs["enable_gqa"] = True
            else:
                k = repeat_kv(k, self.num_key_value_groups)
                v = repeat_kv(v, self.num_key_value_groups)
        q_len = q.shape[2]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
                                             is_causal=q_len > 1 and mask is None, **kwargs)
        out = out.reshape(out.shape[0], -1, q_len, v.shape[-1])
        return out.transpose(1, 2).contiguous()

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout: float) -> torch.Tensor:
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if mask is not None:
            weights = weights + mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        out = torch.matmul(weights, v)
        return out.transpose(1, 2).contiguous()


class MLP(nn.Module):
    """`LlamaMLP`: down(silu(gate(x)) * up(x))."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, **kw)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, **kw)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias, **kw)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """`LlamaDecoderLayer`: pre-norm attention and MLP with residual adds; optionally checkpointed."""

    def __init__(self, spec: ModelSpec, attention: AttentionImpl = "sdpa", rms_norm_eps: float = 1e-6, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        # Registration order as in transformers, so named_parameters() lists in the same order.
        self.self_attn = Attention(spec, attention, **kw)
        self.mlp = MLP(spec, **kw)
        self.input_layernorm = RMSNorm(spec.hidden_size, rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, rms_norm_eps, **kw)
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = dict(cos=cos, sin=sin, attention_mask=attention_mask, position_ids=position_ids)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # As transformers' GradientCheckpointingLayer: only the hidden states are checkpoint inputs
            # (saved by the checkpoint); the keyword arguments are kept alive by the recompute closure.
            return checkpoint(partial(self._layer_forward, **kwargs), hidden_states, use_reentrant=False)
        return self._layer_forward(hidden_states, **kwargs)

    def _layer_forward(self, hidden_states: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor,
                       attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
        # `position_ids` is unused (RoPE gets cos/sin), but transformers passes it to every layer, so
        # under checkpointing the closure keeps it until backward; taking it keeps the bytes identical.
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, cos, sin, attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class DecoderModel(nn.Module):
    """`LlamaModel`: embeddings, decoder layers, final norm, rotary tables."""

    def __init__(self, spec: ModelSpec, attention: AttentionImpl = "sdpa", rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, attention, rms_norm_eps, **kw) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, rms_norm_eps, **kw)
        self.rotary_emb = RotaryEmbedding(spec.head_dim, rope_theta, device=device)
        self.attention = attention
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and not inputs_embeds.requires_grad:
            # transformers' `enable_input_require_grads` (needed by PEFT with checkpointing).
            inputs_embeds.requires_grad_(True)
        batch, seq = inputs_embeds.shape[:2]
        position_ids = torch.arange(seq, device=inputs_embeds.device).unsqueeze(0)
        mask = None
        if self.attention == "eager":
            mask = eager_causal_mask(batch, seq, inputs_embeds.dtype, inputs_embeds.device)
        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, position_ids)
        return self.norm(hidden_states)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`: fp32 logits, labels padded with `ignore_index` then shifted."""
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    return F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="mean")


class DecoderLM(nn.Module):
    """`LlamaForCausalLM`: `model` (a `DecoderModel`) and `lm_head`, tied to the embeddings if the spec says so."""

    def __init__(self, spec: ModelSpec, attention: AttentionImpl = "sdpa", rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec, attention, rms_norm_eps, rope_theta, dtype=dtype, device=device)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=spec.lm_head_bias, dtype=dtype,
                                 device=device)
        self.tie_weights()

    # -- configuration ---------------------------------------------------------------------------

    @property
    def attention(self) -> str:
        return self.model.attention

    def set_attention(self, attention: AttentionImpl) -> None:
        _check_attention(attention)
        self.model.attention = attention
        for layer in self.model.layers:
            layer.self_attn.attention = attention

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def gradient_checkpointing_enable(self) -> None:
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, enable: bool) -> None:
        self.model.gradient_checkpointing = enable
        for layer in self.model.layers:
            layer.gradient_checkpointing = enable

    # -- tied embeddings -------------------------------------------------------------------------

    def output_linear(self) -> nn.Linear:
        """The nn.Linear holding the output weight (the LoRA base layer when lm_head is adapted)."""
        return self.lm_head.base_layer if isinstance(self.lm_head, LoRALinear) else self.lm_head

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.output_linear().weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # `to_empty` (and `to` across devices) builds a new Parameter per module: re-tie afterwards.
        result = super()._apply(fn, recurse)
        self.tie_weights()
        return result

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        hidden_states = self.model(input_ids)
        logits = self.lm_head(hidden_states)
        loss = None if labels is None else causal_lm_loss(logits, labels, self.spec.vocab_size)
        return CausalLMOutput(loss=loss, logits=logits)


# ---- LoRA -----------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen `base_layer` plus a LoRA adapter: base(x) + lora_B(lora_A(x)) * alpha / r (PEFT's forward).

    `lora_A` (in -> r, kaiming-uniform with a = sqrt(5)) and `lora_B` (r -> out, zeros) are created in
    `adapter_dtype` (fp32 by default, PEFT's `autocast_adapter_dtype=True`; None = the base dtype); the
    input is cast to that dtype for the adapter and the sum is cast back to the base output dtype.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float,
                 adapter_dtype: torch.dtype | None = torch.float32, use_rslora: bool = False) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise PlannerInputError("r", f"must be a positive integer, got {r!r}", "pass e.g. --r 8")
        weight = base_layer.weight
        dtype = weight.dtype if adapter_dtype is None else adapter_dtype
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)  # PEFT's `update_layer`
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, dtype=dtype, device=weight.device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, dtype=dtype, device=weight.device)
        if weight.device.type != "meta":
            self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        result_dtype = result.dtype
        adapter_dtype = self.lora_A.weight.dtype
        if x.dtype != adapter_dtype:
            x = x.to(dtype=adapter_dtype)
        result = result + self.lora_B(self.lora_A(x)) * self.scaling
        return result.to(result_dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, adapter_dtype={self.lora_A.weight.dtype}"


def lora_module_paths(spec: ModelSpec, target_modules: tuple[str, ...] | None,
                      layers_to_transform: tuple[int, ...] | None = None) -> tuple[str, ...]:
    """Full module paths LoRA adapts, decided by `lora_planner.params.adapted_layers` (PEFT's suffix
    rule, "all-linear", None = PEFT's default for the family, `layers_to_transform`)."""
    paths: list[str] = []
    for module, layers in adapted_layers(spec, target_modules, layers_to_transform):
        if module.kind != "linear":
            raise PlannerInputError(
                "target", f"{module.path.rsplit('.', 1)[-1]!r} is an embedding; the builtin backend adapts "
                          "linear layers only", "target linear layers, or use the hf backend")
        paths += [module.layer_path(layer) for layer in sorted(layers)]
    return tuple(paths)


def apply_lora(model: DecoderLM, r: int, alpha: float | None = None,
               target_modules: tuple[str, ...] | None = None,
               adapter_dtype: torch.dtype | None = torch.float32,
               layers_to_transform: tuple[int, ...] | None = None, use_rslora: bool = False) -> DecoderLM:
    """Freeze every base parameter and wrap the targeted linears in `LoRALinear` (in place).

    `alpha` None means 2r (the planner's `LoraSpec` default); `use_rslora` scales by alpha / sqrt(r). Returns the
    model.
    """
    alpha = float(2 * r) if alpha is None else alpha
    if not alpha > 0:
        raise PlannerInputError("alpha", f"must be positive, got {alpha!r}", "pass e.g. --alpha 16")
    paths = lora_module_paths(model.spec, target_modules, layers_to_transform)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise PlannerInputError("target", f"{path} already has a LoRA adapter", "apply LoRA once")
        if min(base.in_features, base.out_features) < r:
            raise PlannerInputError("r", f"rank {r} exceeds the width of {path} "
                                         f"({base.in_features} x {base.out_features})",
                                    f"use r <= {min(base.in_features, base.out_features)}")
        setattr(parent, name, LoRALinear(base, r, alpha, adapter_dtype, use_rslora))
    model.tie_weights()
    return model


# ---- construction and initialisation --------------------------------------------------------------


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_IMPLS:
        raise PlannerInputError("attention", f"unknown value {attention!r}", f"use one of {', '.join(ATTENTION_IMPLS)}")


def _check_spec(spec: ModelSpec) -> None:
    if spec.family not in BUILTIN_FAMILIES:
        raise PlannerInputError(
            "model_type", f"the builtin backend implements Llama-like models ({', '.join(BUILTIN_FAMILIES)}), "
                          f"not {spec.family!r} ({spec.name})", "profile this model with the hf backend")
    unsupported = {
        "hidden_act": spec.hidden_act != "silu",
        "partial_rotary_factor": spec.partial_rotary_factor != 1.0,
        "qk_layernorm": spec.qk_layernorm,
        "dropout": spec.dropout > 0 or spec.embedding_dropout > 0,
    }
    for field_name, bad in unsupported.items():
        if bad:
            raise PlannerInputError(
                field_name, f"{getattr(spec, field_name)!r} is not supported by the builtin Llama-style model",
                "profile this model with the hf backend")


def init_weights(model: nn.Module, initializer_range: float = INITIALIZER_RANGE) -> nn.Module:
    """(Re)initialise every parameter and buffer as transformers / PEFT do: linears and embeddings
    N(0, initializer_range) with zero biases, RMSNorm weights one, RoPE buffers recomputed, LoRA A
    kaiming-uniform and B zero. Use after `to_empty`; re-ties tied embeddings. Returns the model."""
    adapter_parts: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                adapter_parts |= {id(module.lora_A), id(module.lora_B)}
                module.reset_lora_parameters()
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module) not in adapter_parts:
                module.weight.normal_(mean=0.0, std=initializer_range)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(mean=0.0, std=initializer_range)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
    if isinstance(model, DecoderLM):
        model.tie_weights()
    return model


def build_builtin_model(spec: ModelSpec, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                        attention: AttentionImpl = "sdpa", gradient_checkpointing: bool = False,
                        rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0) -> DecoderLM:
    """A `DecoderLM` for a Llama-like `spec` with weights in `dtype`.

    On "meta" nothing is allocated (use `model.to_empty(device=...)` then `init_weights(model)`);
    on a real device the weights are initialised as transformers initialises them (seed with
    `torch.manual_seed` for reproducibility). The model is returned in training mode.
    """
    _check_spec(spec)
    _check_attention(attention)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PlannerInputError("dtype", f"must be a floating torch.dtype, got {dtype!r}",
                                "pass e.g. torch.bfloat16")
    model = DecoderLM(spec, attention, rms_norm_eps, rope_theta, dtype=dtype, device="meta")
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        init_weights(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()

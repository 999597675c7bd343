"""What one training forward keeps alive for backward: saved activations, layer by layer (pure).

Starting point: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198, Sec. 4.1), which counts s*b*h*(34 + 5*a*s/h) bytes per layer for 16-bit GPT training.
That count assumes every linear keeps its input, dropout everywhere, and no fused attention. Here the
count is rebuilt from what PyTorch autograd actually saves in the Hugging Face `transformers` modules
(checked with `torch.autograd.graph.saved_tensors_hooks`, see `experiments/probe_saved_activations.py`):

- a linear keeps its input only when its weight needs a gradient: frozen base layers under LoRA keep
  nothing (autograd saves `input` for `mm` only if `weight.requires_grad`); bitsandbytes' 4-bit matmul
  (`MatMul4Bit`) saves only the packed weight, so QLoRA's frozen layers keep nothing either;
- a PEFT adapter keeps its own copy of its input when it has to cast it (fp32 adapters on a 16-bit
  base, `autocast_adapter_dtype=True`), plus the rank-r intermediate A x;
- RMSNorm (Llama) upcasts to fp32 and keeps that fp32 copy and 1/rms; it keeps the normalised input
  only when its weight trains; LayerNorm keeps its input and the fp32 mean and 1/std;
- SDPA (flash / memory-efficient kernels) keeps q, k, v, the output and the fp32 log-sum-exp, no S x S
  matrix; eager attention keeps the fp32 softmax and its low-precision copy (S x S per head);
- element-wise ops keep what their derivative needs (SiLU/GELU: input; x*y: both; tanh: output);
- dropout with p > 0 keeps a 1-byte mask;
- nothing upstream of the first trainable parameter is kept: under LoRA with frozen embeddings the
  first layer's input norm saves nothing.

The loss (transformers' `ForCausalLMLoss`): logits are upcast to fp32, `log_softmax` keeps its fp32
output; its backward holds three fp32 B x S x V tensors at once (saved output, incoming gradient from
`nll_loss`, its own result), which is often the step's peak for LoRA with a 32k-256k vocabulary.

Known limitations: assumes no padding mask (SDPA takes its causal fast path), PEFT's
`lora_dropout=0`, no KV cache, no fused cross-entropy (Liger) and no sequence packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lora_planner.params import Module, module_inventory, resolve_targets
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4
MASK = 1  # bool dropout mask, one byte per element


@dataclass(frozen=True)
class SavedTensor:
    name: str
    nbytes: int


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes kept for backward, split the way the phases of a step need them.

    `layer` is a layer whose input needs a gradient; `first_layer` is layer 0, which differs when the
    embeddings are frozen (LoRA / QLoRA). `model` is what lives outside the layers (rotary tables, final
    norm, lm_head input, the batch itself); `loss` is what the loss keeps for backward.
    """

    layer: tuple[SavedTensor, ...]
    first_layer: tuple[SavedTensor, ...]
    model: tuple[SavedTensor, ...]
    loss: tuple[SavedTensor, ...]
    num_layers: int
    checkpoint_per_layer_bytes: int
    loss_forward_scratch_bytes: int  # logits and their fp32 copy, alive while the loss is computed
    loss_backward_scratch_bytes: int  # gradient buffers of the loss backward, on top of `loss`
    layer_backward_scratch_bytes: int  # transient gradient buffers inside one layer's backward

    @staticmethod
    def total(items: tuple[SavedTensor, ...]) -> int:
        return sum(item.nbytes for item in items)

    @property
    def layer_bytes(self) -> int:
        return self.total(self.layer)

    @property
    def first_layer_bytes(self) -> int:
        return self.total(self.first_layer)

    @property
    def all_layers_bytes(self) -> int:
        """Every layer's saved tensors (no checkpointing)."""
        return self.first_layer_bytes + (self.num_layers - 1) * self.layer_bytes

    @property
    def model_bytes(self) -> int:
        return self.total(self.model)

    @property
    def loss_bytes(self) -> int:
        return self.total(self.loss)


@lru_cache(maxsize=1024)
def _adapted_paths(spec: ModelSpec, targets: tuple[str, ...] | None) -> frozenset[str]:
    return frozenset(m.path for m in resolve_targets(spec, targets))


@lru_cache(maxsize=256)
def _modules_by_path(spec: ModelSpec) -> dict[str, Module]:
    return {m.path: m for m in module_inventory(spec)}


class _Flow:
    """The settings every rule below needs, and the rules for linear layers shared by all families."""

    def __init__(self, spec: ModelSpec, training: TrainingSpec) -> None:
        self.spec = spec
        self.t = training
        self.b, self.s = training.batch_size, training.seq_len
        self.tokens = training.tokens
        self.full = training.method == "full"
        self.amp = training.amp is not None
        self.e_compute = BYTES_PER_ELEMENT[training.compute_dtype]
        # The residual stream: fp32 under autocast (fp32 embeddings, fp32 adds), else the compute dtype.
        self.e_stream = FP32 if self.amp else self.e_compute
        self.e_adapter = FP32 if training.lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[training.dtype]
        self.r = training.lora.r
        self.adapted_paths = _adapted_paths(spec, training.lora.target_modules) if not self.full else frozenset()
        self.modules = _modules_by_path(spec)

    def adapted(self, path: str) -> bool:
        return path in self.adapted_paths

    def linear(self, path: str, x_bytes_per_element: int, x_needs_grad: bool) -> tuple[list[SavedTensor], bool]:
        """What a (possibly adapted) linear saves for its input x: (own tensors, whether x itself is kept).

        x itself is kept when the base weight trains (full fine-tuning) or when an adapter uses x
        without a cast. Under autocast every consumer casts an fp32 input to 16-bit on its own, and that
        copy, not x, is what is saved.
        """
        m = self.modules[path]
        tokens, name = self.tokens, path.split("layers.0.")[-1].split("h.0.")[-1]
        own: list[SavedTensor] = []
        keeps_x = False
        cast_by_autocast = self.amp and x_bytes_per_element != self.e_compute
        if self.full:
            if cast_by_autocast:
                own.append(SavedTensor(f"{name}.input_autocast_copy", tokens * m.in_features * self.e_compute))
            else:
                keeps_x = True
        if self.adapted(path):
            if self.amp:
                # PEFT casts x to the adapter dtype (fp32), then autocast casts it to 16-bit for lora_A.
                own.append(SavedTensor(f"{name}.lora_input_autocast_copy", tokens * m.in_features * self.e_compute))
                a_out = self.e_compute
            elif self.e_adapter != x_bytes_per_element:
                own.append(SavedTensor(f"{name}.lora_input_cast", tokens * m.in_features * self.e_adapter))
                a_out = self.e_adapter
            else:
                keeps_x = True
                a_out = self.e_adapter
            own.append(SavedTensor(f"{name}.lora_A_output", tokens * self.r * a_out))
        if self.amp:
            own.extend(self.amp_weight_copies(path, x_needs_grad))
        return own, keeps_x

    def amp_weight_copies(self, path: str, x_needs_grad: bool) -> list[SavedTensor]:
        """Autocast's 16-bit weight copies that backward keeps: every weight whose input needs a gradient
        (trainable weights are cached for the whole forward anyway), and the adapters' A and B."""
        m = self.modules[path]
        copies: list[SavedTensor] = []
        name = path.split("layers.0.")[-1].split("h.0.")[-1]
        if (x_needs_grad or self.full) and not m.tied:
            copies.append(SavedTensor(f"{name}.weight_autocast_copy", m.in_features * m.out_features * self.e_compute))
        if self.adapted(path):
            copies.append(SavedTensor(f"{name}.lora_weights_autocast_copy",
                                      self.r * (m.in_features + m.out_features) * self.e_compute))
        return copies

    def adapter_makes_grad(self, *paths: str) -> bool:
        return any(self.adapted(p) for p in paths)


def _rms_norm(flow: _Flow, name: str, x_needs_grad: bool, fp32_normalised: bool) -> list[SavedTensor]:
    """Llama/Gemma RMSNorm: `x.to(fp32)`, `x * rsqrt(mean(x^2) + eps)`, then the weight.

    Saves the fp32 input (the stream itself when it is already fp32) and 1/rms when x needs a gradient;
    the normalised tensor only when the weight trains (Llama multiplies after casting back to the stream
    dtype, Gemma before, in fp32).
    """
    tokens, h = flow.tokens, flow.spec.hidden_size
    saved: list[SavedTensor] = []
    if x_needs_grad:
        saved += [SavedTensor(f"{name}.fp32_input", tokens * h * FP32), SavedTensor(f"{name}.rsqrt", tokens * FP32)]
    if flow.full:
        width = FP32 if fp32_normalised else flow.e_stream
        saved.append(SavedTensor(f"{name}.normalised", tokens * h * width))
    return saved


def _layer_norm(flow: _Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """nn.LayerNorm keeps its input and fp32 mean and 1/std (needed for the input and the weight gradient)."""
    if not (x_needs_grad or flow.full):
        return []
    tokens, h = flow.tokens, flow.spec.hidden_size
    return [SavedTensor(f"{name}.input", tokens * h * flow.e_stream), SavedTensor(f"{name}.mean_rstd", 2 * tokens * FP32)]


def _sdpa(flow: _Flow, q_cols: int, kv_cols: int, *, q_new: bool, k_new: bool) -> list[SavedTensor]:
    """Fused SDPA keeps q, k, v, output and the fp32 log-sum-exp (b x heads x s).

    `q_new` / `k_new`: q and k are fresh tensors (after RoPE); otherwise they are views of the projection
    output, which is counted by the caller.
    """
    tokens, e = flow.tokens, flow.e_compute
    saved = []
    if q_new:
        saved.append(SavedTensor("attn.q_rotated", tokens * q_cols * e))
    if k_new:
        saved.append(SavedTensor("attn.k_rotated", tokens * kv_cols * e))
    saved += [
        SavedTensor("attn.v", tokens * kv_cols * e),
        SavedTensor("attn.output", tokens * q_cols * e),
        SavedTensor("attn.logsumexp", flow.b * flow.spec.num_heads * flow.s * FP32),
    ]
    return saved


def _eager_attention(flow: _Flow, q_cols: int) -> list[SavedTensor]:
    """matmul(q, k^T) keeps q and k; softmax(dtype=fp32) keeps its fp32 output; the 16-bit copy of the
    probabilities and v are kept by the second matmul; the output is copied to (b, s, heads*dim)."""
    tokens, e = flow.tokens, flow.e_compute
    scores = flow.b * flow.spec.num_heads * flow.s * flow.s
    saved = [
        SavedTensor("attn.q_rotated", tokens * q_cols * e),
        SavedTensor("attn.k_repeated", tokens * q_cols * e),
        SavedTensor("attn.v_repeated", tokens * q_cols * e),
        SavedTensor("attn.softmax_fp32", scores * FP32),
    ]
    if e != FP32:
        saved.append(SavedTensor("attn.probs", scores * e))
    return saved


def _llama_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One Llama / Mistral / Qwen2 / Gemma decoder layer (pre-norm, separate q/k/v/o, gated MLP)."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    p = "model.layers.0."
    gemma = spec.family == "gemma"
    saved = _rms_norm(flow, "input_layernorm", x_needs_grad, fp32_normalised=gemma)

    keeps_normed = False
    for proj in ("q_proj", "k_proj", "v_proj"):
        own, keeps = flow.linear(p + "self_attn." + proj, flow.e_stream, x_needs_grad)
        saved += own
        keeps_normed |= keeps
    if keeps_normed:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * flow.e_stream))

    attn_needs_grad = x_needs_grad or flow.adapter_makes_grad(
        p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
    # transformers passes enable_gqa to SDPA (no padding mask), so k and v stay at kv-head width.
    if attn_needs_grad:
        if flow.t.attention == "sdpa":
            saved += _sdpa(flow, spec.q_size, spec.kv_size, q_new=True, k_new=True)
        else:
            saved += _eager_attention(flow, spec.q_size)
    o_input_is_copy = flow.t.attention == "eager"
    own, keeps = flow.linear(p + "self_attn.o_proj", e, attn_needs_grad)
    saved += own
    if keeps and (o_input_is_copy or not attn_needs_grad):
        saved.append(SavedTensor("self_attn.o_proj.input", tokens * spec.q_size * e))

    mid_needs_grad = attn_needs_grad or flow.adapter_makes_grad(p + "self_attn.o_proj")
    saved += _rms_norm(flow, "post_attention_layernorm", mid_needs_grad, fp32_normalised=gemma)
    keeps_normed = False
    for proj in ("gate_proj", "up_proj"):
        own, keeps = flow.linear(p + "mlp." + proj, flow.e_stream, mid_needs_grad)
        saved += own
        keeps_normed |= keeps
    if keeps_normed:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * spec.hidden_size * flow.e_stream))

    gate_grad = mid_needs_grad or flow.adapted(p + "mlp.gate_proj")
    up_grad = mid_needs_grad or flow.adapted(p + "mlp.up_proj")
    inter = tokens * spec.intermediate_size * e
    if gate_grad:
        saved.append(SavedTensor("mlp.gate_output", inter))  # the activation function's input
    if up_grad:
        saved.append(SavedTensor("mlp.act_output", inter))  # act(gate) * up: each factor for the other's grad
    if gate_grad:
        saved.append(SavedTensor("mlp.up_output", inter))
    own, keeps = flow.linear(p + "mlp.down_proj", e, gate_grad or up_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.down_proj.input", inter))
    return saved


def _gelu_saved(flow: _Flow, prefix: str) -> list[SavedTensor]:
    """What the MLP activation keeps. `gelu_new` (GPT-2, Phi) is written out in Python in transformers
    (`0.5*x*(1 + tanh(c*(x + 0.044715*x^3)))`) and keeps x, tanh(.), 0.5*x and 1 + tanh(.); one-op
    activations (F.gelu, BLOOM's custom GeLUFunction) keep only x."""
    inter = flow.tokens * flow.spec.intermediate_size * flow.e_compute
    if flow.spec.hidden_act == "gelu_new":
        return [SavedTensor(f"{prefix}.act_input", inter), SavedTensor(f"{prefix}.act_tanh", inter),
                SavedTensor(f"{prefix}.act_half_x", inter), SavedTensor(f"{prefix}.act_one_plus_tanh", inter)]
    return [SavedTensor(f"{prefix}.act_input", inter)]


def _plain_mlp(flow: _Flow, fc1: str, fc2: str, x_needs_grad: bool) -> tuple[list[SavedTensor], bool]:
    """fc1 -> activation -> fc2 (Phi, GPT-2, BLOOM). Returns (own saved tensors, whether fc1 keeps its input)."""
    saved, keeps_x = flow.linear(fc1, flow.e_stream, x_needs_grad)
    inner_grad = x_needs_grad or flow.adapted(fc1)
    if inner_grad:
        saved += _gelu_saved(flow, "mlp")
    own, keeps = flow.linear(fc2, flow.e_compute, inner_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.fc2_input", flow.tokens * flow.spec.intermediate_size * flow.e_compute))
    return saved, keeps_x


def _phi_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """Phi: one LayerNorm, then attention and MLP in parallel on its output, partial rotary."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    p = "model.layers.0."
    saved = _layer_norm(flow, "input_layernorm", x_needs_grad)
    keeps_normed = False
    for proj in ("q_proj", "k_proj", "v_proj"):
        own, keeps = flow.linear(p + "self_attn." + proj, flow.e_stream, x_needs_grad)
        saved += own
        keeps_normed |= keeps
    attn_needs_grad = x_needs_grad or flow.adapter_makes_grad(
        p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
    if attn_needs_grad:
        saved += _sdpa(flow, spec.q_size, spec.kv_size, q_new=True, k_new=True)
    own, keeps = flow.linear(p + "self_attn.dense", e, attn_needs_grad)
    saved += own
    mlp_saved, keeps_mlp_x = _plain_mlp(flow, p + "mlp.fc1", p + "mlp.fc2", x_needs_grad)
    saved += mlp_saved
    if keeps_normed or keeps_mlp_x:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * flow.e_stream))
    return saved


def _gpt2_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """GPT-2: LayerNorm, fused c_attn (q, k, v are views of its output), SDPA, c_proj, MLP."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = "transformer.h.0."
    saved = _layer_norm(flow, "ln_1", x_needs_grad)
    own, keeps = flow.linear(p + "attn.c_attn", flow.e_stream, x_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("ln_1.output", tokens * h * flow.e_stream))
    attn_needs_grad = x_needs_grad or flow.adapted(p + "attn.c_attn")
    if attn_needs_grad:
        saved.append(SavedTensor("attn.c_attn_output", tokens * 3 * h * e))  # q, k, v views
        saved += _sdpa(flow, h, 0, q_new=False, k_new=False)[1:]  # output + logsumexp (v is a view)
    own, keeps = flow.linear(p + "attn.c_proj", e, attn_needs_grad)
    saved += own
    mid_needs_grad = attn_needs_grad or flow.adapted(p + "attn.c_proj")
    saved += _dropout_masks(flow, "attn.resid_dropout", 1 if mid_needs_grad else 0)
    saved += _layer_norm(flow, "ln_2", mid_needs_grad)
    mlp_saved, keeps_x = _plain_mlp(flow, p + "mlp.c_fc", p + "mlp.c_proj", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("ln_2.output", tokens * h * flow.e_stream))
    saved += _dropout_masks(flow, "mlp.dropout", 1)
    return saved


def _bloom_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """BLOOM: LayerNorm, fused query_key_value, eager ALiBi attention (S x S kept), dense, MLP."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = "transformer.h.0."
    saved = _layer_norm(flow, "input_layernorm", x_needs_grad)
    own, keeps = flow.linear(p + "self_attention.query_key_value", flow.e_stream, x_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("input_layernorm.output", tokens * h * flow.e_stream))
    attn_needs_grad = x_needs_grad or flow.adapted(p + "self_attention.query_key_value")
    if attn_needs_grad:
        scores = flow.b * spec.num_heads * flow.s * flow.s
        # q, k, v are strided views of the fused output; reshaping them for baddbmm/bmm copies each.
        saved += [SavedTensor("attn.q", tokens * h * e), SavedTensor("attn.k", tokens * h * e),
                  SavedTensor("attn.v", tokens * h * e), SavedTensor("attn.softmax_fp32", scores * FP32)]
        if e != FP32:
            saved.append(SavedTensor("attn.probs", scores * e))
    own, keeps = flow.linear(p + "self_attention.dense", e, attn_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("self_attention.dense.input", tokens * h * e))
    mid_needs_grad = attn_needs_grad or flow.adapted(p + "self_attention.dense")
    saved += _layer_norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, keeps_x = _plain_mlp(flow, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    return saved


def _dropout_masks(flow: _Flow, name: str, count: int, p: float | None = None) -> list[SavedTensor]:
    p = flow.spec.dropout if p is None else p
    if p <= 0 or count == 0:
        return []
    return [SavedTensor(f"{name}.mask", count * flow.tokens * flow.spec.hidden_size * MASK)]


_LAYERS = {"llama": _llama_layer, "mistral": _llama_layer, "qwen2": _llama_layer, "gemma": _llama_layer,
           "phi": _phi_layer, "gpt2": _gpt2_layer, "bloom": _bloom_layer}


def _model_level(flow: _Flow) -> list[SavedTensor]:
    """Outside the layers: the batch, rotary tables, embedding-side ops, the final norm, lm_head's input."""
    spec, tokens, h = flow.spec, flow.tokens, flow.spec.hidden_size
    saved = [SavedTensor("batch.input_ids_and_labels", 2 * tokens * 8)]
    if spec.family in ("llama", "mistral", "qwen2", "gemma", "phi"):
        rotary_dim = spec.head_dim if spec.family != "phi" else int(spec.head_dim * spec.partial_rotary_factor)
        saved.append(SavedTensor("rotary.cos_sin", 2 * tokens * rotary_dim * flow.e_compute))
    if spec.family == "gpt2":
        saved += _dropout_masks(flow, "embeddings.dropout", 1 if flow.full else 0, flow.spec.embedding_dropout)
    if spec.family == "bloom":
        saved += _layer_norm(flow, "word_embeddings_layernorm", flow.full)
    final = {"phi": "model.final_layernorm", "gpt2": "transformer.ln_f", "bloom": "transformer.ln_f"}
    if spec.family in final:
        saved += _layer_norm(flow, "final_norm", True)
    else:
        saved += _rms_norm(flow, "final_norm", True, fp32_normalised=spec.family == "gemma")
    own, keeps = flow.linear("lm_head", flow.e_stream, True)
    saved += own
    if keeps:
        saved.append(SavedTensor("lm_head.input", tokens * h * flow.e_stream))
    return saved


def activation_profile(spec: ModelSpec, training: TrainingSpec) -> ActivationProfile:
    """Saved activations and transient buffers of one training step (see the module docstring)."""
    flow = _Flow(spec, training)
    layer_fn = _LAYERS[spec.family]
    tokens, vocab, e = flow.tokens, spec.vocab_size, flow.e_compute
    logits = tokens * vocab
    # Frozen embeddings (LoRA / QLoRA, no enable_input_require_grads) send no gradient into layer 0.
    # Gradient checkpointing in transformers makes the inputs require grad, so layer 0 is like the rest.
    first_input_needs_grad = flow.full or training.grad_checkpointing
    upcast = logits * FP32 if e != FP32 else 0
    return ActivationProfile(
        layer=tuple(layer_fn(flow, True)),
        first_layer=tuple(layer_fn(flow, first_input_needs_grad)),
        model=tuple(_model_level(flow)),
        loss=(SavedTensor("loss.log_softmax_fp32", logits * FP32),),
        num_layers=spec.num_layers,
        checkpoint_per_layer_bytes=tokens * spec.hidden_size * flow.e_stream,
        # 16-bit logits + their fp32 copy are alive while log_softmax writes its output.
        loss_forward_scratch_bytes=logits * e + upcast,
        # nll_loss's gradient and log_softmax's input gradient, both fp32, beside the saved output.
        loss_backward_scratch_bytes=2 * logits * FP32,
        # Inside a layer's backward: the incoming gradient, gradients of the MLP's intermediates and of
        # the layer input, the largest of which are B x S x intermediate.
        layer_backward_scratch_bytes=(2 * spec.hidden_size + 3 * spec.intermediate_size) * tokens * e,
    )

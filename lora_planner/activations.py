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

from copy import copy
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

from lora_planner.params import Module, adapters_by_layer, module_inventory, rotary_dim
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4
MASK = 1  # bool dropout mask, one byte per element


class SavedTensor(NamedTuple):  # a NamedTuple, not a dataclass: profiles build thousands of these per grid
    name: str
    nbytes: int


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes kept for backward, split the way the phases of a step need them.

    `layer` is the last layer (the first one backward meets); `first_layer` is layer 0, which differs when
    the embeddings are frozen (LoRA / QLoRA). `layer_runs` lists every layer, as runs of identical layers
    in model order: (how many, what each saves); layers differ when LoRA adapts only some of them (a
    layer-specific target or `layers_to_transform`), since nothing upstream of the first adapted layer
    needs a gradient. `model` is what lives outside the layers (rotary tables, final norm, lm_head input,
    the batch itself); `loss` is what the loss keeps for backward.
    """

    layer: tuple[SavedTensor, ...]
    first_layer: tuple[SavedTensor, ...]
    layer_runs: tuple[tuple[int, tuple[SavedTensor, ...]], ...]
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

    @cached_property  # profiles are immutable; totals are asked for once per phase
    def layer_bytes(self) -> int:
        return self.total(self.layer)

    @cached_property
    def first_layer_bytes(self) -> int:
        return self.total(self.first_layer)

    @cached_property
    def all_layers_bytes(self) -> int:
        """Every layer's saved tensors (no checkpointing)."""
        return sum(count * self.total(saved) for count, saved in self.layer_runs)

    def layer_saved_bytes(self, index: int) -> int:
        """What decoder layer `index` saves."""
        for count, saved in self.layer_runs:
            if index < count:
                return self.total(saved)
            index -= count
        raise IndexError(index)

    @cached_property
    def largest_layer(self) -> tuple[SavedTensor, ...]:
        """The layer that saves the most (what `--detail` shows)."""
        return max((saved for _, saved in self.layer_runs), key=self.total)

    @cached_property
    def checkpoint_recompute_bytes(self) -> int:
        """Under gradient checkpointing, the most that recomputing one layer adds in backward on top of
        every layer's checkpointed input: layer i is recomputed while the inputs of layers 0..i are still
        held (later ones are freed), so this is max over i of (layer i's saved bytes - (L - 1 - i) inputs)."""
        best, i = None, 0
        for count, saved in self.layer_runs:
            i += count  # the run's last layer has the fewest freed inputs ahead of it
            extra = self.total(saved) - (self.num_layers - i) * self.checkpoint_per_layer_bytes
            best = extra if best is None else max(best, extra)
        return best or 0

    @cached_property
    def batch_bytes(self) -> int:
        """The batch itself (input ids and labels), alive for the whole step."""
        return self.total(tuple(item for item in self.model if item.name.startswith("batch.")))

    @cached_property
    def model_bytes_below_head(self) -> int:
        """Model-level tensors that outlive the head's backward (all but the final norm's and lm_head's)."""
        return self.total(tuple(i for i in self.model if not i.name.startswith(("final_norm.", "lm_head."))))

    @cached_property
    def model_bytes(self) -> int:
        return self.total(self.model)

    @cached_property
    def loss_bytes(self) -> int:
        return self.total(self.loss)


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
        # PEFT's prepare_model_for_kbit_training casts embeddings, norms, biases and lm_head to fp32: the
        # stream and every op between the 4-bit matmuls (which cast their input to the compute dtype and
        # their output back, bitsandbytes `Linear4bit.forward`) then run in fp32.
        self.kbit_fp32 = training.method == "qlora" and training.kbit_prep
        self.e_compute = FP32 if self.kbit_fp32 else BYTES_PER_ELEMENT[training.compute_dtype]
        # The residual stream: fp32 under autocast (fp32 embeddings, fp32 adds), else the compute dtype.
        self.e_stream = FP32 if self.amp else self.e_compute
        self.e_adapter = FP32 if training.lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[training.dtype]
        self.r = training.lora.r
        if self.full:
            self.layer_adapters: tuple[frozenset[str], ...] = (frozenset(),) * spec.num_layers
            self.outside_adapters: frozenset[str] = frozenset()
        else:
            self.layer_adapters, self.outside_adapters = adapters_by_layer(
                spec, training.lora.target_modules, training.lora.layers_to_transform)
        self.adapted_paths = self.outside_adapters
        self.modules = _modules_by_path(spec)

    def in_layer(self, adapters: frozenset[str]) -> _Flow:
        """The same settings, seen from a decoder layer whose adapted modules are `adapters`."""
        flow = copy(self)
        flow.adapted_paths = adapters | self.outside_adapters
        return flow

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
        """Autocast's 16-bit weight copies that backward keeps (for the input gradient): every weight whose
        input needs a gradient, trainable weights always (cached for the whole forward); for an adapter,
        lora_B's copy always (its input A x needs a gradient) and lora_A's when x needs one."""
        m = self.modules[path]
        copies: list[SavedTensor] = []
        name = path.split("layers.0.")[-1].split("h.0.")[-1]
        if x_needs_grad or self.full:
            copies.append(SavedTensor(f"{name}.weight_autocast_copy", m.in_features * m.out_features * self.e_compute))
        if self.adapted(path):
            lora_in = m.in_features if x_needs_grad else 0
            copies.append(SavedTensor(f"{name}.lora_weights_autocast_copy",
                                      self.r * (lora_in + m.out_features) * self.e_compute))
        return copies

    def adapter_makes_grad(self, *paths: str) -> bool:
        return any(self.adapted(p) for p in paths)


def _rms_norm(flow: _Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """Llama / Gemma RMSNorm: `x.to(fp32)`, `x * rsqrt(mean(x^2) + eps)`, then the weight.

    Saves the fp32 input (the stream itself when it is already fp32) and 1/rms when x needs a gradient;
    the normalised tensor only when the weight trains. Llama multiplies after casting back to the stream
    dtype; Gemma multiplies in fp32 by `1 + w`, keeping that fp32 vector and an fp32 normalised tensor.
    """
    tokens, h = flow.tokens, flow.spec.hidden_size
    gemma = flow.spec.family == "gemma"
    saved: list[SavedTensor] = []
    if x_needs_grad:
        saved += [SavedTensor(f"{name}.fp32_input", tokens * h * FP32), SavedTensor(f"{name}.rsqrt", tokens * FP32)]
        if gemma:
            saved.append(SavedTensor(f"{name}.one_plus_weight", h * FP32))
    if flow.full:
        width = FP32 if gemma else flow.e_stream
        saved.append(SavedTensor(f"{name}.normalised", tokens * h * width))
    return saved


def _layer_norm(flow: _Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """nn.LayerNorm keeps its input and the per-token mean and 1/std: in the input's dtype on CPU (measured),
    in fp32 on CUDA (`layer_norm_cuda` allocates them in the accumulation type)."""
    if not (x_needs_grad or flow.full):
        return []
    tokens, h, e = flow.tokens, flow.spec.hidden_size, flow.e_stream
    stats = FP32 if flow.t.device == "cuda" else e
    return [SavedTensor(f"{name}.input", tokens * h * e), SavedTensor(f"{name}.mean_rstd", 2 * tokens * stats)]


def _dropout_mask(flow: _Flow, name: str, numel: int, p: float, x_needs_grad: bool, e: int) -> list[SavedTensor]:
    """Training-mode dropout keeps its mask: a bool tensor from `native_dropout` on CUDA; on CPU
    `F.dropout` multiplies by a Bernoulli tensor in the activation dtype."""
    if p <= 0 or not x_needs_grad:
        return []
    return [SavedTensor(f"{name}.mask", numel * (MASK if flow.t.device == "cuda" else e))]


def _sdpa(flow: _Flow, q_cols: int, kv_cols: int) -> list[SavedTensor]:
    """Fused SDPA (flash / memory-efficient, CUDA and CPU) keeps q, k, v, the output and the fp32
    log-sum-exp (b x heads x s); with no padding mask transformers passes `enable_gqa`, so k and v stay
    at kv-head width. q and k are fresh RoPE outputs; v is the projection output itself."""
    tokens, e = flow.tokens, flow.e_compute
    return [
        SavedTensor("attn.q_rotated", tokens * q_cols * e),
        SavedTensor("attn.k_rotated", tokens * kv_cols * e),
        SavedTensor("attn.v", tokens * kv_cols * e),
        SavedTensor("attn.output", tokens * q_cols * e),
        SavedTensor("attn.logsumexp", flow.b * flow.spec.num_heads * flow.s * FP32),
    ]


def _softmax_saved(flow: _Flow, v_needs_grad: bool) -> list[SavedTensor]:
    """Eager attention's S x S tensors: softmax keeps its output (fp32 when transformers asks for an fp32
    softmax or autocast runs it in fp32); the 16-bit copy of the probabilities is kept by the matmul
    with v when v needs a gradient (in fp32 it is the same tensor); dropout adds a mask and the dropped
    probabilities."""
    scores, e = flow.b * flow.spec.num_heads * flow.s * flow.s, flow.e_compute
    softmax_e = FP32 if flow.spec.family != "gpt2" or flow.amp else e  # GPT-2 eager softmax stays in dtype
    saved = [SavedTensor("attn.softmax", scores * softmax_e)]
    probs_copy = softmax_e != e
    if flow.spec.attention_dropout > 0:
        saved += _dropout_mask(flow, "attn.dropout", scores, flow.spec.attention_dropout, True, e)
        saved.append(SavedTensor("attn.probs_dropped", scores * e))
    elif probs_copy and v_needs_grad:
        saved.append(SavedTensor("attn.probs", scores * e))
    return saved


def _eager_attention(flow: _Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """matmul(q, k^T) keeps each operand for the other's gradient; `repeat_kv` copies k and v to all
    heads first (when heads > kv heads); probs @ v keeps v when the probabilities need a gradient."""
    tokens, e, spec = flow.tokens, flow.e_compute, flow.spec
    repeated = spec.q_size if spec.num_kv_heads != spec.num_heads else spec.kv_size
    saved = []
    if k_grad:
        saved.append(SavedTensor("attn.q_rotated", tokens * spec.q_size * e))
    if q_grad:
        saved.append(SavedTensor("attn.k_repeated", tokens * repeated * e))
    if q_grad or k_grad:
        saved += _softmax_saved(flow, v_grad)
        saved.append(SavedTensor("attn.v_repeated", tokens * repeated * e))
    elif v_grad:
        saved += [s for s in _softmax_saved(flow, True) if s.name != "attn.softmax"]
    return saved


def _attention_core(flow: _Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """RoPE'd q, k and v through SDPA (everything or nothing) or eager attention (per operand)."""
    if flow.t.attention == "eager":
        return _eager_attention(flow, q_grad, k_grad, v_grad)
    return _sdpa(flow, flow.spec.q_size, flow.spec.kv_size) if q_grad or k_grad or v_grad else []


def _attention_projections(flow: _Flow, prefix: str, projections: tuple[str, ...],
                           x_needs_grad: bool) -> tuple[list[SavedTensor], bool, tuple[bool, ...]]:
    """q / k / v (or fused qkv) linears sharing one normed input: (saved, whether the input is kept,
    whether each output needs a gradient)."""
    saved: list[SavedTensor] = []
    keeps_input = False
    for proj in projections:
        own, keeps = flow.linear(prefix + proj, flow.e_stream, x_needs_grad)
        saved += own
        keeps_input |= keeps
    grads = tuple(x_needs_grad or flow.adapted(prefix + proj) for proj in projections)
    return saved, keeps_input, grads


def _llama_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """One Llama / Mistral / Qwen2 / Gemma decoder layer (pre-norm, separate q/k/v/o, gated MLP)."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    p = "model.layers.0."
    saved = _rms_norm(flow, "input_layernorm", x_needs_grad)
    own, keeps_normed, (q_grad, k_grad, v_grad) = _attention_projections(
        flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), x_needs_grad)
    saved += own
    if keeps_normed:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * flow.e_stream))
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += _attention_core(flow, q_grad, k_grad, v_grad)
    # SDPA's output is laid out (b, s, heads, dim), so o_proj reads it without a copy; eager copies.
    own, keeps = flow.linear(p + "self_attn.o_proj", e, attn_needs_grad)
    saved += own
    if keeps and (flow.t.attention == "eager" or not attn_needs_grad):
        saved.append(SavedTensor("self_attn.o_proj.input", tokens * spec.q_size * e))

    mid_needs_grad = attn_needs_grad or flow.adapted(p + "self_attn.o_proj")
    saved += _rms_norm(flow, "post_attention_layernorm", mid_needs_grad)
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


def _gelu_saved(flow: _Flow) -> list[SavedTensor]:
    """What the MLP activation keeps. `gelu_new` (GPT-2, Phi) is written out in Python in transformers
    (`0.5*x*(1 + tanh(c*(x + 0.044715*x^3)))`) and keeps x, tanh(.), 0.5*x and 1 + tanh(.); one-op
    activations (F.gelu, BLOOM's custom GeLUFunction) keep only x."""
    inter = flow.tokens * flow.spec.intermediate_size * flow.e_compute
    if flow.spec.hidden_act == "gelu_new":
        return [SavedTensor("mlp.act_input", inter), SavedTensor("mlp.act_tanh", inter),
                SavedTensor("mlp.act_half_x", inter), SavedTensor("mlp.act_one_plus_tanh", inter)]
    return [SavedTensor("mlp.act_input", inter)]


def _plain_mlp(flow: _Flow, fc1: str, fc2: str, x_needs_grad: bool) -> tuple[list[SavedTensor], bool, bool]:
    """fc1 -> activation -> fc2 (Phi, GPT-2, BLOOM): (saved, whether fc1 keeps its input, whether the
    output needs a gradient)."""
    saved, keeps_x = flow.linear(fc1, flow.e_stream, x_needs_grad)
    inner_grad = x_needs_grad or flow.adapted(fc1)
    if inner_grad:
        saved += _gelu_saved(flow)
    own, keeps = flow.linear(fc2, flow.e_compute, inner_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.fc2_input", flow.tokens * flow.spec.intermediate_size * flow.e_compute))
    return saved, keeps_x, inner_grad or flow.adapted(fc2)


def _phi_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """Phi: one LayerNorm, then attention and MLP in parallel on its output, partial rotary."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    p = "model.layers.0."
    saved = _layer_norm(flow, "input_layernorm", x_needs_grad)
    own, keeps_normed, (q_grad, k_grad, v_grad) = _attention_projections(
        flow, p + "self_attn.", ("q_proj", "k_proj", "v_proj"), x_needs_grad)
    saved += own
    attn_needs_grad = q_grad or k_grad or v_grad
    saved += _attention_core(flow, q_grad, k_grad, v_grad)
    # Partial RoPE ends in torch.cat, so q is (b, heads, s, dim)-contiguous and so is the attention
    # output: the (b, s, hidden) input of `dense` is a copy.
    own, keeps = flow.linear(p + "self_attn.dense", e, attn_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("self_attn.dense.input", tokens * spec.q_size * e))
    attn_out_grad = attn_needs_grad or flow.adapted(p + "self_attn.dense")
    saved += _dropout_mask(flow, "attn.resid_dropout", tokens * spec.hidden_size, spec.dropout, attn_out_grad, e)
    mlp_saved, keeps_mlp_x, mlp_out_grad = _plain_mlp(flow, p + "mlp.fc1", p + "mlp.fc2", x_needs_grad)
    saved += mlp_saved
    saved += _dropout_mask(flow, "mlp.resid_dropout", tokens * spec.hidden_size, spec.dropout, mlp_out_grad, e)
    if keeps_normed or keeps_mlp_x:
        saved.append(SavedTensor("input_layernorm.output", tokens * spec.hidden_size * flow.e_stream))
    return saved


def _gpt2_attention(flow: _Flow, needs_grad: bool) -> list[SavedTensor]:
    """GPT-2's q, k, v are views of the c_attn output. SDPA with attention dropout has no fused CPU
    kernel: the math fallback upcasts q, k, v to fp32 and keeps fp32 S x S probabilities, mask and dropped
    probabilities. On CUDA the flash / efficient kernels keep q, k, v (the c_attn output), the output and
    the log-sum-exp (dropout is replayed from the RNG state). Eager keeps the c_attn output and the S x S
    softmax (plus dropout mask and dropped probabilities)."""
    if not needs_grad:
        return []
    tokens, h, e = flow.tokens, flow.spec.hidden_size, flow.e_compute
    scores = flow.b * flow.spec.num_heads * flow.s * flow.s
    qkv = SavedTensor("attn.c_attn_output", tokens * 3 * h * e)
    if flow.t.attention == "eager":
        return [qkv, *_softmax_saved(flow, True)]
    if flow.t.device == "cpu" and flow.spec.attention_dropout > 0:
        return [SavedTensor("attn.qkv_fp32", 3 * tokens * h * FP32), SavedTensor("attn.probs_fp32", scores * FP32),
                SavedTensor("attn.dropout_mask_fp32", scores * FP32), SavedTensor("attn.probs_dropped_fp32", scores * FP32)]
    return [qkv, SavedTensor("attn.output", tokens * h * e),
            SavedTensor("attn.logsumexp", flow.b * flow.spec.num_heads * flow.s * FP32)]


def _gpt2_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """GPT-2: LayerNorm, fused c_attn, attention, c_proj, residual dropout, LayerNorm, MLP, dropout."""
    spec, tokens, e, h = flow.spec, flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = "transformer.h.0."
    saved = _layer_norm(flow, "ln_1", x_needs_grad)
    own, keeps = flow.linear(p + "attn.c_attn", flow.e_stream, x_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("ln_1.output", tokens * h * flow.e_stream))
    attn_needs_grad = x_needs_grad or flow.adapted(p + "attn.c_attn")
    saved += _gpt2_attention(flow, attn_needs_grad)
    own, keeps = flow.linear(p + "attn.c_proj", e, attn_needs_grad)
    saved += own
    fused_output_reused = flow.t.attention == "sdpa" and not (flow.t.device == "cpu" and spec.attention_dropout > 0)
    if keeps and not (fused_output_reused and attn_needs_grad):
        saved.append(SavedTensor("attn.c_proj.input", tokens * h * e))  # heads merged into a copy
    mid_needs_grad = attn_needs_grad or flow.adapted(p + "attn.c_proj")
    saved += _dropout_mask(flow, "attn.resid_dropout", tokens * h, spec.dropout, mid_needs_grad, e)
    saved += _layer_norm(flow, "ln_2", mid_needs_grad)
    mlp_saved, keeps_x, out_grad = _plain_mlp(flow, p + "mlp.c_fc", p + "mlp.c_proj", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("ln_2.output", tokens * h * flow.e_stream))
    saved += _dropout_mask(flow, "mlp.dropout", tokens * h, spec.dropout, out_grad, e)
    return saved


def _bloom_layer(flow: _Flow, x_needs_grad: bool) -> list[SavedTensor]:
    """BLOOM: LayerNorm, fused query_key_value, eager ALiBi attention (S x S kept), dense, MLP."""
    tokens, e, h = flow.tokens, flow.e_compute, flow.spec.hidden_size
    p = "transformer.h.0."
    saved = _layer_norm(flow, "input_layernorm", x_needs_grad)
    own, keeps = flow.linear(p + "self_attention.query_key_value", flow.e_stream, x_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("input_layernorm.output", tokens * h * flow.e_stream))
    attn_needs_grad = x_needs_grad or flow.adapted(p + "self_attention.query_key_value")
    if attn_needs_grad:
        # q, k, v are strided views of the fused output; reshaping them for baddbmm / bmm copies each.
        saved += [SavedTensor("attn.q", tokens * h * e), SavedTensor("attn.k", tokens * h * e),
                  SavedTensor("attn.v", tokens * h * e), *_softmax_saved(flow, True)]
    own, keeps = flow.linear(p + "self_attention.dense", e, attn_needs_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("self_attention.dense.input", tokens * h * e))
    mid_needs_grad = attn_needs_grad or flow.adapted(p + "self_attention.dense")
    saved += _layer_norm(flow, "post_attention_layernorm", mid_needs_grad)
    mlp_saved, keeps_x, _ = _plain_mlp(flow, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h", mid_needs_grad)
    saved += mlp_saved
    if keeps_x:
        saved.append(SavedTensor("post_attention_layernorm.output", tokens * h * flow.e_stream))
    return saved


_LAYERS = {"llama": _llama_layer, "mistral": _llama_layer, "qwen2": _llama_layer, "gemma": _llama_layer,
           "phi": _phi_layer, "gpt2": _gpt2_layer, "bloom": _bloom_layer}


def _model_level(flow: _Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """Outside the layers: the batch, RoPE tables, embedding-side ops, the final norm, lm_head's input."""
    spec, tokens, h, s = flow.spec, flow.tokens, flow.spec.hidden_size, flow.s
    saved = [SavedTensor("batch.input_ids_and_labels", 2 * tokens * 8)]
    if rotary_dim(spec):
        # cos and sin for positions (1, s, rotary_dim), shared by every layer, in the stream dtype.
        saved.append(SavedTensor("rotary.cos_sin", 2 * s * rotary_dim(spec) * flow.e_stream))
    if spec.family == "gpt2":
        if flow.full:
            saved.append(SavedTensor("embeddings.position_ids", s * 8))  # wpe's indices
        saved += _dropout_mask(flow, "embeddings.dropout", tokens * h, spec.embedding_dropout,
                               embeddings_need_grad, flow.e_stream)
    if spec.family == "bloom":
        saved += _layer_norm(flow, "word_embeddings_layernorm", embeddings_need_grad)
    if flow.t.grad_checkpointing and rotary_dim(spec) or (flow.t.grad_checkpointing and spec.family == "gpt2"
                                                            and not flow.full):
        saved.append(SavedTensor("checkpoint.position_ids", s * 8))  # int64, kept by the checkpoint's closure
    if flow.t.grad_checkpointing and spec.family == "gpt2" and not flow.full:
        # enable_input_require_grads turns the embedding output into a graph input that stays alive.
        saved.append(SavedTensor("embeddings.output", tokens * h * flow.e_stream))
    if flow.t.grad_checkpointing and (flow.t.attention == "eager" or spec.family == "bloom"):
        # Non-reentrant checkpointing keeps each layer's arguments until its backward: the
        # materialised (b, 1, s, s) causal mask (and BLOOM's ALiBi bias), shared by all layers.
        saved.append(SavedTensor("checkpoint.attention_mask", flow.b * s * s * flow.e_stream))
        if spec.family == "bloom":
            saved.append(SavedTensor("checkpoint.alibi", flow.b * spec.num_heads * s * flow.e_stream))
    if spec.family in ("phi", "gpt2", "bloom"):
        saved += _layer_norm(flow, "final_norm", True)
    else:
        saved += _rms_norm(flow, "final_norm", True)
    own, keeps = flow.linear("lm_head", flow.e_stream, True)
    saved += own
    if keeps:
        saved.append(SavedTensor("lm_head.input", tokens * h * flow.e_stream))
    return saved


def _layer_runs(flow: _Flow, first_input_needs_grad: bool) -> tuple[tuple[int, tuple[SavedTensor, ...]], ...]:
    """Each decoder layer's saved tensors, as runs of identical layers. A layer's input needs a gradient
    when anything upstream trains: the embeddings (full), checkpointing's `enable_input_require_grads`,
    or an adapter in an earlier layer."""
    layer_fn = _LAYERS[flow.spec.family]
    built: dict[tuple[frozenset[str], bool], tuple[SavedTensor, ...]] = {}
    runs: list[list] = []
    needs_grad = first_input_needs_grad
    for adapters in flow.layer_adapters:
        key = (adapters, needs_grad)
        if key not in built:
            built[key] = tuple(layer_fn(flow.in_layer(adapters), needs_grad))
        if runs and runs[-1][1] is built[key]:
            runs[-1][0] += 1
        else:
            runs.append([1, built[key]])
        needs_grad = needs_grad or bool(adapters)
    return tuple((count, saved) for count, saved in runs)


def activation_profile(spec: ModelSpec, training: TrainingSpec) -> ActivationProfile:
    """Saved activations and transient buffers of one training step (see the module docstring)."""
    flow = _Flow(spec, training)
    tokens, vocab, e = flow.tokens, spec.vocab_size, flow.e_compute
    logits = tokens * vocab
    # Frozen embeddings (LoRA / QLoRA, no enable_input_require_grads) send no gradient into layer 0, unless
    # the embedding itself carries an adapter. Gradient checkpointing in transformers makes the inputs
    # require grad, so layer 0 is like the rest.
    embedding_adapted = any(flow.modules[p].kind == "embedding" for p in flow.outside_adapters)
    first_input_needs_grad = flow.full or training.grad_checkpointing or embedding_adapted
    runs = _layer_runs(flow, first_input_needs_grad)
    upcast = logits * FP32 if e != FP32 else 0
    return ActivationProfile(
        layer=runs[-1][1],
        first_layer=runs[0][1],
        layer_runs=runs,
        model=tuple(_model_level(flow, first_input_needs_grad)),
        # log_softmax's fp32 output (kept by nll_loss too), the shifted int64 targets, the total weight.
        loss=(SavedTensor("loss.log_softmax_fp32", logits * FP32), SavedTensor("loss.targets", tokens * 8),
              SavedTensor("loss.total_weight", FP32)),
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

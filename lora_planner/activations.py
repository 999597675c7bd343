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

Where the rules live: the op rules (norms, attention cores, MLPs, linears with or without adapters) are in
`lora_planner.families.rules`; each family's layer composes them in `lora_planner/families/<family>.py`; this
module assembles a step's profile from them (layers in runs, what lives outside the layers, the loss).

Known limitations: assumes no padding mask (SDPA takes its causal fast path), PEFT's
`lora_dropout=0`, no KV cache, no fused cross-entropy (Liger) and no sequence packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from lora_planner.families import family_rules
from lora_planner.families.base import Module
from lora_planner.families.rules import FP32, Flow, SavedTensor, norm
from lora_planner.params import adapters_by_layer, module_inventory, rotary_dim
from lora_planner.specs import ModelSpec, TrainingSpec


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


def make_flow(spec: ModelSpec, training: TrainingSpec) -> Flow:
    """The settings the family's rules read, with the adapted modules of every layer."""
    if training.method == "full":
        layer_adapters: tuple[frozenset[str], ...] = (frozenset(),) * spec.num_layers
        outside: frozenset[str] = frozenset()
    else:
        layer_adapters, outside = adapters_by_layer(spec, training.lora.target_modules,
                                                    training.lora.layers_to_transform)
    return Flow(spec, training, family_rules(spec.family), layer_adapters, outside, _modules_by_path(spec))


def _model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """Outside the layers: the batch, RoPE tables, checkpointing's arguments, the family's own tensors
    (`Family.model_level`), the final norm, lm_head's input."""
    spec, s, family = flow.spec, flow.s, flow.family
    saved = [SavedTensor("batch.input_ids_and_labels", 2 * flow.tokens * 8)]
    if rotary_dim(spec):
        # cos and sin for positions (1, s, rotary_dim), shared by every layer, in the stream dtype.
        rotary_e = FP32 if family.rotary_fp32 else flow.e_stream
        saved.append(SavedTensor("rotary.cos_sin", 2 * s * rotary_dim(spec) * rotary_e))
        if flow.t.grad_checkpointing:
            saved.append(SavedTensor("checkpoint.position_ids", s * 8))  # int64, kept by the checkpoint's closure
    if flow.t.grad_checkpointing and flow.t.attention == "eager":
        # Non-reentrant checkpointing keeps each layer's arguments until its backward: the materialised
        # (b, 1, s, s) causal mask, shared by all layers.
        saved.append(SavedTensor("checkpoint.attention_mask", flow.b * s * s * flow.e_stream))
    saved += family.model_level(flow, embeddings_need_grad)
    saved += norm(flow, "final_norm", True)
    own, keeps = flow.linear("lm_head", flow.e_stream, True)
    saved += own
    if keeps:
        saved.append(SavedTensor("lm_head.input", flow.tokens * spec.hidden_size * flow.e_stream))
    return saved


def _layer_runs(flow: Flow, first_input_needs_grad: bool) -> tuple[tuple[int, tuple[SavedTensor, ...]], ...]:
    """Each decoder layer's saved tensors, as runs of identical layers. A layer's input needs a gradient
    when anything upstream trains: the embeddings (full), checkpointing's `enable_input_require_grads`,
    or an adapter in an earlier layer."""
    layer_fn = flow.family.layer
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
    flow = make_flow(spec, training)
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

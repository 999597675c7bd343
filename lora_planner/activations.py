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
`nll_loss`, its own result), which is often the step's peak for LoRA with a 32k-256k vocabulary. torchtune's
chunked loss (`TrainingSpec.loss` "chunked", `lora_planner.loss`) keeps the same log_softmax outputs but holds
one chunk's fp32 copy and gradients at a time (source and measurements: `lora_planner.profiler.losses`).

Where the rules live: the op rules (norms, attention cores, MLPs, linears with or without adapters) are in
`lora_planner.families.rules`; each family's layer composes them in `lora_planner/families/<family>.py`; this
module assembles a step's profile from them (layers in runs, what lives outside the layers, the loss).

Padded and packed batches (`TrainingSpec.padding` / `packing`): transformers' materialised masks (SDPA's per-layer
additive mask and repeated k / v, `rules.sdpa_mask_applies`), a packed row's S^2 over the whole row, the collator's
extra batch tensors (`batch_extras`); measured on CPU steps. Liger (`TrainingSpec.liger`, `loss` "fused-linear"): its
norms' and SwiGLU's saved tensors (`rules.liger_rms_norm`, `rules.gated_mlp`) and its fused loss (`lora_planner.loss`),
modelled from its source.

Known limitations: PEFT's `lora_dropout=0`, no KV cache; a padded batch is planned with every row as long as the
longest. The loss is the model's
own `reduction="mean"` (what `model(**batch).loss` runs, and the profiler); the Trainer passes
`num_items_in_batch` to models that accept loss kwargs, which sums and divides: a few 0-d tensors more. The chunked
loss: eager only (`torch.compile` of it saves other tensors), not with LoRA on lm_head nor full fine-tuning under
autocast (refused). A layer's backward buffers are one total per layer kind, with all its saved tensors alive
(README, Known limitations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from itertools import groupby

from lora_planner.errors import PlannerInputError
from lora_planner.families import family_rules
from lora_planner.families.base import Module
from lora_planner.families.moe import (
    backward_order_counts, busiest_expert_tokens, check_routing, eager_loop_freed_bytes, eager_stack_gradient_bytes,
)
from lora_planner.families.rules import (
    FLASH, FLEX, FP32, FULL, Flow, SavedTensor, dora_backward_scratch, dora_forward_scratch, flash_backward_scratch,
    flex_backward_scratch, flex_block_mask_bytes, norm,
    rms_norm_backward,
)
from lora_planner.loss import (
    causal_lm_loss_saved, check_chunked_loss, check_linear_loss, check_litgpt_loss, chunk_targets_are_views,
    chunked_loss_moments, chunked_loss_saved, linear_loss_moments, linear_loss_saved, output_layer_calls,
    litgpt_logits_bytes, litgpt_loss_moments, litgpt_loss_saved, litgpt_retained_bytes, check_unsloth_loss,
    unsloth_loss_moments, unsloth_loss_saved,
)
from lora_planner.loss_fused import (
    cce_backward_scratch, cce_forward_scratch, cce_saved, check_cce_loss, check_fused_linear_loss, check_trl_loss,
    flce_forward_scratch, flce_saved, no_grad_pass_bytes, trl_backward_scratch, trl_forward_scratch,
    trl_held_outputs_bytes, trl_saved,
)
from lora_planner.inference import (
    check_no_grad_family, check_no_grad_forward, layer_weight_casts_bytes, no_grad_layer_peak_bytes,
)
from lora_planner.objectives import reference_pass
from lora_planner.params import adapted_layers, adapters_by_layer, module_inventory, rotary_dim, rotary_tables
from lora_planner.loss_preference import preference_batch_bytes, preference_loss_moments, preference_loss_saved
from lora_planner.specs import BYTES_PER_ELEMENT, LOGITS_OBJECTIVES, UNSLOTH_LOSSES, ModelSpec, TrainingSpec


# What only nll_loss saves (not log_softmax's backward), freed once `NllLossBackward` has run.
NLL_ONLY_SAVED = frozenset({"loss.targets", "loss.total_weight"})


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes kept for backward, split the way the phases of a step need them.

    `layer` is the last layer (the first one backward meets); `first_layer` is layer 0, which differs when
    the embeddings are frozen (LoRA / QLoRA). `layer_runs` lists every layer, as runs of identical layers
    in model order: (how many, what each saves); layers differ when LoRA adapts only some of them (a
    layer-specific target or `layers_to_transform`), since nothing upstream of the first adapted layer
    needs a gradient. `model` is what lives outside the layers (rotary tables, final norm, lm_head input,
    the batch itself); `loss` is what the loss keeps for backward (its saved tensors: what
    `saved_tensors_hooks` sees).

    Besides the saved tensors, the loss's own scalars (transformers 5.24 `loss/loss_utils.py`
    `ForCausalLMLoss` -> `fixed_cross_entropy`, `reduction="mean"`): the loss itself, a 0-d fp32 tensor the
    caller holds from the end of forward until `backward()` returns (`loss_output_bytes`, an activation to
    the tracker), and `backward()`'s seed gradient `torch.ones_like(loss)` (`torch/autograd/__init__.py`
    `_make_grads`), alive for all of backward (in `loss_backward_scratch_bytes`, and `backward_seed_bytes`
    for the phases after the loss's backward).
    """

    layer: tuple[SavedTensor, ...]
    first_layer: tuple[SavedTensor, ...]
    layer_runs: tuple[tuple[int, tuple[SavedTensor, ...]], ...]
    model: tuple[SavedTensor, ...]
    loss: tuple[SavedTensor, ...]
    num_layers: int
    checkpoint_per_layer_bytes: int
    # Transient at the forward's last op (nll_loss): logits, their fp32 copy, the padded labels, the final hidden
    # state when lm_head does not keep it, autocast's unsaved weight copies (see `activation_profile`).
    loss_forward_scratch_bytes: int
    loss_backward_scratch_bytes: int  # gradient buffers of the loss backward (and its seed), on top of `loss`
    layer_backward_scratch_bytes: int  # transient gradient buffers inside one layer's backward (the largest layer's)
    # ... and per decoder layer, where they differ (an MoE model's dense layers: `ModelSpec.dense_layers`); empty when
    # every layer's are `layer_backward_scratch_bytes`
    layer_backward_scratch_each: tuple[int, ...] = ()
    # MoE with `output_router_logits`: the gradients of every MoE layer's router logits, which the load-balancing loss's
    # backward (run first: its nodes are the newest) leaves waiting in each layer's input buffer until backward gets
    # there (`router_aux_gradient_bytes`, a (tokens, experts) tensor per MoE layer).
    router_aux_gradient_bytes: int = 0
    # What the loss still keeps when its backward peaks, where it is not `loss` less nll_loss's own saved tensors
    # (the chunked loss: the chunks its backward has not reached yet keep theirs; `loss_bytes_in_backward`)
    loss_kept_in_backward_bytes: int | None = None
    # whether the loss value exists at the forward's heaviest op (transformers' loss: nll_loss makes it; the chunked
    # loss peaks at its last chunk's nll_loss, before the final division makes it)
    loss_value_at_forward_end: bool = True
    loss_output_bytes: int = FP32  # the loss value (a 0-d fp32 tensor), alive from forward end through backward
    # what the training loop keeps from one step to the next, there at every phase (litgpt's fp32 logits list)
    resident_bytes: int = 0
    # the final norm's backward moment (`rules.rms_norm_backward`): (its saved bytes freed by then, its buffers); (0, 0)
    # where it is not modelled (it then never outweighs the loss's or the last layer's backward)
    final_norm_backward: tuple[int, int] = (0, 0)
    # the activations at the loss's forward peak less what the loss saves (litgpt: Fabric's new fp32 list, before any
    # loss op has saved anything)
    loss_forward_activations_delta: int = 0
    # (activations, temporaries) the previous step's graph holds, kept alive by litgpt's kept logits, from the optimizer
    # step until the next forward's logits replace them (`loss.litgpt_retained_bytes`; the forward's end counts them
    # in the loss's moments before that)
    retained_graph_bytes: tuple[int, int] = (0, 0)
    # LoRA or trainable tokens on lm_head (`head_moments`): its forward moment (activations beyond the layers' and the
    # model-level saved tensors, temporaries) and its backward one (gradients, activations beyond those, temporaries)
    head_adapter_moments: tuple[tuple[int, int], tuple[int, int, int]] = ((0, 0), (0, 0, 0))
    # Trainable tokens on the embeddings (`trainable_tokens_moments`): the forward's first op (activations beyond the
    # batch, temporaries) and the backward's last (activations, temporaries; the embeddings' delta gradient not yet)
    token_moments: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    backward_seed_bytes: int = FP32  # backward()'s seed gradient, ones_like(loss), alive through backward
    # DPO's reference pass (`lora_planner.objectives`), between the policy's forward and backward: (what the loss code
    # holds beside the policy's saved tensors, the no-grad pass's heaviest transient); (0, 0): no reference pass
    reference_moment: tuple[int, int] = (0, 0)
    # under checkpointing, a layer's own forward transient beyond the checkpointed inputs it runs beside (DPO; 0: not
    # planned)
    checkpointed_forward_bytes: int = 0
    # KTO's policy pass over the KL batch, no grad, before the forward (`objectives`): its heaviest moment beyond the
    # weights and the batch (0: no such pass)
    kl_moment: int = 0

    def backward_scratch_bytes(self, index: int) -> int:
        """The transient gradient buffers of decoder layer `index`'s backward."""
        return self.layer_backward_scratch_each[index] if self.layer_backward_scratch_each \
            else self.layer_backward_scratch_bytes

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

    @cached_property
    def loss_bytes_in_backward(self) -> int:
        """What the loss still keeps when its backward peaks (log_softmax's backward writes its result): the
        shifted targets and the total weight are gone, freed with `NllLossBackward`'s saved variables once it
        ran (autograd releases a node's saved tensors after its backward unless `retain_graph`)."""
        if self.loss_kept_in_backward_bytes is not None:
            return self.loss_kept_in_backward_bytes
        return self.total(tuple(i for i in self.loss if i.name not in NLL_ONLY_SAVED))


@lru_cache(maxsize=256)
def _modules_by_path(spec: ModelSpec) -> dict[str, Module]:
    return {m.path: m for m in module_inventory(spec)}


def make_flow(spec: ModelSpec, training: TrainingSpec) -> Flow:
    """The settings the family's rules read, with the adapted modules of every layer. A family transformers 5.24
    builds without SDPA (`Family.sdpa` False: Gemma 2, whose soft-capping SDPA cannot do) runs eager attention
    when SDPA was asked (`from_config` / `from_pretrained` fall back to eager by default; an explicit "sdpa" raises),
    so that is what is planned (`lora_planner.planner.plan_warnings` says so); flash_attention_2 and flex_attention are
    refused for the families whose flash path is not modelled (`Family.flash_refused`)."""
    family = family_rules(spec.family)
    if training.objective == "grpo":  # (before the padding its rows always have)
        check_no_grad_family(spec, "GRPO's generation")
    if not family.sdpa and training.attention == "sdpa":
        training = replace(training, attention="eager")
    if (training.padding or training.packing) and family.mask_refused:
        raise PlannerInputError("packing" if training.packing else "padding",
                                f"not planned for {spec.family} yet: {family.mask_refused}",
                                "plan without --padding / --packing (every row full, no mask)")
    if training.liger and family.liger not in ("", "modelled"):
        raise PlannerInputError("liger", f"not planned for {spec.family}: {family.liger}", "plan without --liger")
    if training.attention in (FLASH, FLEX) and family.flash_refused:
        raise PlannerInputError("attention", f"{training.attention} is not planned for {spec.family}: "
                                             + (family.flash_refused if training.attention == FLASH else
                                                "its attention's layouts are planned for SDPA and eager only (as for "
                                                f"flash-attn: {family.flash_refused})"), "use --attention sdpa or eager")
    if training.attention == FLEX and spec.attention_dropout > 0:
        raise PlannerInputError("attention", f"transformers' FlexAttention refuses dropout in training, and "
                                             f"{spec.name} has attention_dropout {spec.attention_dropout:g}",
                                "use --attention sdpa, or a config with attention_dropout 0")
    if training.method == "full":
        layer_adapters: tuple[frozenset[str], ...] = (frozenset(),) * spec.num_layers
        outside: frozenset[str] = frozenset()
    else:
        lora = training.lora
        layer_adapters, outside = adapters_by_layer(spec, lora.target_modules, lora.layers_to_transform,
                                                    lora.target_parameters)
    flow = Flow(spec, training, family, layer_adapters, outside, _modules_by_path(spec))
    if spec.is_moe and training.method != "full":
        flow.rank_scale = {m.path: m.lora_rank_scale for m, _ in adapted_layers(
            spec, training.lora.target_modules, training.lora.layers_to_transform, training.lora.target_parameters)
            if m.lora_rank_scale != 1}
    return flow


def _model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """Outside the layers: the batch, RoPE tables, checkpointing's arguments, the family's own tensors
    (`Family.model_level`), the final norm, lm_head's input."""
    spec, s, family = flow.spec, flow.s, flow.family
    saved = [SavedTensor("batch.input_ids_and_labels", 2 * flow.tokens * 8)]
    saved += batch_extras(flow)
    saved += embedding_lora_saved(flow)
    saved += trainable_tokens_saved(flow)
    if rotary_dim(spec):
        # cos and sin for positions (1, s, rotary_dim), shared by every layer, in the stream dtype.
        rotary_e = FP32 if family.rotary_fp32 else flow.e_stream
        width = rotary_dim(spec) // 2 if family.rotary_half_tables else rotary_dim(spec)
        saved.append(SavedTensor("rotary.cos_sin", 2 * s * width * rotary_e * rotary_tables(spec)))
        if flow.t.grad_checkpointing and not flow.t.packing:  # (packed: the batch's own position_ids)
            saved.append(SavedTensor("checkpoint.position_ids", s * 8))  # int64, kept by the checkpoint's closure
    if flow.t.grad_checkpointing and flow.t.attention == "eager":
        # Non-reentrant checkpointing keeps each layer's arguments until its backward: the materialised
        # (b, 1, s, s) causal mask, shared by all layers.
        saved.append(SavedTensor("checkpoint.attention_mask", flow.b * s * s * flow.e_stream))
    elif flow.t.grad_checkpointing and flow.masked and FULL in (set(spec.layer_types or ()) or {FULL}):
        # SDPA's (b, 1, s, s) bool mask of a padded / packed batch (flash-attn's: the (b, s) padding mask itself;
        # FlexAttention's: its BlockMask, below)
        mask = flow.b * s * s if flow.t.attention == "sdpa" else flow.b * s if flow.t.padding and \
            flow.t.attention == FLASH else 0
        if mask:
            saved.append(SavedTensor("checkpoint.attention_mask", mask))
    if flow.t.attention == FLEX:
        # the BlockMask every layer's FlexAttention saves (and checkpointing keeps as their argument): shared
        saved.append(SavedTensor("attn.block_mask", flex_block_mask_bytes(flow)))
    saved += family.model_level(flow, embeddings_need_grad)
    saved += norm(flow, "final_norm", True)
    if flow.loss in ("fused-linear", "cce", "trl") + UNSLOTH_LOSSES:  # fused losses read lm_head's weight: it never runs
        return saved
    own, keeps = flow.linear("lm_head", flow.e_stream, True)
    if flow.t.loss in ("chunked", "linear", "litgpt") and not flow.full:
        # the output layer runs once per chunk: under autocast each call casts (and keeps) its own copy of a frozen
        # weight (a trained one's cast is cached, `autocast_mode.cpp` `cached_cast`, and shared)
        own = [item._replace(nbytes=item.nbytes * output_layer_calls(flow))
               if item.name.endswith("weight_autocast_copy")
               else item for item in own]
    saved += own
    if keeps:
        saved.append(SavedTensor("lm_head.input", flow.tokens * spec.hidden_size * flow.e_stream))
    return saved


def head_moments(flow: Flow) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """LoRA on the output layer (PEFT 0.21.2 `peft/tuners/lora/layer.py` `Linear.forward`: `result = base(x)`, then
    `result = result + lora_B(lora_A(x)) * scaling`): its two moments, each on top of the layers' and the model-level
    saved tensors (the loss has saved nothing yet, or its backward has freed it all), measured on CPU
    (tests/profiler/test_runner.py).

    - Forward, at the add: ((activations, temporaries)) = (the loss value's absence: 0, the base logits, lora_B's output
      and its scaled copy: the adapter dtype, under autocast the 16-bit compute dtype).
    - Backward, when lora_B's weight gradient is written: (gradients, activations, temporaries) = (that gradient,
      V x r in the adapter dtype; the loss value; the logits' gradient and its scaled copy for the adapter branch,
      the input gradient written before it, tokens x r, and backward's seed). Under autocast the scaled copy is the
      incoming gradient itself, and the heaviest moment comes one node later: the 16-bit gradient of lora_B cast to
      fp32 beside it, once the matmul's node released what it saved (lora_B's and A x's 16-bit copies, the size of
      its two gradients beside it).

    Trainable tokens on lm_head (`trainable_tokens_saved`): backward writes the merged matrix's dense V x h gradient
    (the weight's dtype) beside the logits' gradient, then lm_head's input gradient, before `index_select` takes the
    trained rows; the merged matrix itself is saved.

    ((0, 0), (0, 0, 0)) without LoRA or trainable tokens on lm_head."""
    logits = flow.tokens * flow.spec.vocab_size
    if any(layer.module.group == "lm_head" for layer in flow.token_layers) and \
            not any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters):
        e = FP32 if flow.kbit_fp32 else BYTES_PER_ELEMENT[flow.t.dtype]
        table, hidden = flow.spec.vocab_size * flow.spec.hidden_size, flow.tokens * flow.spec.hidden_size
        if flow.amp:
            # forward: the fp32 merged matrix, still referenced, beside its saved 16-bit copy and the 16-bit logits
            # (and the final hidden state the CausalLM forward holds); backward: the copy's 16-bit gradient and its
            # fp32 cast, the hidden state's gradient, once the matmul released the copy and the input's copy
            return (0, table * e + logits * flow.e_compute + hidden * flow.e_stream), \
                (0, FP32 - (table + hidden) * flow.e_compute,
                 table * (flow.e_compute + e) + hidden * flow.e_stream + FP32)
        return (0, 0), (0, FP32, (table + hidden) * e + logits * e + FP32)
    if flow.full or not any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters):
        return (0, 0), (0, 0, 0)
    grad_b = flow.spec.vocab_size * flow.r * flow.e_adapter
    if flow.amp:
        # lora_B's matmul node has released lora_B's 16-bit copy and A x's; its outputs, those two gradients, remain
        released = (flow.spec.vocab_size + flow.tokens) * flow.r * flow.e_compute
        return (0, logits * 3 * flow.e_compute), (grad_b, FP32 - released, released + logits * flow.e_compute + FP32)
    return (0, logits * (flow.e_compute + 2 * flow.e_adapter)), \
        (grad_b, FP32, logits * (flow.e_compute + flow.e_adapter) + flow.tokens * flow.r * flow.e_adapter + FP32)


def trainable_tokens_saved(flow: Flow) -> list[SavedTensor]:
    """PEFT 0.21.2's trainable tokens (`peft/tuners/trainable_tokens/layer.py`
    `TrainableTokensLayer.get_merged_weights`: `W.index_copy(0, idx, delta.to(W))`, then `F.embedding` / `F.linear`
    on the merged matrix), per wrapped module: index_copy's int64 indices, and the delta cast to the weight's dtype
    when it differs (the fp32 rows on a 16-bit matrix). The output layer also keeps the merged V x h matrix for its input's gradient (under autocast, its 16-bit
    copy instead: `Flow.amp_weight_copies`), and its input (`Flow.trained_paths`). Measured on CPU
    (tests/profiler/test_runner.py)."""
    saved: list[SavedTensor] = []
    e = FP32 if flow.kbit_fp32 else BYTES_PER_ELEMENT[flow.t.dtype]  # the embedding matrix as stored
    h, vocab = flow.spec.hidden_size, flow.spec.vocab_size
    for layer in flow.token_layers:
        name = layer.module.path.rsplit(".", 1)[-1]
        saved.append(SavedTensor(f"{name}.trainable_tokens_index", layer.tokens * 8))
        if e != flow.e_adapter:
            saved.append(SavedTensor(f"{name}.trainable_tokens_cast", layer.tokens * h * e))
        if layer.module.group == "lm_head" and not flow.amp:
            saved.append(SavedTensor(f"{name}.merged_weight", vocab * h * e))
    return saved


def _head_moments_with_caches(flow: Flow, model: tuple[SavedTensor, ...], first_input_needs_grad: bool,
                              ) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """`head_moments` (the hf loss only), its forward moment with what autocast's cache still holds then (the
    16-bit casts `_forward_end_holds` counts at the loss)."""
    if flow.loss != "hf":
        return (0, 0), (0, 0, 0)
    (forward_acts, forward_temps), backward = head_moments(flow)
    if forward_temps and flow.amp:
        forward_temps += _forward_end_holds(flow, model, first_input_needs_grad, hidden_held=False)
    return (forward_acts, forward_temps), backward


def trainable_tokens_moments(flow: Flow) -> tuple[tuple[int, int], tuple[int, int]]:
    """Trainable tokens on the input embeddings (`trainable_tokens_saved`), what the merged V x h matrix adds at the two
    ends of the step (measured on CPU, tests/profiler/test_runner.py):

    - forward, at `F.embedding`: (the token saves, the merged matrix + the embedding output), the output an activation
      where it is kept itself (a checkpointed layer's input, or an fp32 stream a norm keeps);
    - backward, at the last op: `embedding_dense_backward` writes a dense V x h gradient (the weight's dtype) beside
      the gradient arriving at the embeddings (tokens x h), then `index_select` the n trained rows of it once that is
      freed, while index_copy's saved tensors still live: (those saves, dense + the larger of the two).

    ((0, 0), (0, 0)) without trainable tokens on the embeddings."""
    layers = [layer for layer in flow.token_layers if layer.module.group == "embeddings"]
    if not layers:
        return (0, 0), (0, 0)
    e = FP32 if flow.kbit_fp32 else BYTES_PER_ELEMENT[flow.t.dtype]
    h, vocab = flow.spec.hidden_size, flow.spec.vocab_size
    saves = sum(layer.tokens * 8 + (layer.tokens * h * e if e != flow.e_adapter else 0) for layer in layers)
    output = flow.tokens * h * flow.e_stream
    kept = flow.t.grad_checkpointing or flow.e_stream == FP32
    forward = (saves + (output if kept else 0), vocab * h * e + (0 if kept else output))
    # the gradient arriving at the embeddings lives until `embedding_dense_backward` returns; the rows' after it
    arriving = flow.tokens * h * flow.e_stream
    return forward, (saves, vocab * h * e + max(arriving, sum(layer.tokens for layer in layers) * h * e))


def embedding_lora_saved(flow: Flow) -> list[SavedTensor]:
    """LoRA on the input embeddings (PEFT 0.21.2 `peft/tuners/lora/layer.py` `Embedding.forward`): the rows of A
    gathered for the batch, `F.embedding(x, lora_embedding_A.T)` (tokens x r, the adapter dtype), feed the matmul
    with B, which keeps them (under autocast: the 16-bit copies of them and of B); the token ids are the batch itself.
    Under checkpointing, transformers' `enable_input_require_grads` hook makes the frozen base embedding's output a
    leaf that requires grad, which its AccumulateGrad node keeps beside the adapted sum `result + B A x` (cast back
    to the stream's dtype) that layer 0 receives. Measured on CPU (tests/profiler/test_runner.py)."""
    saved: list[SavedTensor] = []
    for path in sorted(flow.outside_adapters):
        m = flow.modules[path]
        if m.kind != "embedding":
            continue
        name = path.rsplit(".", 1)[-1]
        if flow.amp:
            saved += [SavedTensor(f"{name}.lora_A_output_autocast_copy", flow.tokens * flow.r * flow.e_compute),
                      SavedTensor(f"{name}.lora_B_autocast_copy", m.out_features * flow.r * flow.e_compute)]
        else:
            saved.append(SavedTensor(f"{name}.lora_A_output", flow.tokens * flow.r * flow.e_adapter))
        if flow.t.grad_checkpointing:
            saved.append(SavedTensor(f"{name}.base_output_leaf", flow.tokens * m.out_features * flow.e_stream))
    return saved


def batch_extras(flow: Flow) -> list[SavedTensor]:
    """What the collator adds to input_ids and labels: the (b, s) int64 attention mask of a padded batch; for a packed
    one TRL's `DataCollatorForLanguageModeling(padding_free=True)` (trl/trainer/sft_trainer.py): int64 position_ids,
    int32 `seq_idx` per token and the int32 cumulative lengths (`cu_seq_lens_q` / `_k`, one tensor) of its sequences,
    taken as the micro-batch's (two when it is one sequence, so that the row packs several)."""
    if flow.t.objective == "dpo":
        # `DataCollatorForPreference` always returns the int64 attention and completion masks; `_compute_loss` builds
        # the labels (counted with input_ids) from them (dpo_trainer.py l.184-206, l.1296)
        return [SavedTensor("batch.attention_mask", flow.tokens * 8), SavedTensor("batch.completion_mask",
                                                                                  flow.tokens * 8)]
    if flow.t.objective in LOGITS_OBJECTIVES:
        return [SavedTensor("batch.preference_extras", preference_batch_bytes(flow))]
    if flow.t.objective == "kto":
        # `DataCollatorForUnpairedPreference`: the attention and completion masks, the KL batch's ids and masks (taken
        # as long as the main batch's), the bool labels; `_compute_loss` builds the labels from them (kto_trainer.py
        # l.161-206, l.1370-1401)
        return [SavedTensor(f"batch.{name}", flow.tokens * 8) for name in (
            "attention_mask", "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask")] + [
            SavedTensor("batch.label", flow.b)]
    if flow.t.padding:
        return [SavedTensor("batch.attention_mask", flow.tokens * 8)]
    if flow.t.packing:
        sequences = max(flow.t.batch_size, 2)
        return [SavedTensor("batch.position_ids", flow.tokens * 8), SavedTensor("batch.seq_idx", flow.tokens * 4),
                SavedTensor("batch.cu_seq_lens", (sequences + 1) * 4)]
    return []


@lru_cache(maxsize=256)
def _layer_kinds(spec: ModelSpec) -> tuple[tuple[str | None, bool], ...]:
    """Each decoder layer's (`ModelSpec.layer_types` entry, whether it routes through experts)."""
    return tuple(zip(spec.layer_types or (None,) * spec.num_layers,
                     (spec.is_moe_layer(i) for i in range(spec.num_layers))))


def _layer_runs(flow: Flow, first_input_needs_grad: bool) -> tuple[tuple[int, tuple[SavedTensor, ...]], ...]:
    """Each decoder layer's saved tensors, as runs of identical layers. A layer's input needs a gradient
    when anything upstream trains: the embeddings (full), checkpointing's `enable_input_require_grads`,
    or an adapter in an earlier layer. Layers of different `ModelSpec.layer_types` (sliding-window or full
    attention) are built apart (`Flow.layer_type`); equal results share one tuple, so runs still merge.
    Consecutive layers alike (adapters, kind) are taken together: within such a group only the first layer's input
    can lack a gradient (its adapters give every later one's)."""
    layer_fn = flow.family.layer
    built: dict[tuple[frozenset[str], bool, str | None, bool], tuple[SavedTensor, ...]] = {}
    runs: list[list] = []

    def add(count: int, adapters: frozenset[str], needs_grad: bool, layer_type: str | None, moe_layer: bool) -> None:
        key = (adapters, needs_grad, layer_type, moe_layer)
        saved = built.get(key)
        if saved is None:
            layer_flow = flow.in_layer(adapters)
            layer_flow.layer_type, layer_flow.moe_layer = layer_type, moe_layer
            saved = tuple(layer_fn(layer_flow, needs_grad))
            saved = built[key] = next((other for other in built.values() if other == saved), saved)
        if runs and runs[-1][1] is saved:
            runs[-1][0] += count
        else:
            runs.append([count, saved])

    needs_grad = first_input_needs_grad
    for (adapters, (layer_type, moe_layer)), group in groupby(zip(flow.layer_adapters, _layer_kinds(flow.spec))):
        count = sum(1 for _ in group)
        if adapters and not needs_grad:
            add(1, adapters, False, layer_type, moe_layer)
            needs_grad, count = True, count - 1
        if count:
            add(count, adapters, needs_grad, layer_type, moe_layer)
    return tuple((count, saved) for count, saved in runs)


def _forward_end_holds(flow: Flow, model: tuple[SavedTensor, ...], first_input_needs_grad: bool,
                       hidden_held: bool = True) -> int:
    """What the forward still holds at its last op (nll_loss) that backward does not keep.

    - The final hidden state (lm_head's input), when lm_head does not save it (LoRA, or under autocast, where
      lm_head saves its 16-bit copy): `LlamaForCausalLM.forward` (and every transformers 5.24 `*ForCausalLM`)
      holds it in the local `hidden_states` (and `outputs`) while `self.loss_function` runs.
    - Under autocast, the cached 16-bit copies of trainable weights that autograd does not save: autocast
      caches the cast of every leaf that requires grad (`aten/src/ATen/autocast_mode.cpp` `cached_cast`) until
      the outermost autocast region exits, after the loss (`torch.autocast.__exit__` ->
      `torch.clear_autocast_cache`). Backward keeps a weight's copy only when the matmul's input needs a
      gradient (`Flow.amp_weight_copies`); in a checkpointed layer (non-reentrant) it keeps none. So: LoRA's
      lora_A where x needs no gradient (the layers before the first adapter's output, without checkpointing),
      every adapter's A and B in checkpointed layers; every linear's bias under full fine-tuning, and LoRA's
      trained biases (`bias`; addmm's bias needs no saving), and under checkpointing every layer linear's weight
      too.
    Adapters outside the layers (lm_head, the embeddings) are not counted: lm_head's input needs a gradient and
    is not checkpointed, and embeddings run no autocast op.
    """
    spec = flow.spec
    held = 0 if not hidden_held or any(i.name == "lm_head.input" for i in model) \
        else flow.tokens * spec.hidden_size * flow.e_stream
    if not flow.amp:
        return held
    e, checkpointed = flow.e_compute, flow.t.grad_checkpointing
    if flow.full:
        for m in flow.modules.values():
            if m.kind != "linear":
                continue
            in_layers = m.path.startswith(flow.family.layer_prefix)
            weight = m.in_features * m.out_features if checkpointed and in_layers and not m.tied else 0
            held += (weight + (m.out_features if m.bias else 0)) * e * m.count
        return held
    held += flow.linear_bias_numel * e
    if checkpointed and flow.family.linear_reads_layer_input:
        # checkpointing's `enable_input_require_grads` makes layer 0's input a leaf that requires grad; a layer whose
        # projections read its input directly (no pre-norm: OLMo 2) has autocast cast that leaf, and cache the 16-bit
        # copy until the region exits (measured on CPU)
        held += flow.tokens * spec.hidden_size * e
    needs_grad = first_input_needs_grad or flow.norm_bias_trains
    for adapters, layer_type in zip(flow.layer_adapters, spec.layer_types or (None,) * spec.num_layers):
        if checkpointed:
            held += sum(flow.r * (flow.modules[p].in_features + flow.modules[p].out_features) for p in adapters) * e
        elif adapters and not needs_grad:
            layer_flow = flow.in_layer(adapters)
            layer_flow.layer_type, layer_flow.input_grads = layer_type, {}
            flow.family.layer(layer_flow, False)
            held += sum(flow.r * flow.modules[p].in_features for p in adapters
                        if not layer_flow.input_grads.get(p, True)) * e
        needs_grad = needs_grad or bool(adapters)
    return held


def int8_checkpoint_held_bytes(flow: Flow) -> int:
    """Under checkpointing (non-reentrant), what each layer's LLM.int8 matmuls keep from its forward to its backward:
    their inputs are context attributes (`ctx.A`), which checkpointing's saved-tensor hooks never see, so every
    distinct input of the layer's 8-bit linears (the attention's and the MLP's inputs, o_proj's and down_proj's) stays
    beside the layer's checkpointed input (the same tensor where a projection reads that input: OLMo 2). Every layer
    holds the same: checkpointing makes every layer's input need a gradient. Reentrant checkpointing runs the forward
    without a graph: nothing held. Measured on CPU (MatMul8bitFp; the CUDA `MatMul8bitLt` keeps its input the same
    way, `ctx.tensors`)."""
    if not (flow.int8 and flow.t.grad_checkpointing) or flow.t.use_reentrant:  # reentrant: the forward has no graph
        return 0
    layer_flow = flow.in_layer(flow.layer_adapters[0])
    layer_flow.layer_type = (flow.spec.layer_types or (None,))[0]
    layer_flow.int8_inputs = {}
    flow.family.layer(layer_flow, True)
    return sum(size for key, size in layer_flow.int8_inputs.items() if key != "layer_input")


def activation_profile(spec: ModelSpec, training: TrainingSpec) -> ActivationProfile:
    """Saved activations and transient buffers of one training step (see the module docstring)."""
    flow = make_flow(spec, training)
    if training.lora.use_dora and not flow.full:
        check_dora(flow)
    if flow.int8 and spec.is_moe:
        raise PlannerInputError("quant", "an 8-bit base of an MoE model is not modelled yet (bitsandbytes quantizes "
                                         "the router and attention linears, not the experts' parameter stacks)",
                                "plan the MoE model with --method lora or qlora")
    if spec.is_moe and not isinstance(training.routing, str):
        check_routing(spec, training.routing)
    tokens, vocab, e = flow.tokens, spec.vocab_size, flow.e_compute
    logits = tokens * vocab
    # Frozen embeddings (LoRA / QLoRA, no enable_input_require_grads) send no gradient into layer 0, unless
    # the embedding itself carries an adapter. Gradient checkpointing in transformers makes the inputs
    # require grad, so layer 0 is like the rest.
    embedding_adapted = any(flow.modules[p].kind == "embedding" for p in flow.outside_adapters | flow.trained_paths)
    first_input_needs_grad = flow.full or training.grad_checkpointing or embedding_adapted
    # LoRA's bias="all" trains every LayerNorm's bias: the layers' first op (LayerNorm families) then gives layer 0 the
    # graph an input gradient would (`rules.layer_norm`), and BLOOM's embedding LayerNorm its input gradient itself
    runs = _layer_runs(flow, first_input_needs_grad or flow.norm_bias_trains)
    scratch_each = _layer_backward_scratch_each(flow, runs)
    dora_forward, dora_backward, dora_recompute = _dora_moments(flow) if training.lora.use_dora and \
        not flow.full else (0, 0, 0)
    if dora_backward or dora_forward:
        # a DoRA linear's own backward, and under checkpointing its forward transient again in the recompute (the
        # scratch comes on top of the whole recomputed layer; the transient, inside the recompute, on top of less)
        scratch_each = tuple(max(each, dora_backward, dora_recompute if training.grad_checkpointing else 0)
                             for each in scratch_each)
    upcast = logits * FP32 if e != FP32 else 0
    # Final logit soft-capping (Gemma 2: `Gemma2ForCausalLM.forward`, logits / cap, tanh, * cap): the scalar ops save
    # nothing; tanh keeps its output (the logits' dtype) for backward.
    softcap = (SavedTensor("loss.logit_softcap_tanh", logits * e),) if spec.final_logit_softcapping is not None else ()
    # The padded labels (see `causal_lm_loss_saved`) are a separate b x (s+1) tensor only when b > 1.
    padded_labels = flow.b * (flow.s + 1) * 8 if flow.b > 1 else 0
    resident = 0  # what the loss keeps from one step to the next (litgpt's logits)
    forward_activations = 0  # the activations at the loss's forward peak less what it saves (litgpt's conversion)
    retained = (0, 0)  # what a kept graph holds from the optimizer step to the next forward's end (litgpt)
    model = tuple(_model_level(flow, first_input_needs_grad))
    if training.loss == "chunked":
        check_chunked_loss(spec)
        if any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters):
            raise PlannerInputError(
                "loss", "the chunked loss with LoRA on lm_head is not modelled yet (its adapters' gradients are "
                        "summed over the chunks)", "use --loss hf, or leave lm_head out of the targets")
        if flow.full and flow.amp:
            raise PlannerInputError(
                "loss", "full fine-tuning under autocast with the chunked loss is not modelled yet (the chunks' "
                        "gradients of lm_head's cached 16-bit weight are summed before one cast back)",
                "use --loss hf, or bf16 weights without --amp")
        # full fine-tuning: each chunk writes a gradient of the output layer's weight
        head = sum(m.weight_numel_each for m in flow.modules.values() if m.group == "lm_head") if flow.full else 0
        loss_saved = chunked_loss_saved(flow)
        chunk_forward, chunk_backward, loss_kept = chunked_loss_moments(
            flow, head * BYTES_PER_ELEMENT[training.dtype])
        # the shifted labels, held (not saved) when the chunks' targets are copies of them; the final hidden state
        # went with the model's forward
        loss_forward = chunk_forward + (0 if chunk_targets_are_views(flow) else flow.tokens * 8) \
            + _forward_end_holds(flow, model, first_input_needs_grad, hidden_held=False)
        loss_backward = FP32 + chunk_backward
    elif training.loss == "linear":
        check_linear_loss(flow)
        loss_saved = linear_loss_saved(flow)
        forward, backward, loss_kept = linear_loss_moments(flow)
        # the final hidden state, held by the recipe while the loss runs
        loss_forward = forward + _forward_end_holds(flow, model, first_input_needs_grad)
        loss_backward = FP32 + backward  # backward's seed
    elif training.loss == "litgpt":
        check_litgpt_loss(flow)
        loss_saved = litgpt_loss_saved(flow)
        forward_activations, loss_forward, backward, loss_kept = litgpt_loss_moments(flow)
        loss_backward = FP32 + backward  # backward's seed
        resident = litgpt_logits_bytes(flow)
        retained = litgpt_retained_bytes(flow)
    elif training.loss in UNSLOTH_LOSSES:
        check_unsloth_loss(flow)
        loss_saved = unsloth_loss_saved(flow)
        loss_kept = None
        forward, loss_backward = unsloth_loss_moments(flow)
        # the final hidden state, held by the patched forward while the loss runs
        loss_forward = forward + _forward_end_holds(flow, model, first_input_needs_grad)
    elif flow.loss == "fused-linear":
        check_fused_linear_loss(flow)
        head = spec.vocab_size * spec.hidden_size * BYTES_PER_ELEMENT[training.dtype] if flow.full else 0
        loss_saved = flce_saved(flow, head)
        loss_kept = None
        # the final hidden state, held by the CausalLM forward while the loss runs (`_forward_end_holds`)
        loss_forward = flce_forward_scratch(flow, head) + _forward_end_holds(flow, model, first_input_needs_grad)
        loss_backward = 2 * FP32  # backward's seed and the division's gradient; the kernel scales in place
    elif flow.loss == "cce":
        check_cce_loss(flow)
        loss_saved = cce_saved(flow)
        loss_kept = None
        # the final hidden state is saved by the loss itself (in loss_saved), not merely held
        loss_forward = cce_forward_scratch(flow) + _forward_end_holds(flow, model, first_input_needs_grad,
                                                                       hidden_held=False)
        loss_backward = 2 * FP32 + cce_backward_scratch(flow)  # backward's seed and the division's gradient
    elif flow.loss == "trl":
        check_trl_loss(flow)
        loss_saved = trl_saved(flow)
        loss_kept = None
        # the backbone's output, held by the patched forward while the head runs (`_forward_end_holds`)
        loss_forward = trl_forward_scratch(flow) + _forward_end_holds(flow, model, first_input_needs_grad)
        loss_backward = 2 * FP32 + trl_backward_scratch(flow)  # backward's seed and the division's gradient
    elif training.objective in LOGITS_OBJECTIVES:
        # ORPO / CPO (`lora_planner.loss_preference`): the pair's whole logits through TRL's own loss code
        loss_saved = softcap + preference_loss_saved(flow)
        # (after the output layer, the model's forward and Accelerate's autocast region, with its cache of weight
        # casts, return: what they hold counts at the output layer only)
        loss_forward, loss_kept, loss_backward = preference_loss_moments(
            flow, _forward_end_holds(flow, model, first_input_needs_grad))
        loss_backward += FP32  # backward's seed
    else:
        loss_saved = causal_lm_loss_saved(flow) + softcap
        loss_kept = None
        loss_forward = logits * e + upcast + padded_labels + _forward_end_holds(flow, model, first_input_needs_grad)
        loss_backward = FP32 + 2 * logits * FP32
    if dora_forward:
        # DoRA's weight-norm transient in the last layer's forward, before the loss, its saved tensors and the
        # head's exist (the layer's own saved tensors counted whole: an upper bound)
        head = sum(t.nbytes for t in model if t.name.startswith(("final_norm.", "lm_head.")))
        loss_forward = max(loss_forward, dora_forward - sum(t.nbytes for t in loss_saved) - head
                           - (FP32 if flow.loss == "hf" else 0))
    reference = (0, 0)
    if reference_pass(training) != "none":
        # DPO's reference pass (`lora_planner.objectives`): the outputs the policy's forward returned, held by
        # `_compute_loss`, and the no-grad pass's heaviest moment: in the layers, or in the fused head
        check_no_grad_forward(flow, "DPO's reference pass")
        # full fine-tuning's reference copy: its parameters require grad (TRL leaves them so), so under autocast its
        # forward caches every layer weight's cast until the pass ends
        copy = reference_pass(training) == "model-copy"
        casts = layer_weight_casts_bytes(flow) if copy else 0
        reference = (trl_held_outputs_bytes(flow),
                     casts + no_grad_pass_bytes(flow, copy, ("log_probs",) if copy else None))
    kl = 0
    if training.objective == "kto":
        # the KL batch (as long as the main one) through the policy under no_grad: its labels, then the layers' moment
        # (with the padded batch's bool mask; a trained model's autocast casts cached) or the fused head's
        check_no_grad_forward(flow, "KTO's KL pass")
        mask = flow.b * flow.s * flow.s if flow.masked else 0
        casts = layer_weight_casts_bytes(flow) if flow.full else 0
        kl = tokens * 8 + casts + no_grad_pass_bytes(flow, flow.full, mask_bytes=mask)
    checkpointed_forward = 0
    if training.objective in ("dpo", "kto") and training.grad_checkpointing and \
            not any(flow.modules[p].group == "mlp" for a in flow.layer_adapters for p in a):
        # A checkpointed layer's forward keeps nothing but its input, so its heaviest moment is the no-grad one
        # (`lora_planner.inference`), beside every earlier layer's checkpointed input; with TRL's fused head (no
        # logits) it can outweigh the loss's moment. (Planned for DPO, measured there; adapters on the MLP add to it,
        # not modelled yet.) The stream tensors and RoPE tables it counts are taken out of what is saved already.
        check_no_grad_forward(flow, "DPO's checkpointed forward")
        rope = sum(i.nbytes for i in model if i.name in ("rotary.cos_sin", "checkpoint.position_ids"))
        # (full fine-tuning under autocast: the layers' weight casts are cached as they run, every layer's by the last)
        checkpointed_forward = no_grad_layer_peak_bytes(flow, flow.full) - rope \
            - min(2, spec.num_layers) * tokens * spec.hidden_size * flow.e_stream \
            + (layer_weight_casts_bytes(flow) if flow.full else 0)
    router_aux = 0
    if spec.is_moe and spec.output_router_logits and spec.family not in ("deepseek_v2", "deepseek_v3"):
        # `load_balancing_loss_func` (models/mixtral/modeling_mixtral.py and its copies): a softmax of each MoE layer's
        # router logits (their dtype), then sums; what it keeps is dropped when its backward runs, first in backward
        moe_layers = sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))
        router_aux = moe_layers * tokens * spec.num_experts * e
    return ActivationProfile(
        layer=runs[-1][1],
        first_layer=runs[0][1],
        layer_runs=runs,
        model=model,
        loss=loss_saved,
        num_layers=spec.num_layers,
        # a checkpointed layer's input, and what LLM.int8's matmuls keep beside it (`int8_checkpoint_held_bytes`)
        checkpoint_per_layer_bytes=tokens * spec.hidden_size * flow.e_stream + int8_checkpoint_held_bytes(flow),
        # At nll_loss (the forward's last op): the logits + their fp32 copy, the padded labels, and what the
        # CausalLM forward and the autocast region still hold (`_forward_end_holds`).
        # (With `output_router_logits` the model's output also holds every MoE layer's router logits through the loss.)
        loss_forward_scratch_bytes=loss_forward + router_aux,
        # The seed ones_like(loss), then nll_loss's gradient and log_softmax's input gradient (both fp32) beside
        # the saved output (the chunked loss: one chunk's).
        loss_backward_scratch_bytes=loss_backward + router_aux,
        router_aux_gradient_bytes=router_aux,
        resident_bytes=resident,
        loss_forward_activations_delta=forward_activations,
        retained_graph_bytes=retained,
        loss_kept_in_backward_bytes=loss_kept,
        reference_moment=reference,
        checkpointed_forward_bytes=checkpointed_forward,
        kl_moment=kl,
        head_adapter_moments=_head_moments_with_caches(flow, model, first_input_needs_grad),
        token_moments=trainable_tokens_moments(flow),
        loss_value_at_forward_end=flow.loss in ("hf",) + UNSLOTH_LOSSES and training.objective not in LOGITS_OBJECTIVES,  # (Unsloth's: the accumulator, made first)
        final_norm_backward=rms_norm_backward(flow, model),
        # Inside a layer's backward: the incoming gradient, gradients of the MLP's intermediates and of
        # the layer input, the largest of which are B x S x intermediate.
        layer_backward_scratch_bytes=max(scratch_each),
        layer_backward_scratch_each=scratch_each if len(set(scratch_each)) > 1 else (),
    )


def _dora_moments(flow: Flow) -> tuple[int, int, int]:
    """(forward, backward, recompute) transients of the heaviest DoRA linear (`rules.dora_forward_scratch`,
    `rules.dora_backward_scratch`), over every distinct set of adapted modules; the backward one beside the layer's
    incoming and input gradients and the module's incoming gradient; the recompute one (checkpointing) the forward
    transient less the identity graph the layer's recomputed tensors already count (`rules.Flow.linear`), on top of
    the whole recomputed layer (an upper bound)."""
    forward = backward = recompute = 0
    stream_grads = 2 * flow.tokens * flow.spec.hidden_size * flow.e_compute
    for adapters in dict.fromkeys(flow.layer_adapters):
        if not adapters:
            continue
        layer_flow = flow.in_layer(adapters)
        layer_flow.dora_modules = []
        flow.family.layer(layer_flow, True)  # a layer whose input needs a gradient: the heavier case
        for i, o, x_e, x_grad in layer_flow.dora_modules:
            forward = max(forward, dora_forward_scratch(flow, i, o, x_e, x_grad))
            recompute = max(recompute, dora_forward_scratch(flow, i, o, x_e, x_grad)
                            - (i + flow.r) * i * flow.e_adapter)
            backward = max(backward, stream_grads + flow.tokens * o * x_e + dora_backward_scratch(flow, o, x_e))
    return forward, backward, recompute


def check_dora(flow: Flow) -> None:
    """What DoRA is not planned with yet, refused with the reason."""
    lora = flow.t.lora
    why = ("an 8-bit base (DoRA dequantizes the int8 weight in every forward)" if flow.int8 else
           "autocast (its weight-norm transients in 16-bit)" if flow.amp else
           "MoE expert parameters" if lora.target_parameters or any(
               flow.modules[p].kind == "experts" for a in flow.layer_adapters for p in a) else
           "embeddings or lm_head" if any(flow.modules[p].kind != "linear" or flow.modules[p].group == "lm_head"
                                          for p in flow.outside_adapters) else None)
    if why:
        raise PlannerInputError("use_dora", f"DoRA with {why} is not modelled yet", "plan without --dora")


def _layer_backward_scratch_each(flow: Flow, runs: tuple[tuple[int, tuple[SavedTensor, ...]], ...]) -> tuple[int, ...]:
    """`_layer_backward_scratch` of every decoder layer: dense and MoE layers differ, and under the eager experts loop
    with trained stacks each MoE layer's routing decides what its backward has freed at its heaviest moment."""
    spec = flow.spec
    eager = spec.is_moe and flow.t.experts_implementation == "eager"
    if not eager:  # a layer's scratch depends on its kind only
        kinds = [moe_layer for _, moe_layer in _layer_kinds(spec)]
        by_kind = {moe_layer: _layer_backward_scratch(flow, moe_layer) for moe_layer in set(kinds)}
        return tuple(by_kind[moe_layer] for moe_layer in kinds)
    saved_each = [saved for count, saved in runs for _ in range(count)]
    cache: dict[tuple[bool, tuple[int, int] | None, tuple[SavedTensor, ...] | None], int] = {}
    each, moe_index = [], 0
    for i in range(spec.num_layers):
        moe_layer = spec.is_moe_layer(i)
        order = backward_order_counts(spec, flow.tokens, flow.t.routing, moe_index) if moe_layer and eager else None
        key = (moe_layer, order, saved_each[i] if order else None)
        if key not in cache:
            freed = eager_loop_freed_bytes(saved_each[i], flow.tokens * spec.num_experts_per_tok, *order) \
                if order else 0
            cache[key] = _layer_backward_scratch(flow, moe_layer, freed)
        each.append(cache[key])
        moe_index += moe_layer
    return tuple(each)


def _layer_backward_scratch(flow: Flow, moe_layer: bool, eager_freed: int = 0) -> int:
    """Transient gradient buffers inside one layer's backward: the incoming gradient and the layer input's, and the
    MLP intermediates' gradients (3 x tokens x intermediate). An MoE layer's intermediates are per routed pair
    (tokens x k rows of the experts' width) under grouped_mm; the eager loop runs one expert at a time, so only the
    busiest expert's rows (`TrainingSpec.routing`, `moe.busiest_expert_tokens`) are live at once, beside the
    (tokens, hidden) gradients it accumulates into. `moe_layer`: the layer routes through experts (an MoE model's
    dense layers, `ModelSpec.dense_layers`, have a dense MLP's). With trained stacks under the eager loop its
    heaviest moment is the second expert's stack gradient (`moe.eager_stack_gradient_bytes`), when the loop has
    already freed `eager_freed` bytes of the layer's saved tensors (`moe.eager_loop_freed_bytes`). Under flash-attn
    the attention's backward (`rules.flash_backward_scratch`) is the heavier moment when its buffers outweigh those.
    """
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    attention = flash_backward_scratch(flow) if flow.t.attention == FLASH else \
        flex_backward_scratch(flow) if flow.t.attention == FLEX else 0
    if not moe_layer:
        # Liger's SwiGLU / GEGLU backward writes the gate's and up's gradients into their saved outputs: only the
        # incoming gradient of the product is new (Liger-Kernel ops/swiglu.py `swiglu_backward`)
        intermediates = 1 if flow.liger else 3
        return max((2 * spec.hidden_size + intermediates * spec.intermediate_size) * tokens * e, attention)
    width, h = spec.moe_intermediate_size, spec.hidden_size
    if flow.t.experts_implementation == "grouped_mm":
        rows, extra = tokens * spec.num_experts_per_tok, 0
    else:
        rows, extra = busiest_expert_tokens(spec, tokens, flow.t.routing), 2 * h
    moe = (2 * h * tokens + (3 * width + extra) * rows) * flow.e_expert
    prefix = family_rules(spec.family).layer_prefix + "mlp.experts."
    down = prefix + "down_proj"
    if flow.t.experts_implementation == "eager":
        stacks = [prefix + "gate_up_proj", down]
        stacks_bytes = eager_stack_gradient_bytes(flow, stacks if flow.full else
                                                  [p for p in stacks if p in flow.layer_adapters[-1]])
        if stacks_bytes:
            moe = max(moe, 2 * h * tokens * flow.e_expert + stacks_bytes - eager_freed)
    elif down in flow.layer_adapters[-1]:
        # LoRA on down_proj (PEFT's ParamWrapper): its grouped_mm's backward writes the folded weight's gradient, a
        # whole (E, H, I) stack, while the layer's saved tensors are still alive (measured; the gate_up stack's comes
        # after down's folded weight and inputs are freed)
        moe += spec.num_experts * h * width * flow.e_expert
    return max(moe, attention)

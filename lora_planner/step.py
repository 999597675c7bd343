"""One GPU's training step, as byte counts: weights as stored, trainable tensors, optimizer state,
activations, and the phases of the step they are assembled into (pure).

`lora_planner.memory` turns these into the answer (`estimate_memory`: the peak, its phase, the device
overhead); `lora_planner.parallel` reuses the same components per rank for several GPUs. The phase table,
the sources of every term and the known limitations are in `lora_planner.memory`'s docstring.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from math import ceil
from typing import Literal, get_args

from lora_planner.activation_offload import (
    flow_packs, inputs_held_in_backward, inputs_kept_at_forward_end, resident_gpu_bytes,
)
from lora_planner.activations import ActivationProfile, activation_profile, make_flow
from lora_planner.errors import PlannerInputError
from lora_planner.objectives import reference_pass
from lora_planner.optimizers import TensorGroup, optimizer_scratch_bytes, optimizer_state_bytes
from lora_planner.params import (
    Module, adapted_layers, bias_numel, buffer_bytes, check_sequence_length, is_per_layer, lora_params,
    module_inventory, modules_to_save, trainable_token_layers, trained_biases,
)
from lora_planner.specs import BYTES_PER_ELEMENT, LoraSpec, ModelSpec, TrainingSpec

Phase = Literal["generation", "scoring", "kl_forward", "forward_start", "forward_end", "reference_forward",
                "backward_start", "backward_layers", "backward_end", "optimizer_step"]
PHASES: tuple[str, ...] = get_args(Phase)
PHASE_TITLES: dict[str, str] = {
    "generation": "generation", "scoring": "scoring passes", "kl_forward": "KL pass",
    "forward_start": "forward (gather)", "forward_end": "forward end", "reference_forward": "reference forward",
    "backward_start": "backward start", "backward_layers": "backward (layers)", "backward_end": "backward end",
    "optimizer_step": "optimizer step"}
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "temporaries")
MIB = 2**20
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class MemoryBreakdown:
    """Live bytes by PyTorch's memory categories."""

    weights_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_states_bytes: int = 0
    activations_bytes: int = 0
    temporaries_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_states_bytes
                + self.activations_bytes + self.temporaries_bytes)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, f"{name}_bytes") for name in CATEGORIES}


@dataclass(frozen=True)
class PhaseMemory:
    phase: Phase
    breakdown: MemoryBreakdown


# Each quantized tensor's QuantState also owns its own small tensors (bitsandbytes 0.50.2
# `functional.quantize_4bit` with compress_statistics=True, measured on a loaded model): the NF4 code
# book (16 fp32), the absmax offset (one fp32) and the nested state's dynamic 8-bit map (256 fp32).
NF4_STATE_CONSTANT_BYTES = 16 * 4 + 4 + 256 * 4


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """One NF4 (or FP4: the same bytes) tensor. With double quantization (QLoRA Sec. 3; bitsandbytes 0.50.2
    `functional.quantize_4bit`, `compress_statistics=True`): packed 4-bit values, one uint8 constant per 64 values,
    one fp32 constant per 256 of those, and the quantization state's own constants (1,092 bytes). Without
    (`bnb_4bit_use_double_quant=False`): the packed values, one fp32 absmax per 64 values and the 16-entry fp32 code
    book. `bnb_4bit_quant_storage` reinterprets the same packed bytes. Measured on loaded models (CPU backend)."""
    blocks = ceil(numel / NF4_BLOCK)
    if not double_quant:
        return ceil(numel / 2) + 4 * blocks + 16 * 4
    return ceil(numel / 2) + blocks + 4 * ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) + NF4_STATE_CONSTANT_BYTES


def _base_weight_bytes(spec: ModelSpec, training: TrainingSpec) -> int:
    """Frozen or trainable base weights as stored: --dtype (fp32 under AMP), NF4 linears under QLoRA."""
    return _stored_weight_bytes(spec, _quant(_storage_method(training)), training.dtype, _kbit_fp32(training),
                                training.matmul_4bit_dtype,
                                training.double_quant)


def _kbit_fp32(training: TrainingSpec) -> bool:
    """Whether PEFT's `prepare_model_for_kbit_training` runs (a quantized base, `kbit_prep`): it casts every 16-bit
    parameter that is not a bitsandbytes `Params4bit` to fp32 (peft 0.21.2, `peft/utils/other.py`): the
    embeddings, norms, lm_head and the biases of the quantized linears (a 4-bit one's first forward casts its bias
    back to the compute dtype, `_stored_bytes_each`; LLM.int8's `Int8Params` are int8, untouched). Buffers (RoPE's
    inv_freq) stay."""
    return training.quantized and training.kbit_prep and training.dtype != "fp32"


def _quant(method: str) -> str:
    """How the base linears of a `_storage_method` are stored: "nf4" (QLoRA's NF4 / FP4), "int8" (LLM.int8,
    `load_in_8bit`), "" (at the dtype)."""
    return {"qlora": "nf4", "int8": "int8"}.get(method, "")


def _storage_method(training: TrainingSpec) -> str:
    """The method as the cached storage functions key it: "int8" for LoRA on an 8-bit base."""
    return "int8" if training.load_in_8bit else training.method


def int8_bytes(m: Module) -> int:
    """One LLM.int8 linear's weight (bitsandbytes 0.50.2 `nn/modules.py` `Int8Params._quantize`, measured on a loaded
    model): the int8 values (`CB`, the weight's own storage) and an fp32 absmax per output row (`SCB`)."""
    return m.weight_numel_each + 4 * m.out_features


def _stored_bytes_each(m: Module, quant: str, dtype: str, kbit_fp32: bool, double_quant: bool = True,
                       matmul_dtype: str | None = None) -> int:
    """One instance of module `m` as stored: NF4 (`quant` "nf4") or int8 ("int8") weight (+ bias) for the quantized
    base's linears, else at `dtype`; after kbit preparation everything else is fp32. A 4-bit linear's bias is back
    at `dtype` (the compute dtype QLoRA loads with) from the first forward on, kbit preparation or not:
    bitsandbytes 0.50 `nn/modules.py` `Linear4bit.forward` casts x to the compute dtype and then the bias for good
    (`bias.data = bias.data.to(x.dtype)`: `matmul_dtype`, `bnb_4bit_compute_dtype` when set); an 8-bit linear's
    follows its input (`Linear8bitLt.forward`: the stream's dtype, fp32 after kbit preparation)."""
    e = 4 if kbit_fp32 or m.fp32 else BYTES_PER_ELEMENT[dtype]
    if quant and m.kind == "linear" and m.group != "lm_head":
        if quant == "int8":
            return int8_bytes(m) + (m.out_features * e if m.bias else 0)
        return nf4_bytes(m.weight_numel_each, double_quant) + (
            m.out_features * BYTES_PER_ELEMENT[matmul_dtype or dtype] if m.bias else 0)
    return m.params_each * e


@lru_cache(maxsize=1024)
def _stored_weight_bytes(spec: ModelSpec, quant: str, dtype: str, kbit_fp32: bool = False,
                         matmul_dtype: str | None = None, double_quant: bool = True) -> int:
    return sum(_stored_bytes_each(m, quant, dtype, kbit_fp32, double_quant, matmul_dtype) * m.count
               for m in module_inventory(spec))


@lru_cache(maxsize=4096)  # grids vary batch and sequence far more often than these inputs
def saved_module_bytes(m: Module, dtype: str, kbit_fp32: bool) -> int:
    """One `modules_to_save` copy (`ModulesToSaveWrapper`: a deep copy of the module, in the original's dtype: PEFT's
    adapter upcast skips it; measured): weight (a tied output layer's too: the copy unties it) and bias."""
    e = 4 if kbit_fp32 or m.fp32 else BYTES_PER_ELEMENT[dtype]
    return (m.weight_numel_each + (m.out_features if m.bias else 0)) * e


@lru_cache(maxsize=4096)  # (a tuple of frozen groups: the optimizer's cached state sizes key on it)
def _trainable_groups(spec: ModelSpec, method: str, dtype: str, lora: LoraSpec,
                      kbit_fp32: bool = False) -> tuple[TensorGroup, ...]:
    """Every trainable tensor, grouped by shape: all weights and biases (full), or LoRA's A and B (+ DoRA's
    magnitudes, + the `modules_to_save` copies)."""
    groups: list[TensorGroup] = []
    if method == "full":
        e = BYTES_PER_ELEMENT[dtype]
        for m in module_inventory(spec):
            if m.tied:
                continue
            if m.kind == "norm":
                groups.append(TensorGroup((m.out_features,), m.count * (2 if m.bias else 1), e))
                continue
            shape = (m.in_features, m.out_features) if m.kind == "embedding" else (m.out_features, m.in_features)
            if m.kind == "experts":  # transformers' (E, out, in) stacks
                shape = (m.experts, m.out_features, m.in_features)
            groups.append(TensorGroup(shape, m.count, 4 if m.fp32 else e, embedding=m.kind == "embedding"))
            if m.bias:
                groups.append(TensorGroup((m.experts, m.out_features) if m.experts > 1 else (m.out_features,),
                                          m.count, e))
        return tuple(groups)
    e = 4 if lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[dtype]
    for m in lora_params(spec, lora.r, lora.target_modules, lora.layers_to_transform,
                         lora.target_parameters).target_modules:
        rank = lora.r * m.lora_rank_scale * m.experts  # PEFT's ParamWrapper: lora_A (r E, in), lora_B (out, r E)
        groups.append(TensorGroup((rank, m.in_features), m.count, e))
        groups.append(TensorGroup((m.out_features, rank), m.count, e))
        if lora.use_dora:  # DoRA's magnitude (`lora_magnitude_vector`), cast with the adapters
            groups.append(TensorGroup((m.out_features,), m.count, e))
    for m in modules_to_save(spec, lora.modules_to_save):
        copy_e = 4 if kbit_fp32 or m.fp32 else BYTES_PER_ELEMENT[dtype]
        shape = (m.in_features, m.out_features) if m.kind == "embedding" else (m.out_features, m.in_features)
        groups.append(TensorGroup(shape, 1, copy_e, embedding=m.kind == "embedding"))
        if m.bias:
            groups.append(TensorGroup((m.out_features,), 1, copy_e))
    for m, layers in _trained_biases(spec, lora):
        groups.append(TensorGroup((m.experts, m.out_features) if m.experts > 1 else (m.out_features,),
                                  max(len(layers), 1), _bias_bytes(m, method, dtype, kbit_fp32)))
    for layer in trainable_token_layers(spec, lora):
        if not layer.shared:  # `trainable_tokens_delta`: the rows themselves, upcast with the adapters
            groups.append(TensorGroup((layer.tokens, spec.hidden_size), 1, e))
    return tuple(groups)


def token_buffer_bytes(spec: ModelSpec, training: TrainingSpec) -> int:
    """`trainable_tokens_original`: each wrapped layer's own copy of its rows (a buffer, the adapter dtype: PEFT's
    upcast reaches it), kept to restore them; a shared (tied) layer uses the embeddings'."""
    if training.method == "full":
        return 0
    return sum(layer.tokens * spec.hidden_size * _adapter_bytes(training)
               for layer in trainable_token_layers(spec, training.lora) if not layer.shared)


def token_delta_bytes(spec: ModelSpec, training: TrainingSpec, group: str) -> int:
    """Bytes of the trainable-token deltas of the wrapped modules in `group` ("embeddings", "lm_head")."""
    if training.method == "full":
        return 0
    return sum(layer.tokens * spec.hidden_size * _adapter_bytes(training)
               for layer in trainable_token_layers(spec, training.lora)
               if not layer.shared and layer.module.group == group)


def _trained_biases(spec: ModelSpec, lora: LoraSpec) -> tuple[tuple[Module, frozenset[int]], ...]:
    """PEFT's `bias` (`params.trained_biases`), less the modules `modules_to_save` copies (their originals are frozen
    again by `ModulesToSaveWrapper`; the copy's bias trains with it)."""
    copied = {m.path for m in modules_to_save(spec, lora.modules_to_save)}
    return tuple((m, layers) for m, layers in trained_biases(spec, lora) if m.path not in copied)


def _bias_bytes(m: Module, method: str, dtype: str, kbit_fp32: bool) -> int:
    """Bytes per element of a trained base bias, as stored (`_stored_bytes_each`): a 4-bit linear's is back at the
    compute dtype after its first forward; kbit preparation leaves the others fp32."""
    if method == "qlora" and m.kind == "linear" and m.group != "lm_head":
        return BYTES_PER_ELEMENT[dtype]
    return 4 if kbit_fp32 or m.fp32 else BYTES_PER_ELEMENT[dtype]


def trained_bias_bytes(spec: ModelSpec, training: TrainingSpec) -> int:
    """Bytes of the base biases PEFT's `bias` trains: already stored with the base weights."""
    if training.method == "full":
        return 0
    kbit = _kbit_fp32(training)
    return sum(bias_numel(m) * max(len(layers), 1) * _bias_bytes(m, _storage_method(training), training.dtype, kbit)
               for m, layers in _trained_biases(spec, training.lora))


def trainable_groups(spec: ModelSpec, training: TrainingSpec) -> tuple[TensorGroup, ...]:
    """The trainable tensors of `training` grouped by shape (all weights, or LoRA's A and B)."""
    return _trainable_groups(spec, _storage_method(training), training.dtype, training.lora,
                             _kbit_fp32(training))


@lru_cache(maxsize=4096)
def _trainable_totals(spec: ModelSpec, method: str, dtype: str, lora: LoraSpec,
                      kbit_fp32: bool = False) -> tuple[int, int]:
    groups = _trainable_groups(spec, method, dtype, lora, kbit_fp32)
    return sum(g.numel * g.count for g in groups), sum(g.nbytes for g in groups)


def trainable_totals(spec: ModelSpec, training: TrainingSpec) -> tuple[int, int]:
    """(trainable parameters, their bytes)."""
    return _trainable_totals(spec, _storage_method(training), training.dtype, training.lora,
                             _kbit_fp32(training))


def group_bytes(spec: ModelSpec, training: TrainingSpec) -> tuple[int, int, int, int]:
    """(root bytes, one layer's bytes, one layer's trainable bytes, root trainable bytes), adapters
    included: "root" is everything outside the decoder layers (embeddings, final norm, lm_head), the
    groups FSDP gathers and reduce-scatters, and what backward finishes last."""
    root, layer, layer_trainable, root_trainable, _ = _group_bytes(
        spec, _storage_method(training), training.dtype, training.lora, _kbit_fp32(training))
    return root, layer, layer_trainable, root_trainable


def layer_trainable_bytes(spec: ModelSpec, training: TrainingSpec) -> tuple[int, ...]:
    """Trainable bytes of each decoder layer (all its weights under full fine-tuning; its adapters under
    LoRA, which may differ layer by layer with layer-specific targets)."""
    return _group_bytes(spec, _storage_method(training), training.dtype, training.lora,
                        _kbit_fp32(training))[4]


@lru_cache(maxsize=4096)  # keyed on what matters, not on batch and sequence
def _group_bytes(spec: ModelSpec, method: str, dtype: str, lora: LoraSpec,
                 kbit_fp32: bool) -> tuple[int, int, int, int, tuple[int, ...]]:
    """(root, largest layer, largest layer's trainable, root trainable, each layer's trainable) bytes."""
    e = BYTES_PER_ELEMENT[dtype]
    e_adapter = 4 if lora.adapter_dtype == "fp32" else e
    full = method == "full"
    layers = spec.num_layers
    adapted = {} if full else dict(adapted_layers(spec, lora.target_modules, lora.layers_to_transform,
                                                   lora.target_parameters))
    by_path = {m.path: layers_in for m, layers_in in adapted.items()}
    numel_by_path = {m.path: m.lora_numel(lora.r) + (m.out_features if lora.use_dora else 0) for m in adapted}
    root = root_trainable = 0
    per_layer_stored = [0] * layers  # an MoE model's dense layers and expert layers hold different modules
    per_layer_adapters = [0] * layers
    for m in module_inventory(spec):
        stored = _stored_bytes_each(m, _quant(method), dtype, kbit_fp32)
        adapter = numel_by_path.get(m.path, 0) * e_adapter
        if is_per_layer(m):
            for i in m.layers or range(layers):
                per_layer_stored[i] += stored
            for i in by_path.get(m.path, ()):
                per_layer_adapters[i] += adapter
        else:
            root += stored + (adapter if m.path in by_path else 0)
            root_trainable += stored if full else (adapter if m.path in by_path else 0)
    if full:
        return root, max(per_layer_stored), max(per_layer_stored), root_trainable, tuple(per_layer_stored)
    copies = sum(saved_module_bytes(m, dtype, kbit_fp32) for m in modules_to_save(spec, lora.modules_to_save))
    root, root_trainable = root + copies, root_trainable + copies
    # trained base biases: trainable (their gradients come with their layer's backward), already stored
    per_layer_trainable = list(per_layer_adapters)
    for m, layers_in in _trained_biases(spec, lora):
        nbytes = bias_numel(m) * _bias_bytes(m, method, dtype, kbit_fp32)
        if is_per_layer(m):
            for i in layers_in:
                per_layer_trainable[i] += nbytes
        else:
            root_trainable += nbytes
    root_trainable += sum(layer.tokens * spec.hidden_size * e_adapter  # trainable-token deltas (outside the layers)
                          for layer in trainable_token_layers(spec, lora) if not layer.shared)
    largest = max(per_layer_trainable)
    return root, max(s + a for s, a in zip(per_layer_stored, per_layer_adapters)), largest, root_trainable, \
        tuple(per_layer_trainable)


def _adapter_bytes(training: TrainingSpec) -> int:
    """Bytes per element of the LoRA factors: fp32 (PEFT's `autocast_adapter_dtype`) or the base dtype."""
    return 4 if training.lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[training.dtype]


def _outside_adapter_paths(spec: ModelSpec, training: TrainingSpec) -> frozenset[str]:
    """The adapted modules outside the decoder layers (LoRA on the embeddings or the output layer)."""
    if training.method == "full":
        return frozenset()
    lora = training.lora
    return frozenset(m.path for m, _ in adapted_layers(spec, lora.target_modules, lora.layers_to_transform,
                                                       lora.target_parameters) if not is_per_layer(m))


def _outside_adapter_bytes(spec: ModelSpec, training: TrainingSpec) -> dict[str, int]:
    """LoRA bytes outside the layers by group ("embeddings", "lm_head"): their gradients come when backward reaches
    the module (lm_head's first, the embeddings' last)."""
    paths = _outside_adapter_paths(spec, training)
    out = {"embeddings": 0, "lm_head": 0}
    for m in module_inventory(spec):
        if m.path in paths and m.group in out:
            out[m.group] += m.lora_numel(training.lora.r) * _adapter_bytes(training)
    return out


@dataclass(frozen=True)
class StepComponents:
    """The byte counts a step's phases are assembled from (one GPU, the whole model)."""

    weights: int  # everything stored: base (+ buffers) + adapters
    base_weights: int  # base weights at --dtype (NF4 for QLoRA), the seed rule's x
    gradients: int  # of all trainable parameters
    states: int  # optimizer state
    optimizer_scratch: int
    head_gradients: int  # lm_head (+ final norm) gradients, which exist from the start of backward (full)
    activations: ActivationProfile
    layers_saved: int  # saved by all layers (layer inputs only under checkpointing)
    recomputed: int  # one layer's saved tensors, recomputed in backward under checkpointing
    layer_scratch: int  # transient gradient buffers of one layer's backward (+ QLoRA's dequantized weight), seed
    end_gradients: int  # the end of backward (see step_components)
    end_activations: int  # besides the batch (the loss value included)
    end_scratch: int  # backward's seed included
    resident: int = 0  # there at every phase: activation offloading's GPU buffers (Unsloth's), litgpt's logits
    # GRPO (`lora_planner.generation`): the round's buffered inputs through the training phases; the generation
    # round's and the scoring passes' bytes beyond the model states (0: no such phase); whether a round can start
    # while the step's gradients are held; a colocated vLLM's reservation during generation only (sleep mode; without
    # it, in `resident`)
    round_bytes: int = 0
    generation_bytes: int = 0
    scoring_bytes: int = 0
    generation_gradients: bool = False
    generation_only_bytes: int = 0
    # GRPO: the micro-batch's ids are `_compute_loss`'s locals (cats of the buffered round), gone when it returns, but
    # for what backward keeps of them (a trained embedding's indices): those bytes (None: the batch lives all step)
    batch_in_backward: int | None = None

    @cached_property  # (frozen: each is read more than once a step)
    def saved(self) -> int:
        """Everything the forward leaves for backward, the loss's included, and the loss value (when it exists at
        the forward's heaviest op: `ActivationProfile.loss_value_at_forward_end`)."""
        acts = self.activations
        return self.layers_saved + acts.model_bytes + acts.loss_bytes \
            + (acts.loss_output_bytes if acts.loss_value_at_forward_end else 0)

    @cached_property
    def forward_end(self) -> tuple[int, int]:
        """(activations, temporaries) at the forward's heaviest op: the loss's, or LoRA on lm_head's add
        (`ActivationProfile.head_adapter_moments`), whichever holds more."""
        acts = self.activations
        loss = (self.saved + acts.loss_forward_activations_delta, acts.loss_forward_scratch_bytes)
        extra_acts, temporaries = acts.head_adapter_moments[0]
        head = (self.layers_saved + acts.model_bytes + extra_acts, temporaries)
        moment = head if temporaries and sum(head) > sum(loss) else loss
        # a checkpointed layer's own forward (`ActivationProfile.checkpointed_forward_bytes`), the last one's: every
        # layer input and the model-level tensors below the head saved beside it
        layer = (self.layers_saved + acts.model_bytes_below_head, acts.checkpointed_forward_bytes)
        return layer if acts.checkpointed_forward_bytes and sum(layer) > sum(moment) else moment

    @cached_property
    def backward_start(self) -> tuple[int, int, int]:
        """(gradients, activations, temporaries) at the start of backward: the loss's backward, or LoRA on lm_head's
        (`ActivationProfile.head_adapter_moments`), whichever holds more."""
        acts = self.activations
        loss = (0, self.saved_at_backward_start, acts.loss_backward_scratch_bytes)
        gradients, extra_acts, temporaries = acts.head_adapter_moments[1]
        head = (gradients, self.layers_saved + acts.model_bytes + extra_acts, temporaries)
        moment = head if temporaries and sum(head) > sum(loss) else loss
        freed, scratch = acts.final_norm_backward
        # the final norm's backward, after the loss's (a fused loss's is light): the loss's saved tensors are gone
        norm = (0, self.layers_saved + acts.model_bytes - freed + acts.loss_output_bytes,
                scratch + acts.backward_seed_bytes)
        return norm if scratch and sum(norm) > sum(moment) else moment

    @cached_property
    def saved_at_backward_start(self) -> int:
        """What is kept when the loss's backward peaks: nll_loss's targets and total weight are freed by then
        (`ActivationProfile.loss_bytes_in_backward`)."""
        acts = self.activations
        return self.layers_saved + acts.model_bytes + acts.loss_bytes_in_backward + acts.loss_output_bytes

    @cached_property
    def layers_activations(self) -> int:
        """While backward runs through the layers: every layer's saved tensors (+ one recomputed), the
        model-level ones but the final norm's and lm_head's (their backward ran first and freed them), and the
        loss value the caller holds until `backward()` returns."""
        acts = self.activations
        return self.layers_saved + acts.model_bytes_below_head + self.recomputed + acts.loss_output_bytes \
            + acts.router_aux_gradient_bytes


def step_components(spec: ModelSpec, training: TrainingSpec) -> StepComponents:
    """Weights, gradients, optimizer state and activations of one step on one GPU."""
    check_sequence_length(spec, training.seq_len)  # GPT-2's learned positions end at n_positions
    modules = module_inventory(spec)
    groups = trainable_groups(spec, training)
    _, trainable_bytes = trainable_totals(spec, training)
    base_bytes = _base_weight_bytes(spec, training)
    buffers = buffer_bytes(spec, training.dtype)  # RoPE's fp32 tables, Gemma's embed_scale
    # (trained base biases are stored with the base weights, `trained_bias_bytes`)
    weights = base_bytes + buffers + token_buffer_bytes(spec, training) + (
        0 if training.method == "full" else trainable_bytes - trained_bias_bytes(spec, training))
    if reference_pass(training) == "model-copy" or (training.objective == "grpo" and training.method == "full"
                                                    and training.grpo.reference_pass):
        weights += base_bytes + buffers  # DPO's reference (GRPO's at beta > 0): the model again, at the policy's dtype
    impl = training.resolved_optimizer_impl
    step_on_device = training.device == "cpu" or impl == "fused"

    acts = activation_profile(spec, training)
    # backward()'s seed gradient lives through all of backward (`ActivationProfile.backward_seed_bytes`)
    extra_scratch = acts.backward_seed_bytes
    if training.quantized:
        # bitsandbytes dequantizes one weight for each matmul, forward and backward: to the compute dtype (4-bit), or
        # to the input's dtype beside an fp32 scale per output row (LLM.int8: `MatMul8bitFp` / `MatMul8bitLt.backward`
        # `state.CB.to(dtype_A).mul_(SCB.unsqueeze(1) * (1 / 127))`; the stream's dtype, fp32 after kbit preparation)
        linears = [m for m in modules if m.kind == "linear" and m.group != "lm_head"]
        if training.load_in_8bit:
            stream = 4 if _kbit_fp32(training) else BYTES_PER_ELEMENT[training.dtype]
            extra_scratch += max(m.weight_numel_each * stream + 4 * m.out_features for m in linears)
        else:
            # `MatMul4Bit.backward` dequantizes at the dtype the weight was quantized from (the load dtype,
            # `quant_state.dtype`), then casts that copy to `bnb_4bit_compute_dtype` when they differ: both live
            load, compute = BYTES_PER_ELEMENT[training.dtype], BYTES_PER_ELEMENT[training.matmul_4bit_dtype]
            extra_scratch += max(m.weight_numel_each for m in linears) * (
                compute + (load if training.matmul_4bit_dtype != training.dtype else 0))
    last = spec.num_layers - 1
    offload = _activation_offload(spec, training, acts)
    if training.grad_checkpointing:
        layers_saved = offload.kept * acts.checkpoint_per_layer_bytes
        # the layer being recomputed in backward, with its own backward's buffers: the heaviest of the layers
        recomputed, scratch = _recompute_moment(acts, offload)
    else:
        # backward's first layer, with every layer's saved tensors still held
        layers_saved, recomputed, scratch = acts.all_layers_bytes, 0, acts.backward_scratch_bytes(last)
    layer_scratch = scratch + extra_scratch
    saved_copies = modules_to_save(spec, training.lora.modules_to_save) if training.method != "full" else ()
    outside = _outside_adapter_bytes(spec, training)  # LoRA on the output layer / the embeddings, by group
    head_grads = sum(m.params for m in modules if m.group == "lm_head") * BYTES_PER_ELEMENT[training.dtype] \
        if training.method == "full" else sum(saved_module_bytes(m, training.dtype, _kbit_fp32(training))
                                              for m in saved_copies if m.group == "lm_head") + outside["lm_head"] \
        + token_delta_bytes(spec, training, "lm_head")
    # The end of backward is the larger of two moments: the first layer's backward (its saved tensors
    # and gradient buffers beside every other layer's gradients; its own come as its tensors go), and the
    # very last op, when all gradients exist and no activation is left; with a tied embedding autograd
    # then adds the embedding's V x h gradient to lm_head's, both partial gradients beside the sum.
    # "First layer" is the first one backward runs through: layer 0, or under LoRA without a gradient at
    # the model's input, the first layer with an adapter (nothing below it has a backward).
    per_layer_trainable = layer_trainable_bytes(spec, training)
    first = 0 if acts.first_layer_bytes or not any(per_layer_trainable) else \
        next(i for i, b in enumerate(per_layer_trainable) if b)
    embedding_grads = sum(m.params for m in modules if m.group == "embeddings") * BYTES_PER_ELEMENT[training.dtype] \
        if training.method == "full" else sum(saved_module_bytes(m, training.dtype, _kbit_fp32(training))
                                              for m in saved_copies if m.group == "embeddings") \
        + outside["embeddings"] + token_delta_bytes(spec, training, "embeddings")
    # (computed after the first layer's backward)
    if training.grad_checkpointing:
        last_layer_left = offload.held(first) * acts.checkpoint_per_layer_bytes + acts.layer_saved_bytes(first)
    else:
        last_layer_left = acts.layer_saved_bytes(first)
    end_grads = trainable_bytes - per_layer_trainable[first] - embedding_grads
    if spec.dense_layers:
        # An MoE model's dense layers (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers) are lighter than
        # its expert layers, so the first layer's backward need not be the heaviest late moment: the backward of each
        # run's first expert layer, beside the gradients of every layer above it (and, under checkpointing, its
        # recomputed saved tensors on top of the checkpointed inputs below), is a candidate too.
        end_grads, last_layer_left, first_scratch = _late_backward_moment(
            acts, training, per_layer_trainable, first, trainable_bytes - embedding_grads, end_grads, last_layer_left,
            offload)
    else:
        first_scratch = acts.backward_scratch_bytes(first)
    # The loss value and backward's seed stay until `backward()` returns, at either moment.
    end_acts, end_scratch = last_layer_left + acts.loss_output_bytes, first_scratch + extra_scratch
    last_op_scratch, last_op_acts = acts.backward_seed_bytes, acts.loss_output_bytes
    if training.method != "full" and any(m.group == "embeddings" for m in saved_copies):
        # a trained embedding copy's backward: its gradient beside its incoming one (the stream's dtype)
        last_op_scratch += training.tokens * spec.hidden_size * (4 if _kbit_fp32(training) or training.amp
                                                                 else BYTES_PER_ELEMENT[training.dtype])
    if outside["embeddings"]:
        # LoRA on the embeddings (PEFT `Embedding`): the last op, `embedding_dense_backward` of F.embedding(x, A.T),
        # writes a dense (V, r) gradient that AccumulateGrad copies into lora_embedding_A's (r, V) layout beside it.
        # Under checkpointing the base output kept as a leaf (`activations.embedding_lora_saved`) and the gradient
        # AccumulateGrad gives it are alive too.
        adapted = _outside_adapter_paths(spec, training)
        embedding_lora = [m for m in modules if m.kind == "embedding" and m.path in adapted]
        last_op_scratch += sum(m.in_features * training.lora.r for m in embedding_lora) * _adapter_bytes(training)
        if training.grad_checkpointing:
            stream = 4 if _kbit_fp32(training) or training.amp else BYTES_PER_ELEMENT[training.dtype]
            last_op_acts += training.tokens * spec.hidden_size * stream  # the leaf
            last_op_scratch += training.tokens * spec.hidden_size * stream  # its gradient
    last_op_grads = trainable_bytes
    if acts.token_moments[1][1]:
        # trainable tokens on the embeddings: the last op's dense gradient of the merged matrix (`activations.
        # trainable_tokens_moments`), before the trained rows' gradient exists
        last_op_acts += acts.token_moments[1][0]
        last_op_scratch += acts.token_moments[1][1]
        last_op_grads -= token_delta_bytes(spec, training, "embeddings")
    if training.method == "full":
        # The embedding's backward (`embedding_dense_backward`) writes its gradient while its input, the
        # gradient of the embeddings' output (tokens x h, the weights' dtype), is still alive: autograd frees
        # a node's incoming gradient when the node returns. Tied: then the add of the two partial V x h
        # gradients (lm_head's, waiting in the weight's input buffer, and the embedding's) makes the sum, with
        # that input gradient gone: the larger of the two moments.
        e = BYTES_PER_ELEMENT[training.dtype]
        table, into_embedding = spec.vocab_size * spec.hidden_size * e, training.tokens * spec.hidden_size * e
        last_op_scratch += table + max(table, into_embedding) if spec.tie_word_embeddings else into_embedding
    if last_op_grads + last_op_scratch + last_op_acts > end_grads + end_acts + end_scratch:
        end_grads, end_acts, end_scratch = last_op_grads, last_op_acts, last_op_scratch
    return StepComponents(
        weights=weights, base_weights=base_bytes, gradients=trainable_bytes,
        states=optimizer_state_bytes(groups, training.optimizer, step_on_device),
        optimizer_scratch=optimizer_scratch_bytes(groups, training.optimizer, impl), head_gradients=head_grads,
        activations=acts, layers_saved=layers_saved, recomputed=recomputed, layer_scratch=layer_scratch,
        end_gradients=end_grads, end_activations=end_acts, end_scratch=end_scratch,
        **_grpo_parts(spec, training, offload.resident + acts.resident_bytes))


def _grpo_parts(spec: ModelSpec, training: TrainingSpec, resident: int) -> dict[str, int | bool]:
    """GRPO's round (`lora_planner.generation`): the generation and scoring phases' own bytes, the round's buffer
    through training, and a colocated vLLM's reservation (every phase, or generation only under sleep mode)."""
    if training.objective != "grpo":
        return {"resident": resident}
    from lora_planner.activations import make_flow
    from lora_planner.generation import buffered_round_bytes, generation_memory, scoring_memory, scoring_passes

    flow = make_flow(spec, training)
    gen = generation_memory(flow)
    scoring = sum(scoring_memory(flow)) if scoring_passes(training) else 0
    sleep = training.grpo.vllm_enable_sleep_mode
    return {"round_bytes": buffered_round_bytes(training, scoring_passes(training)),
            "batch_in_backward": training.tokens * 8 if training.method == "full" else 0,
            "generation_bytes": gen.peak_bytes, "scoring_bytes": scoring,
            "generation_gradients": training.grpo.round_starts_mid_step(training.batch_size),
            "generation_only_bytes": gen.vllm_bytes if sleep else 0,
            "resident": resident + (0 if sleep else gen.vllm_bytes)}


@dataclass(frozen=True)
class _Offload:
    """Checkpointed layer inputs on the GPU (`lora_planner.activation_offload`): `kept` from the forward's end through
    the loss, `held(i)` while layer i is recomputed and goes back (i + 1 without offloading), and what the
    implementation keeps on the GPU at every phase (`resident`)."""

    kind: str
    num_layers: int
    kept: int
    input_elements: int
    resident: int = 0

    def held(self, layer: int) -> int:
        return inputs_held_in_backward(self.kind, layer, self.num_layers, self.input_elements)


def _activation_offload(spec: ModelSpec, training: TrainingSpec, acts: ActivationProfile) -> _Offload:
    kind, layers = training.activation_offload, spec.num_layers
    elements = training.tokens * spec.hidden_size
    if kind == "none":
        return _Offload(kind, layers, layers, elements)
    if kind == "torchtune" and spec.final_logit_softcapping is not None:
        raise PlannerInputError("activation_offload", f"{spec.name}'s logit soft-capping runs outside the output "
                                "layer, where torchtune's hooks would offload it: not modelled",
                                "drop --activation-offloading for this model")
    packs = flow_packs(make_flow(spec, training))
    return _Offload(kind, layers, inputs_kept_at_forward_end(kind, layers, packs, elements), elements,
                    resident_gpu_bytes(kind, elements))


def _recompute_moment(acts: ActivationProfile, offload: _Offload) -> tuple[int, int]:
    """Under gradient checkpointing, the heaviest decoder layer i of: (what recomputing it adds on top of the
    checkpointed inputs the forward left on the GPU, its backward's buffers). Without offloading layer i is
    recomputed while the inputs of layers 0..i are still held (later ones are freed): its saved bytes less (L - 1 - i)
    inputs (`ActivationProfile.checkpoint_recompute_bytes` is the largest of the first terms); with it, the inputs
    `offload.held(i)` says."""
    moments, index = [], 0
    scratch_each = acts.layer_backward_scratch_each
    for count, saved in acts.layer_runs:
        layer_bytes = ActivationProfile.total(saved)
        layers = range(index, index + count)
        if offload.kind == "none" and (not scratch_each or len(set(scratch_each[index:index + count])) == 1):
            # the inputs held grow with i and the run's buffers are alike: its last layer is its heaviest
            layers = range(index + count - 1, index + count)
        for i in layers:
            extra = layer_bytes + (offload.held(i) - offload.kept) * acts.checkpoint_per_layer_bytes
            moments.append((extra, acts.backward_scratch_bytes(i)))
        index += count
    return max(moments, key=sum)


def _late_backward_moment(acts: ActivationProfile, training: TrainingSpec, per_layer_trainable: tuple[int, ...],
                          first: int, grads_after_embedding: int, grads: int, left: int,
                          offload: _Offload) -> tuple[int, int, int]:
    """(gradients, activations, the layer backward's buffers) at the heaviest layer backward from `first` on (see
    `step_components`): at layer i the gradients of the layers above it exist, the layers up to i keep their saved
    tensors (checkpointing: their inputs, and layer i its recomputed tensors), and layer i's backward its own buffers
    (an MoE model's dense and expert layers differ)."""
    scratch = acts.backward_scratch_bytes(first)
    best = (grads + left + scratch, grads, left, scratch)
    index, saved_below = 0, 0
    trained_up_to = list(itertools.accumulate(per_layer_trainable))  # layers 0..i's trainable bytes
    for count, saved in acts.layer_runs:
        layer_bytes = ActivationProfile.total(saved)
        for i in range(index, index + count):
            if i > first:
                g = grads_after_embedding - trained_up_to[i]
                if training.grad_checkpointing:
                    a = offload.held(i) * acts.checkpoint_per_layer_bytes + layer_bytes
                else:
                    a = saved_below + (i - index + 1) * layer_bytes
                s = acts.backward_scratch_bytes(i)
                if g + a + s > best[0]:
                    best = (g + a + s, g, a, s)
        saved_below += count * layer_bytes
        index += count
    return best[1], best[2], best[3]


RETAINED_GRAPH_PHASES = ("forward_start", "optimizer_step")  # (forward_end: in the loss's own moments)


def single_gpu_phases(c: StepComponents) -> tuple[PhaseMemory, ...]:
    """The phases of the module docstring's table for one GPU holding everything."""
    acts = c.activations

    def phase(name: Phase, activations_bytes: int, temporaries_bytes: int, **parts: int) -> PhaseMemory:
        # a graph kept past its backward (litgpt's logits) holds its tensors outside backward
        held_acts, held_temps = acts.retained_graph_bytes if name in RETAINED_GRAPH_PHASES else (0, 0)
        return PhaseMemory(name, MemoryBreakdown(weights_bytes=c.weights, optimizer_states_bytes=c.states,
                                                 activations_bytes=activations_bytes + c.resident + held_acts,
                                                 temporaries_bytes=temporaries_bytes + held_temps, **parts))

    # DPO's reference pass (`lora_planner.objectives`): the policy's saved tensors and the outputs held, and the no-grad
    # pass's heaviest moment
    held, reference = acts.reference_moment
    grads = c.gradients if c.generation_gradients else 0
    generation = (phase("generation", gradients_bytes=grads, activations_bytes=0,
                        temporaries_bytes=c.generation_bytes + c.generation_only_bytes),) if c.generation_bytes else ()
    scoring = (phase("scoring", gradients_bytes=grads, activations_bytes=0, temporaries_bytes=c.scoring_bytes),) \
        if c.scoring_bytes else ()
    if c.round_bytes:
        c = replace(c, resident=c.resident + c.round_bytes)  # the round's buffer, through the training phases
    batch = acts.batch_bytes if c.batch_in_backward is None else c.batch_in_backward  # in backward
    freed = acts.batch_bytes - batch
    return (
        *generation, *scoring,
        *((phase("kl_forward", activations_bytes=acts.batch_bytes, temporaries_bytes=acts.kl_moment),)
          if acts.kl_moment else ()),
        phase("forward_start", activations_bytes=acts.batch_bytes + acts.token_moments[0][0],
              temporaries_bytes=acts.token_moments[0][1]),
        phase("forward_end", activations_bytes=c.forward_end[0], temporaries_bytes=c.forward_end[1]),
        *((phase("reference_forward", activations_bytes=c.saved + held, temporaries_bytes=reference),)
          if reference else ()),
        phase("backward_start", gradients_bytes=c.backward_start[0], activations_bytes=c.backward_start[1] - freed,
              temporaries_bytes=c.backward_start[2]),
        phase("backward_layers", gradients_bytes=c.head_gradients, activations_bytes=c.layers_activations - freed,
              temporaries_bytes=c.layer_scratch),
        phase("backward_end", gradients_bytes=c.end_gradients, activations_bytes=c.end_activations + batch,
              temporaries_bytes=c.end_scratch),
        phase("optimizer_step", gradients_bytes=c.gradients,
              activations_bytes=acts.batch_bytes if c.batch_in_backward is None else 0,
              temporaries_bytes=c.optimizer_scratch),
    )

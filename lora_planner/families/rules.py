"""The op rules every family's layer is built from: what each op keeps for backward (pure).

Measured against PyTorch autograd's saved tensors in the Hugging Face `transformers` modules (checked with
`torch.autograd.graph.saved_tensors_hooks`, `experiments/probe_saved_activations.py`; the summary of the
rules is the docstring of `lora_planner.activations`). A family module composes them in its layer's order;
`Flow` carries the settings every rule needs and the rule for (possibly adapted) linears.
"""

from __future__ import annotations

from typing import Any

from lora_planner.families.base import Family, Module, SavedTensor
from lora_planner.specs import BYTES_PER_ELEMENT, ModelSpec, TrainingSpec

FP32 = 4
MASK = 1  # bool dropout mask, one byte per element
FLASH = "flash_attention_2"
FLEX = "flex_attention"


def liger_patches(family: Family, training: TrainingSpec) -> bool:
    """`use_liger_kernel` (`TrainingSpec.liger`) on a family whose Liger patch is planned (`Family.liger`)."""
    return training.liger and family.liger == "modelled"


def loss_that_runs(family: Family, training: TrainingSpec) -> str:
    """The loss the step runs: Liger's fused linear cross-entropy where Liger patches the family, else the one asked
    (`TrainingSpec.loss`; a family Liger does not patch keeps it). TRL's fused LM head ("trl") stays: TRL 1.16's
    `SFTTrainer` sets `liger_kernel_config["fused_linear_cross_entropy"] = False` under `use_liger_kernel`
    (`trainer/sft_trainer.py`, before `add_fused_lm_head`), so only Liger's layer kernels apply."""
    return "fused-linear" if liger_patches(family, training) and training.loss != "trl" else training.loss


# Linears that read the same tensor as another (the key they share): q / k / v the attention's input, gate / up the
# MLP's; Phi-2's fc1 reads the one LayerNorm output its attention reads too (`PhiDecoderLayer.forward`).
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
SHARED_INPUT_BY_FAMILY = {"phi": {"mlp.fc1": "self_attn.q_proj"}}


def int8_input_key(family: Family, name: str) -> str:
    """Which tensor the linear `name` (its path below the layer) reads: "layer_input" when it is the decoder layer's
    input itself (OLMo 2's attention projections: no pre-norm), else the name of the first linear reading it."""
    parent, _, last = name.rpartition(".")
    special = SHARED_INPUT_BY_FAMILY.get(family.model_types[0], {})
    key = special[name] if name in special else \
        (f"{parent}.{SHARED_INPUT[last]}" if parent else SHARED_INPUT[last]) if last in SHARED_INPUT else name
    if family.linear_reads_layer_input and key.endswith("q_proj"):
        return "layer_input"
    return key


class Flow:
    """The settings every rule below needs, and the rule for linear layers shared by all families.

    `layer_adapters` holds, per decoder layer, the layer-0 paths of its adapted modules; `outside_adapters`
    the adapted modules outside the layers; `modules` every module by layer-0 path. `input_grads`, when a
    dict, records for each linear whether its input needs a gradient (what the FLOP count reads), and
    `attention_grads` whether q, k and v do.
    """

    def __init__(self, spec: ModelSpec, training: TrainingSpec, family: Family,
                 layer_adapters: tuple[frozenset[str], ...], outside_adapters: frozenset[str],
                 modules: dict[str, Module]) -> None:
        self.spec = spec
        self.family = family
        self.t = training
        self.b, self.s = training.rows  # packing: one row of every token
        # transformers materialises an attention mask (padding, or packed sequences found in position_ids:
        # `masking_utils.find_packed_sequence_indices`) and hands SDPA a (b, 1, s, s) one
        self.masked = training.padding or training.packing
        # Liger's kernels replace the family's norms and gated MLP (`Family.liger` "modelled"; `lora_planner.liger`)
        # `modules_to_save` copies (trained in full beside the adapters: their linear keeps its input)
        self.trained_paths: frozenset[str] = frozenset()
        if training.lora.modules_to_save and training.method != "full":
            from lora_planner.params import modules_to_save  # lazily: params imports the families

            self.trained_paths = frozenset(m.path for m in modules_to_save(spec, training.lora.modules_to_save))
        # trainable tokens: the wrapped modules run on a merged matrix that needs a gradient (the output layer keeps its
        # input, the embeddings give layer 0 an input gradient), as a trained copy's would
        self.token_layers: tuple[Any, ...] = ()  # `params.TokenLayer`s
        if training.lora.trainable_token_indices and training.method != "full":
            from lora_planner.params import trainable_token_layers

            self.token_layers = trainable_token_layers(spec, training.lora)
            self.trained_paths |= frozenset(layer.module.path for layer in self.token_layers)
        # PEFT's `bias`: the base biases that train give their module's output a gradient (no saved tensor of their
        # own: a bias's gradient is the sum of the output's); "all" trains the norms' too (`layer_norm`)
        self.bias_paths: frozenset[str] = frozenset()
        self.norm_bias_trains = False
        self.linear_bias_numel = 0
        if training.lora.bias != "none" and training.method != "full":
            from lora_planner.params import trained_biases

            biases = trained_biases(spec, training.lora)
            self.bias_paths = frozenset(m.path for m, _ in biases)
            self.norm_bias_trains = any(m.kind == "norm" for m, _ in biases)
            # the linears' trained bias elements, every layer's: autocast caches their 16-bit casts for the forward
            self.linear_bias_numel = sum(m.out_features * max(len(layers), 1) for m, layers in biases
                                         if m.kind == "linear")
        # Liger's kernels replace the family's norms and gated MLP (`Family.liger` "modelled"), and the loss that runs
        self.liger = liger_patches(family, training)
        self.loss = loss_that_runs(family, training)
        self.tokens = training.tokens
        self.full = training.method == "full"
        self.amp = training.amp is not None
        # PEFT's prepare_model_for_kbit_training casts embeddings, norms, biases and lm_head to fp32: the
        # stream and every op between the 4-bit matmuls (which cast their input to the compute dtype and
        # their output back, bitsandbytes `Linear4bit.forward`) then run in fp32.
        self.kbit_fp32 = training.quantized and training.kbit_prep
        self.int8 = training.load_in_8bit  # LLM.int8 base linears (`Flow.linear`)
        # when a dict: each distinct input an LLM.int8 linear of the layer keeps as a context attribute, by the input's
        # name (`int8_input_key`), in bytes (`activations.int8_checkpoint_held_bytes`)
        self.int8_inputs: dict[str, int] | None = None
        self.e_compute = FP32 if self.kbit_fp32 else BYTES_PER_ELEMENT[training.compute_dtype]
        # The residual stream: fp32 under autocast (fp32 embeddings, fp32 adds), else the compute dtype.
        self.e_stream = FP32 if self.amp else self.e_compute
        self.e_adapter = FP32 if training.lora.adapter_dtype == "fp32" else BYTES_PER_ELEMENT[training.dtype]
        self.r = training.lora.r
        self.layer_adapters = layer_adapters
        self.outside_adapters = outside_adapters
        self.adapted_paths = outside_adapters
        self.modules = modules
        self.input_grads: dict[str, bool] | None = None
        # when a list, each DoRA linear the layer rule meets: (in, out, input bytes per element, input needs grad)
        self.dora_modules: list[tuple[int, int, int, bool]] | None = None
        self.attention_grads: tuple[bool, bool, bool] | None = None
        self.layer_type: str | None = None  # the layer's `ModelSpec.layer_types` entry (set per layer)
        self.moe_layer = spec.is_moe  # the layer routes through experts (set per layer, `ModelSpec.dense_layers`)
        # MoE experts compute in their weights' dtype (grouped_mm casts its input to it, `integrations/moe.py`
        # `_grouped_mm`), fp32 after PEFT's kbit preparation.
        self.e_expert = FP32 if self.kbit_fp32 or (training.dtype == "fp32") else self.e_compute
        # What flash-attn sees: transformers casts fp32 q / k / v to the autocast dtype, or else to the model's
        # (`integrations/flash_attention.py` `get_target_dtype`, `fa_peft_integration_check`): the 16-bit compute
        # dtype even where PEFT's kbit preparation keeps the stream fp32. Other kernels see the compute dtype.
        self.e_attention = BYTES_PER_ELEMENT[training.compute_dtype] if training.attention == FLASH \
            else self.e_compute
        # LoRA rank multipliers PEFT's MoE conversion sets (`rank_pattern`: r x 2 on gate_up_proj), by layer-0 path.
        self.rank_scale: dict[str, int] = {}

    def in_layer(self, adapters: frozenset[str]) -> Flow:
        """The same settings, seen from a decoder layer whose adapted modules are `adapters`."""
        flow = object.__new__(Flow)  # (copy.copy's shallow copy, without its protocol's cost)
        flow.__dict__.update(self.__dict__)
        flow.adapted_paths = adapters | self.outside_adapters
        return flow

    def adapted(self, path: str) -> bool:
        return path in self.adapted_paths

    def trains(self, path: str) -> bool:
        """Whether the module's output needs a gradient of its own: an adapter, or a trained bias."""
        return path in self.adapted_paths or path in self.bias_paths

    def linear(self, path: str, x_bytes_per_element: int, x_needs_grad: bool) -> tuple[list[SavedTensor], bool]:
        """What a (possibly adapted) linear saves for its input x: (own tensors, whether x itself is kept).

        x itself is kept when the base weight trains (full fine-tuning) or when an adapter uses x
        without a cast. Under autocast every consumer casts an fp32 input to 16-bit on its own, and that
        copy, not x, is what is saved.
        """
        if self.input_grads is not None:
            self.input_grads[path] = x_needs_grad
        m = self.modules[path]
        tokens, name = self.tokens, path.split("layers.0.")[-1].split("h.0.")[-1]
        own: list[SavedTensor] = []
        keeps_x = False
        cast_by_autocast = self.amp and x_bytes_per_element != self.e_compute
        if self.int8 and x_needs_grad and m.group != "lm_head" and path not in self.trained_paths:
            # LLM.int8's matmul keeps its input as a context attribute whenever it has a node (bitsandbytes 0.50.2
            # `autograd/_functions.py`: `ctx.A = A` in `MatMul8bitFp`, `ctx.tensors = (None, subA, A)` in
            # `MatMul8bitLt`), though backward never reads it: the frozen weight needs no gradient. Under checkpointing
            # these are held from the forward (`activations.int8_checkpoint_held_bytes`), and the recompute keeps no
            # second copy (its hooks see no context attribute): only what another op saves is recomputed.
            keeps_x = keeps_x or not self.t.grad_checkpointing  # (reentrant: the recompute keeps it, as without)
            if self.int8_inputs is not None:
                self.int8_inputs[int8_input_key(self.family, name)] = tokens * m.in_features * x_bytes_per_element
        if self.full or path in self.trained_paths:
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
            if self.t.lora.use_dora:
                own += dora_saved(self, name, m.out_features, x_bytes_per_element, x_needs_grad)
                if self.t.grad_checkpointing:
                    # the recompute (non-reentrant checkpointing) packs every saved tensor, those of B A's unused
                    # graph too (the identity and A I): they stay in the checkpoint's frame through the backward
                    own.append(SavedTensor(f"{name}.dora_recomputed_identity",
                                           (m.in_features + self.r) * m.in_features * self.e_adapter))
                if self.dora_modules is not None:
                    self.dora_modules.append((m.in_features, m.out_features, x_bytes_per_element, x_needs_grad))
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
        if x_needs_grad or self.full or path in self.trained_paths:
            copies.append(SavedTensor(f"{name}.weight_autocast_copy", m.in_features * m.out_features * self.e_compute))
        if self.adapted(path):
            lora_in = m.in_features if x_needs_grad else 0
            copies.append(SavedTensor(f"{name}.lora_weights_autocast_copy",
                                      self.r * (lora_in + m.out_features) * self.e_compute))
        return copies

    def note_attention(self, q_grad: bool, k_grad: bool, v_grad: bool) -> None:
        if self.input_grads is not None:
            self.attention_grads = (q_grad, k_grad, v_grad)


# ---------------------------------------------------------------------------------------------- DoRA
# PEFT 0.21.2's DoRA on a Linear (`peft/tuners/lora/variants.py` `DoraLinearVariant.forward`, `peft/tuners/lora/dora.py`
# `DoraLinearLayer.forward`), lora_dropout 0 (PEFT's default: the base output is reused, not recomputed), measured on
# CPU (tests/profiler/test_runner.py): `get_lora_weight` builds B A as lora_B(lora_A(eye(in))) with a graph, the base
# weight is cast to the adapter dtype, `weight + scaling * B A` and its row norm are taken detached (the paper's
# section 4.3), so none of the out x in tensors is kept; then `(m / norm - 1) * base_result + m / norm * lora_result *
# scaling` keeps the base output, B A x, and three (out,) vectors.


def dora_saved(flow: Flow, name: str, out_features: int, x_e: int, x_needs_grad: bool) -> list[SavedTensor]:
    """What DoRA adds to a LoRA linear's saved tensors: the base output (its dtype: the input's, the compute dtype
    under autocast), B A x (the adapter dtype; 16-bit under autocast) and the norm, m / norm and, when x needs a
    gradient, m / norm - 1 ((out,) in the adapter dtype)."""
    tokens = flow.tokens
    base_e = flow.e_compute if flow.amp else x_e
    lora_e = flow.e_compute if flow.amp else flow.e_adapter
    return [SavedTensor(f"{name}.dora_base_output", tokens * out_features * base_e),
            SavedTensor(f"{name}.dora_lora_result", tokens * out_features * lora_e),
            SavedTensor(f"{name}.dora_scales", (3 if x_needs_grad else 2) * out_features * flow.e_adapter)]


def dora_forward_scratch(flow: Flow, in_features: int, out_features: int, x_e: int, x_needs_grad: bool) -> int:
    """DoRA's forward transient in one adapted linear, above what lives when it starts (measured): the base output
    and the input cast to the adapter dtype; the I x I identity, A I, B A and the base weight's cast copy (out x in;
    on a 4-bit base also the dequantized weight at its load dtype, `dequantize_module_weight`);
    then the larger of the weight norm's two out x in temporaries and the output's combination (B A x, three fp32
    tokens x out products, A x, the (out,) vectors)."""
    tokens, r, ea = flow.tokens, flow.r, flow.e_adapter
    i, o = in_features, out_features
    weight_e = BYTES_PER_ELEMENT[flow.t.dtype]
    held = tokens * o * x_e + (tokens * i * ea if x_e != ea else 0)
    weights = i * i * ea + i * r * ea + o * i * ea + (o * i * ea if weight_e != ea else 0)
    if flow.t.method == "qlora":  # `dequantize_module_weight`: the 4-bit weight at its load dtype, before the cast
        weights += o * i * weight_e
    combine = (3 if x_needs_grad else 2) * o * ea + tokens * r * ea + 4 * tokens * o * ea
    return held + weights + max(2 * o * i * ea, combine)


def dora_backward_scratch(flow: Flow, out_features: int, x_e: int) -> int:
    """The heaviest moment of one DoRA linear's backward beyond the incoming gradient (measured): the gradient cast to
    the adapter dtype and the base output's (input dtype), three tokens x out products in the adapter dtype, the
    magnitude's gradient."""
    tokens, ea = flow.tokens, flow.e_adapter
    cast = tokens * out_features * (ea + x_e) if x_e != ea else 0
    return cast + 3 * tokens * out_features * ea + out_features * ea


# ---------------------------------------------------------------------------------------------- norms


def norm(flow: Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """The family's norm (`Family.norm`)."""
    return layer_norm(flow, name, x_needs_grad) if flow.family.norm == "layer" else rms_norm(flow, name, x_needs_grad)


def liger_rms_norm(flow: Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """Liger's `LigerRMSNormFunction`, which its instance patch binds on input_layernorm, post_attention_layernorm
    and the final norm (Liger-Kernel `src/liger_kernel/ops/rms_norm.py` `forward`: `ctx.save_for_backward(X, W,
    RSTD)`; `rms_norm_forward`: Y in X's dtype, RSTD (rows,) fp32 in the llama and gemma casting modes): its input
    itself, the residual stream in the stream dtype (no fp32 copy, no normalised tensor: the weight's gradient comes
    from X and RSTD), and 1/rms, whenever it has a graph. Under checkpointing a layer's input_layernorm input is the
    layer's checkpointed input, so its recompute keeps no second copy."""
    if not (x_needs_grad or flow.full):
        return []
    saved = [] if flow.t.grad_checkpointing and name == "input_layernorm" else \
        [SavedTensor(f"{name}.input", flow.tokens * flow.spec.hidden_size * flow.e_stream)]
    return saved + [SavedTensor(f"{name}.rstd", flow.tokens * FP32)]


def rms_norm(flow: Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """Llama / Gemma RMSNorm: `x.to(fp32)`, `x * rsqrt(mean(x^2) + eps)`, then the weight.

    Saves the fp32 input (the stream itself when it is already fp32) and 1/rms when x needs a gradient;
    the normalised tensor only when the weight trains. Llama multiplies after casting back to the stream
    dtype; Gemma ("rms_gemma") multiplies in fp32 by `1 + w`, keeping that fp32 vector and an fp32
    normalised tensor; OLMo 2 ("rms_fp32") multiplies in fp32 by w itself, keeping an fp32 normalised tensor.
    """
    if flow.liger:
        return liger_rms_norm(flow, name, x_needs_grad)
    tokens, h = flow.tokens, flow.spec.hidden_size
    gemma = flow.family.norm == "rms_gemma"
    saved: list[SavedTensor] = []
    if x_needs_grad:
        saved += [SavedTensor(f"{name}.fp32_input", tokens * h * FP32), SavedTensor(f"{name}.rsqrt", tokens * FP32)]
        if gemma:
            saved.append(SavedTensor(f"{name}.one_plus_weight", h * FP32))
    if flow.full:
        width = FP32 if gemma or flow.family.norm == "rms_fp32" else flow.e_stream
        saved.append(SavedTensor(f"{name}.normalised", tokens * h * width))
    return saved


def rms_norm_backward(flow: Flow, model: tuple[SavedTensor, ...]) -> tuple[int, int]:
    """The final RMSNorm's backward on a 16-bit stream (Llama's, Gemma's and OLMo 2's, `rms_norm`; measured on CPU): 1/rms
    (and Gemma's fp32 1 + w) is freed by then, the fp32 input is still kept, and pow's backward (`grad * 2 * x.pow(1)`) holds five fp32
    tokens x hidden buffers (the product's two branches, the mean's expanded gradient, x^1 and 2 x^1). Returns (bytes
    freed, buffers); (0, 0) where not modelled: fp32 streams, Liger's norm, full fine-tuning (a trained norm), LoRA on
    lm_head or a trained copy of it (their backward runs first). It decides only where the loss's backward is light (a
    fused loss) and the MLP is narrow beside the hidden size (the last layer's backward is lighter)."""
    if flow.liger or flow.full or flow.family.norm not in ("rms", "rms_gemma", "rms_fp32") or flow.e_stream == FP32 \
            or any(flow.modules[p].group == "lm_head" for p in flow.outside_adapters | flow.trained_paths):
        return (0, 0)
    freed = sum(t.nbytes for t in model if t.name.startswith("final_norm.") and t.name != "final_norm.fp32_input")
    return (freed, 5 * flow.tokens * flow.spec.hidden_size * FP32) if freed else (0, 0)


def rms_norm_of(flow: Flow, name: str, numel: int, width: int, x_e: int, x_needs_grad: bool,
                fp32_product: bool = False) -> list[SavedTensor]:
    """RMSNorm over the last `width` channels of a tensor of `numel` elements, `x_e` bytes each, wherever it sits:
    the q / k norms of Qwen3 (per head, `Qwen3RMSNorm(head_dim)`) and OLMo 2 (over the whole q / kv width),
    OLMo 2's norms of the attention and MLP outputs. As `rms_norm`: the fp32 input (x itself when already fp32)
    and the per-row 1/rms when x needs a gradient; when the weight trains, the normalised tensor in x's dtype
    (Qwen3RMSNorm: `weight * x.to(input_dtype)`) or in fp32 (`fp32_product`, Olmo2RMSNorm:
    `(weight * x).to(input_dtype)`)."""
    saved: list[SavedTensor] = []
    if x_needs_grad:
        saved += [SavedTensor(f"{name}.fp32_input", numel * FP32), SavedTensor(f"{name}.rsqrt", numel // width * FP32)]
    if flow.full:
        saved.append(SavedTensor(f"{name}.normalised", numel * (FP32 if fp32_product else x_e)))
    return saved


def layer_norm(flow: Flow, name: str, x_needs_grad: bool) -> list[SavedTensor]:
    """nn.LayerNorm keeps its input and the per-token mean and 1/std: in the input's dtype on CPU (measured),
    in fp32 on CUDA (`layer_norm_cuda` allocates them in the accumulation type). A trained bias alone (LoRA's
    `bias="all"`) keeps the same: `native_layer_norm`'s one backward formula saves all three."""
    if not (x_needs_grad or flow.full or flow.norm_bias_trains):
        return []
    tokens, h, e = flow.tokens, flow.spec.hidden_size, flow.e_stream
    stats = FP32 if flow.t.device == "cuda" else e
    return [SavedTensor(f"{name}.input", tokens * h * e), SavedTensor(f"{name}.mean_rstd", 2 * tokens * stats)]


def dropout_mask(flow: Flow, name: str, numel: int, p: float, x_needs_grad: bool, e: int) -> list[SavedTensor]:
    """Training-mode dropout keeps its mask: a bool tensor from `native_dropout` on CUDA; on CPU
    `F.dropout` multiplies by a Bernoulli tensor in the activation dtype."""
    if p <= 0 or not x_needs_grad:
        return []
    return [SavedTensor(f"{name}.mask", numel * (MASK if flow.t.device == "cuda" else e))]


# ---------------------------------------------------------------------------------------------- attention


# ---------------------------------------------------------------------------------------------- SDPA's kernel
# On CUDA, `F.scaled_dot_product_attention` runs the first kernel whose checks pass, in torch's default order
# (ATen/Context.h `sdp_priority_order`: flash, memory-efficient, math; pytorch/pytorch
# aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `select_sdp_backend`, `can_use_flash_attention`,
# `can_use_mem_efficient_attention`):
# - flash: fp16 / bf16, no attention mask, q / k / v head dims equal and <= 256, grouped-query attention allowed;
# - memory-efficient: fp16 / bf16 / fp32, a mask allowed, grouped-query attention allowed (`supports_gqa`), head dims
#   multiples of the GEMM alignment (`minimum_gemm_alignment`: 8 in 16-bit, 4 in fp32 on sm80+); its log-sum-exp is
#   padded to a multiple of 32 positions;
# - math: everything else, an eager-style graph (`_scaled_dot_product_attention_math`: S x S probabilities).
# transformers passes `enable_gqa=True` (k, v at kv-head width) when there is no mask and the head dims are <= 256
# (`integrations/sdpa_attention.py` `use_gqa_in_sdpa`), and repeats k / v itself otherwise. On H100 / B200 with
# cuDNN >= 9.15 (`check_prefer_cudnn_attention`) cuDNN's kernel goes first for 16-bit inputs: it keeps what flash
# keeps (q, k, v, the output, an unpadded fp32 log-sum-exp), so the flash plan stands. On the CPU the flash kernel
# takes every dtype and a mask (measured). sm86-89's refusal of flash for training head dims in (192, 224] is not
# modelled (the plan does not know the GPU's architecture).
SdpaKernel = str  # "flash" | "efficient" | "math" | "cpu-flash"
EFFICIENT_LSE_ALIGN = 32  # mem-efficient attention's log-sum-exp rows (`kernel_forward.h`: kAlignLSE)


def sdpa_kernel(flow: Flow, head_dim: int | None = None, v_head_dim: int | None = None) -> tuple[SdpaKernel, str]:
    """(the kernel SDPA runs for this layer, why) per the rules above."""
    if flow.t.device != "cuda":
        return "cpu-flash", "the CPU's flash kernel takes every dtype and a mask"
    spec = flow.spec
    if spec.v_head_dim:  # DeepSeek's MLA: q / k are qk_nope_head_dim + head_dim (RoPE) wide, v v_head_dim
        hd, hv = spec.qk_nope_head_dim + spec.head_dim, spec.v_head_dim
    else:
        hd = hv = spec.head_dim
    hd, hv = head_dim or hd, v_head_dim or hv
    masked = sdpa_mask_applies(flow)
    low = flow.e_attention == 2
    if low and not masked and hd == hv <= 256:
        return "flash", "16-bit, no mask, head dim <= 256"
    align = 8 if low else 4
    why = "a materialised mask" if masked else ("fp32" if not low else f"head dims {hd} / {hv}")
    if hd % align == 0 and hv % align == 0:
        return "efficient", f"{why} rules flash out"
    return "math", f"{why} rules flash out, and head dim {hd if hd % align else hv} is not a multiple of {align}"


def logsumexp_saved(flow: Flow, heads: int, kernel: SdpaKernel | None = None) -> SavedTensor:
    """SDPA's fp32 log-sum-exp (b x heads x s), its rows padded to 32 by the memory-efficient kernel."""
    kernel = kernel or sdpa_kernel(flow)[0]
    rows = round_up(flow.s, EFFICIENT_LSE_ALIGN) if kernel == "efficient" else flow.s
    return SavedTensor("attn.logsumexp", flow.b * heads * rows * FP32)


def sdpa(flow: Flow, q_cols: int, kv_cols: int) -> list[SavedTensor]:
    """Fused SDPA (flash / memory-efficient, CUDA and CPU) keeps q, k, v, the output and the fp32
    log-sum-exp (b x heads x s); with no padding mask transformers passes `enable_gqa`, so k and v stay
    at kv-head width. q and k are fresh RoPE outputs; v is the projection output itself."""
    tokens, e = flow.tokens, flow.e_compute
    return [
        SavedTensor("attn.q_rotated", tokens * q_cols * e),
        SavedTensor("attn.k_rotated", tokens * kv_cols * e),
        SavedTensor("attn.v", tokens * kv_cols * e),
        SavedTensor("attn.output", tokens * q_cols * e),
        logsumexp_saved(flow, flow.spec.num_heads),
    ]


def sdpa_math(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """SDPA's math kernel (aten/src/ATen/native/transformers/attention.cpp `_scaled_dot_product_attention_math`):
    q and k each scaled by sqrt(scale) (new tensors), k and v repeated to every head first under `enable_gqa`
    (`repeat_interleave`: copies), q k^T, `_safe_softmax` in the compute dtype, dropout, then the probabilities @ v.
    Each matmul keeps the operand the other's gradient needs: the scaled q (when k needs a gradient), the scaled
    repeated k (when q does), the probabilities and v (whole-head width). Measured on CPU steps with the math kernel
    forced (tests/test_rules.py)."""
    tokens, e, spec = flow.tokens, flow.e_compute, flow.spec
    saved = []
    if k_grad:
        saved.append(SavedTensor("attn.q_scaled", tokens * spec.q_size * e))
    if q_grad:
        saved.append(SavedTensor("attn.k_scaled_repeated", tokens * spec.q_size * e))
    if q_grad or k_grad:
        saved += softmax_saved(flow, v_grad, fp32_softmax=False)
        saved.append(SavedTensor("attn.v_repeated", tokens * spec.q_size * e))
    elif v_grad:  # the probabilities (after dropout) for v's gradient
        saved.append(SavedTensor("attn.probs", flow.b * spec.num_heads * flow.s * flow.s * e))
    return saved


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flash_attention(flow: Flow, q_cols: int, kv_cols: int, v_storage: int | None = None) -> list[SavedTensor]:
    """flash-attn 2 (`attn_implementation="flash_attention_2"`), modelled from its source (Dao-AILab/flash-attention
    `flash_attn/flash_attn_interface.py` `FlashAttnFunc.forward`: `ctx.save_for_backward(q, k, v, out_padded,
    softmax_lse, rng_state)`; `csrc/flash_attn/flash_api.cpp` `mha_fwd`: `out = torch::empty_like(q)`, `softmax_lse`
    (b, heads, s) fp32, `rng_state` 2 int64): q, k and v as they reach it (transformers' (b, s, heads, dim)
    transposes are views, `maybe_contiguous` copies nothing with a unit last stride; k and v stay at kv-head width,
    the kernel does grouped-query attention itself), each padded to a multiple of 8 channels per head when the head
    dim is not (`F.pad` copies), the output, the fp32 log-sum-exp and the RNG state. `v_storage`: bytes v keeps when
    it is a view of a wider tensor (a fused qkv output). In the flash dtype (`Flow.e_attention`). Not measured here
    (flash-attn needs CUDA): the counts are pinned by hand in tests/test_activations.py."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_attention
    dim = spec.head_dim
    pad = round_up(dim, 8) / dim
    v_bytes = int(tokens * kv_cols * e * pad) if v_storage is None or pad != 1 else v_storage
    saved = [
        SavedTensor("attn.q_rotated", int(tokens * q_cols * e * pad)),
        SavedTensor("attn.k_rotated", int(tokens * kv_cols * e * pad)),
        SavedTensor("attn.v", v_bytes),
        SavedTensor("attn.output", int(tokens * q_cols * e * pad)),
        SavedTensor("attn.logsumexp", flow.b * spec.num_heads * flow.s * FP32),
        SavedTensor("attn.rng_state", 2 * 8),
    ]
    if flow.t.padding:
        # the varlen path (`modeling_flash_attention_utils._upad_input`): each layer gathers the real tokens of q, k
        # and v (copies of the same size when every row is full, the planned worst case) by int64 indices, which
        # the gathers and the re-padding of the output keep, beside the int32 cumulative lengths (b + 1)
        saved += [SavedTensor("attn.unpad_indices", tokens * 8), SavedTensor("attn.cu_seqlens", (flow.b + 1) * 4)]
    return saved


def flash_backward_scratch(flow: Flow) -> int:
    """flash-attn 2's backward at its heaviest (`csrc/flash_attn/flash_api.cpp` `mha_bwd`): beside the incoming
    gradient of the output (b, s, heads, dim), dq / dk / dv (`empty_like` of q, k, v), `softmax_d` (b, heads,
    s rounded up to 128) fp32, `dq_accum` (b, s rounded to 128, heads, dim rounded to 32 (to 64 above 128)) fp32, and
    under grouped-query attention `dk_expanded` / `dv_expanded` at every head's width before the sum over groups;
    plus the layer's incoming stream gradient."""
    spec, b, s, e = flow.spec, flow.b, flow.s, flow.e_attention
    heads, dim = spec.num_heads, round_up(spec.head_dim, 8)
    q, kv = b * s * heads * dim * e, b * s * spec.num_kv_heads * dim * e
    s_rounded = round_up(s, 128)
    accum = b * s_rounded * heads * round_up(dim, 32 if dim <= 128 else 64) * FP32
    expanded = 2 * q if spec.num_kv_heads != heads else 0
    return (2 * q + 2 * kv + b * heads * s_rounded * FP32 + accum + expanded
            + flow.tokens * spec.hidden_size * flow.e_stream)


# ---------------------------------------------------------------------------------------------- FlexAttention
# PyTorch's FlexAttention as transformers 5.24 trains with it (`integrations/flex_attention.py`
# `flex_attention_forward`: `enable_gqa=True` for a power-of-two head count, the LSE requested on CUDA, the output
# `transpose(1, 2).contiguous()`; `compile_friendly_flex_attention` compiles `flex_attention`), modelled from torch 2.13's
# source because it has no backward on the CPU: `torch/_higher_order_ops/flex_attention.py`
# `FlexAttentionAutogradOp.forward` saves q, k, v, the output, the log-sum-exp and the block mask's tensors (the max
# scores are output too, but the compiled graph's backward does not read them: freed); the inductor template
# (`torch/_inductor/kernel/flex/flex_attention.py`, `tuned_flex_attention`) writes the output with q's stride order and
# an fp32 (b, heads, s) log-sum-exp; its backward (`tuned_flex_attention_backward`) makes the fp32 (b, heads, s)
# `delta`, dq (q's shape) and dk / dv at the kv heads' width (grouped-query attention inside the kernel). The mask is a
# BlockMask (`masking_utils.flex_attention_mask`, `create_block_mask(B=batch, H=None)`): int32 block counts and
# indices at 128 x 128 blocks, nothing S x S; padding, packed sequences, sliding windows and soft-capping live in its
# mask / score functions. Dropout is refused by transformers.
FLEX_BLOCK = 128  # `_DEFAULT_SPARSE_BLOCK_SIZE`


def flex_attention(flow: Flow, q_cols: int, kv_cols: int, v_storage: int | None = None) -> list[SavedTensor]:
    """FlexAttention's saved tensors (above): q and k as RoPE left them, v as it reaches it (`v_storage`: the bytes a
    view of a wider tensor keeps, e.g. a fused qkv output), k and v at kv-head width, the output and the fp32
    log-sum-exp; in the compute dtype (it takes fp32 too). The block mask is model-level (`flex_block_mask_bytes`)."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    if spec.num_heads & (spec.num_heads - 1):  # not a power of two: transformers repeats k and v (`repeat_kv`)
        kv_cols, v_storage = q_cols, None
    return [
        SavedTensor("attn.q_rotated", tokens * q_cols * e),
        SavedTensor("attn.k_rotated", tokens * kv_cols * e),
        SavedTensor("attn.v", tokens * kv_cols * e if v_storage is None else v_storage),
        SavedTensor("attn.output", tokens * q_cols * e),
        SavedTensor("attn.logsumexp", flow.b * spec.num_heads * flow.s * FP32),
    ]


def flex_block_mask_bytes(flow: Flow) -> int:
    """One BlockMask's tensors (torch `nn/attention/flex_attention.py` `BlockMask`): for the kv side and the q side
    (its transpose, for backward), the block counts (b, 1, blocks) and the indices (b, 1, blocks, blocks), each for the
    partial and the full blocks, int32; one mask per kind of layer (sliding and full), shared by every layer."""
    blocks = -(-flow.s // FLEX_BLOCK)
    kinds = len(set(flow.spec.layer_types or ())) or 1
    return kinds * 4 * flow.b * 4 * (blocks + blocks * blocks)


def flex_backward_scratch(flow: Flow) -> int:
    """FlexAttention's backward at its heaviest (above): beside the incoming gradient of the output, dq (q's size), dk
    and dv (kv width) and the fp32 (b, heads, s) delta, plus the layer's incoming stream gradient."""
    spec, e = flow.spec, flow.e_compute
    kv_size = spec.q_size if spec.num_heads & (spec.num_heads - 1) else spec.kv_size
    q, kv = flow.tokens * spec.q_size * e, flow.tokens * kv_size * e
    return 2 * q + 2 * kv + flow.b * spec.num_heads * flow.s * FP32 + flow.tokens * spec.hidden_size * flow.e_stream


def fused_output_reused(flow: Flow) -> bool:
    """Whether o_proj reads the saved attention output without a copy: SDPA's fused output is laid out (b, s, heads,
    dim), so merging the heads is a view; flash-attn's `empty_like(q)` keeps q's (b, heads, s, dim) storage order
    (q arrives as a transposed view), so transformers' `reshape(...).contiguous()` copies it, as after eager
    attention and SDPA's math kernel (whose output is not saved: `sdpa_math`)."""
    return flow.t.attention == "sdpa" and sdpa_kernel(flow)[0] != "math"


def softmax_saved(flow: Flow, v_needs_grad: bool, fp32_softmax: bool = True) -> list[SavedTensor]:
    """Eager attention's S x S tensors: softmax keeps its output (fp32 when transformers asks for an fp32
    softmax (`fp32_softmax`) or autocast runs it in fp32); the 16-bit copy of the probabilities is kept by the
    matmul with v when v needs a gradient (in fp32 it is the same tensor); dropout adds a mask and the
    dropped probabilities."""
    scores, e = flow.b * flow.spec.num_heads * flow.s * flow.s, flow.e_compute
    softmax_e = FP32 if fp32_softmax or flow.amp else e
    saved = [SavedTensor("attn.softmax", scores * softmax_e)]
    probs_copy = softmax_e != e
    if flow.spec.attention_dropout > 0:
        saved += dropout_mask(flow, "attn.dropout", scores, flow.spec.attention_dropout, True, e)
        saved.append(SavedTensor("attn.probs_dropped", scores * e))
    elif probs_copy and v_needs_grad:
        saved.append(SavedTensor("attn.probs", scores * e))
    return saved


def eager_attention(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """matmul(q, k^T) keeps each operand for the other's gradient; `repeat_kv` copies k and v to all
    heads first (when heads > kv heads); probs @ v keeps v when the probabilities need a gradient. With one kv head
    and one row (b = 1, e.g. a packed row) the repeat is a stride-0 view that matmul folds into its bmm without a
    copy, so k and v keep their kv-wide storage (measured: tests/profiler/test_runner.py, Gemma packed)."""
    tokens, e, spec = flow.tokens, flow.e_compute, flow.spec
    folds = spec.num_kv_heads == spec.num_heads or (spec.num_kv_heads == 1 and flow.b == 1)
    repeated = spec.kv_size if folds else spec.q_size
    saved = []
    if k_grad:
        saved.append(SavedTensor("attn.q_rotated", tokens * spec.q_size * e))
    if q_grad:
        saved.append(SavedTensor("attn.k_repeated", tokens * repeated * e))
    if q_grad or k_grad:
        saved += softmax_saved(flow, v_grad)
        saved.append(SavedTensor("attn.v_repeated", tokens * repeated * e))
    elif v_grad:
        saved += [s for s in softmax_saved(flow, True) if s.name != "attn.softmax"]
    return saved


def attention_core(flow: Flow, q_grad: bool, k_grad: bool, v_grad: bool) -> list[SavedTensor]:
    """RoPE'd q, k and v through SDPA, flash-attn or FlexAttention (everything or nothing) or eager attention (per
    operand); a
    sliding-window layer whose SDPA mask is materialised keeps what `masked_sdpa` says (flash-attn takes the window
    and Gemma 2's soft-cap inside the kernel: no mask)."""
    flow.note_attention(q_grad, k_grad, v_grad)
    if flow.t.attention == "eager":
        return eager_attention(flow, q_grad, k_grad, v_grad)
    if not (q_grad or k_grad or v_grad):
        return []
    if flow.t.attention == FLASH:
        return flash_attention(flow, flow.spec.q_size, flow.spec.kv_size)
    if flow.t.attention == FLEX:
        return flex_attention(flow, flow.spec.q_size, flow.spec.kv_size)
    if sdpa_kernel(flow)[0] == "math":
        return sdpa_math(flow, q_grad, k_grad, v_grad)
    if sdpa_mask_applies(flow):
        return masked_sdpa(flow, flow.spec.q_size)
    return sdpa(flow, flow.spec.q_size, flow.spec.kv_size)


# ---------------------------------------------------------------------------------------------- sliding windows
# transformers 5.24 `masking_utils`: every family with a window (Mistral, Phi-3, StarCoder2: all layers, from
# `config.sliding_window`; Qwen2 / Qwen3 / SmolLM3 / Gemma 2 / Gemma 3: the "sliding_attention" entries of
# `config.layer_types`) builds its sliding layers' mask with `create_sliding_window_causal_mask`, the others' with
# `create_causal_mask`. The config reader writes each family's `ModelSpec.layer_types` the way its config class does
# (all "sliding_attention" for the single-window families), so one rule serves them all.
#
# - SDPA: `sdpa_mask` returns None (SDPA's `is_causal`) only while seq_len < sliding_window
#   (`_ignore_causal_mask_sdpa`: `kv_length >= local_attention_size` materialises it). From seq_len >= window on, a
#   (1, 1, s, s) bool mask (expanded to the batch: a view) reaches `sdpa_attention_forward`, which then repeats k and
#   v to every head (`use_gqa_in_sdpa` is False with a mask: `repeat_kv`), and SDPA converts the bool mask into an
#   additive (b, 1, s, s) mask in the compute dtype on every call (`convert_boolean_attn_mask`), which its backward
#   keeps (`masked_sdpa`). Full layers keep SDPA's `is_causal` path (`sdpa`).
# - eager: `eager_mask` materialises a (b, 1, s, s) additive mask in the embeddings' dtype for each kind present;
#   adding it saves nothing, so sliding and full layers keep the same tensors.
# - gradient checkpointing (non-reentrant) keeps each layer's mask argument until that layer's backward
#   (`mask_arguments`).
# CUDA: the masked SDPA rules out the flash kernel and the memory-efficient one runs. Assumed: it keeps what the CPU
# flash kernel keeps (q, the repeated k / v, the output, the fp32 log-sum-exp, the additive mask as its bias);
# its log-sum-exp is padded to a multiple of 32 positions and its bias to a multiple of 16, so equal sizes when
# seq_len is a multiple of 32 and a few bytes per row more otherwise (not counted). Measured on the CPU (SDPA's
# CPU flash kernel takes the mask; tests/test_activations.py `*_swa`) and in fake traces of full-size models (CPU
# dispatch); not yet on a GPU.

SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_mask_materialised(flow: Flow) -> bool:
    """Whether SDPA's sliding-window layers get an explicit mask: seq_len >= sliding_window
    (`masking_utils._ignore_causal_mask_sdpa`). flash-attn takes the window as `window_size` (no mask; transformers'
    `flash_attention_mask` passes none without padding)."""
    window = flow.spec.sliding_window
    return flow.t.attention == "sdpa" and window is not None and flow.s >= window


def sliding_mask_applies(flow: Flow) -> bool:
    """This layer is a sliding-window layer (`Flow.layer_type`) and SDPA gets its mask."""
    return flow.layer_type == SLIDING and sliding_mask_materialised(flow)


def sdpa_mask_applies(flow: Flow) -> bool:
    """SDPA gets a materialised mask in this layer: a padded or packed batch (every layer: `masking_utils.sdpa_mask`
    builds a (b, 1, s, s) bool mask once `_ignore_causal_mask_sdpa` sees a padding zero or packed sequences), or a
    sliding window past --seq-len (`sliding_mask_applies`). Measured on CPU steps with padding and packing
    (tests/profiler/test_runner.py)."""
    return flow.t.attention == "sdpa" and (flow.masked or sliding_mask_applies(flow))


def masked_sdpa(flow: Flow, q_cols: int) -> list[SavedTensor]:
    """SDPA with a materialised mask: q (`q_cols` wide), k and v repeated to every head (`repeat_kv`; as they are
    without GQA), the output, the log-sum-exp, and the additive (b, 1, s, s) mask SDPA makes of the bool one.
    With a single kv head (Gemma 3 1B) `repeat_kv`'s expand + reshape is a view of the kv-wide tensor (the head
    dimension keeps stride 0), so k and v keep their kv-wide storage."""
    kv_cols = flow.spec.kv_size if flow.spec.num_kv_heads == 1 else q_cols
    return sdpa(flow, q_cols, kv_cols) + [SavedTensor("attn.additive_mask", flow.b * flow.s * flow.s * flow.e_compute)]


def mask_arguments(flow: Flow) -> list[SavedTensor]:
    """Under non-reentrant checkpointing, the sliding layers' mask argument their recompute closures keep (the full
    layers' eager mask is counted by `lora_planner.activations` for every eager family): SDPA, seq_len >= window: the
    (1, 1, s, s) bool mask, (b, 1, s, s) with padding or packing (then at any length); eager with both kinds of
    layer: the second (b, 1, s, s) additive mask."""
    kinds = set(flow.spec.layer_types or ())
    if not flow.t.grad_checkpointing or SLIDING not in kinds:
        return []
    if flow.t.attention == "sdpa" and flow.masked:  # the padding mask's batch dimension carries through
        return [SavedTensor("checkpoint.sliding_attention_mask", flow.b * flow.s * flow.s)]
    if sliding_mask_materialised(flow):
        return [SavedTensor("checkpoint.sliding_attention_mask", flow.s * flow.s)]
    if flow.t.attention == "eager" and kinds == {SLIDING, FULL}:
        return [SavedTensor("checkpoint.sliding_attention_mask", flow.b * flow.s * flow.s * flow.e_stream)]
    return []


def sliding_model_level(flow: Flow, embeddings_need_grad: bool) -> list[SavedTensor]:
    """`Family.model_level` of a family whose only tensors outside the layers are the mask arguments."""
    return mask_arguments(flow)


def attention_projections(flow: Flow, prefix: str, projections: tuple[str, ...],
                          x_needs_grad: bool) -> tuple[list[SavedTensor], bool, tuple[bool, ...]]:
    """q / k / v (or fused qkv) linears sharing one normed input: (saved, whether the input is kept,
    whether each output needs a gradient)."""
    saved: list[SavedTensor] = []
    keeps_input = False
    for proj in projections:
        own, keeps = flow.linear(prefix + proj, flow.e_stream, x_needs_grad)
        saved += own
        keeps_input |= keeps
    grads = tuple(x_needs_grad or flow.trains(prefix + proj) for proj in projections)
    return saved, keeps_input, grads


def normed_attention_input(flow: Flow, prefix: str, projections: tuple[str, ...],
                           x_needs_grad: bool) -> tuple[list[SavedTensor], tuple[bool, ...]]:
    """A pre-norm layer's way into attention: `input_layernorm`, then the projections reading its output (q / k / v
    or a fused qkv, under `prefix`, e.g. "model.layers.0.self_attn."), and that output itself when a projection
    keeps its input: (saved, whether each projection's output needs a gradient)."""
    saved = norm(flow, "input_layernorm", x_needs_grad)
    own, keeps_normed, grads = attention_projections(flow, prefix, projections, x_needs_grad)
    saved += own
    if keeps_normed:
        saved.append(SavedTensor("input_layernorm.output", flow.tokens * flow.spec.hidden_size * flow.e_stream))
    return saved, grads


def output_projection(flow: Flow, path: str, width: int, attn_needs_grad: bool,
                      reads_saved_output: bool = False) -> tuple[list[SavedTensor], bool]:
    """The projection after attention (o_proj / dense, input `width` wide in the compute dtype): its own tensors,
    and its input when it keeps it, unless that input is the attention output already saved
    (`reads_saved_output`: fused SDPA's output is laid out (b, s, heads, dim), so the projection reads it without
    a copy; eager attention, partial RoPE's cat and merged heads make a copy). (saved, whether the output needs
    a gradient)."""
    own, keeps = flow.linear(path, flow.e_attention, attn_needs_grad)
    if keeps and not (reads_saved_output and attn_needs_grad):
        name = path.split("layers.0.")[-1].split("h.0.")[-1]
        own.append(SavedTensor(f"{name}.input", flow.tokens * width * flow.e_attention))
    return own, attn_needs_grad or flow.trains(path)


# ---------------------------------------------------------------------------------------------- MLPs


def gelu_saved(flow: Flow) -> list[SavedTensor]:
    """What the MLP activation keeps. `gelu_new` (GPT-2, Phi) is written out in Python in transformers
    (`0.5*x*(1 + tanh(c*(x + 0.044715*x^3)))`) and keeps x, tanh(.), 0.5*x and 1 + tanh(.); one-op
    activations (F.gelu, BLOOM's custom GeLUFunction) keep only x."""
    inter = flow.tokens * flow.spec.intermediate_size * flow.e_compute
    if flow.spec.hidden_act == "gelu_new":
        return [SavedTensor("mlp.act_input", inter), SavedTensor("mlp.act_tanh", inter),
                SavedTensor("mlp.act_half_x", inter), SavedTensor("mlp.act_one_plus_tanh", inter)]
    return [SavedTensor("mlp.act_input", inter)]


def plain_mlp(flow: Flow, fc1: str, fc2: str, x_needs_grad: bool) -> tuple[list[SavedTensor], bool, bool]:
    """fc1 -> activation -> fc2 (Phi, GPT-2, BLOOM): (saved, whether fc1 keeps its input, whether the
    output needs a gradient)."""
    saved, keeps_x = flow.linear(fc1, flow.e_stream, x_needs_grad)
    inner_grad = x_needs_grad or flow.trains(fc1)
    if inner_grad:
        saved += gelu_saved(flow)
    own, keeps = flow.linear(fc2, flow.e_compute, inner_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.fc2_input", flow.tokens * flow.spec.intermediate_size * flow.e_compute))
    return saved, keeps_x, inner_grad or flow.trains(fc2)


def gated_mlp(flow: Flow, prefix: str, x_needs_grad: bool, input_name: str,
              width: int | None = None) -> tuple[list[SavedTensor], bool]:
    """Llama's MLP: gate_proj and up_proj on one input (kept once, as `input_name`, when a linear needs it),
    act(gate) * up, down_proj (`width` wide inside; the model's intermediate_size unless given, e.g. Qwen2-MoE's
    shared expert): (saved, whether the output needs a gradient)."""
    spec, tokens, e = flow.spec, flow.tokens, flow.e_compute
    saved: list[SavedTensor] = []
    keeps_input = False
    for proj in ("gate_proj", "up_proj"):
        own, keeps = flow.linear(prefix + proj, flow.e_stream, x_needs_grad)
        saved += own
        keeps_input |= keeps
    if keeps_input:
        saved.append(SavedTensor(input_name, tokens * spec.hidden_size * flow.e_stream))
    gate_grad = x_needs_grad or flow.trains(prefix + "gate_proj")
    up_grad = x_needs_grad or flow.trains(prefix + "up_proj")
    inter = tokens * (width or spec.intermediate_size) * e
    if flow.liger and (gate_grad or up_grad):
        # Liger's `LigerSiLUMulFunction` / `LigerGELUMulFunction` (ops/swiglu.py, ops/geglu.py:
        # `ctx.save_for_backward(a, b)`): gate's and up's outputs, act(gate) * up in one kernel (backward writes
        # their gradients into them)
        saved += [SavedTensor("mlp.gate_output", inter), SavedTensor("mlp.up_output", inter)]
    if gate_grad and not flow.liger:
        saved.append(SavedTensor("mlp.gate_output", inter))  # the activation function's input
    if up_grad and not flow.liger:
        saved.append(SavedTensor("mlp.act_output", inter))  # act(gate) * up: each factor for the other's grad
    if gate_grad and not flow.liger:
        saved.append(SavedTensor("mlp.up_output", inter))
    own, keeps = flow.linear(prefix + "down_proj", e, gate_grad or up_grad)
    saved += own
    if keeps:
        saved.append(SavedTensor("mlp.down_proj.input", inter))
    return saved, gate_grad or up_grad or flow.trains(prefix + "down_proj")


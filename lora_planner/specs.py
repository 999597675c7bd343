"""What is being trained and how: frozen, validated dataclasses.

`ModelSpec` describes a decoder-only transformer exactly as far as memory is concerned (the fields of a
Hugging Face `config.json` that change a parameter count or an activation size). `LoraSpec` and
`TrainingSpec` describe the adapter and the step. Construction validates, so every later function can
trust its inputs; errors are `PlannerInputError`s that name the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Literal, get_args

from lora_planner.errors import PlannerInputError
from lora_planner.frozen import frozen_spec
from lora_planner.defaults import DEFAULT_R, DEFAULT_SEQ_LEN
from lora_planner.names import (
    default_optimizer_impl, optimizer_impls, resolve_attention, resolve_dtype, resolve_optimizer,
)

Family = Literal["llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "bloom", "gpt_neox", "granite", "phi3",
                 "starcoder2", "qwen3", "olmo2", "smollm3", "gemma2", "gemma3_text",
                 "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
Dtype = Literal["fp32", "bf16", "fp16"]
Method = Literal["full", "lora", "qlora"]
LoraBias = Literal["none", "lora_only", "all"]
QuantType = Literal["nf4", "fp4"]
# CPU offload of model states (`lora_planner.parallel.offload`): DeepSpeed's `offload_optimizer` (fp32 master, its
# gradient and the optimizer states in host RAM, stepped there), or with the parameters too (DeepSpeed ZeRO-3's
# `offload_param`, FSDP2's `CPUOffloadPolicy`: shards, gradients and optimizer states).
Offload = Literal["none", "optimizer", "params"]
OFFLOADS: tuple[str, ...] = ("none", "optimizer", "params")
# Activation offloading's implementations (`lora_planner.activation_offload`).
ActivationOffload = Literal["none", "torchtune", "unsloth"]
ACTIVATION_OFFLOADS: tuple[str, ...] = ("none", "torchtune", "unsloth")
# The planner's optimizer names, one per state layout (`lora_planner.names.PLANNER_OPTIMIZERS` says what
# each is); Hugging Face `OptimizerNames` spellings are mapped onto these by `TrainingSpec`.
Optimizer = Literal["adamw", "sgd", "sgd_momentum", "adagrad", "rmsprop", "adafactor", "torch_adafactor",
                    "adamw8bit", "paged_adamw8bit", "paged_adamw32bit",
                    "lion8bit", "lion32bit", "paged_lion8bit", "paged_lion32bit", "rmsprop8bit", "rmsprop32bit",
                    "ademamix8bit", "ademamix32bit", "paged_ademamix8bit", "paged_ademamix32bit"]
OptimizerImpl = Literal["foreach", "for-loop", "fused"]
Device = Literal["cuda", "cpu"]
# transformers' `attn_implementation` names: "flash_attention_2" is the flash-attn package (CUDA, 16-bit only);
# "flex_attention" PyTorch's FlexAttention, compiled (CUDA: it has no backward on the CPU).
Attention = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]
# transformers 5.24's MoE experts implementations (`integrations/moe.py`): "grouped_mm" (the default,
# `PreTrainedModel.get_correct_experts_implementation`) or the class's own per-expert loop ("eager").
ExpertsImplementation = Literal["grouped_mm", "eager"]
# The training loss: transformers' `ForCausalLMLoss` ("hf"), torchtune's chunked cross-entropy ("chunked":
# `CEWithChunkedOutputLoss`, the output layer and the fp32 upcast one sequence chunk at a time), or Liger's fused
# linear cross-entropy ("fused-linear": `LigerFusedLinearCrossEntropyFunction`, no logits kept, `lora_planner.loss`),
# or Apple's Cut Cross-Entropy ("cce": `linear_cross_entropy`, what axolotl's cut_cross_entropy plugin runs), or TRL's
# fused LM head ("trl": `ChunkedLogProbFunction`, what TRL 1.16's SFTTrainer runs by default).
# torchtune main's `LinearCrossEntropyLoss` ("linear": the ignored rows dropped first, the output layer and the fp32
# upcast over N row chunks).
# litgpt's ("litgpt": the output layer over 128-token sequence chunks, Fabric's fp32 copy of every chunk, the list
# kept by the training loop from one step to the next).
# Unsloth's fused cross-entropy ("unsloth": `UnslothFusedLoss`, each row chunk's loss and input gradient computed in
# forward, the chunks sized so that one's fp32 logits stay under a target, 4 GiB at most; each chunk's step compiled,
# as Unsloth runs it by default; "unsloth-eager": the same with `UNSLOTH_FUSED_CE_COMPILE_DISABLE=1`).
LossKind = Literal["hf", "chunked", "fused-linear", "cce", "trl", "linear", "litgpt", "unsloth", "unsloth-eager"]
UNSLOTH_LOSSES: tuple[str, ...] = ("unsloth", "unsloth-eager")
# What the step trains for, as TRL's trainers name it (`lora_planner.objectives`): "sft" is every trainer's plain
# causal-LM step; "dpo" TRL's DPOTrainer (chosen and rejected rows, a reference pass); "kto" TRL's KTOTrainer (single
# examples, a KL batch, two reference passes); "grpo" TRL's GRPOTrainer (a generation round, scoring passes,
# `GrpoSpec`); "orpo", "simpo" and "cpo" TRL's ORPOTrainer and CPOTrainer (the pair's whole logits,
# `lora_planner.loss_preference`).
Objective = Literal["sft", "dpo", "orpo", "simpo", "cpo", "kto", "grpo"]
AdapterDtype = Literal["fp32", "base"]
# Each strategy names one engine (lora_planner.parallel): torch DDP (+ ZeroRedundancyOptimizer), torch FSDP2
# FULL_SHARD / SHARD_GRAD_OP, DeepSpeed ZeRO stages 1-3. The bare ZeRO names are DeepSpeed's.
Strategy = Literal["ddp", "ddp-zero1", "fsdp", "fsdp-grad-op", "deepspeed-zero1", "deepspeed-zero2",
                   "deepspeed-zero3"]

FAMILIES: tuple[str, ...] = get_args(Family)
# `ModelSpec.family` values beyond the Literal: traced profiles (`lora_planner.traced.register`) add theirs.
REGISTERED_FAMILIES: set[str] = set()
DTYPES: tuple[str, ...] = get_args(Dtype)
METHODS: tuple[str, ...] = get_args(Method)
LORA_BIASES: tuple[str, ...] = get_args(LoraBias)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
OPTIMIZER_IMPLS: tuple[str, ...] = get_args(OptimizerImpl)
DEVICES: tuple[str, ...] = get_args(Device)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
EXPERTS_IMPLEMENTATIONS: tuple[str, ...] = get_args(ExpertsImplementation)
LOSSES: tuple[str, ...] = get_args(LossKind)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
MODELLED_OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "orpo", "simpo", "cpo", "kto", "grpo")
LOGITS_OBJECTIVES: tuple[str, ...] = ("orpo", "simpo", "cpo")  # the trainer's loss over the whole logits, no fused head
WITH_REFERENCE: tuple[str, ...] = ("dpo", "kto")  # a reference pass in the step, unless precomputed
PAIRED: tuple[str, ...] = ("dpo", "orpo", "simpo", "cpo")  # a preference pair is two rows (`TrainingSpec.rows_per_example`)
TRAINERS = {"sft": "SFTTrainer / Trainer", "dpo": "DPOTrainer", "orpo": "ORPOTrainer", "simpo": "CPOTrainer (simpo)",
            "cpo": "CPOTrainer",
            "kto": "KTOTrainer", "grpo": "GRPOTrainer"}
DEFAULT_LOSS_CHUNKS = 8  # torchtune's `CEWithChunkedOutputLoss(num_output_chunks=8)`
ROUTINGS: tuple[str, ...] = ("balanced", "worst")
STRATEGIES: tuple[str, ...] = get_args(Strategy)
STRATEGY_ALIASES: dict[str, str] = {"zero1": "deepspeed-zero1", "zero2": "deepspeed-zero2",
                                    "zero3": "deepspeed-zero3", "fsdp-full-shard": "fsdp",
                                    "zero-redundancy-optimizer": "ddp-zero1"}
STRATEGY_NAMES: tuple[str, ...] = STRATEGIES + tuple(STRATEGY_ALIASES)  # accepted by --strategy

BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PlannerInputError(field_name, f"unknown value {value!r}", f"use one of {', '.join(choices)}")


# Bounds of the step's sizes, far above any real run, so that absurd input is refused with one line instead of
# overflowing or running for hours (the CLI's types, `lora_planner.cli_types`, use the same constants).
MAX_R = 2**16  # PEFT ranks in use stop at a few thousand; a rank is also bounded by the layer's width
MAX_BATCH_SIZE = 2**20  # sequences per micro-batch
MAX_SEQ_LEN = 2**24  # 16.8 M tokens per sequence: above the longest context windows published (10 M)
MAX_GPUS = 2**20  # data-parallel ranks: ~10x the largest training clusters built
MAX_GLOBAL_BATCH = 2**30  # sequences per optimizer step: far above any published run (~10^4-10^5)


LOSS_ALIASES = {"liger": "fused-linear", "flce": "fused-linear", "fused_linear": "fused-linear",
                "cut-cross-entropy": "cce", "cut_cross_entropy": "cce", "fused_lm_head": "trl",
                "fused-lm-head": "trl", "linear-ce": "linear", "linear_cross_entropy": "linear",
                "linearcrossentropyloss": "linear", "unsloth_fused_ce": "unsloth", "unsloth-fused-ce": "unsloth",
                "unsloth_eager": "unsloth-eager"}


def parse_loss(text: str) -> dict[str, object]:
    """`hf` | `chunked[:N]` | `linear[:N]` (alias `linear_cross_entropy`) | `fused-linear` (alias `liger`, `flce`) |
    `cce` (alias `cut_cross_entropy`) | `trl` (alias `fused_lm_head`) | `unsloth[-eager][:N | :GIB gb]` (N chunks
    forced, as `UNSLOTH_CE_LOSS_N_CHUNKS`; or the per-chunk target, as `UNSLOTH_CE_LOSS_TARGET_GB`) (the CLI's `--loss`, a
    grid's `loss` axis) -> TrainingSpec's `loss`, `loss_chunks`, `loss_chunk_tokens` and `loss_target_gib`."""
    name, _, chunks = text.strip().lower().partition(":")
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSSES or (chunks and name not in ("chunked", "linear", "litgpt") + UNSLOTH_LOSSES):
        raise PlannerInputError("loss", f"unknown loss {text!r}",
                                "pass --loss hf, chunked[:N] (e.g. chunked:8), linear[:N], litgpt[:TOKENS], "
                                "fused-linear, cce, trl, unsloth[:N | :GIBgb] or unsloth-eager[:N | :GIBgb]")
    if not chunks:
        return {"loss": name}
    if name in UNSLOTH_LOSSES and chunks.rstrip("gib") != chunks:  # unsloth:2.5gb: the per-chunk target in GiB
        target = chunks.rstrip("gib")
        try:
            gib = float(target)
        except ValueError:
            gib = 0.0
        if not 0 < gib < float("inf"):
            raise PlannerInputError("loss", f"the chunk target must be a positive number of GiB, got {chunks!r}",
                                    "pass e.g. --loss unsloth:2gb")
        return {"loss": name, "loss_target_gib": gib}
    if name == "litgpt":  # litgpt[:N]: N tokens per chunk, not N chunks
        if not chunks.isdigit() or int(chunks) < 1:
            raise PlannerInputError("loss", f"chunk size must be a positive integer, got {chunks!r}",
                                    "pass e.g. --loss litgpt:128")
        return {"loss": name, "loss_chunk_tokens": int(chunks)}
    if not chunks.isdigit() or int(chunks) < 1:
        raise PlannerInputError("loss", f"chunk count must be a positive integer, got {chunks!r}",
                                f"pass e.g. --loss {name}:8")
    return {"loss": name, "loss_chunks": int(chunks)} | ({"loss_target_gib": None} if name in UNSLOTH_LOSSES else {})


def check_positive_int(field_name: str, value: object, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlannerInputError(field_name, f"must be a positive integer, got {value!r}", "pass a value >= 1")
    if maximum is not None and value > maximum:
        shown = f"{value:.3g}" if value >= 10**12 else f"{value:,}"
        raise PlannerInputError(field_name, f"must be at most {maximum:,}, got {shown}",
                                f"pass a value in [1, {maximum:,}]")


# Largest sizes a ModelSpec may have, each far above any released model (the largest today: Llama-3.1-405B's
# 126 layers, 16,384 hidden, 53,248 MLP width and 128 heads; Gemma's 256k vocabulary; Llama 4 Scout's 10M-token
# context), so that absurd config values (10**12 layers, a 10**15 vocabulary) are refused in one line instead
# of making per-layer loops run for hours or sizes overflow downstream float arithmetic.
MAX_LAYERS = 2**14  # 16,384 decoder layers
MAX_WIDTH = 2**20  # hidden_size, intermediate_size, head_dim: 1,048,576 channels
MAX_HEADS = 2**16  # attention and key/value heads
MAX_VOCAB = 2**24  # 16.8 M tokens
MAX_POSITIONS = 2**26  # max_position_embeddings: 67 M tokens
MAX_EXPERTS = 2**16  # routed experts per layer (DeepSeek-V3: 256, Qwen3-235B: 128)
MODEL_SIZE_LIMITS: dict[str, int] = {
    "vocab_size": MAX_VOCAB, "hidden_size": MAX_WIDTH, "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS,
    "num_kv_heads": MAX_HEADS, "head_dim": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
    "max_position_embeddings": MAX_POSITIONS,
}
# ModelSpec fields -> the config.json keys errors name (Llama spelling; GPT-2 / BLOOM readers rename them).
MODEL_CONFIG_KEYS: dict[str, str] = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                                     "num_kv_heads": "num_key_value_heads"}


@frozen_spec
class ModelSpec:
    """A decoder-only LLM, reduced to what determines its memory.

    Family conventions (module names and layout) follow the Hugging Face `transformers` classes:
    llama/mistral/qwen2/gemma share the Llama layout (separate q/k/v/o, gated MLP, RMSNorm), phi has
    LayerNorm, parallel attention+MLP and a biased lm_head, gpt2 and bloom fuse q/k/v into one matrix.

    Construction validates: every size a positive integer at most its `MODEL_SIZE_LIMITS` bound, dropouts in
    [0, 1], `partial_rotary_factor` in (0, 1], `sliding_window` None or positive, the flags bools, and
    num_kv_heads dividing num_heads. Errors name the config.json key (num_hidden_layers, not num_layers).
    """

    name: str
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always, Llama's `attention_bias`)
    attention_out_bias: bool = False  # bias on the output projection (o_proj / dense / c_proj)
    mlp_bias: bool = False
    lm_head_bias: bool = False  # phi-2 has one
    qk_layernorm: bool = False  # phi option: LayerNorm(head_dim) on q and k
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0  # phi: RoPE on this fraction of each head
    dropout: float = 0.0  # residual dropout active in training (GPT-2 and Phi-2: 0.1)
    embedding_dropout: float = 0.0  # GPT-2: 0.1
    attention_dropout: float = 0.0
    sliding_window: int | None = None  # the window the sliding layers attend over (None: none), `layer_types`
    parallel_residual: bool = False  # gpt_neox `use_parallel_residual`: x + attn(ln1(x)) + mlp(ln2(x))
    # Gemma 2 / 3 (transformers' Gemma2Config / Gemma3TextConfig): tanh soft-capping of the attention scores and
    # of the logits (None: none).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Each layer's attention kind ("sliding_attention": masked to `sliding_window`, or "full_attention"), as the
    # config class sets it (`config_reader._window_fields`); None: no sliding layer.
    layer_types: tuple[str, ...] | None = None
    # Mixture of experts (0 experts: a dense model). Every MoE layer routes each token to `num_experts_per_tok` of
    # `num_experts` experts of width `moe_intermediate_size`; `shared_expert_intermediate_size` > 0 adds an
    # always-on gated MLP of that width (Qwen2-MoE's `shared_expert`); `dense_layers` lists the layers that keep a
    # dense MLP of `intermediate_size` (Qwen2-MoE's `mlp_only_layers` / `decoder_sparse_step`); `norm_topk_prob`
    # renormalises the top-k probabilities (Mixtral always does).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = False
    # `output_router_logits`: the CausalLM adds the load-balancing loss (`load_balancing_loss_func`), which keeps each
    # MoE layer's router softmax for backward (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss; DeepSeek has none).
    output_router_logits: bool = False
    # DeepSeek-V2 / V3 (`lora_planner.families.deepseek`): multi-head latent attention when `kv_lora_rank` > 0. q is
    # `q_a_proj` (H -> q_lora_rank), its RMSNorm and `q_b_proj`, or one `q_proj` when `q_lora_rank` is 0 (config
    # null); k / v come from `kv_a_proj_with_mqa` (H -> kv_lora_rank + rope dim), its RMSNorm and `kv_b_proj`; heads
    # are `qk_nope_head_dim` + `head_dim` (the RoPE part, transformers' `head_dim = qk_rope_head_dim`) wide for q / k,
    # `v_head_dim` for v. The router: `router_sigmoid` (V3: sigmoid scores) else softmax; `router_groups` > 0 limits the
    # top-k to the best `router_topk_groups` of that many expert groups (V3; V2's group_limited_greedy).
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    router_sigmoid: bool = False
    router_groups: int = 0
    router_topk_groups: int = 0

    def __post_init__(self) -> None:
        if self.family not in REGISTERED_FAMILIES:  # traced families (lora_planner.traced) are registered at run time
            check_choice("model_type", self.family, FAMILIES)
        for name, maximum in MODEL_SIZE_LIMITS.items():
            key = MODEL_CONFIG_KEYS.get(name, name)
            check_positive_int(key, getattr(self, name))
            if getattr(self, name) > maximum:
                value = getattr(self, name)
                shown = f"{value:.3g}" if value >= 10**12 else f"{value:,}"
                raise PlannerInputError(key, f"{shown} is above the planner's limit of {maximum:,}, far beyond any "
                                             "released model", f"check the config.json (at most {maximum:,})")
        for name in ("dropout", "embedding_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and 0 <= value <= 1):
                raise PlannerInputError(name, f"must be a dropout probability in [0, 1], got {value!r}",
                                        "use e.g. 0.0 or 0.1")
        prf = self.partial_rotary_factor
        if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not (math.isfinite(prf) and 0 < prf <= 1):
            raise PlannerInputError("partial_rotary_factor", f"must be a fraction in (0, 1], got {prf!r}",
                                    "use e.g. 0.5, or 1.0 for RoPE on the whole head")
        if self.sliding_window is not None:
            check_positive_int("sliding_window", self.sliding_window)
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            # any number: transformers soft-caps whenever the value is not None (`if softcap is not None`)
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))):
                raise PlannerInputError(name, f"must be a number or null, got {cap!r}",
                                        "use e.g. 30.0 (Gemma 2), or null for no soft-capping")
        if self.layer_types is not None and (
                len(self.layer_types) != self.num_layers
                or any(t not in ("sliding_attention", "full_attention") for t in self.layer_types)):
            raise PlannerInputError("layer_types", f"must name sliding_attention or full_attention for each of the "
                                                   f"{self.num_layers} layers, got {self.layer_types!r}",
                                    "fix the config.json, or leave layer_types out")
        for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias", "lm_head_bias",
                     "qk_layernorm", "parallel_residual", "norm_topk_prob", "output_router_logits"):
            if not isinstance(getattr(self, name), bool):
                raise PlannerInputError(name, f"must be true or false, got {getattr(self, name)!r}",
                                        "use a bool")
        if self.num_experts:
            check_positive_int("num_experts_per_tok", self.num_experts_per_tok)
            check_positive_int("moe_intermediate_size", self.moe_intermediate_size, MAX_WIDTH)
            check_positive_int("num_experts", self.num_experts, MAX_EXPERTS)
            if self.num_experts_per_tok > self.num_experts:
                raise PlannerInputError("num_experts_per_tok", f"{self.num_experts_per_tok} is more than the "
                                        f"{self.num_experts} experts", "use at most num_experts")
            if any(not 0 <= i < self.num_layers for i in self.dense_layers):
                raise PlannerInputError("mlp_only_layers", f"must be layer indices below {self.num_layers}, got "
                                        f"{list(self.dense_layers)!r}", "fix the config.json")
        if self.num_heads % self.num_kv_heads:
            raise PlannerInputError(
                "num_key_value_heads",
                f"{self.num_kv_heads} does not divide num_attention_heads={self.num_heads}",
                "use a divisor of the number of attention heads",
            )

    @property
    def q_size(self) -> int:
        """Width of the query projection output (= heads x head_dim; Gemma-7B: 16 x 256 > hidden)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projections (grouped-query attention shrinks it)."""
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` routes through experts (else it has a dense MLP)."""
        return self.num_experts > 0 and layer not in self.dense_layers


@frozen_spec
class LoraSpec:
    """A LoRA adapter (Hu et al. 2021, arXiv 2106.09685): W x + (alpha / r) B A x, A: r x in, B: out x r.

    `alpha` defaults to 2r (a common rule of thumb; PEFT's own default is 8). `target_modules` uses PEFT's
    names (suffix match on the module path) or the single entry "all-linear" (every linear layer but
    the output head, as PEFT defines it); None means PEFT's default for the family (q_proj + v_proj for
    Llama-style models, c_attn for GPT-2, query_key_value for BLOOM, q/v/fc1/fc2 for Phi). `adapter_dtype` "fp32" is PEFT's default
    (`autocast_adapter_dtype=True` keeps adapters in fp32 on a 16-bit base); "base" uses the base dtype.
    """

    r: int = DEFAULT_R
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    adapter_dtype: AdapterDtype = "fp32"
    # PEFT's `layers_to_transform`: adapt the targets only in these decoder layers (None: every layer).
    layers_to_transform: tuple[int, ...] | None = None
    # PEFT's `target_parameters`: MoE expert / router weights adapted through `lora.ParamWrapper` (a parameter name
    # or its suffix, e.g. "mlp.experts.gate_up_proj"), beside what `target_modules` names.
    target_parameters: tuple[str, ...] | None = None
    # PEFT's `use_rslora` (Kalajdzievski 2023, arXiv 2312.03732): the update is scaled by alpha / sqrt(r) instead of
    # alpha / r (`peft/tuners/lora/layer.py` `update_layer`); nothing else changes, memory included.
    use_rslora: bool = False
    # PEFT's `use_dora` (Liu et al. 2024, arXiv 2402.09353): a trainable magnitude vector (out_features) per adapted
    # linear, and the weight-norm computation in every forward (`lora_planner.families.rules.dora_saved`).
    use_dora: bool = False
    # PEFT's `modules_to_save`: modules trained in full beside the adapters (`ModulesToSaveWrapper`: a trainable deep
    # copy, the original kept frozen), e.g. embed_tokens and lm_head for new tokens; `params.modules_to_save`.
    modules_to_save: tuple[str, ...] | None = None
    # PEFT's `bias`: which of the base model's biases train beside the adapters (`BaseTuner._mark_only_adapters_as_
    # trainable`): "none", "lora_only" (those of the adapted layers) or "all" (every parameter named bias); they stay
    # in the base dtype (the adapter upcast skips them) and keep nothing for backward (`params.trained_biases`).
    bias: LoraBias = "none"
    # PEFT's `trainable_token_indices`: rows of the embedding matrix trained without a full copy
    # (`TrainableTokensLayer`: the rows as an fp32 delta); (module name, indices) pairs, the name "" for PEFT's list
    # form (the input embeddings, and a tied output layer with them); `params.trainable_token_layers`.
    trainable_token_indices: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("r", self.r, MAX_R)
        check_choice("bias", self.bias, LORA_BIASES)
        if self.trainable_token_indices is not None and (
                not self.trainable_token_indices
                or any(not isinstance(name, str) or not indices
                       or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
                       for name, indices in self.trainable_token_indices)):
            raise PlannerInputError("trainable_token_indices", "needs token ids >= 0",
                                    "pass e.g. --trainable-token-indices 128000-128255")
        if self.modules_to_save is not None and (
                not self.modules_to_save or any(not isinstance(n, str) or not n.strip() for n in self.modules_to_save)):
            raise PlannerInputError("modules_to_save", "empty module name",
                                    "pass e.g. --modules-to-save embed_tokens,lm_head")
        if not isinstance(self.use_dora, bool):
            raise PlannerInputError("use_dora", f"must be true or false, got {self.use_dora!r}",
                                    "pass --dora or leave it out")
        if not isinstance(self.use_rslora, bool):
            raise PlannerInputError("use_rslora", f"must be true or false, got {self.use_rslora!r}",
                                    "pass --use-rslora or leave it out")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha) or not self.alpha > 0):
            raise PlannerInputError("alpha", f"must be positive, got {self.alpha!r}", "pass e.g. --alpha 16")
        if self.target_modules is not None and (
                not self.target_modules or any(not t.strip() for t in self.target_modules)):
            raise PlannerInputError("target", "empty target module name", "pass e.g. --target q_proj,v_proj")
        check_choice("adapter_dtype", self.adapter_dtype, ("fp32", "base"))
        if self.target_parameters is not None and (
                not self.target_parameters or any(not t.strip() for t in self.target_parameters)):
            raise PlannerInputError("target_parameters", "empty parameter name",
                                    "pass e.g. --target-parameters mlp.experts.gate_up_proj,mlp.experts.down_proj")
        if self.layers_to_transform is not None and (
                not self.layers_to_transform
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers_to_transform)):
            raise PlannerInputError("layers_to_transform", f"must be layer indices >= 0, got {self.layers_to_transform!r}",
                                    "pass e.g. --layers-to-transform 0,1,2")

    @property
    def effective_alpha(self) -> float:
        return float(2 * self.r) if self.alpha is None else float(self.alpha)

    @property
    def scaling(self) -> float:
        """The factor on B A x: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `LoraLayer.scaling`)."""
        return self.effective_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


GenerationBackend = Literal["transformers", "vllm-colocate", "vllm-server"]
GENERATION_BACKENDS: tuple[str, ...] = get_args(GenerationBackend)
MAX_GENERATIONS = 2**12


@frozen_spec
class GrpoSpec:
    """TRL 1.16's `GRPOConfig` fields that change a GRPO step's memory (`lora_planner.generation`,
    `lora_planner.objectives`), named and defaulted as TRL does (`trl/trainer/grpo_config.py`; the facts with line
    numbers in `docs/research/issue17_grpo.md`). `TrainingSpec.batch_size` is `per_device_train_batch_size`, counted in
    completions (rows), and `TrainingSpec.seq_len` a row's prompt + completion.

    - `num_generations` (G, 8): completions per prompt; a generation round's rows must be a multiple of it;
    - `max_completion_length` (512): the completion's tokens (generate's `max_new_tokens`); the prompt is the rest of
      the row (GRPOConfig has no prompt limit: prompts are not truncated);
    - `gradient_accumulation_steps` (1) and `steps_per_generation` (None: the accumulation steps) or
      `generation_batch_size` (the round's rows; not both): one round generates batch_size x steps_per_generation
      rows on each GPU, in one `generate` call, then trains on them in that many micro-batches;
    - `num_iterations` (mu, 1): rounds reused that many times;
    - `beta` (0.0, TRL's default): above 0, a reference pass (the adapters disabled, or a model copy for full
      fine-tuning) and its log-probs;
    - `generation_backend`: "transformers" (`use_vllm=False`, the default: `model.generate` on the training GPU),
      "vllm-colocate" (`use_vllm=True`, `vllm_mode="colocate"`: vLLM in the training process, its share
      `vllm_gpu_memory_utilization` of the GPU, 0.3) or "vllm-server" (`vllm_mode="server"`: generation elsewhere);
    - `vllm_enable_sleep_mode` (False): vLLM releases its weights and KV cache between generations;
    - `temperature` (1.0): another value adds one (rows x vocabulary) fp32 buffer per sampled token (a logits
      processor).
    """

    num_generations: int = 8
    max_completion_length: int = 512
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    generation_batch_size: int | None = None
    num_iterations: int = 1
    beta: float = 0.0
    generation_backend: GenerationBackend = "transformers"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_enable_sleep_mode: bool = False
    temperature: float = 1.0
    # "vllm-colocate": the GPU's memory vLLM takes its share of (the CLI fills it from --gpu / --gpu-mem)
    vllm_gpu_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("num_generations", self.num_generations, MAX_GENERATIONS)
        if self.num_generations < 2:
            raise PlannerInputError("num_generations", "GRPO compares completions of one prompt: needs at least 2, "
                                    f"got {self.num_generations}", "pass --num-generations 2 or more")
        check_positive_int("max_completion_length", self.max_completion_length, MAX_SEQ_LEN)
        check_positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps, MAX_BATCH_SIZE)
        if self.steps_per_generation is not None:
            check_positive_int("steps_per_generation", self.steps_per_generation, MAX_BATCH_SIZE)
        if self.generation_batch_size is not None:
            check_positive_int("generation_batch_size", self.generation_batch_size, MAX_BATCH_SIZE)
            if self.steps_per_generation is not None:
                raise PlannerInputError("generation_batch_size", "GRPOConfig takes generation_batch_size or "
                                        "steps_per_generation, not both", "drop one of them")
        check_positive_int("num_iterations", self.num_iterations, MAX_BATCH_SIZE)
        for name, value, low in (("beta", self.beta, 0.0), ("temperature", self.temperature, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < float("inf") \
                    or (name == "temperature" and value == 0):
                raise PlannerInputError(name, f"must be a {'non-negative' if name == 'beta' else 'positive'} number, "
                                              f"got {value!r}", f"pass e.g. --{name} {0.04 if name == 'beta' else 1.0}")
        check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        value = self.vllm_gpu_memory_utilization
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise PlannerInputError("vllm_gpu_memory_utilization", f"must be a fraction in (0, 1), got {value!r}",
                                    "pass e.g. --vllm-gpu-memory-utilization 0.3")
        if self.vllm_gpu_memory_bytes is not None:
            check_positive_int("vllm_gpu_memory_bytes", self.vllm_gpu_memory_bytes)
        if not isinstance(self.vllm_enable_sleep_mode, bool):
            raise PlannerInputError("vllm_enable_sleep_mode", f"must be true or false, got "
                                    f"{self.vllm_enable_sleep_mode!r}", "pass --vllm-enable-sleep-mode or leave it out")

    @property
    def reference_pass(self) -> bool:
        """A reference model's log-probs only when beta is not 0 (grpo_trainer.py l.984-986, l.2709-2739)."""
        return self.beta != 0

    def steps_per_round(self, batch_size: int) -> int:
        """Micro-batches one generation round feeds: `steps_per_generation`, or `generation_batch_size` / the
        micro-batch, or the accumulation steps (grpo_config.py l.1096-1116, one process)."""
        if self.steps_per_generation is not None:
            return self.steps_per_generation
        if self.generation_batch_size is not None:
            return max(self.generation_batch_size // batch_size, 1)
        return self.gradient_accumulation_steps

    def old_log_prob_pass(self, batch_size: int) -> bool:
        """Whether `_generate_and_score_completions` runs the old policy's no-grad pass (grpo_trainer.py l.2642-2657):
        when the accumulation steps are not a multiple of a round's reuse, or vLLM samples (its importance-sampling
        correction, on by default)."""
        return self.gradient_accumulation_steps % (self.steps_per_round(batch_size) * self.num_iterations) != 0 or \
            self.generation_backend != "transformers"

    def round_starts_mid_step(self, batch_size: int) -> bool:
        """A round can start while the step's gradients are held: rounds start every steps_per_generation x
        num_iterations micro-batches, optimizer steps every gradient_accumulation_steps."""
        return (self.steps_per_round(batch_size) * self.num_iterations) % self.gradient_accumulation_steps != 0


def _refuse_unmodelled(trainer: str, settings: tuple[tuple[str, bool, str, str], ...]) -> None:
    """The first of `settings` (field, whether set, what, the fix) that is set, refused: `trainer` is not planned
    with it yet."""
    for field_name, on, what, fix in settings:
        if on:
            raise PlannerInputError(field_name, f"{trainer} with {what} is not modelled yet", fix)


@frozen_spec
class TrainingSpec:
    """One optimizer step's settings.

    `dtype` is the dtype the weights are stored in; `amp` turns on autocast mixed precision, which needs
    fp32 master weights (`dtype` must be fp32). `optimizer_impl` None means the default for the optimizer
    (`lora_planner.names.default_optimizer_impl`): fused AdamW, the Hugging Face Trainer's default
    `adamw_torch_fused`; PyTorch's own choice for the other torch optimizers (foreach on CUDA, for-loop on
    CPU). Hugging Face spellings are accepted and normalized on construction: `optimizer="adamw_torch"`
    becomes adamw + PyTorch's default for the device, `dtype="bfloat16"` bf16, `attention` as transformers'
    `attn_implementation`.
    """

    method: Method = "lora"
    dtype: Dtype = "bf16"
    amp: Dtype | None = None
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl | None = None
    batch_size: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    grad_checkpointing: bool = False
    device: Device = "cuda"
    attention: Attention = "sdpa"
    # MoE models only: transformers' experts implementation, and the routing the eager loop's per-expert buffers are
    # sized from: "balanced" (every expert gets tokens x k / E), "worst" (one expert set takes every token), or the
    # tokens each expert received, per MoE layer (e.g. measured by the profiler's router hook).
    experts_implementation: ExpertsImplementation = "grouped_mm"
    routing: str | tuple[tuple[int, ...], ...] = "balanced"
    # The loss (`LossKind`) and, for "chunked" / "linear", how many (sequence / row) chunks the output layer and the
    # loss run in.
    loss: LossKind = "hf"
    loss_chunks: int = DEFAULT_LOSS_CHUNKS
    loss_chunk_tokens: int = 128  # "litgpt": the sequence chunk of its output layer (`lm_head_chunk_size=128`)
    # "unsloth" / "unsloth-eager": the per-chunk target of its fp32 logits, GiB (`get_chunk_size`: min(half the free GPU memory, 4 GiB),
    # the cap planned); None: `loss_chunks` chunks, forced as `UNSLOTH_CE_LOSS_N_CHUNKS` forces them.
    loss_target_gib: float | None = 4.0
    # The batch as the collator builds it. `padding`: rows of different lengths padded to --seq-len, with an attention
    # mask (transformers / TRL's default collator when lengths differ). `packing`: padding-free, as TRL's
    # `padding_free` / `packing` (bfd) collator: the micro-batch's sequences concatenated into one row of
    # batch_size x seq_len tokens (the fullest row it can build), position_ids restarting per sequence, no mask.
    padding: bool = False
    packing: bool = False
    # The training objective (`lora_planner.objectives`): "dpo" runs each of `batch_size` pairs as two rows (prompt +
    # chosen, prompt + rejected) of `seq_len` tokens, and a reference pass unless `precompute_ref_log_probs`.
    objective: Objective = "sft"
    precompute_ref_log_probs: bool = False
    # "simpo" / "cpo": CPOConfig's `cpo_alpha`, the NLL term's weight (TRL's default 1.0, for SimPO too); 0 drops the
    # term and its log_softmax over the chosen rows
    cpo_alpha: float = 1.0
    # "grpo": GRPOConfig's generation and scoring settings (`GrpoSpec`); ignored by the other objectives.
    grpo: GrpoSpec = field(default_factory=GrpoSpec)
    # transformers' `use_liger_kernel=True`: Liger's RMSNorm, RoPE and SwiGLU / GEGLU on the families it patches, and
    # its fused linear cross-entropy as the loss (`lora_planner.liger`).
    liger: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    gpus: int = 1  # data-parallel ranks; batch_size is per rank
    strategy: Strategy | None = None  # how the ranks share model states (None: ddp when gpus > 1)
    # QLoRA only: PEFT's `prepare_model_for_kbit_training` (PEFT's QLoRA recipe calls it on a quantized
    # base) casts every non-quantized 16-bit parameter to fp32; see `lora_planner.memory`.
    kbit_prep: bool = True
    # QLoRA only: bitsandbytes' `bnb_4bit_use_double_quant` (the QLoRA recipe's True: the absmax constants quantized
    # again) and `bnb_4bit_quant_type` (nf4 or fp4: the same bytes); `step.nf4_bytes`.
    double_quant: bool = True
    quant_type: QuantType = "nf4"
    # QLoRA only: bitsandbytes' `bnb_4bit_compute_dtype`, the dtype the 4-bit matmuls run in (`Linear4bit.forward` casts
    # its input to it and the output back); None: the load dtype (`--dtype`), as the QLoRA recipe sets it.
    # transformers' own default is fp32. Other methods ignore it.
    bnb_4bit_compute_dtype: Dtype | None = None
    # Gradient checkpointing's flavour: torch's reentrant `checkpoint` (`gradient_checkpointing_kwargs={"use_reentrant":
    # True}`, what PEFT's `prepare_model_for_kbit_training` asks for) instead of the non-reentrant one transformers and
    # TRL default to. Measured equal but for what the checkpointed forward keeps outside saved-tensor hooks (an 8-bit
    # base's inputs: none under reentrant, which runs the layers without a graph).
    use_reentrant: bool = False
    # LoRA only: the base loaded in 8 bits (bitsandbytes LLM.int8, transformers'
    # `BitsAndBytesConfig(load_in_8bit=True)`: int8 weights with an fp32 scale per output row, `step.int8_bytes`; what
    # its matmuls keep: `rules.Flow.linear`); kbit preparation as for QLoRA.
    load_in_8bit: bool = False
    # Model states in host RAM (`Offload`; needs a DeepSpeed or FSDP strategy, one GPU allowed) and whether the engine
    # page-locks its host buffers (DeepSpeed `offload_optimizer.pin_memory`, FSDP2 `CPUOffloadPolicy(pin_memory)`).
    offload: Offload = "none"
    offload_pin_memory: bool = True
    # Ranks sharing one host (its RAM holds their offloaded states); None: every rank on one node, at most 8.
    gpus_per_node: int | None = None
    # Checkpointed layer inputs in host RAM (`lora_planner.activation_offload`): torchtune's
    # `enable_activation_offloading`, Unsloth's `use_gradient_checkpointing="unsloth"`; needs grad_checkpointing.
    activation_offload: ActivationOffload = "none"
    # DeepSpeed strategies: the `zero_optimization` settings that change memory, as (key, value) pairs over
    # DeepSpeed's defaults (`lora_planner.parallel.deepspeed.DeepSpeedZeroConfig`); a value "auto" is what the
    # Hugging Face Trainer fills in from the model's hidden size (`--from` a DeepSpeed JSON sets them).
    zero_config: tuple[tuple[str, int | bool | str], ...] = ()

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("device", self.device, DEVICES)
        self._normalize_spellings()
        check_positive_int("batch_size", self.batch_size, MAX_BATCH_SIZE)
        check_positive_int("seq_len", self.seq_len, MAX_SEQ_LEN)
        check_positive_int("gpus", self.gpus, MAX_GPUS)
        check_choice("experts_implementation", self.experts_implementation, EXPERTS_IMPLEMENTATIONS)
        check_choice("loss", self.loss, LOSSES)
        self._check_objective()
        check_choice("quant_type", self.quant_type, ("nf4", "fp4"))
        if self.bnb_4bit_compute_dtype is not None:
            check_choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, DTYPES)
        if not isinstance(self.double_quant, bool):
            raise PlannerInputError("double_quant", f"must be true or false, got {self.double_quant!r}",
                                    "pass --no-double-quant or leave it out")
        check_positive_int("loss_chunks", self.loss_chunks, MAX_SEQ_LEN)
        check_positive_int("loss_chunk_tokens", self.loss_chunk_tokens, MAX_SEQ_LEN)
        if self.loss_target_gib is not None and (isinstance(self.loss_target_gib, bool) or not isinstance(
                self.loss_target_gib, (int, float)) or not 0 < self.loss_target_gib < float("inf")):
            raise PlannerInputError("loss_target_gib",
                                    f"must be a positive number of GiB, got {self.loss_target_gib!r}",
                                    "pass e.g. --loss unsloth:2gb, or --loss unsloth:N for N chunks")
        if self.loss == "chunked" and self.loss_chunks > self.seq_len:
            raise PlannerInputError("loss", f"{self.loss_chunks} chunks of a {self.seq_len}-token sequence",
                                    f"pass --loss chunked:N with N <= {self.seq_len}")
        if self.loss == "linear" and self.loss_chunks > self.tokens - self.rows[0]:
            raise PlannerInputError("loss", f"{self.loss_chunks} chunks of {self.tokens - self.rows[0]} target rows",
                                    f"pass --loss linear:N with N <= {self.tokens - self.rows[0]}")
        if self.liger and self.loss in ("chunked", "linear", "litgpt") + UNSLOTH_LOSSES:
            raise PlannerInputError("liger", f"use_liger_kernel runs Liger's fused linear cross-entropy, not the "
                                             f"{self.loss} loss", "drop --loss, or drop --liger")
        if self.padding and self.packing:
            raise PlannerInputError("packing", "a packed (padding-free) batch has no padding",
                                    "pass --packing or --padding, not both")
        if isinstance(self.routing, str):
            check_choice("routing", self.routing, ROUTINGS)
        elif not (isinstance(self.routing, tuple) and self.routing and all(
                isinstance(row, tuple) and row and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                       for n in row) for row in self.routing)):
            raise PlannerInputError("routing", "must be balanced, worst, or per-layer tokens per expert",
                                    "pass --routing balanced|worst|FILE (a JSON list of per-layer lists of counts)")
        if self.strategy is not None:
            check_choice("strategy", self.strategy, STRATEGY_NAMES)
            if self.gpus == 1 and self.offload == "none":
                raise PlannerInputError("strategy", f"{self.strategy} shares model states across GPUs, but gpus is 1",
                                        "pass --gpus N (N >= 2) with --strategy, or drop --strategy")
        check_choice("offload", self.offload, OFFLOADS)
        if self.gpus_per_node is not None:
            check_positive_int("gpus_per_node", self.gpus_per_node, MAX_GPUS)
            if self.gpus_per_node > self.gpus:
                raise PlannerInputError("gpus_per_node", f"{self.gpus_per_node} GPUs per node, but gpus is {self.gpus}",
                                        f"pass --gpus-per-node {self.gpus} or fewer")
        if self.offload != "none":
            self._check_offload()
        check_choice("activation_offload", self.activation_offload, ACTIVATION_OFFLOADS)
        if self.activation_offload != "none":
            self._check_activation_offload()
        self._check_load_in_8bit()
        if not isinstance(self.use_reentrant, bool):
            raise PlannerInputError("use_reentrant", f"must be true or false, got {self.use_reentrant!r}",
                                    "pass --use-reentrant or leave it out")
        if self.use_reentrant and not self.grad_checkpointing:
            raise PlannerInputError("use_reentrant", "reentrant checkpointing needs checkpointing",
                                    "pass --grad-checkpointing with --use-reentrant")
        if self.optimizer_impl is not None:
            check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
            impls = optimizer_impls(self.optimizer)
            if self.optimizer_impl not in impls:
                raise PlannerInputError("optimizer_impl", f"{self.optimizer} has no {self.optimizer_impl} implementation",
                                        f"use {' or '.join(impls)}, or leave --optimizer-impl out")
        if self.amp is not None:
            check_choice("amp", self.amp, ("bf16", "fp16"))
            if self.dtype != "fp32":
                raise PlannerInputError(
                    "amp", f"autocast needs fp32 master weights, got --dtype {self.dtype}",
                    "use --dtype fp32 with --amp, or drop --amp",
                )
        if self.attention == "flex_attention" and self.device != "cuda":
            raise PlannerInputError("attention", "FlexAttention has no backward on the CPU (torch 2.13: "
                                                 "`_validate_device`)", "use --attention sdpa with --device cpu")
        if self.attention == "flash_attention_2":
            if self.device != "cuda":
                raise PlannerInputError("attention", "flash_attention_2 (the flash-attn package) runs on CUDA only",
                                        "use --attention sdpa with --device cpu")
            if self.compute_dtype == "fp32":
                raise PlannerInputError("attention", "flash_attention_2 computes in fp16 / bf16 only (flash-attn "
                                                     "refuses fp32 q / k / v)",
                                        "use --dtype bf16, or --dtype fp32 --amp bf16")
        if self.method == "qlora" and self.dtype == "fp32" and self.amp is None:
            raise PlannerInputError(
                "dtype", "QLoRA computes in 16-bit (the NF4 base is dequantized to the compute dtype)",
                "use --dtype bf16 or fp16 (or --amp bf16) with --method qlora",
            )

    def _check_objective(self) -> None:
        """What an objective is not planned with (yet), refused with the reason and the fix (`lora_planner.objectives`
        plans the rest)."""
        check_choice("objective", self.objective, OBJECTIVES)
        if not isinstance(self.precompute_ref_log_probs, bool):
            raise PlannerInputError("precompute_ref_log_probs", f"must be true or false, got "
                                    f"{self.precompute_ref_log_probs!r}", "pass --precompute-ref-log-probs or leave it out")
        objective, trainer = self.objective, TRAINERS[self.objective]
        if objective not in MODELLED_OBJECTIVES:
            raise PlannerInputError("objective", f"{objective} ({trainer}) is not modelled yet",
                                    f"plan --objective {', '.join(MODELLED_OBJECTIVES)}")
        if self.precompute_ref_log_probs and objective not in WITH_REFERENCE:
            raise PlannerInputError("precompute_ref_log_probs", f"only DPO and KTO have a reference to precompute, not "
                                    f"{objective}", "drop --precompute-ref-log-probs, or pass --objective dpo or kto")
        if not isinstance(self.cpo_alpha, (int, float)) or isinstance(self.cpo_alpha, bool) or \
                not 0 <= self.cpo_alpha < float("inf"):
            raise PlannerInputError("cpo_alpha", f"must be a number >= 0, got {self.cpo_alpha!r}",
                                    "pass e.g. --cpo-alpha 0 (pure SimPO) or 1 (TRL's default)")
        if self.cpo_alpha != 1.0 and objective not in ("simpo", "cpo"):
            raise PlannerInputError("cpo_alpha", f"only CPOTrainer (--objective simpo or cpo) has cpo_alpha, not "
                                    f"{objective}", "drop --cpo-alpha, or pass --objective simpo")
        if objective == "sft":
            return
        if objective in LOGITS_OBJECTIVES:
            self._check_logits_objective(trainer)
            return
        if self.loss != "trl":
            raise PlannerInputError("loss", f"TRL's {trainer} always runs its fused LM head (`fused_lm_head=True`), "
                                            f"not the {self.loss} loss",
                                    "pass --loss trl (or leave --loss out with --objective)")
        if self.packing:
            raise PlannerInputError("packing", f"{trainer} has no padding-free batches (TRL 1.16 resets padding_free "
                                               "to False)", "drop --packing")
        if self.gpus > 1 or self.strategy is not None:
            what = "its generation and scoring passes" if objective == "grpo" else "its reference pass"
            raise PlannerInputError("gpus", f"{trainer} is planned on one GPU so far ({what} under DDP, FSDP or ZeRO "
                                            "is not modelled yet)", "pass --gpus 1")
        if objective == "grpo":
            self._check_grpo()
        if objective == "kto" and self.batch_size < 2:
            raise PlannerInputError("batch_size", "KTOTrainer's KL term needs at least 2 examples a micro-batch (its "
                                                  "KL batch pairs each prompt with another example's completion)",
                                    "pass --batch-size 2 or more")
        _refuse_unmodelled(trainer, self._unmodelled_with_trainers(
            liger=" (their no-grad forward in the reference pass)", dora=" (its transients in the checkpointed forward)",
            int8=" (LLM.int8's no-grad matmuls)"))

    def _unmodelled_with_trainers(self, liger: str = "", dora: str = "", int8: str = "") -> tuple[
            tuple[str, bool, str, str], ...]:
        """The settings no TRL trainer is planned with yet, as (field, whether set, what, the fix); `liger`, `dora`,
        `int8`: why, for the trainer at hand."""
        return (("offload", self.offload != "none", "CPU offload", "drop --offload"),
                ("activation_offload", self.activation_offload != "none", "activation offloading",
                 "drop --activation-offloading"),
                ("liger", self.liger, "Liger's kernels" + liger, "drop --liger"),
                ("use_dora", self.lora.use_dora, "DoRA" + dora, "drop --dora"),
                ("quant", self.load_in_8bit, "an 8-bit base" + int8, "use --method qlora"))

    def _check_logits_objective(self, trainer: str) -> None:
        """ORPO / CPO: the trainer projects every position and computes its loss from the logits
        (`lora_planner.loss_preference`); what it is not planned with yet is refused."""
        if self.loss != "hf":
            raise PlannerInputError("loss", f"TRL's {trainer} computes its loss from the whole logits (no fused "
                                            f"head), not the {self.loss} loss", "drop --loss (or pass --loss hf)")
        _refuse_unmodelled(trainer, (
            ("packing", self.packing, "padding-free batches (its collator pads the pairs)", "drop --packing"),
            ("gpus", self.gpus > 1 or self.strategy is not None, "several GPUs (not validated yet)", "pass --gpus 1"),
            *self._unmodelled_with_trainers()))

    def _check_grpo(self) -> None:
        """GRPO's rows and what it is planned with so far (`lora_planner.generation`)."""
        g = self.grpo
        if not isinstance(g, GrpoSpec):
            raise PlannerInputError("grpo", f"expected GRPO settings, got {type(g).__name__}", "pass a GrpoSpec")
        if self.seq_len <= g.max_completion_length:
            raise PlannerInputError("seq_len", f"a GRPO row is prompt + completion: {self.seq_len} tokens leave no "
                                               f"prompt beside max_completion_length {g.max_completion_length}",
                                    "pass --max-prompt-length (the prompt's tokens) and --max-completion-length")
        if g.generation_batch_size is not None and g.generation_batch_size % self.batch_size:
            raise PlannerInputError("generation_batch_size", f"a round's {g.generation_batch_size} rows are not a "
                                    f"whole number of micro-batches of {self.batch_size} (GRPOConfig requires it)",
                                    f"pass a multiple of {self.batch_size}")
        steps = g.steps_per_round(self.batch_size)
        rows = self.batch_size * steps
        if rows % g.num_generations:
            raise PlannerInputError("num_generations", f"a generation round's {rows} rows (batch size {self.batch_size}"
                                    f" x steps_per_generation {steps}) are not a multiple of num_generations "
                                    f"{g.num_generations} (GRPOConfig requires generation_batch_size % num_generations"
                                    " == 0)", f"pass --batch-size or --steps-per-generation so that their product is"
                                              f" a multiple of {g.num_generations}")
        if self.method == "qlora":
            raise PlannerInputError("method", "GRPO on a 4-bit base (its generation through bitsandbytes) is not "
                                              "modelled yet", "plan --method lora or full")
        if g.generation_backend != "transformers" and self.device == "cpu":
            raise PlannerInputError("generation_backend", "vLLM runs on CUDA GPUs, not on cpu",
                                    "drop --use-vllm, or plan --device cuda")

    def _check_load_in_8bit(self) -> None:
        """An 8-bit base (LLM.int8) as planned: LoRA adapters on it, no autocast, one GPU or DDP."""
        if not isinstance(self.load_in_8bit, bool):
            raise PlannerInputError("load_in_8bit", f"must be true or false, got {self.load_in_8bit!r}",
                                    "pass --quant int8 or leave it out")
        if self.load_in_8bit and self.method != "lora":
            raise PlannerInputError("quant", f"an 8-bit base (load_in_8bit) carries LoRA adapters, not --method "
                                             f"{self.method}" + (" (QLoRA is the 4-bit base)" if self.method == "qlora"
                                                                 else ""), "use --method lora with --quant int8")
        if self.load_in_8bit and self.activation_offload != "none":
            raise PlannerInputError("activation_offload", "activation offloading with an 8-bit base is not modelled "
                                    "yet (LLM.int8 keeps its inputs outside the saved-tensor hooks that offload)",
                                    "drop --activation-offloading, or --quant int8")
        if self.load_in_8bit and self.resolved_strategy not in (None, "ddp", "ddp-zero1"):
            raise PlannerInputError("strategy", f"an 8-bit base under {self.resolved_strategy} is not modelled (its "
                                                "int8 weights are not sharded like 16-bit ones)",
                                    "use one GPU or --strategy ddp with --quant int8")
        if self.load_in_8bit and self.amp is not None:
            raise PlannerInputError("amp", "autocast over an 8-bit base is not modelled yet (bitsandbytes' int8 matmul "
                                           "runs in its input's dtype)", "load in 16 bits: --dtype bf16 without --amp")

    def _check_offload(self) -> None:
        """The engines that offload, and what each can offload (`lora_planner.parallel.offload`)."""
        strategy = STRATEGY_ALIASES.get(self.strategy, self.strategy) if self.strategy else None
        if strategy is None or strategy.startswith("ddp"):
            raise PlannerInputError("offload", "offloading is a DeepSpeed ZeRO or FSDP feature"
                                    + (f", not {strategy}'s" if strategy else ""),
                                    "pass --strategy deepspeed-zero2 (or zero1 / zero3, or fsdp), on one GPU or more")
        if strategy.startswith("fsdp") and self.offload == "optimizer":
            raise PlannerInputError("offload", "FSDP2's CPUOffloadPolicy moves parameters, gradients and optimizer "
                                               "states together", "pass --offload params with --strategy fsdp")
        if strategy in ("deepspeed-zero1", "deepspeed-zero2") and self.offload == "params":
            raise PlannerInputError("offload", "DeepSpeed offloads parameters (offload_param) under ZeRO-3 only",
                                    "pass --offload optimizer, or --strategy deepspeed-zero3")

    def _check_activation_offload(self) -> None:
        """What `lora_planner.activation_offload`'s two implementations need."""
        kind = self.activation_offload
        if not self.grad_checkpointing:
            raise PlannerInputError("activation_offload", f"{kind}'s activation offloading moves checkpointed layer "
                                    "inputs (torchtune's recipes refuse it without activation checkpointing)",
                                    "add --grad-checkpointing")
        if self.device != "cuda":
            raise PlannerInputError("activation_offload", "activation offloading copies from the GPU to host RAM",
                                    "use --device cuda")
        if self.resolved_strategy not in (None, "ddp"):
            raise PlannerInputError("activation_offload", f"activation offloading with {self.resolved_strategy} is "
                                    "not modelled yet", "plan it on one GPU or with DDP")
        if kind == "unsloth" and self.compute_dtype == "fp32":
            raise PlannerInputError("activation_offload", "Unsloth's offload buffers are 16-bit", "use --dtype bf16")

    def _normalize_spellings(self) -> None:
        """Hugging Face / torch spellings -> the planner's (the dataclass is frozen: object.__setattr__)."""
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, "dtype"))
        if self.amp is not None:
            object.__setattr__(self, "amp", resolve_dtype(self.amp, "amp"))
        if self.bnb_4bit_compute_dtype is not None:
            object.__setattr__(self, "bnb_4bit_compute_dtype",
                               resolve_dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype"))
        object.__setattr__(self, "attention", resolve_attention(self.attention))
        optimizer, impl = resolve_optimizer(self.optimizer, self.device)
        if impl is not None and self.optimizer_impl is not None and impl != self.optimizer_impl:
            raise PlannerInputError("optimizer_impl", f"{self.optimizer!r} already means the {impl} implementation, "
                                                      f"not {self.optimizer_impl}",
                                    "drop --optimizer-impl, or name the optimizer without an implementation")
        object.__setattr__(self, "optimizer", optimizer)
        if impl is not None:
            object.__setattr__(self, "optimizer_impl", impl)

    @property
    def resolved_optimizer_impl(self) -> OptimizerImpl:
        if self.optimizer_impl is not None:
            return self.optimizer_impl
        return default_optimizer_impl(self.optimizer, self.device)[0]

    @property
    def optimizer_impl_reason(self) -> str:
        """Why `resolved_optimizer_impl` is what it is, for the output."""
        if self.optimizer_impl is not None:
            return "as given"
        return default_optimizer_impl(self.optimizer, self.device)[1]

    @property
    def resolved_strategy(self) -> Strategy | None:
        """The engine `strategy` is taken as (aliases resolved: zero2 -> deepspeed-zero2); None on one
        GPU (unless it offloads: DeepSpeed's ZeRO-Offload runs on one); DistributedDataParallel when several GPUs name
        no strategy."""
        if self.gpus == 1 and self.offload == "none":
            return None
        return STRATEGY_ALIASES.get(self.strategy, self.strategy) if self.strategy else "ddp"

    @property
    def quantized(self) -> bool:
        """The base is a bitsandbytes one: NF4 / FP4 (QLoRA) or LLM.int8 (`load_in_8bit`)."""
        return self.method == "qlora" or self.load_in_8bit

    @property
    def matmul_4bit_dtype(self) -> Dtype:
        """The dtype QLoRA's 4-bit matmuls compute in: `bnb_4bit_compute_dtype`, else the compute dtype."""
        return self.bnb_4bit_compute_dtype or self.compute_dtype

    @property
    def compute_dtype(self) -> Dtype:
        """The dtype matmuls run in: the autocast dtype under AMP, else the weights' dtype."""
        return self.amp if self.amp is not None else self.dtype

    @property
    def rows_per_example(self) -> int:
        """Rows the model sees per example of the micro-batch: 2 for a preference pair (`objectives.PAIRED`)."""
        return 2 if self.objective in PAIRED else 1

    @property
    def tokens(self) -> int:
        return self.batch_size * self.rows_per_example * self.seq_len

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, tokens per row) of what the model sees: packing flattens the micro-batch into one row; a preference
        pair is two rows."""
        return (1, self.tokens) if self.packing else (self.batch_size * self.rows_per_example, self.seq_len)

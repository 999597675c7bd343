"""What is being trained and how: frozen, validated dataclasses.

`ModelSpec` describes a decoder-only transformer exactly as far as memory is concerned (the fields of a
Hugging Face `config.json` that change a parameter count or an activation size). `LoraSpec` and
`TrainingSpec` describe the adapter and the step. Construction validates, so every later function can
trust its inputs; errors are `PlannerInputError`s that name the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from lora_planner.errors import PlannerInputError

Family = Literal["llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "bloom"]
Dtype = Literal["fp32", "bf16", "fp16"]
Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor"]
OptimizerImpl = Literal["foreach", "for-loop", "fused"]
Device = Literal["cuda", "cpu"]
Attention = Literal["sdpa", "eager"]
AdapterDtype = Literal["fp32", "base"]
Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp"]

FAMILIES: tuple[str, ...] = get_args(Family)
DTYPES: tuple[str, ...] = get_args(Dtype)
METHODS: tuple[str, ...] = get_args(Method)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
OPTIMIZER_IMPLS: tuple[str, ...] = get_args(OptimizerImpl)
DEVICES: tuple[str, ...] = get_args(Device)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
STRATEGIES: tuple[str, ...] = get_args(Strategy)

BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


def check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PlannerInputError(field_name, f"unknown value {value!r}", f"use one of {', '.join(choices)}")


def check_positive_int(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlannerInputError(field_name, f"must be a positive integer, got {value!r}", "pass a value >= 1")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LLM, reduced to what determines its memory.

    Family conventions (module names and layout) follow the Hugging Face `transformers` classes:
    llama/mistral/qwen2/gemma share the Llama layout (separate q/k/v/o, gated MLP, RMSNorm), phi has
    LayerNorm, parallel attention+MLP and a biased lm_head, gpt2 and bloom fuse q/k/v into one matrix.
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
    sliding_window: int | None = None  # Mistral: attention sees this many past tokens (None: all)

    def __post_init__(self) -> None:
        check_choice("model_type", self.family, FAMILIES)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
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


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter (Hu et al. 2021, arXiv 2106.09685): W x + (alpha / r) B A x, A: r x in, B: out x r.

    `alpha` defaults to 2r (a common rule of thumb; PEFT's own default is 8). `target_modules` uses PEFT's
    names (suffix match on the module path) or the single entry "all-linear" (every linear layer but
    the output head, as PEFT defines it); None means PEFT's default for the family (q_proj + v_proj for
    Llama-style models, c_attn for GPT-2, query_key_value for BLOOM, q/v/fc1/fc2 for Phi). `adapter_dtype` "fp32" is PEFT's default
    (`autocast_adapter_dtype=True` keeps adapters in fp32 on a 16-bit base); "base" uses the base dtype.
    """

    r: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    adapter_dtype: AdapterDtype = "fp32"

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        if self.alpha is not None and not self.alpha > 0:
            raise PlannerInputError("alpha", f"must be positive, got {self.alpha!r}", "pass e.g. --alpha 16")
        if self.target_modules is not None and (
                not self.target_modules or any(not t.strip() for t in self.target_modules)):
            raise PlannerInputError("target", "empty target module name", "pass e.g. --target q_proj,v_proj")
        check_choice("adapter_dtype", self.adapter_dtype, ("fp32", "base"))

    @property
    def effective_alpha(self) -> float:
        return float(2 * self.r) if self.alpha is None else float(self.alpha)

    @property
    def scaling(self) -> float:
        return self.effective_alpha / self.r


@dataclass(frozen=True)
class TrainingSpec:
    """One optimizer step's settings.

    `dtype` is the dtype the weights are stored in; `amp` turns on autocast mixed precision, which needs
    fp32 master weights (`dtype` must be fp32). `optimizer_impl` None means PyTorch's own default for the
    device: foreach on CUDA, the for-loop implementation on CPU (`torch.optim.optimizer._default_to_fused_or_foreach`).
    """

    method: Method = "lora"
    dtype: Dtype = "bf16"
    amp: Dtype | None = None
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl | None = None
    batch_size: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    device: Device = "cuda"
    attention: Attention = "sdpa"
    lora: LoraSpec = field(default_factory=LoraSpec)
    gpus: int = 1  # data-parallel ranks; batch_size is per rank
    strategy: Strategy | None = None  # how the ranks share model states (None: ddp when gpus > 1)

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("device", self.device, DEVICES)
        check_choice("attention", self.attention, ATTENTIONS)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("gpus", self.gpus)
        if self.strategy is not None:
            check_choice("strategy", self.strategy, STRATEGIES)
            if self.gpus == 1:
                raise PlannerInputError("strategy", f"{self.strategy} shares model states across GPUs, but gpus is 1",
                                        "pass --gpus N (N >= 2) with --strategy, or drop --strategy")
        if self.optimizer_impl is not None:
            check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        if self.amp is not None:
            check_choice("amp", self.amp, ("bf16", "fp16"))
            if self.dtype != "fp32":
                raise PlannerInputError(
                    "amp", f"autocast needs fp32 master weights, got --dtype {self.dtype}",
                    "use --dtype fp32 with --amp, or drop --amp",
                )
        if self.method == "qlora" and self.dtype == "fp32" and self.amp is None:
            raise PlannerInputError(
                "dtype", "QLoRA computes in 16-bit (the NF4 base is dequantized to the compute dtype)",
                "use --dtype bf16 or fp16 (or --amp bf16) with --method qlora",
            )

    @property
    def resolved_optimizer_impl(self) -> OptimizerImpl:
        if self.optimizer_impl is not None:
            return self.optimizer_impl
        return "foreach" if self.device == "cuda" else "for-loop"

    @property
    def resolved_strategy(self) -> Strategy | None:
        """None on one GPU; DistributedDataParallel when several GPUs name no strategy."""
        if self.gpus == 1:
            return None
        return self.strategy or "ddp"

    @property
    def compute_dtype(self) -> Dtype:
        """The dtype matmuls run in: the autocast dtype under AMP, else the weights' dtype."""
        return self.amp if self.amp is not None else self.dtype

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

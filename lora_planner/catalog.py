"""Named real architectures and GPUs, and the `config.json` reader that turns either into a `ModelSpec`.

The model catalog stores each model as the fields of its official Hugging Face `config.json` (only
the keys that change memory), and goes through the same parser as a user's own `config.json`, so the
catalog cannot drift from what the reader understands. Parameter totals are pinned in the tests against
`transformers` models built from these configs.

GPU memory sizes are the `memory.total` that `nvidia-smi` reports for each board (MiB) on current
drivers (R525 and later: the full board, with the driver's "Reserved" share listed separately), not the
marketing "GB". Known limitation: CUDA's own total (`torch.cuda.get_device_properties(0).total_memory`)
leaves that reserve out (H100 SXM: 81,106 MiB against nvidia-smi's 81,559); the default 10 % headroom
covers it, and `--gpu NAME --gpu-mem SIZE` takes an exact figure.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_planner.errors import PlannerInputError
from lora_planner.files import MAX_CONFIG_BYTES, read_json_file
from lora_planner.specs import FAMILIES, ModelSpec

MIB = 2**20
GIB = 2**30

# name -> (Hugging Face repo id, the memory-relevant part of its config.json)
MODEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "tie_word_embeddings": False}),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False}),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "tie_word_embeddings": True}),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "tie_word_embeddings": False}),
    "gemma-7b": ("google/gemma-7b", {
        "model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
        "hidden_act": "gelu", "max_position_embeddings": 8192}),
    "phi-2": ("microsoft/phi-2", {
        "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "hidden_act": "gelu_new", "partial_rotary_factor": 0.4, "qk_layernorm": False,
        "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False}),
    "gpt2": ("openai-community/gpt2", {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "n_inner": None, "n_positions": 1024, "activation_function": "gelu_new",
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}),
    "bloom-7b1": ("bigscience/bloom-7b1", {
        "model_type": "bloom", "vocab_size": 250880, "hidden_size": 4096, "n_layer": 30, "n_head": 32}),
    "tinyllama-1.1b": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "tie_word_embeddings": False}),
}

# Other names people use for the same weights.
MODEL_ALIASES: dict[str, str] = {
    "llama-7b": "llama-2-7b",  # LLaMA-1 7B has the same shapes (only max_position_embeddings differs)
    "llama2-7b": "llama-2-7b",
    "llama-3-8b-instruct": "llama-3-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "tinyllama": "tinyllama-1.1b",
}
for _name, (_repo, _) in MODEL_CONFIGS.items():
    MODEL_ALIASES[_repo.lower()] = _name

# Defaults of each transformers config class for keys a config.json may omit.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True, "phi": False,
                "gpt2": True, "bloom": True}
# GPT2Config defaults resid/embd/attn dropout to 0.1; the other families' config classes to 0.
_DROPOUT_DEFAULT = {"gpt2": 0.1}
_DROPOUT_DEFAULT.update({f: 0.0 for f in FAMILIES if f != "gpt2"})
_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "gemma": 8192, "phi": 2048,
                      "gpt2": 1024, "bloom": 2048}
_ACT_DEFAULT = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "gemma": "gelu_pytorch_tanh",
                "phi": "gelu_new", "gpt2": "gelu_new", "bloom": "bloom_gelu"}


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _required_int(config: dict[str, Any], source: str, *keys: str) -> int:
    value = _first(config, *keys)
    if value is None:
        raise PlannerInputError(f"{source}: {keys[0]}", "missing from the config",
                                "use a complete Hugging Face config.json")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlannerInputError(f"{source}: {keys[0]}", f"must be a positive integer, got {value!r}",
                                "fix the config.json")
    return value


def spec_from_config(config: dict[str, Any], name: str) -> ModelSpec:
    """Parse the memory-relevant part of a Hugging Face `config.json` into a `ModelSpec`.

    Key names and defaults follow the `transformers` config classes of each family (GPT-2 and BLOOM use
    `n_embd` / `n_layer` / `n_head`; Qwen2 always has q/k/v biases; Phi has biases everywhere and a biased
    lm_head; GPT-2's MLP is `n_inner` or 4 x hidden; BLOOM's is 4 x hidden).
    """
    if not isinstance(config, dict):
        raise PlannerInputError(name, "config.json must hold a JSON object", "use a Hugging Face config.json")
    family = config.get("model_type")
    if family not in FAMILIES:
        raise PlannerInputError(
            f"{name}: model_type", f"unsupported model_type {family!r}",
            f"supported families are {', '.join(FAMILIES)}",
        )
    hidden = _required_int(config, name, "hidden_size", "n_embd", "n_embed")
    layers = _required_int(config, name, "num_hidden_layers", "n_layer")
    heads = _required_int(config, name, "num_attention_heads", "n_head")
    vocab = _required_int(config, name, "vocab_size")
    kv_heads = _first(config, "num_key_value_heads", default=heads)
    head_dim = _first(config, "head_dim", default=256 if family == "gemma" else hidden // heads)
    if family == "gpt2":
        intermediate = _first(config, "n_inner", default=4 * hidden)
    elif family == "bloom":
        intermediate = 4 * hidden  # BloomMLP ignores any intermediate size in the config
    else:
        intermediate = _required_int(config, name, "intermediate_size")
    max_positions = _first(config, "n_positions", "max_position_embeddings", default=_POSITIONS_DEFAULT[family])
    biased_everywhere = family in ("phi", "gpt2", "bloom")
    # Which bias flags each transformers class honours: Llama both, Gemma attention_bias only,
    # Qwen2 hard-codes q/k/v biases, Mistral none.
    honours_attention_bias = family in ("llama", "gemma") and bool(config.get("attention_bias", False))
    return ModelSpec(
        name=name,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        tie_word_embeddings=bool(_first(config, "tie_word_embeddings", default=_TIE_DEFAULT[family])),
        max_position_embeddings=max_positions,
        attention_bias=biased_everywhere or family == "qwen2" or honours_attention_bias,
        attention_out_bias=biased_everywhere or honours_attention_bias,
        mlp_bias=biased_everywhere or (family == "llama" and bool(config.get("mlp_bias", False))),
        lm_head_bias=family == "phi",
        qk_layernorm=family == "phi" and bool(config.get("qk_layernorm", False)),
        partial_rotary_factor=float(config.get("partial_rotary_factor") or 1.0),
        dropout=float(_first(config, "resid_pdrop", "hidden_dropout", default=_DROPOUT_DEFAULT[family])),
        embedding_dropout=float(_first(config, "embd_pdrop", default=_DROPOUT_DEFAULT[family])),
        attention_dropout=float(_first(config, "attn_pdrop", "attention_dropout", default=_DROPOUT_DEFAULT[family])),
        sliding_window=_sliding_window(family, config),
        hidden_act=str(_first(config, "hidden_activation", "hidden_act", "activation_function",
                              default=_ACT_DEFAULT[family])),
    )


def _sliding_window(family: str, config: dict[str, Any]) -> int | None:
    """MistralConfig defaults to a 4096-token window; Qwen2 uses one only with `use_sliding_window`."""
    if family == "mistral":
        window = config.get("sliding_window", 4096)
    elif family == "qwen2" and config.get("use_sliding_window"):
        window = config.get("sliding_window")
    else:
        window = None
    return int(window) if isinstance(window, int) and window > 0 else None


def load_config_json(path: str | Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (or a folder holding one) into a `ModelSpec`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    config = read_json_file(path, "model", "pass a catalog name or a readable Hugging Face config.json")
    return spec_from_config(config, name=str(path))


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_CONFIGS)


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalog name (or alias / Hugging Face repo id), or a path to a `config.json`."""
    key = name_or_path.strip().lower()
    key = MODEL_ALIASES.get(key, key)
    if key not in MODEL_CONFIGS:
        # Chat / instruct fine-tunes share their base model's shapes: meta-llama/Llama-3.1-8B-Instruct.
        for suffix in ("-instruct", "-chat", "-it", "-chat-hf"):
            base = key.removesuffix(suffix)
            if base != key and MODEL_ALIASES.get(base, base) in MODEL_CONFIGS:
                key = MODEL_ALIASES.get(base, base)
                break
    if key in MODEL_CONFIGS:
        return spec_from_config(MODEL_CONFIGS[key][1], name=key)
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return load_config_json(name_or_path)
    close = difflib.get_close_matches(key, [*MODEL_CONFIGS, *MODEL_ALIASES], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(MODEL_CONFIGS)}"
    raise PlannerInputError("model", f"unknown model {name_or_path!r}",
                            f"{hint} (or pass a path to a config.json)")


TFLOPS = 10**12
GB_PER_S = 10**9

BF16_FP16_FP32 = ("bf16", "fp16", "fp32")
FP16_FP32 = ("fp16", "fp32")  # before Ampere / CDNA2: no bf16 tensor cores


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as one PyTorch device sees it.

    `memory_bytes`: the `memory.total` that `nvidia-smi` (ROCm: `rocm-smi`) reports for the board, in MiB,
    not the marketing "GB". `half_flops_per_s`: dense (no 2:4 sparsity) peak of 16-bit tensor-core matmuls
    with fp32 accumulation, what PyTorch's bf16 / fp16 matmuls use (GeForce cards run fp32 accumulation at
    half their fp16-accumulate rate); on GPUs without bf16 the fp16 rate. `fp32_flops_per_s`: plain fp32
    (TF32 off, PyTorch's default for matmuls). `dtypes`: the compute dtypes it runs (bf16 from Ampere /
    CDNA2 on). `source`: the datasheet the FLOP/s and bandwidth come from; `memory_source` where the
    reported memory comes from ("datasheet" marks a datasheet size converted because no reported value
    was found).
    """

    name: str
    memory_bytes: int
    dtypes: tuple[str, ...]
    half_flops_per_s: float
    fp32_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    source: str = ""
    memory_source: str = ""

    @property
    def supports_bf16(self) -> bool:
        return "bf16" in self.dtypes

    def flops_per_s(self, dtype: str) -> float:
        return self.fp32_flops_per_s if dtype == "fp32" else self.half_flops_per_s


_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200"
_B200 = "https://resources.nvidia.com/en-us-dgx-systems/dgx-b200-datasheet (HGX B200 totals / 8)"
_GB200 = "https://www.nvidia.com/en-us/data-center/gb200-nvl72/ (NVL72 totals / 72)"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (Appendix A)"
_AMPERE = "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf (Appendix A)"
_BLACKWELL = "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf"
_MODAL = "nvidia-smi, github.com/modal-labs/modal-client/pull/2797"
# Value matched in several real nvidia-smi logs found in public repositories by exact-string search, but no
# citable issue / page URL showing it was found: checked, yet still without a source to cite.
_SEEN = "nvidia-smi, same value in several public repo logs (no citable URL found)"
# Driver era: since about R525 nvidia-smi's memory.total is the full board size and a separate "Reserved" line
# holds the driver's share; older drivers printed total minus that share (V100-16GB 16160 / 16152, V100-32GB
# 32510, T4 15109, A100-40GB 40536, RTX 3090 24268). The table uses the current-driver values throughout.
# Neither is what torch.cuda.get_device_properties(0).total_memory reports: CUDA's total leaves out the
# reserved share (H100 SXM: nvidia-smi 81559 MiB, CUDA 81106 MiB = 85045477376 B, deviceQuery output in
# github.com/thamada/nvidia-smi nvsim/H100SXMx8_deviceQuery.py).

GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    # Hopper / Blackwell data-centre GPUs
    GpuSpec("h100-80gb", 81559 * MIB, BF16_FP16_FP32, 989 * TFLOPS, 67 * TFLOPS, 3350 * GB_PER_S, _H100 + " (SXM)",
            "nvidia-smi, github.com/NVIDIA/nccl/issues/1264"),
    GpuSpec("h100-pcie", 81559 * MIB, BF16_FP16_FP32, 756 * TFLOPS, 51 * TFLOPS, 2000 * GB_PER_S, _H100 + " (PCIe)",
            _SEEN),
    GpuSpec("h100-nvl", 95830 * MIB, BF16_FP16_FP32, 835 * TFLOPS, 60 * TFLOPS, 3900 * GB_PER_S, _H100 + " (NVL)",
            "nvidia-smi, github.com/NVIDIA/gpu-admin-tools/issues/4"),
    GpuSpec("h200", 143771 * MIB, BF16_FP16_FP32, 989 * TFLOPS, 67 * TFLOPS, 4800 * GB_PER_S, _H200 + " (SXM)",
            "nvidia-smi, github.com/sgl-project/sglang/issues/3196"),
    GpuSpec("b200", 183359 * MIB, BF16_FP16_FP32, 2250 * TFLOPS, 75 * TFLOPS, 8000 * GB_PER_S, _B200,
            "nvidia-smi, github.com/NVIDIA/TensorRT-LLM/issues/10278"),
    # 186 GB HBM3e per GPU (13.4 TB / 72) converted: datasheet, no reported value found.
    GpuSpec("gb200", 186 * 10**9 // MIB * MIB, BF16_FP16_FP32, 2500 * TFLOPS, 80 * TFLOPS, 8000 * GB_PER_S, _GB200,
            "datasheet"),
    # Ampere / Ada / Volta / Turing data-centre GPUs
    GpuSpec("a100-40gb", 40960 * MIB, BF16_FP16_FP32, 312 * TFLOPS, 19.5 * TFLOPS, 1555 * GB_PER_S, _A100, _MODAL),
    GpuSpec("a100-80gb", 81920 * MIB, BF16_FP16_FP32, 312 * TFLOPS, 19.5 * TFLOPS, 2039 * GB_PER_S, _A100 + " (SXM)",
            _MODAL),
    GpuSpec("l40", 46068 * MIB, BF16_FP16_FP32, 181 * TFLOPS, 90.5 * TFLOPS, 864 * GB_PER_S,
            "https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf", _SEEN),
    GpuSpec("l40s", 46068 * MIB, BF16_FP16_FP32, 362 * TFLOPS, 91.6 * TFLOPS, 864 * GB_PER_S,
            "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413", _MODAL),
    GpuSpec("a10", 23028 * MIB, BF16_FP16_FP32, 125 * TFLOPS, 31.2 * TFLOPS, 600 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf", _MODAL),
    # AWS's A10 variant; AWS publishes no tensor figures: 70 TF is the figure cloud benchmarks use.
    GpuSpec("a10g", 23028 * MIB, BF16_FP16_FP32, 70 * TFLOPS, 31.2 * TFLOPS, 600 * GB_PER_S,
            "https://aws.amazon.com/ec2/instance-types/g5/ (A10G; tensor rate not published)",
            "nvidia-smi, github.com/NVIDIA/DCGM/issues/232"),
    GpuSpec("l4", 23034 * MIB, BF16_FP16_FP32, 121 * TFLOPS, 30.3 * TFLOPS, 300 * GB_PER_S,
            "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet", _MODAL),
    GpuSpec("t4", 15360 * MIB, FP16_FP32, 65 * TFLOPS, 8.1 * TFLOPS, 320 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf",
            _MODAL),
    # V100 with R525+ drivers (ECC on); older drivers print 16160 / 32510 MiB (see the driver-era note above).
    GpuSpec("v100-16gb", 16384 * MIB, FP16_FP32, 125 * TFLOPS, 15.7 * TFLOPS, 900 * GB_PER_S,
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf (SXM2)",
            _SEEN),
    GpuSpec("v100-32gb", 32768 * MIB, FP16_FP32, 125 * TFLOPS, 15.7 * TFLOPS, 900 * GB_PER_S,
            "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf (SXM2)",
            "nvidia-smi 525.105.17, github.com/Wan-Video/Wan2.1/issues/5"),
    # Workstation cards (full-rate fp32 accumulation)
    GpuSpec("rtx-a6000", 49140 * MIB, BF16_FP16_FP32, 154.8 * TFLOPS, 38.7 * TFLOPS, 768 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web.pdf",
            _SEEN),
    GpuSpec("rtx-6000-ada", 49140 * MIB, BF16_FP16_FP32, 364.2 * TFLOPS, 91.1 * TFLOPS, 960 * GB_PER_S,
            "https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/rtx-6000/proviz-print-rtx6000-datasheet-web-2504660.pdf",
            _SEEN),
    # GeForce cards (fp32 accumulation at half the fp16-accumulate rate)
    GpuSpec("rtx-5090", 32607 * MIB, BF16_FP16_FP32, 209.5 * TFLOPS, 104.8 * TFLOPS, 1792 * GB_PER_S, _BLACKWELL,
            "nvidia-smi, github.com/noonghunna/club-3090/issues/1261"),
    GpuSpec("rtx-4090", 24564 * MIB, BF16_FP16_FP32, 165.2 * TFLOPS, 82.6 * TFLOPS, 1008 * GB_PER_S, _ADA,
            "nvidia-smi, github.com/RLinf/RLinf/issues/255"),
    GpuSpec("rtx-4080", 16376 * MIB, BF16_FP16_FP32, 97.5 * TFLOPS, 48.7 * TFLOPS, 716.8 * GB_PER_S, _ADA, _SEEN),
    GpuSpec("rtx-4070-ti", 12282 * MIB, BF16_FP16_FP32, 80.2 * TFLOPS, 40.1 * TFLOPS, 504 * GB_PER_S, _ADA, _SEEN),
    GpuSpec("rtx-3090", 24576 * MIB, BF16_FP16_FP32, 71 * TFLOPS, 35.6 * TFLOPS, 936 * GB_PER_S, _AMPERE,
            "nvidia-smi, github.com/noonghunna/club-3090/issues/1128"),
    GpuSpec("rtx-3080", 10240 * MIB, BF16_FP16_FP32, 59.5 * TFLOPS, 29.8 * TFLOPS, 760 * GB_PER_S, _AMPERE + " (10 GB)",
            _SEEN),
    # GA106 has no whitepaper table: 112 tensor cores x 1.777 GHz x 128 dense fp16 FLOP/clk with fp32
    # accumulation (the GA102 per-core rate of the Ampere whitepaper).
    GpuSpec("rtx-3060-12gb", 12288 * MIB, BF16_FP16_FP32, 25.5 * TFLOPS, 12.7 * TFLOPS, 360 * GB_PER_S,
            _AMPERE + " (per-core rate x GA106's 112 tensor cores)",
            "nvidia-smi, github.com/geerlingguy/raspberry-pi-pcie-devices/issues/790"),
    # AMD Instinct (ROCm's torch.cuda API; VRAM as rocm-smi reports it)
    # Bare metal in the default SPX / NPS1 partition: 206141652992 B (rocm-smi and rocminfo agree). The SR-IOV
    # virtual function cloud VMs expose ("AMD Instinct MI300X VF") reports 205822885888 B = 196288 MiB.
    GpuSpec("mi300x", 196592 * MIB, BF16_FP16_FP32, 1307.4 * TFLOPS, 163.4 * TFLOPS, 5300 * GB_PER_S,
            "https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf",
            "rocminfo VRAM pool 201310208 KB = 206141652992 B, github.com/ROCm/rocm-examples/issues/187"),
    # One MI250 is two GCDs, each its own PyTorch device with 64 GiB: per-GCD figures (datasheet / 2).
    GpuSpec("mi250", 65520 * MIB, BF16_FP16_FP32, 181 * TFLOPS, 22.6 * TFLOPS, 1638.4 * GB_PER_S,
            "https://www.amd.com/content/dam/amd/en/documents/instinct-business-docs/product-briefs/instinct-mi250-brochure.pdf (per GCD)",
            "rocminfo VRAM pool 67092480 KB = 68702699520 B per GCD, github.com/ROCm/rocm_smi_lib/issues/160"),
)}

# Other names people use: bare chips pick the most rented (or the smaller, where memory differs) variant.
GPU_ALIASES: dict[str, str] = {
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-sxm5": "h100-80gb", "h100-80gb-hbm3": "h100-80gb",
    "h100-94gb": "h100-nvl", "h100-pcie-80gb": "h100-pcie",
    "h200-sxm": "h200", "h200-141gb": "h200",
    "a100": "a100-40gb", "a100-sxm4-40gb": "a100-40gb", "a100-sxm4-80gb": "a100-80gb", "a100-pcie-40gb": "a100-40gb",
    "a100-pcie-80gb": "a100-80gb", "a100-40g": "a100-40gb", "a100-80g": "a100-80gb",
    "v100": "v100-16gb", "v100-sxm2-16gb": "v100-16gb", "v100-sxm2-32gb": "v100-32gb",
    "tesla-t4": "t4", "tesla-v100": "v100-16gb",
    "5090": "rtx-5090", "4090": "rtx-4090", "4080": "rtx-4080", "4070-ti": "rtx-4070-ti", "4070ti": "rtx-4070-ti",
    "rtx-4070ti": "rtx-4070-ti", "3090": "rtx-3090", "3080": "rtx-3080", "3060": "rtx-3060-12gb",
    "rtx-3060": "rtx-3060-12gb", "3060-12gb": "rtx-3060-12gb",
    "a6000": "rtx-a6000", "6000-ada": "rtx-6000-ada", "rtx-6000-ada-generation": "rtx-6000-ada",
    "l40s-48gb": "l40s", "mi300": "mi300x", "instinct-mi300x": "mi300x", "instinct-mi250": "mi250",
}


def _gpu_key(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx-4090', 'RTX_4090' -> 'rtx-4090', 'A100 80GB' -> 'a100-80gb'."""
    key = "-".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    for prefix in ("nvidia-", "geforce-", "amd-", "tesla-"):
        if key.startswith(prefix) and key not in GPU_ALIASES:
            key = key.removeprefix(prefix)
    if key.startswith("rtx") and not key.startswith("rtx-"):
        key = "rtx-" + key[3:]
    return key


def resolve_gpu(name: str) -> GpuSpec:
    """A catalog GPU by name or alias, case- and separator-insensitive; unknown names get close matches."""
    key = _gpu_key(name)
    key = GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, [*GPUS, *GPU_ALIASES], n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known GPUs: {', '.join(GPUS)}"
    raise PlannerInputError("gpu", f"unknown GPU {name!r}", f"{hint} (or pass --gpu-mem 24GiB)")


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


_UNIT_NAMES = {"b": "B", "kb": "kB", "mb": "MB", "gb": "GB", "tb": "TB",
               "kib": "KiB", "mib": "MiB", "gib": "GiB", "tib": "TiB"}


def _split_memory_size(text: str, field_name: str) -> tuple[str, str, int]:
    """(number as typed, unit key or "" for a bare number, bytes); one-line error if unreadable."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = int(float(number) * _UNITS[unit or "gib"]) if (unit or "gib") in _UNITS else 0
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise PlannerInputError(field_name, f"cannot read memory size {text!r}", "write e.g. 24GiB or 80GB")
    return number, unit, value


def parse_memory_size(text: str, field_name: str = "gpu-mem") -> int:
    """'24GiB', '80GB', '40 gib', '1.5TiB' -> bytes. A bare number means GiB. GB is decimal (10^9 bytes),
    GiB binary (2^30): `memory_size_echo` says which one the user got."""
    return _split_memory_size(text, field_name)[2]


def memory_size_echo(text: str, field_name: str = "gpu-mem") -> str:
    """The size as the user typed it and as the planner reads it, in GiB: '80GB' -> '80 GB = 74.51 GiB',
    '24GiB' -> '24 GiB', '24' -> '24 GiB (a bare number means GiB)'."""
    number, unit, value = _split_memory_size(text, field_name)
    if not unit:
        return f"{number} GiB (a bare number means GiB)"
    typed = f"{number} {_UNIT_NAMES[unit]}"
    return typed if unit == "gib" else f"{typed} = {value / GIB:.2f} GiB"

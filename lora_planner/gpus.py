"""The GPU catalog (`GPUS`, `resolve_gpu`) and memory sizes as users type them (`parse_memory_size`).

GPU memory sizes are the `memory.total` that `nvidia-smi` reports for each board (MiB) on current
drivers (R525 and later: the full board, with the driver's "Reserved" share listed separately), not the
marketing "GB". Known limitation: CUDA's own total (`torch.cuda.get_device_properties(0).total_memory`)
leaves that reserve out (H100 SXM: 81,106 MiB against nvidia-smi's 81,559); the default 10 % headroom
covers it, and `--gpu NAME --gpu-mem SIZE` takes an exact figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_planner.errors import PlannerInputError

MIB = 2**20
GIB = 2**30

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
    import difflib  # lazily: only on this path (cold start, issue 11)
    close = difflib.get_close_matches(key, [*GPUS, *GPU_ALIASES], n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known GPUs: {', '.join(GPUS)}"
    raise PlannerInputError("gpu", f"unknown GPU {name!r}", f"{hint} (or pass --gpu-mem 24GiB)")


MAX_MEMORY_SIZE_BYTES = 2**50  # 1 PiB: thousands of times any accelerator's memory
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
        raise PlannerInputError(field_name, f"cannot read memory size {text[:40]!r}", "write e.g. 24GiB or 80GB")
    if value > MAX_MEMORY_SIZE_BYTES:
        raise PlannerInputError(field_name, f"{text[:40]!r} is more than 1 PiB", "write e.g. 24GiB or 80GB")
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

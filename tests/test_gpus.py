"""The GPU catalog and memory sizes (`lora_planner.gpus`)."""

from __future__ import annotations

import pytest

from lora_planner.errors import PlannerInputError
from lora_planner.gpus import GIB, GPUS, MIB, parse_memory_size, resolve_gpu

# --------------------------------------------------------------------------------------------------
# 5. GPUs and memory sizes
# --------------------------------------------------------------------------------------------------

# `nvidia-smi --query-gpu=memory.total` (MiB; ROCm: rocm-smi), bf16 support (Ampere / CDNA2 on), dense 16-bit
# tensor TFLOP/s with fp32 accumulation, fp32 TFLOP/s and GB/s from the datasheets (catalog `source`).
GPU_TABLE = {
    "h100-80gb": (81559, True, 989, 67, 3350),
    "h100-pcie": (81559, True, 756, 51, 2000),
    "h100-nvl": (95830, True, 835, 60, 3900),
    "h200": (143771, True, 989, 67, 4800),
    "b200": (183359, True, 2250, 75, 8000),
    "gb200": (186 * 10**9 // MIB, True, 2500, 80, 8000),  # datasheet 186 GB converted
    "a100-40gb": (40960, True, 312, 19.5, 1555),
    "a100-80gb": (81920, True, 312, 19.5, 2039),
    "l40": (46068, True, 181, 90.5, 864),
    "l40s": (46068, True, 362, 91.6, 864),
    "a10": (23028, True, 125, 31.2, 600),
    "a10g": (23028, True, 70, 31.2, 600),
    "l4": (23034, True, 121, 30.3, 300),
    "t4": (15360, False, 65, 8.1, 320),
    "v100-16gb": (16384, False, 125, 15.7, 900),
    "v100-32gb": (32768, False, 125, 15.7, 900),
    "rtx-a6000": (49140, True, 154.8, 38.7, 768),
    "rtx-6000-ada": (49140, True, 364.2, 91.1, 960),
    "rtx-5090": (32607, True, 209.5, 104.8, 1792),
    "rtx-4090": (24564, True, 165.2, 82.6, 1008),
    "rtx-4080": (16376, True, 97.5, 48.7, 716.8),
    "rtx-4070-ti": (12282, True, 80.2, 40.1, 504),
    "rtx-3090": (24576, True, 71, 35.6, 936),
    "rtx-3080": (10240, True, 59.5, 29.8, 760),
    "rtx-3060-12gb": (12288, True, 25.5, 12.7, 360),
    "mi300x": (196592, True, 1307.4, 163.4, 5300),
    "mi250": (65520, True, 181, 22.6, 1638.4),  # one GCD, the device PyTorch sees
}


def test_gpu_table_is_the_catalog():
    assert set(GPU_TABLE) == set(GPUS)


@pytest.mark.parametrize(("name", "mib", "bf16", "half_tflops", "fp32_tflops", "gb_per_s"),
                         [(n, *v) for n, v in GPU_TABLE.items()])
def test_gpu_catalog(name, mib, bf16, half_tflops, fp32_tflops, gb_per_s):
    gpu = resolve_gpu(name)
    assert (gpu.name, gpu.memory_bytes, gpu.supports_bf16) == (name, mib * MIB, bf16)
    assert gpu.flops_per_s("bf16") == pytest.approx(half_tflops * 1e12)
    assert gpu.flops_per_s("fp32") == pytest.approx(fp32_tflops * 1e12)
    assert gpu.memory_bandwidth_bytes_per_s == pytest.approx(gb_per_s * 1e9)
    assert gpu.dtypes == (("bf16", "fp16", "fp32") if bf16 else ("fp16", "fp32"))
    assert gpu.source.startswith("https://") and gpu.memory_source
    assert resolve_gpu(f" {name.upper()} ") == gpu


@pytest.mark.parametrize(("alias", "name"), [
    ("h100", "h100-80gb"), ("H100-SXM", "h100-80gb"), ("a100", "a100-40gb"), ("4090", "rtx-4090"),
    ("RTX 4090", "rtx-4090"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("rtx_3060", "rtx-3060-12gb"),
    ("v100", "v100-16gb"), ("NVIDIA H100 NVL", "h100-nvl"), ("A6000", "rtx-a6000"), ("5090", "rtx-5090"),
    ("4070ti", "rtx-4070-ti"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("MI300X", "mi300x"),
])
def test_gpu_aliases(alias, name):
    assert resolve_gpu(alias).name == name


@pytest.mark.parametrize(("name", "suggestions"), [
    ("a10o", ("a100",)),
    ("rtx-409", ("rtx-4090",)),
    ("h10", ("h100",)),
    ("v10", ("v100",)),
])
def test_unknown_gpu_suggests(name, suggestions):
    with pytest.raises(PlannerInputError) as err:
        resolve_gpu(name)
    assert err.value.field == "gpu"
    assert "did you mean" in err.value.fix
    for suggestion in suggestions:
        assert suggestion in err.value.fix
    assert "--gpu-mem" in err.value.fix


def test_unknown_gpu_without_close_names_lists_them_all():
    with pytest.raises(PlannerInputError) as err:
        resolve_gpu("xyz")
    for name in GPUS:
        assert name in err.value.fix


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * GIB),
    ("80GB", 80 * 10**9),
    ("40", 40 * GIB),
    ("1.5TiB", 3 * 2**39),
    ("40 gib", 40 * GIB),
    (" 16 GiB ", 16 * GIB),
    ("512MiB", 512 * MIB),
    ("2048KiB", 2 * MIB),
    ("1000000kB", 10**9),
    ("1e3MB", 10**9),
    ("1TB", 10**12),
    ("4096b", 4096),
    ("0.5", GIB // 2),
    ("79.6GiB", int(79.6 * GIB)),
])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", [
    "abc", "-1GiB", "0", "0GB", "-0", "", "   ", "GiB", "24GiBs", "24XB", "24 G", "24GiB!", "inf", "nan",
    "1e400GiB",  # float overflow: must still be a PlannerInputError
    "0.1B",  # positive but rounds to 0 bytes
])
def test_parse_memory_size_rejects(text):
    with pytest.raises(PlannerInputError) as err:
        parse_memory_size(text)
    assert err.value.field == "gpu-mem"
    assert repr(text) in err.value.problem


def test_parse_memory_size_names_the_given_field():
    with pytest.raises(PlannerInputError) as err:
        parse_memory_size("lots", field_name="cpu-mem")
    assert err.value.field == "cpu-mem"
    assert str(err.value).startswith("cpu-mem: ")

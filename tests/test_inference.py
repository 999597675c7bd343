"""`lora_planner.inference`: a no-grad forward's heaviest moment in the layers, by hand and against the exact tracker
on transformers' Llama, Mistral, Qwen2 and Qwen3 (train mode, `use_cache=False`, as TRL's reference pass calls it)."""

from __future__ import annotations

import pytest

from lora_planner.activations import make_flow
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.inference import check_no_grad_forward, no_grad_layer_peak_bytes
from lora_planner.specs import TrainingSpec

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 352,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
SPEC = spec_from_config(CONFIG, "tiny-llama-wide-mlp")


@pytest.mark.parametrize(("amp", "expected"), [
    # fp32: 4 stream tensors (64 tokens x 64), cos / sin (32 x 16) and positions, act(gate), up and their product
    (None, 4 * 64 * 64 * 4 + 2 * 32 * 16 * 4 + 32 * 8 + 3 * 64 * 352 * 4),
    # bf16 autocast over fp32 weights: at up_proj, act(gate) and up's output in bf16, x's and the weight's bf16 casts
    ("bf16", 4 * 64 * 64 * 4 + 2 * 32 * 16 * 4 + 32 * 8 + 2 * 64 * 352 * 2 + 64 * 64 * 2 + 352 * 64 * 2),
])
def test_by_hand(amp, expected):
    flow = make_flow(SPEC, TrainingSpec(method="lora", dtype="fp32", amp=amp, device="cpu", batch_size=2, seq_len=32))
    assert no_grad_layer_peak_bytes(flow) == expected


@pytest.mark.parametrize("name", ["gpt2", "phi"])
def test_other_families_are_refused(name):
    from lora_planner.catalog import resolve_model

    spec = resolve_model({"gpt2": "gpt2", "phi": "phi-2"}[name])
    with pytest.raises(PlannerInputError, match="dense Llama-style"):
        check_no_grad_forward(make_flow(spec, TrainingSpec(method="lora")), "DPO's reference pass")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_equals_the_tracker(amp, model_type):
    """The real forward of frozen weights (a LoRA base, as DPO's reference pass runs it), measured: the peak above the
    weights and the input ids equals the planned moment. (Weights that require grad would also have autocast cache
    their bf16 casts until the region ends, no-grad or not: not planned, full fine-tuning's reference is refused.)"""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_planner.profiler.tracker import LiveTensorTracker

    config = {**CONFIG, "model_type": model_type, "head_dim": 16}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).train()
    model.requires_grad_(False)
    ids = torch.randint(0, 64, (2, 32))
    tracker = LiveTensorTracker()
    with tracker:
        tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
        tracker.register(ids, "activations")
        base = tracker.live_bytes
        tracker.begin_step()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            model.model(input_ids=ids, use_cache=False)
        result = tracker.end_step()
    flow = make_flow(spec_from_config(config, model_type),
                     TrainingSpec(method="lora", dtype="fp32", amp=amp, device="cpu", batch_size=2, seq_len=32))
    assert result.peak_bytes - base == no_grad_layer_peak_bytes(flow)


@pytest.mark.parametrize(("device", "dequantized"), [("cuda", 352 * 64 * 2), ("cpu", 0)])
def test_a_4bit_base(device, dequantized):
    """QLoRA (no kbit preparation, bf16): on CUDA `MatMul4Bit` dequantizes up_proj's weight for its matmul, which at 16
    tokens outweighs the MLP's activations; on CPU bitsandbytes' gemm_4bit reads the packed weight."""
    flow = make_flow(SPEC, TrainingSpec(method="qlora", dtype="bf16", device=device, batch_size=2, seq_len=8,
                                        kbit_prep=False))
    stream = 4 * 16 * 64 * 2 + 2 * 8 * 16 * 2 + 8 * 8
    assert no_grad_layer_peak_bytes(flow) == stream + max(3 * 16 * 352 * 2, 2 * 16 * 352 * 2 + dequantized)

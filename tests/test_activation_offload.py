"""Activation offloading (`lora_planner.activation_offload`): hand counts of torchtune's and Unsloth's policies from
their source, and the pack sequences they act on, recorded on real transformers models on the CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lora_planner.activation_offload import (
    final_norm_packs, host_buffers, inputs_held_in_backward, inputs_kept_at_forward_end, offloadable,
    resident_gpu_bytes,
)
from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.errors import PlannerInputError
from lora_planner.families import family_rules
from lora_planner.memory import estimate_memory
from lora_planner.parallel.offload import HostBuffer
from lora_planner.specs import TrainingSpec

MIB = 2 ** 20
LLAMA_8B = resolve_model("llama-3.1-8b")
# Llama-3.1-8B, 2 x 4,096 tokens: M = 8,192 x 4,096 = 32 Mi elements, a layer input of 64 MiB in bf16
M = 8192 * 4096


def training(kind: str, **kw) -> TrainingSpec:
    return TrainingSpec(batch_size=2, seq_len=4096, grad_checkpointing=True, loss="chunked", activation_offload=kind,
                        **kw)


def phases(kind: str, **kw) -> dict[str, int]:
    return {p.phase: p.breakdown.activations_bytes for p in estimate_memory(LLAMA_8B, training(kind, **kw)).phases}


# ------------------------------------------------------------------------------------------------ hand counts
@pytest.mark.parametrize("norm, weight_trains, liger, expected", [
    # Llama: fp32 input (pow), 1/rms (rsqrt), 1/rms and the fp32 input (x * rsqrt), the weight (w * x)
    ("rms", False, False, ((M * 4, False), (8192 * 4, False), (8192 * 4, False), (M * 4, False), (8192, True))),
    ("rms", True, False, ((M * 4, False), (8192 * 4, False), (8192 * 4, False), (M * 4, False), (8192, True),
                          (M * 2, False))),
    ("rms_fp32", True, False, ((M * 4, False), (8192 * 4, False), (8192 * 4, False), (M * 4, False), (8192, True),
                               (M * 4, False))),
    # Gemma: 1 + w is an fp32 vector, no parameter
    ("rms_gemma", False, False, ((M * 4, False), (8192 * 4, False), (8192 * 4, False), (M * 4, False),
                                 (4096 * 4, False))),
    ("layer", False, False, ((8192, True), (M * 2, False), (8192, True), (8192 * 4, False), (8192 * 4, False))),
    ("rms", False, True, ((M * 2, False), (8192, True), (8192 * 4, False))),
])
def test_final_norm_packs(norm, weight_trains, liger, expected):
    assert final_norm_packs(norm, weight_trains, liger, 8192, 4096, 2) == expected


@pytest.mark.parametrize("norm, liger, tokens, kept", [
    ("rms", False, 8192, 1),  # the last offloadable pack is the 4th: ids L - 0 .. L + 4 in the stash
    ("rms_gemma", False, 8192, 0),
    ("layer", False, 8192, 0),  # mean and 1/std (4 bytes a token) are 1 KiB or more from 256 tokens
    ("layer", False, 128, 3),  # ... below, the input (the second pack) is the last offloadable one
    ("rms", True, 8192, 2),
    ("rms", True, 128, 4),
])
def test_torchtune_inputs_kept_at_forward_end(norm, liger, tokens, kept):
    packs = final_norm_packs(norm, False, liger, tokens, 4096, 2)
    assert inputs_kept_at_forward_end("torchtune", 32, packs, tokens * 4096) == kept
    assert inputs_kept_at_forward_end("torchtune", 2, packs, tokens * 4096) == min(kept, 2)
    assert inputs_kept_at_forward_end("none", 32, packs, tokens * 4096) == 32


def test_unsloth_offloads_above_one_mebi_element():
    assert inputs_kept_at_forward_end("unsloth", 32, (), 2 ** 20 + 1) == 1
    assert inputs_kept_at_forward_end("unsloth", 32, (), 2 ** 20) == 32  # `new_size > MINIMUM_SIZE`
    assert [inputs_held_in_backward("unsloth", i, 32, M) for i in (0, 30, 31)] == [0, 0, 1]
    assert [inputs_held_in_backward("unsloth", i, 32, 2 ** 20) for i in (0, 30, 31)] == [1, 31, 32]
    assert [inputs_held_in_backward("torchtune", i, 32, M) for i in (0, 30, 31)] == [2, 2, 1]
    assert [inputs_held_in_backward("none", i, 32, M) for i in (0, 30, 31)] == [1, 31, 32]
    # two 16-bit GPU buffers, never below their initial 1 Mi elements
    assert resident_gpu_bytes("unsloth", M) == 2 * M * 2
    assert resident_gpu_bytes("unsloth", 1000) == 2 * 2 ** 20 * 2
    assert resident_gpu_bytes("torchtune", M) == 0


def test_host_buffers_hand_count():
    """Llama-3.1-8B, 2 x 4,096 tokens, bf16. torchtune: 32 layer inputs of 64 MiB and the final norm's two fp32
    inputs (128 MiB) and two 1/rms rows (32 KiB), every one a power of two already. Unsloth: its 200 buffers of 256
    KiB (32 of them resized: reserved, no longer in use) and 32 layer buffers of 64 MiB."""
    packs = final_norm_packs("rms", False, False, 8192, 4096, 2)
    tt = [HostBuffer(name, nbytes, True, sizes)
          for name, nbytes, sizes in host_buffers("torchtune", 32, packs, M * 2, M)]
    assert [b.nbytes for b in tt] == [32 * 64 * MIB, 2 * 128 * MIB + 2 * 32768]
    assert sum(b.reserved_bytes for b in tt) == 2_415_984_640
    un = [HostBuffer(name, nbytes, True, sizes)
          for name, nbytes, sizes in host_buffers("unsloth", 32, packs, M * 2, M)]
    assert [b.nbytes for b in un] == [(200 - 32) * 256 * 1024, 32 * 64 * MIB]
    assert sum(b.reserved_bytes for b in un) == 200 * 256 * 1024 + 32 * 64 * MIB
    # a layer input of 96 MiB is reserved as 128 MiB
    name, nbytes, sizes = host_buffers("unsloth", 2, packs, 3 * M, 3 * M // 2)[1]
    assert HostBuffer(name, nbytes, True, sizes).reserved_bytes == 2 * 128 * MIB
    # nothing offloaded at or below 1 Mi elements: only the initial buffers
    small = host_buffers("unsloth", 32, packs, 2 ** 21, 2 ** 20)
    assert [nbytes for _, nbytes, _ in small] == [200 * 256 * 1024, 0]
    assert offloadable(1024, False) and not offloadable(1023, False) and not offloadable(10 ** 9, True)


def test_plan_moves_the_layer_inputs():
    """The plan against plain checkpointing: torchtune keeps 1 of the 32 layer inputs (64 MiB each) from the forward's
    end through the loss and 2 while a layer goes back (31 then); Unsloth 1, plus its two 64 MiB GPU buffers at every
    phase."""
    none, tt, un = phases("none"), phases("torchtune"), phases("unsloth")
    layer = 64 * MIB
    assert none["forward_end"] - tt["forward_end"] == 31 * layer
    assert none["backward_start"] - tt["backward_start"] == 31 * layer
    assert none["backward_layers"] - tt["backward_layers"] == 30 * layer  # layer 31's recompute, before: 32 inputs
    assert tt["backward_end"] - none["backward_end"] == layer  # layer 0 with layer 1's input not yet freed
    assert un["forward_start"] == none["forward_start"] + 2 * layer
    assert none["forward_end"] - un["forward_end"] == 31 * layer - 2 * layer
    assert un["optimizer_step"] == none["optimizer_step"] + 2 * layer
    host = estimate_memory(LLAMA_8B, training("torchtune")).host
    assert host.total_bytes == 2_415_984_640 and host.ranks_per_node == 1


def test_refusals():
    with pytest.raises(PlannerInputError, match="add --grad-checkpointing"):
        TrainingSpec(activation_offload="torchtune")
    with pytest.raises(PlannerInputError, match="device cuda"):
        TrainingSpec(activation_offload="torchtune", grad_checkpointing=True, device="cpu")
    with pytest.raises(PlannerInputError, match="deepspeed-zero3"):
        TrainingSpec(activation_offload="unsloth", grad_checkpointing=True, gpus=2, strategy="zero3")
    with pytest.raises(PlannerInputError, match="16-bit"):
        TrainingSpec(activation_offload="unsloth", grad_checkpointing=True, dtype="fp32")
    with pytest.raises(PlannerInputError, match="activation_offload"):
        TrainingSpec(activation_offload="cpu", grad_checkpointing=True)
    with pytest.raises(PlannerInputError, match="soft-capping"):
        estimate_memory(resolve_model("gemma-2-2b"), TrainingSpec(activation_offload="torchtune",
                                                                  grad_checkpointing=True))
    # DDP is planned: the per-rank plan plus its gradient buckets
    ddp = estimate_memory(LLAMA_8B, replace(training("torchtune"), gpus=2))
    assert ddp.host.ranks_per_node == 2


def test_cli_implies_checkpointing_and_reports_host(capsys):
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "2", "--seq-len", "4096",
                 "--loss", "chunked", "--activation-offloading", "torchtune", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["activation_offload"] == "torchtune" and data["inputs"]["grad_checkpointing"] is True
    host = data["methods"]["lora"]["host"]
    assert host["per_rank_bytes"] == 2_415_984_640
    assert [b["name"] for b in host["buffers"]] == ["torchtune: checkpointed layer inputs",
                                                    "torchtune: the final norm's saved tensors"]
    assert main(["--model", "llama-3.1-8b", "--method", "lora", "--activation-offloading", "unsloth"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Unsloth's offloaded checkpointing" in out and "host RAM per rank" in out
    assert main(["--model", "llama-3.1-8b", "--activation-offloading", "unsloth", "--dtype", "fp32"]) == 2
    assert "activation_offload" in capsys.readouterr().err


def test_unsloth_stack_offloads():
    from lora_planner.stacks import STACKS

    assert STACKS["unsloth"].settings["activation_offload"] == "unsloth"
    assert not any("offloaded checkpointing" in note for note in STACKS["unsloth"].notes)


# ------------------------------------------------------------------------------ the packs on real models (CPU)
torch = pytest.importorskip("torch")
REAL = {
    "llama": ({"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}, ("bf16", "fp32")),
    "gemma": ({"model_type": "gemma", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
              ("bf16",)),
    "olmo2": ({"model_type": "olmo2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}, ("bf16",)),
    # LayerNorm's statistics are in the input's dtype on the CPU and fp32 on CUDA: compared in fp32
    "gpt2": ({"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 3, "n_head": 4}, ("fp32",)),
    "phi": ({"model_type": "phi", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 3, "num_attention_heads": 4, "partial_rotary_factor": 0.5}, ("fp32",)),
}


def _recorded_packs(config: dict, dtype: str, batch: int, seq: int):
    """Every tensor autograd packs in a LoRA forward under non-reentrant checkpointing, up to the output layer (which
    torchtune runs under `NoOpManager`), as (bytes, is a parameter), with the spec."""
    from lora_planner.config_reader import spec_from_config
    from lora_planner.profiler.hf_backend import build_hf_model

    spec = spec_from_config(dict(config), f"tiny-{config['model_type']}")
    t = TrainingSpec(method="lora", device="cpu", dtype=dtype, batch_size=batch, seq_len=seq,
                     grad_checkpointing=True)
    torch.manual_seed(0)
    model = build_hf_model(spec, t, "cpu")
    model.train()
    log, state = [], {"head": False}
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda *_: state.update(head=True))

    def pack(tensor):
        if not state["head"]:
            log.append((tensor.numel() * tensor.element_size(), isinstance(tensor, torch.nn.Parameter)))
        return tensor

    ids = torch.randint(0, spec.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids)
    return spec, t, log


@pytest.mark.parametrize("family, dtype", [(f, d) for f, (_, dtypes) in REAL.items() for d in dtypes])
@pytest.mark.parametrize("batch, seq", [(2, 64), (1, 32)])
def test_packs_on_real_models(family, dtype, batch, seq):
    """What the hooks see: each layer's checkpointed input, then exactly `final_norm_packs`; torchtune's stash rule
    replayed over the recorded ids leaves `inputs_kept_at_forward_end` layer inputs on the device."""
    config, _ = REAL[family]
    spec, t, log = _recorded_packs(config, dtype, batch, seq)
    tokens, h, e = batch * seq, spec.hidden_size, 4 if dtype == "fp32" else 2
    layers = spec.num_layers
    packs = final_norm_packs(family_rules(spec.family).norm, False, False, tokens, h, e)
    # (GPT-2's embedding dropout keeps its mask before the layers)
    assert tuple(log[-len(packs):]) == packs
    assert log[-len(packs) - layers:-len(packs)] == [(tokens * h * e, False)] * layers
    # torchtune's forward stash over the recorded sequence (ids from 1, evicted when an offloadable one is packed)
    stash: list[int] = []
    for tensor_id, (nbytes, param) in enumerate(log, start=1):
        if offloadable(nbytes, param):
            stash = [i for i in stash if i > tensor_id - 5] + [tensor_id]
    first_input = len(log) - len(packs) - layers + 1
    kept = sum(1 for i in stash if first_input <= i < first_input + layers)
    assert kept == inputs_kept_at_forward_end("torchtune", layers, packs, tokens * h)

"""`lora_planner.generation`: GRPO's round (hand counts of the KV cache, the decode's and prefill's moments, the
scoring passes TRL runs, vLLM's share) and what is refused; the real GRPOTrainer steps are in
tests/profiler/test_trl_steps.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.activations import make_flow
from lora_planner.catalog import resolve_model
from lora_planner.cli import main
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.generation import generation_memory, kv_element_bytes
from lora_planner.memory import estimate_memory
from lora_planner.specs import GrpoSpec, LoraSpec, TrainingSpec

TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
LORA = LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))


def grpo(**kw) -> TrainingSpec:
    g = GrpoSpec(**{"num_generations": 4, "max_completion_length": 256, **kw.pop("grpo", {})})
    return TrainingSpec(**{"method": "lora", "dtype": "fp32", "device": "cpu", "batch_size": 16, "seq_len": 282,
                           "loss": "trl", "objective": "grpo", "padding": True, "grad_checkpointing": True,
                           "lora": LORA, "grpo": g, **kw})


def test_decode_moment_by_hand():
    """16 rows, 26 prompt + 256 completion tokens, fp32 LoRA (measured on a real GRPOTrainer: the same 3,136,272
    bytes of cache, ids and sampling buffers at the last step's heaviest op)."""
    gen = generation_memory(make_flow(spec_from_config(TINY, "tiny"), grpo()))
    t = 26 + 256 - 1  # positions cached at the last step
    kv = 2 * 16 * 2 * 16 * t * (4 + 4)  # layers x rows x kv heads x head_dim x T x (K + V bytes)
    cat = 16 * 2 * 16 * (t - 1) * 4  # the last layer's old V beside the new one
    ids = 3 * 16 * t * 8 + 16 * t  # input_ids, mask and positions (int64), the (rows, 1, 1, T) bool mask
    sampling = 2 * 16 * 1000 * 4  # the previous step's fp32 logits and probabilities
    step = 4 * 16 * 64 * 4 + 16 * 4 * 16 * 4  # the residual stream and q at one token a row
    assert gen.kv_cache_bytes == kv == 2_301_952
    assert gen.decode_bytes == kv + cat + ids + sampling + step == 3_136_272
    # held: the previous round's ids and masks (int64), advantages, and this round's prompts (4 x rows x P int64)
    assert gen.held_bytes == 2 * 16 * 282 * 8 + 16 * 4 + 4 * 16 * 26 * 8


def test_qwen3_8b_kv_cache():
    """Issue 17's example: 8 completions of 1,024 tokens after a 512-token prompt, LoRA on bf16 weights: 36 layers x 8
    rows x 8 KV heads x 128 x 1,535 positions x 2 x 2 bytes."""
    training = grpo(dtype="bf16", device="cuda", batch_size=8, seq_len=1536,
                    grpo={"num_generations": 8, "max_completion_length": 1024})
    gen = generation_memory(make_flow(resolve_model("qwen3-8b"), training))
    assert gen.kv_cache_bytes == 36 * 8 * 8 * 128 * 1535 * 4 == 1_810_759_680


@pytest.mark.parametrize(("method", "dtype", "amp", "expected"), [
    ("lora", "fp32", "bf16", (4, 4)),  # PEFT generates outside autocast, in the weights' dtype (measured)
    ("lora", "bf16", None, (2, 2)),
    ("full", "fp32", "bf16", (4, 2)),  # V from the autocast v_proj, K promoted by RoPE's fp32 tables (measured)
    ("full", "fp32", None, (4, 4)),
    ("full", "bf16", None, (2, 2)),
])
def test_kv_dtypes(method, dtype, amp, expected):
    flow = make_flow(spec_from_config(TINY, "tiny"), grpo(method=method, dtype=dtype, amp=amp))
    assert kv_element_bytes(flow) == expected


@pytest.mark.parametrize(("config", "old", "mid_step"), [
    ({}, False, False),  # GRPOConfig's defaults: old log-probs are the training pass's, detached
    ({"num_iterations": 2}, True, False),
    ({"gradient_accumulation_steps": 2, "steps_per_generation": 4}, True, False),
    ({"gradient_accumulation_steps": 4, "steps_per_generation": 1}, False, True),  # a round every micro-batch
    ({"gradient_accumulation_steps": 4}, False, False),  # steps_per_generation = the accumulation steps
    ({"generation_backend": "vllm-server"}, True, False),  # vLLM: the importance-sampling correction's pass
])
def test_when_trl_runs_the_old_policy_pass(config, old, mid_step):
    g = GrpoSpec(**config)
    assert g.old_log_prob_pass(8) is old and g.round_starts_mid_step(8) is mid_step


def test_phases_and_what_decides():
    spec = spec_from_config(TINY, "tiny")
    e = estimate_memory(spec, grpo())
    names = [p.phase for p in e.phases]
    assert names[0] == "generation" and "scoring" not in names and "reference_forward" not in names
    scored = estimate_memory(spec, grpo(grpo={"beta": 0.04}))
    assert [p.phase for p in scored.phases][:2] == ["generation", "scoring"]
    # a round starting mid-accumulation holds the step's gradients
    mid = estimate_memory(spec, grpo(grpo={"gradient_accumulation_steps": 4, "steps_per_generation": 1}))
    assert mid.phases[0].breakdown.gradients_bytes > 0 == e.phases[0].breakdown.gradients_bytes


def test_vllm_colocate_reserves_its_share():
    spec = resolve_model("qwen3-8b")
    base = dict(dtype="bf16", device="cuda", batch_size=8, seq_len=1536)
    vllm = {"num_generations": 8, "max_completion_length": 1024, "generation_backend": "vllm-colocate",
            "vllm_gpu_memory_bytes": 80 * 2**30}
    share = int(0.3 * 80 * 2**30)

    def total(e, name: str) -> int:
        return next(p.breakdown.total_bytes for p in e.phases if p.phase == name)

    plain = estimate_memory(spec, grpo(**base, grpo={**vllm, "generation_backend": "vllm-server"}))
    colocated = estimate_memory(spec, grpo(**base, grpo=vllm))
    training_phases = [p.phase for p in plain.phases if p.phase not in ("generation", "scoring")]
    for name in training_phases:
        assert total(colocated, name) - total(plain, name) == share
    asleep = estimate_memory(spec, grpo(**base, grpo={**vllm, "vllm_enable_sleep_mode": True}))
    assert total(asleep, "forward_end") == total(plain, "forward_end")
    assert total(asleep, "generation") - total(plain, "generation") == share


@pytest.mark.parametrize(("settings", "field", "fragment"), [
    ({"batch_size": 6}, "num_generations", "not a multiple of num_generations 4"),
    ({"seq_len": 256}, "seq_len", "leave no prompt"),
    ({"method": "qlora", "dtype": "bf16"}, "method", "4-bit base"),
    ({"grpo": {"generation_backend": "vllm-colocate"}}, "generation_backend", "CUDA"),
    ({"grpo": {"num_generations": 1}}, "num_generations", "at least 2"),
    ({"grpo": {"vllm_gpu_memory_utilization": 1.5}}, "vllm_gpu_memory_utilization", "fraction"),
    ({"grpo": {"beta": -1}}, "beta", "non-negative"),
    ({"gpus": 2}, "gpus", "one GPU so far"),
])
def test_refused_with_the_reason(settings, field, fragment):
    with pytest.raises(PlannerInputError) as err:
        grpo(**settings)
    assert err.value.field == field and fragment in str(err.value)


def test_colocated_vllm_needs_the_gpu():
    training = grpo(device="cuda", grpo={"generation_backend": "vllm-colocate"})
    with pytest.raises(PlannerInputError) as err:
        estimate_memory(spec_from_config(TINY, "tiny"), training)
    assert err.value.field == "gpu"


@settings(max_examples=25, deadline=None)
@given(completion=st.integers(8, 400), rows=st.sampled_from([4, 8, 12]), prompt=st.integers(1, 64))
def test_generation_grows_with_completion_and_rows(completion, rows, prompt):
    spec = spec_from_config(TINY, "tiny")

    def peak(c: int, b: int) -> int:
        return generation_memory(make_flow(spec, grpo(batch_size=b, seq_len=prompt + c, grpo={
            "max_completion_length": c}))).peak_bytes

    assert peak(completion + 1, rows) > peak(completion, rows)
    assert peak(completion, rows + 4) > peak(completion, rows)


def test_cli_plans_grpo(capsys):
    """`--objective grpo`: TRL's micro-batch of 8 completions, 512 prompt + the completion tokens a row, the
    generation round first, its KV cache in the JSON and the note."""
    assert main(["--model", "qwen3-8b", "--method", "lora", "--objective", "grpo", "--max-completion-length", "1024",
                 "--grad-checkpointing", "--gpu", "h100-80gb", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    inputs, lora = doc["inputs"], doc["methods"]["lora"]
    assert inputs["batch_size"] == 8 and inputs["seq_len"] == 1536 and inputs["loss"] == "trl"
    assert inputs["grpo"]["prompt_tokens"] == 512 and inputs["grpo"]["rows_per_round"] == 8
    assert list(lora["phases"])[0] == "generation" and lora["generation"]["kv_cache_bytes"] == 1_810_759_680
    assert lora["throughput"]["prefill_flops"] > 0
    assert any(w.startswith("GRPO (TRL 1.16 GRPOTrainer): a round of 8 completions (1 prompt x 8") and "1.69 GiB" in w
               for w in doc["warnings"])


@pytest.mark.parametrize(("argv", "field"), [
    (["--objective", "grpo", "--use-vllm"], "gpu"),
    (["--objective", "grpo", "--use-vllm", "elsewhere", "--gpu", "h100"], "use-vllm"),
    (["--objective", "grpo", "--max-prompt-length", "100", "--seq-len", "300"], "seq-len"),
    (["--objective", "grpo", "--batch-size", "3"], "num_generations"),
    (["--objective", "grpo", "--loss", "hf"], "loss"),
])
def test_cli_refuses_in_one_line(capsys, argv, field):
    assert main(["--model", "qwen3-8b", "--method", "lora", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {field}:" in err


def test_vllm_server_and_prompt_length(capsys):
    assert main(["--model", "qwen3-8b", "--method", "lora", "--objective", "grpo", "--use-vllm", "server",
                 "--max-prompt-length", "256", "--max-completion-length", "2048", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["seq_len"] == 2304 and doc["inputs"]["grpo"]["generation_backend"] == "vllm-server"
    gen = doc["methods"]["lora"]["generation"]
    assert gen["kv_cache_bytes"] == 0 and gen["vllm_reserved_bytes"] == 0 and gen["weight_sync_bytes"] > 0
    assert doc["inputs"]["grpo"]["old_log_prob_pass"]  # vLLM's importance-sampling correction


def test_on_cuda_the_head_scores_the_completions_only():
    """TRL masks GRPO's labels before the completion (`labels[:, :-logits_to_keep] = -100`): on a Triton device the
    fused head gathers batch x completion rows, not every position (on CPU it scores every position, measured)."""
    from lora_planner.loss_fused import trl_rows, trl_saved

    spec = spec_from_config(TINY, "tiny")
    cuda = make_flow(spec, grpo(device="cuda", dtype="bf16"))
    cpu = make_flow(spec, grpo())
    assert trl_rows(cuda) == 16 * 256 and trl_rows(cpu) == 16 * (282 - 1)
    hidden = next(t for t in trl_saved(cuda) if t.name == "loss.trl_hidden")
    assert hidden.nbytes == 16 * 256 * 64 * 2

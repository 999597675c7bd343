"""The builtin Llama-style model against `lora_planner`'s arithmetic and against `transformers` / `peft`.

Tiny models (3 layers, B=3, S=20, h=64, I=176, 4 heads of 16, V=1000, r=4; dimensions pairwise
distinct) are built from config dicts: the `ModelSpec` through `config_reader.spec_from_config`, the
reference through `AutoConfig.for_model` (tests/hf_reference.py), so both sides read the same config.

Saved-for-backward bytes are measured with `torch.autograd.graph.saved_tensors_hooks`, deduplicated by
untyped storage, parameters, buffers and the batch excluded, and attributed to the decoder layer that
was running when a storage was first saved ("shared" when several layers save it: the RoPE tables).
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from lora_planner.activations import activation_profile
from lora_planner.catalog import resolve_model
from lora_planner.config_reader import spec_from_config
from lora_planner.errors import PlannerInputError
from lora_planner.params import count_params, lora_params
from lora_planner.profiler.builtin_model import (
    DecoderLM,
    LoRALinear,
    RotaryEmbedding,
    apply_lora,
    build_builtin_model,
    init_weights,
)
from lora_planner.specs import LoraSpec, TrainingSpec
from tests.hf_reference import hf_config, meta_model, peft_lora_counts, peft_targets

B, S, R = 3, 20, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_BASE = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
CONFIGS = {
    "llama": dict(model_type="llama", **_BASE, tie_word_embeddings=False),
    "llama-tied-mha-biased": dict(model_type="llama", **{**_BASE, "num_key_value_heads": 4},
                                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2-tied": dict(model_type="qwen2", **_BASE, tie_word_embeddings=True),
    "mistral-mqa": dict(model_type="mistral", **{**_BASE, "num_key_value_heads": 1},
                        sliding_window=None, tie_word_embeddings=False),
}
TARGETS = {"qv": ("q_proj", "v_proj"), "all": ("all-linear",)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls run fastest on one thread; with busy cores OpenMP's spinning makes them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_of(name: str):
    return spec_from_config(CONFIGS[name], name)


def builtin(name: str, dtype: torch.dtype = torch.float32, *, method: str = "full", targets=None,
            attention: str = "sdpa", checkpointing: bool = False, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    model = build_builtin_model(spec_of(name), dtype=dtype, attention=attention,
                                gradient_checkpointing=checkpointing)
    if method == "lora":
        apply_lora(model, R, 2 * R, targets)
    return model


def batch(vocab: int = 1000, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def training(dtype: str, method: str, targets, attention: str, *, amp: str | None = None,
             checkpointing: bool = False) -> TrainingSpec:
    return TrainingSpec(method=method, dtype=dtype, amp=amp, batch_size=B, seq_len=S, device="cpu",
                        attention=attention, grad_checkpointing=checkpointing,
                        lora=LoraSpec(r=R, target_modules=targets))


def saved_bytes(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                autocast: bool = False) -> dict[str, int]:
    """Bytes saved for backward in one training forward (then backward), by layer ('layer0', ...),
    'shared' (saved by several layers) and 'model' (embeddings, final norm, lm_head, loss)."""
    exclude = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    exclude.add(input_ids.untyped_storage().data_ptr())
    where = ["model"]
    savers: dict[int, tuple[int, set[str]]] = {}

    def enter(i):
        def hook(module, args):
            where.append(f"layer{i}")
        return hook

    def leave(module, args, output):
        where.pop()

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(enter(i)), layer.register_forward_hook(leave))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            savers.setdefault(ptr, (storage.nbytes(), set()))[1].add(where[-1])
        return t.detach()  # no output -> grad_fn -> output reference cycle

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                out = model(input_ids=input_ids, labels=input_ids)
        loss = out.loss
        del out
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    result: dict[str, int] = {}
    for nbytes, where_saved in savers.values():
        key = next(iter(where_saved)) if len(where_saved) == 1 else "shared"
        result[key] = result.get(key, 0) + nbytes
    return result


# ---- structure: parameters, names, LoRA ----------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_match_planner_and_transformers(name):
    spec = spec_of(name)
    model = build_builtin_model(spec, dtype=torch.bfloat16, device="meta")
    hf = meta_model(CONFIGS[name])
    ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in hf.named_parameters()]
    assert ours == theirs  # same names, shapes and order
    total = sum(p.numel() for p in model.parameters())
    assert total == count_params(spec).total == sum(p.numel() for p in hf.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec.tie_word_embeddings
    assert all(p.dtype == torch.bfloat16 and p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert set(buffers) == {n for n, _ in hf.named_buffers()} == {"model.rotary_emb.inv_freq",
                                                                   "model.rotary_emb.original_inv_freq"}
    assert buffers["model.rotary_emb.inv_freq"].shape == (spec.head_dim // 2,)


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj"), ("all-linear",), ("down_proj", "k_proj"),
                                     ("layers.1.mlp.up_proj",)])
def test_lora_trainable_counts(name, targets):
    spec = spec_of(name)
    model = apply_lora(build_builtin_model(spec, dtype=torch.bfloat16, device="meta"), R, 8, targets)
    counts = lora_params(spec, R, targets)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)  # PEFT's fp32 adapters
    assert sum(p.numel() for _, p in trainable) == counts.trainable_params
    assert sum(p.numel() for p in model.parameters()) == counts.all_params
    if targets is not None:  # PEFT itself agrees
        assert peft_lora_counts(CONFIGS[name], R, targets) == (counts.trainable_params, counts.all_params)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    if targets == ("layers.1.mlp.up_proj",):
        assert wrapped == ["model.layers.1.mlp.up_proj"]
    if targets == ("all-linear",):
        assert len(wrapped) == 7 * spec.num_layers and "lm_head" not in wrapped


def test_lora_linear_follows_peft():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=8)
    assert lora.scaling == 2.0 and lora.base_layer is base
    assert LoRALinear(base, r=4, alpha=8, use_rslora=True).scaling == 4.0  # rsLoRA: alpha / sqrt(r)
    assert lora.lora_A.weight.shape == (4, 64) and lora.lora_B.weight.shape == (48, 4)
    assert lora.lora_A.weight.dtype == torch.float32 and not base.weight.requires_grad
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert 0 < lora.lora_A.weight.abs().max() <= bound
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    expected = (base(x) + lora.lora_B(lora.lora_A(x.float())) * 2.0).to(torch.bfloat16)
    out = lora(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_rejects_what_the_builtin_backend_does_not_implement():
    for name in ("gemma-7b", "phi-2", "gpt2", "bloom-7b1"):
        with pytest.raises(PlannerInputError, match="hf backend"):
            build_builtin_model(resolve_model(name), dtype=torch.bfloat16, device="meta")
    with pytest.raises(PlannerInputError, match="attention"):
        build_builtin_model(spec_of("llama"), dtype=torch.float32, device="meta", attention="flash")
    with pytest.raises(PlannerInputError, match="dtype"):
        build_builtin_model(spec_of("llama"), dtype=torch.int64, device="meta")
    model = build_builtin_model(spec_of("llama"), dtype=torch.float32, device="meta")
    with pytest.raises(PlannerInputError, match="target"):
        apply_lora(model, R, 8, ("qkv_proj",))
    with pytest.raises(PlannerInputError, match="embedding"):
        apply_lora(model, R, 8, ("embed_tokens",))


@pytest.mark.parametrize("name", ["qwen2-tied", "llama"])
def test_meta_then_to_empty_then_init(name):
    spec = spec_of(name)
    model = apply_lora(build_builtin_model(spec, dtype=torch.bfloat16, device="meta"), R, 8, ("all-linear",))
    model.to_empty(device="cpu")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec.tie_word_embeddings
    torch.manual_seed(0)
    init_weights(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec.tie_word_embeddings
    fresh = RotaryEmbedding(spec.head_dim)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.inv_freq)
    assert torch.equal(model.model.rotary_emb.original_inv_freq, fresh.inv_freq)
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert torch.count_nonzero(layer.self_attn.q_proj.lora_B.weight) == 0
    assert torch.count_nonzero(layer.self_attn.q_proj.lora_A.weight) > 0
    std = layer.mlp.up_proj.base_layer.weight.float().std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02)
    if spec.attention_bias:
        assert torch.count_nonzero(layer.self_attn.q_proj.base_layer.bias) == 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_params(
        spec, R, ("all-linear",)).trainable_params
    loss = model(batch(), labels=batch()).loss
    loss.backward()
    assert torch.isfinite(loss)


# ---- numerics: runs, checkpointing, equality with transformers -----------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_gives_the_same_loss_and_gradients(dtype, attention, method):
    ids = batch()
    results = []
    for checkpointing in (False, True):
        model = builtin("llama", DTYPES[dtype], method=method, attention=attention, checkpointing=checkpointing)
        if method == "lora":
            with torch.no_grad():  # make the adapters matter
                for m in model.modules():
                    if isinstance(m, LoRALinear):
                        m.lora_B.weight.normal_(std=0.02)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert torch.isfinite(loss) and grads and all(g is not None for g in grads.values())
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        results.append((loss, grads))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads0[n], grads1[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_loss_and_gradients_equal_transformers(name, attention):
    model = builtin(name, torch.float32, attention=attention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_config(hf_config(CONFIGS[name]), dtype=torch.float32,
                                              attn_implementation=attention)
    hf.load_state_dict(model.state_dict(), strict=True)
    hf.config.use_cache = False
    hf.train()
    ids = batch()
    ours, theirs = model(ids, labels=ids), hf(input_ids=ids, labels=ids)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)


# ---- saved-for-backward bytes ----------------------------------------------------------------------


def _expected(profile):
    return dict(layer=profile.layer_bytes, first_layer=profile.first_layer_bytes,
                rest=profile.model_bytes - profile.batch_bytes + profile.loss_bytes)


def _measured(saved, num_layers):
    assert all(saved.get(f"layer{i}") == saved["layer1"] for i in range(1, num_layers))
    return dict(layer=saved["layer1"], first_layer=saved["layer0"],
                rest=saved.get("model", 0) + saved.get("shared", 0))


SETTINGS = [("full", None), ("lora", TARGETS["qv"]), ("lora", TARGETS["all"])]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method,targets", SETTINGS, ids=["full", "lora-qv", "lora-all"])
@pytest.mark.parametrize("name", CONFIGS)
def test_saved_bytes_equal_activation_profile(name, method, targets, attention, dtype):
    model = builtin(name, DTYPES[dtype], method=method, targets=targets, attention=attention)
    measured = _measured(saved_bytes(model, model.model.layers, batch()), model.spec.num_layers)
    profile = activation_profile(model.spec, training(dtype, method, targets, attention))
    assert measured == _expected(profile)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method,targets", SETTINGS, ids=["full", "lora-qv", "lora-all"])
def test_saved_bytes_under_autocast_equal_activation_profile(method, targets, attention):
    model = builtin("llama", torch.float32, method=method, targets=targets, attention=attention)
    measured = _measured(saved_bytes(model, model.model.layers, batch(), autocast=True), model.spec.num_layers)
    profile = activation_profile(model.spec, training("fp32", method, targets, attention, amp="bf16"))
    assert measured == _expected(profile)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_saves_only_layer_inputs(method, attention, dtype):
    model = builtin("llama", DTYPES[dtype], method=method, attention=attention, checkpointing=True)
    saved = saved_bytes(model, model.model.layers, batch())
    profile = activation_profile(model.spec, training(dtype, method, None, attention, checkpointing=True))
    per_layer = [saved[f"layer{i}"] for i in range(model.spec.num_layers)]
    assert per_layer == [profile.checkpoint_per_layer_bytes] * model.spec.num_layers
    # RoPE tables, position ids and the eager mask are kept by the recompute closures, not as saved tensors.
    closure_bytes = sum(item.nbytes for item in profile.model
                        if item.name == "rotary.cos_sin" or item.name.startswith("checkpoint."))
    assert "shared" not in saved
    assert saved["model"] == _expected(profile)["rest"] - closure_bytes


def _hf_model(name, dtype, method, targets, attention):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(hf_config(CONFIGS[name]), dtype=DTYPES[dtype],
                                                 attn_implementation=attention)
        model.config.use_cache = False
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=peft_targets(targets),
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    layers = (model.base_model.model if method == "lora" else model).model.layers
    return model, layers


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method,targets", SETTINGS, ids=["full", "lora-qv", "lora-all"])
def test_saved_bytes_equal_transformers_and_peft(method, targets, attention, dtype):
    ours = builtin("llama", DTYPES[dtype], method=method, targets=targets, attention=attention)
    hf, hf_layers = _hf_model("llama", dtype, method, targets, attention)
    ids = batch()
    assert saved_bytes(ours, ours.model.layers, ids) == saved_bytes(hf, hf_layers, ids)


# ---- whole training steps: live memory against transformers / peft, and FakeTensorMode -------------


def _make_batch():
    ids = torch.randint(0, 1000, (B, S))
    return {"input_ids": ids, "labels": ids}


def _timeline(result):
    return [(s.peak_bytes, s.peak_phase, s.peak_breakdown,
             [(p.phase, p.peak_bytes, p.end_bytes, p.end_breakdown) for p in s.phases]) for s in result.steps]


def _measure(model):
    from lora_planner.profiler.tracker import measure_training_step

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return measure_training_step(model, _make_batch, opt, steps=2)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_step_memory_equals_transformers_and_peft(method, attention, checkpointing):
    """Every phase's peak and end bytes, by category, byte for byte (AdamW, bf16, all-linear LoRA)."""
    targets = TARGETS["all"]
    ours = builtin("qwen2-tied", torch.bfloat16, method=method, targets=targets, attention=attention,
                   checkpointing=checkpointing)
    hf, _ = _hf_model("qwen2-tied", "bf16", method, targets, attention)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradient_checkpointing_enable's deprecation notice
            hf.gradient_checkpointing_enable()
        if method == "lora":
            hf.enable_input_require_grads()
    assert _timeline(_measure(ours)) == _timeline(_measure(hf))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("attention,dtype,method", [("sdpa", "bf16", "lora"), ("eager", "fp32", "full")])
def test_fake_run_equals_real_run(attention, dtype, method, checkpointing):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _measure(builtin("llama", DTYPES[dtype], method=method, attention=attention, checkpointing=checkpointing))
    meta = build_builtin_model(spec_of("llama"), dtype=DTYPES[dtype], device="meta", attention=attention,
                               gradient_checkpointing=checkpointing)
    if method == "lora":
        apply_lora(meta, R, 2 * R, None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        meta.to_empty(device="cpu")
        init_weights(meta)
        fake = _measure(meta)
    assert fake.is_fake and not real.is_fake
    assert _timeline(fake) == _timeline(real)

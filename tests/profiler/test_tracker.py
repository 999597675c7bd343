"""Tests for the live-tensor memory tracker (CPU, tiny models, exact bytes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.profiler.tracker import (
    CATEGORY_KEYS,
    LiveTensorTracker,
    MemoryCategory,
    hf_fake_parity,
    measure_training_step,
)

F32 = 4


def _sum_ok(step):
    assert sum(step.peak_breakdown.values()) == step.peak_bytes
    for ph in step.phases:
        assert sum(ph.end_breakdown.values()) == ph.end_bytes
        assert sum(ph.peak_breakdown.values()) == ph.peak_bytes


def _bd(**kw):
    out = dict.fromkeys(CATEGORY_KEYS, 0)
    out.update(kw)
    return out


def test_category_values_are_the_planner_keys():
    assert CATEGORY_KEYS == ("weights", "gradients", "optimizer_states", "activations", "temporaries")
    assert MemoryCategory.WEIGHTS == "weights"
    assert MemoryCategory("optimizer_states") is MemoryCategory.OPTIMIZER_STATES


# ---- hand-computed cases --------------------------------------------------------------------


def test_linear_saved_input_is_the_only_activation():
    lin = torch.nn.Linear(64, 32, bias=False)  # W: 32*64*4 = 8192 B
    tr = LiveTensorTracker()
    with tr:
        tr.register(lin, MemoryCategory.WEIGHTS)
        tr.begin_step()
        x = torch.randn(8, 64)  # 2048 B, saved by mm for dW
        loss = lin(x).sum()  # y (8, 32) = 1024 B is not saved: freed once summed
        assert tr.live_bytes == 8192 + 2048 + F32
        tr.mark_phase("backward")
        assert tr.live_breakdown() == _bd(weights=8192, activations=2048 + F32)
        del x  # the graph still holds it
        assert tr.live_bytes == 8192 + 2048 + F32
        loss.backward()
        del loss  # graph freed: x dies with it
        tr.register(lin.weight.grad, MemoryCategory.GRADIENTS)
        assert tr.live_breakdown() == _bd(weights=8192, gradients=8192)
        step = tr.end_step()
    fwd, bwd = step.phase("forward"), step.phase("backward")
    assert fwd.peak_bytes == 8192 + 2048 + 1024 + F32
    assert fwd.peak_breakdown == _bd(weights=8192, activations=2048 + F32, temporaries=1024)
    assert fwd.end_breakdown == _bd(weights=8192, activations=2048 + F32)
    # backward peak: W, x, loss, the seed grad (4 B), dW (stolen by AccumulateGrad as .grad)
    assert bwd.peak_bytes == 8192 + 2048 + F32 + F32 + 8192
    assert bwd.peak_breakdown == _bd(weights=8192, gradients=8192, activations=2048 + F32, temporaries=F32)
    assert step.peak_phase == "backward" and step.peak_bytes == bwd.peak_bytes
    _sum_ok(step)


def test_linear_adamw_for_loop_training_step_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, foreach=False)
    res = measure_training_step(
        lin, lambda: (torch.randn(8, 64),), opt, steps=3, loss_fn=lambda m, b: m(*b).sum()
    )
    W = G = 8192
    X = 2048
    states = 2 * W + F32  # exp_avg, exp_avg_sq, step (fp32 scalar)
    s1 = res.first_step
    assert s1.start_bytes == W
    # optimizer step: denom = (exp_avg_sq.sqrt() / bc2).add_(eps) keeps 2 W-sized temporaries
    assert s1.peak_phase == "optimizer_step"
    assert s1.peak_bytes == W + G + states + X + 2 * W
    assert s1.peak_breakdown == _bd(
        weights=W, gradients=G, optimizer_states=states, activations=X, temporaries=2 * W
    )
    assert s1.phase("forward").end_bytes == W + X + F32
    assert s1.phase("backward").end_breakdown == _bd(weights=W, gradients=G, activations=X)
    assert s1.phase("optimizer_step").end_breakdown == _bd(
        weights=W, gradients=G, optimizer_states=states, activations=X
    )
    assert s1.phase("zero_grad").end_breakdown == _bd(weights=W, optimizer_states=states)
    for s in res.steps[1:]:
        assert s.start_bytes == W + states
        assert s.peak_bytes == s1.peak_bytes
        assert s.phase("forward").peak_bytes == W + states + X + 1024 + F32
        _sum_ok(s)
    assert res.steady_state.peak_bytes == res.peak_bytes == s1.peak_bytes
    assert res.param_bytes == res.trainable_param_bytes == W
    assert res.adopted_bytes == 0 and not res.is_fake
    _sum_ok(s1)


def test_step1_peak_lacks_the_lazily_created_optimizer_state():
    # activations dominate: the peak is in backward, before step 1 has created exp_avg/exp_avg_sq
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, foreach=True)
    res = measure_training_step(
        mlp, lambda: (torch.randn(256, 8),), opt, steps=3, loss_fn=lambda m, b: m(*b).square().mean()
    )
    n_params = len(list(mlp.parameters()))
    state_bytes = 2 * res.trainable_param_bytes + n_params * F32
    assert res.first_step.peak_phase == res.steady_state.peak_phase == "backward"
    assert res.steady_state.peak_bytes - res.first_step.peak_bytes == state_bytes
    assert res.first_step.peak_breakdown["optimizer_states"] == 0
    assert res.steady_state.peak_breakdown["optimizer_states"] == state_bytes


def test_views_share_one_storage_and_frees_are_recorded():
    tr = LiveTensorTracker()
    with tr:
        a = torch.empty(100)
        b = a.view(10, 10)
        c = a[50:]
        assert tr.live_bytes == 400
        del a, b
        assert tr.live_bytes == 400  # c still holds the storage
        del c
        assert tr.live_bytes == 0
        assert tr.peak_bytes == 400
        # zero-byte storages all have data_ptr 0: they must not collide
        e1, e2 = torch.empty(0), torch.empty(0)
        f = torch.ones(3)
        assert tr.live_bytes == 12
        del e1, e2, f
    assert tr.live_bytes == 0


def test_tensors_made_outside_are_registered_once_and_resizes_tracked():
    w = torch.randn(10)  # made outside the mode
    tr = LiveTensorTracker()
    with tr:
        tr.register(w, "weights")
        tr.register([w, w.view(2, 5)], MemoryCategory.WEIGHTS)
        assert tr.live_bytes == 40
        w.add_(1)  # in place: no new storage
        assert tr.live_bytes == 40
        t = torch.empty(0)
        t.resize_(25)  # storage grows in place (not a new storage)
        assert tr.live_bytes == 40 + 100
        assert tr.peak_bytes == 140
        del t
        assert tr.live_breakdown() == _bd(weights=40)
        with pytest.raises(ValueError, match="category"):
            tr.register(w, "params")


def test_unregistered_inputs_are_adopted():
    outside = torch.randn(16)  # 64 B, never registered
    tr = LiveTensorTracker()
    with tr:
        y = outside * 2
        assert tr.live_bytes == 128
        assert tr.adopted_bytes == 64 and tr.adopted_storages == 1
        z = torch.tensor([1.0, 2.0])  # lift_fresh: an allocation, not an adoption
        assert tr.adopted_storages == 1
        del y, z


def test_categories_resolve_after_the_peak():
    """The peak happens before the storage is registered; the breakdown still says gradients."""
    tr = LiveTensorTracker()
    with tr:
        tr.begin_step()
        act = torch.ones(50)  # forward, survives into backward: activation
        tmp = torch.ones(25)  # forward, dies before backward: temporary
        del tmp
        tr.mark_phase("backward")
        g = torch.zeros(100)  # made in backward; only registered later
        del act
        tr.mark_phase("optimizer_step")
        tr.register(g, MemoryCategory.GRADIENTS)
        del g
        step = tr.end_step()
    assert step.peak_phase == "backward"
    assert step.peak_bytes == 200 + 400
    assert step.peak_breakdown == _bd(gradients=400, activations=200)
    assert step.phase("forward").peak_breakdown == _bd(activations=200, temporaries=100)
    assert step.phase("backward").end_breakdown == _bd(gradients=400)
    assert tr.peak.phase == "backward" and tr.peak.breakdown == step.peak_breakdown
    # storage detail at the peak: keys kept, not just totals
    infos = tr.storages_live_at(step.peak_event)
    assert [(i.nbytes, i.category, i.created_phase) for i in infos] == [
        (400, "gradients", "backward"),
        (200, "activations", "forward"),
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=64), st.integers(min_value=0, max_value=6)),
        min_size=1,
        max_size=25,
    )
)
def test_live_and_peak_match_a_reference_simulation(program):
    """Allocate tensors of n floats; after each, free the live one at index k (if any)."""
    tr = LiveTensorTracker()
    held: list[torch.Tensor] = []
    live = peak = 0
    with tr:
        for n, k in program:
            held.append(torch.empty(n))
            live += 4 * n
            peak = max(peak, live)
            assert tr.live_bytes == live
            if k < len(held) and k % 2 == 0:
                live -= held.pop(k).numel() * 4  # refcounting frees it right here
                assert tr.live_bytes == live
    assert tr.peak_bytes == peak


def test_bad_arguments():
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        measure_training_step(lin, lambda: torch.randn(1, 2), opt, steps=0)
    with pytest.raises(ValueError, match="loss"):  # output is (1, 2), not a scalar loss
        measure_training_step(lin, lambda: torch.randn(1, 2), opt, steps=1)
    tr = LiveTensorTracker()
    with pytest.raises(RuntimeError, match="begin_step"):
        tr.end_step()


# ---- cross-checks ---------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def _mlp_batch():
    return torch.randn(32, 64), torch.randint(0, 10, (32,))


def _mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("foreach", [False, True])
def test_peak_agrees_with_pytorch_mem_tracker(foreach):
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover
        pytest.skip("torch.distributed._tools.mem_tracker not available")
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    ours = measure_training_step(model, _mlp_batch, opt, steps=3, loss_fn=_mlp_loss).peak_bytes

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        for _ in range(3):
            mt.reset_mod_stats()
            batch = _mlp_batch()
            loss = _mlp_loss(model, batch)
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            del batch
    theirs = sum(d["Total"] for d in mt.get_tracker_snapshot("peak").values())
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_adamw_foreach_costs_about_one_extra_copy_of_trainable_params():
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(16)])

    peaks = {}
    for foreach in (False, True):
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
        peaks[foreach] = measure_training_step(
            model, lambda: (torch.randn(2, 32),), opt, steps=2, loss_fn=lambda m, b: m(*b).square().mean()
        ).steady_state
    trainable = 16 * 32 * 32 * F32
    fe, loop = peaks[True], peaks[False]
    assert fe.peak_phase == loop.peak_phase == "optimizer_step"
    # foreach: _foreach_sqrt(exp_avg_sqs) materialises one copy of every trainable param at once
    assert fe.peak_breakdown["temporaries"] == trainable
    # for-loop: only the previous param's denom plus this param's sqrt and quotient
    assert loop.peak_breakdown["temporaries"] <= 3 * 32 * 32 * F32
    diff = fe.peak_bytes - loop.peak_bytes
    assert diff == fe.peak_breakdown["temporaries"] - loop.peak_breakdown["temporaries"]
    assert 0.75 * trainable <= diff <= trainable


# ---- FakeTensorMode ---------------------------------------------------------------------------


def _fake_mode():
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:  # pragma: no cover
        pytest.skip("torch._subclasses.fake_tensor not available")
    return FakeTensorMode(allow_non_fake_inputs=True)


def _peaks(res):
    return [(s.peak_bytes, s.peak_phase, [(p.phase, p.peak_bytes, p.end_bytes) for p in s.phases]) for s in res.steps]


def test_fake_run_matches_real_run_for_plain_module():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    real = measure_training_step(model, _mlp_batch, opt, steps=2, loss_fn=_mlp_loss)

    with torch.device("meta"):
        meta = _mlp()
    with _fake_mode():
        meta.to_empty(device="cpu")
        opt = torch.optim.AdamW(meta.parameters(), lr=1e-3, foreach=True)
        fake = measure_training_step(meta, _mlp_batch, opt, steps=2, loss_fn=_mlp_loss)
    assert fake.is_fake and not real.is_fake
    assert _peaks(fake) == _peaks(real)
    assert fake.steps[-1].peak_breakdown == real.steps[-1].peak_breakdown


@pytest.mark.parametrize("foreach", [False, True])
def test_fake_run_matches_real_run_for_tiny_llama(foreach):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, num_hidden_layers=2, max_position_embeddings=64,
    )

    def make_batch():
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    real = measure_training_step(model, make_batch, opt, steps=2)

    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    with _fake_mode(), hf_fake_parity():
        meta.to_empty(device="cpu")
        opt = torch.optim.AdamW(meta.parameters(), lr=1e-3, foreach=foreach)
        fake = measure_training_step(meta, make_batch, opt, steps=2)
    assert fake.is_fake
    assert fake.peak_bytes == real.peak_bytes  # byte for byte
    assert _peaks(fake) == _peaks(real)
    for f, r in zip(fake.steps, real.steps):
        assert f.peak_breakdown == r.peak_breakdown
        assert [p.end_breakdown for p in f.phases] == [p.end_breakdown for p in r.phases]

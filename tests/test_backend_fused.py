"""The ``fused`` SGLD backend (the Triton kernel under the CPU interpreter: tests/conftest.py sets
``TRITON_INTERPRET=1``) and the graph backend's capture keys, against the reference chain;
tolerances as tests/test_backends.py's docstring explains."""
from __future__ import annotations

import pytest
import torch

from jemfast.energy import JEM
from jemfast.models import SmallCNN
from jemfast.sgld import SGLD, ChainSpec, reference_chain

from tests.backend_helpers import ALPHA, ATOL, B, SIGMA, STEPS, chain_input, check_noise_stats, fused_or_skip, run_chain, tiny_model


# ---- fused (Triton interpreter on the CPU) ---------------------------------------------
@pytest.mark.parametrize("clamp", [False, True])
def test_fused_matches_reference_without_noise(clamp):
    chain = fused_or_skip()
    model, x = tiny_model(), chain_input()
    y = torch.arange(B) % 10
    for yy in (None, y):
        ref = run_chain(reference_chain, model, x, y=yy, clamp=clamp)
        torch.testing.assert_close(run_chain(chain, model, x, y=yy, clamp=clamp), ref, rtol=0, atol=ATOL)


def test_fused_noise_statistics_and_fresh_noise():
    chain = fused_or_skip()
    model, x = tiny_model(), chain_input()
    clean = run_chain(reference_chain, model, x)
    torch.manual_seed(5)
    ref_noisy = run_chain(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(6)
    a = run_chain(chain, model, x, noise=SIGMA)
    assert chain.rng_state[1].item() == STEPS * x.numel()  # Philox offset advanced on the device
    b1, b2 = (run_chain(chain, model, x, noise=SIGMA, steps=1) for _ in range(2))
    assert not torch.equal(b1, b2)  # fresh noise on every call
    check_noise_stats(a, ref_noisy, clean)


def test_fused_keeps_a_channels_last_chain_channels_last():
    chain = fused_or_skip()
    torch.manual_seed(0)
    model = JEM(SmallCNN(3, 10, hidden=8))
    x = (torch.rand(8, 3, 8, 8) * 2 - 1).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    ref = run_chain(reference_chain, model, x, clamp=True, steps=5)
    out = run_chain(chain, model, x, clamp=True, steps=5)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert (ref - x).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    sampler = SGLD(n_steps=5, step_size=ALPHA, noise_std=0.0, backend="fused", clamp=True, channels_last=True)
    out = sampler.run(model, x.contiguous())  # an NCHW start (as the buffer gives) runs channels-last
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_fused_leaves_grads_and_input_alone():
    chain = fused_or_skip()
    model, x = tiny_model(), chain_input()
    x0 = x.clone()
    run_chain(chain, model, x, steps=2, noise=SIGMA)
    assert torch.equal(x, x0)
    assert all(p.grad is None for p in model.parameters())


def test_fused_sgld_state_dict_resumes_the_noise_stream_bit_for_bit():
    fused_or_skip()
    model, x = tiny_model(), chain_input()
    sampler = SGLD(n_steps=2, step_size=ALPHA, noise_std=SIGMA, backend="fused")
    assert sampler.state_dict() == {"n_steps": 2, "rng_state": None}
    sampler.run(model, x)
    state = sampler.state_dict()
    assert state["rng_state"][1].item() == 2 * x.numel()
    a = sampler.run(model, x)
    rng = sampler._chain.rng_state
    sampler.load_state_dict(state)
    assert sampler._chain.rng_state is rng  # loaded in place (a captured graph holds its address)
    assert torch.equal(sampler.run(model, x), a)
    fresh = SGLD(n_steps=1, step_size=ALPHA, noise_std=SIGMA, backend="fused")
    fresh.load_state_dict(state)  # before its chain exists
    assert fresh.n_steps == 2 and torch.equal(fresh.state_dict()["rng_state"], state["rng_state"])
    assert torch.equal(fresh.run(model, x), a)


def test_fused_sgld_reseed():
    fused_or_skip()
    model, x = tiny_model(), chain_input()
    sampler = SGLD(n_steps=1, step_size=ALPHA, noise_std=SIGMA, backend="fused")
    sampler.reseed(123)  # before the chain exists
    c = sampler.run(model, x)
    sampler.reseed(123)
    d = sampler.run(model, x)
    sampler.reseed(124)
    e = sampler.run(model, x)
    assert torch.equal(c, d) and not torch.equal(c, e)
    assert sampler.state_dict()["rng_state"].tolist() == [124, x.numel()]


def test_reference_sgld_state_has_no_kernel_stream():
    sampler = SGLD(n_steps=3)
    sampler.reseed(5)
    assert sampler.state_dict() == {"n_steps": 3, "rng_state": None}
    sampler.load_state_dict({"n_steps": 6})
    assert sampler.n_steps == 6


# ---- graph: the pieces that need no CUDA --------------------------------------------------
def test_capture_key_follows_float_settings_and_parameter_layout():
    from jemfast.sgld.graph import capture_key

    model, x = tiny_model(), chain_input()
    spec = ChainSpec(STEPS, ALPHA, SIGMA)
    base = capture_key(model, x, None, spec)
    assert capture_key(model, x, None, spec) == base
    assert capture_key(model, x, None, ChainSpec(STEPS, ALPHA, SIGMA, True)) != base
    assert capture_key(model, x, torch.arange(B) % 10, spec) != base
    assert capture_key(model, x[:8], None, spec) != base
    x3 = torch.rand(B, 3, 8, 8)  # (1-channel images are both layouts at once)
    assert (capture_key(model, x3.contiguous(memory_format=torch.channels_last), None, spec)
            != capture_key(model, x3, None, spec))
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision())
    saved_new_api = getattr(matmul, "fp32_precision", None)  # torch >= 2.9 mirrors the flags here
    try:
        matmul.allow_tf32 = not saved[0]
        assert capture_key(model, x, None, spec) != base
        matmul.allow_tf32 = saved[0]
        cudnn.allow_tf32 = not saved[1]
        assert capture_key(model, x, None, spec) != base
        cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision("medium")
        assert capture_key(model, x, None, spec) != base
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        if saved_new_api is not None:
            matmul.fp32_precision = saved_new_api
    assert capture_key(model, x, None, spec) == base
    model.to(memory_format=torch.channels_last)  # same values and shapes, other strides
    assert capture_key(model, x, None, spec) != base
    model.to(memory_format=torch.contiguous_format)
    assert capture_key(model, x, None, spec) == base
    model.double()
    assert capture_key(model, x, None, spec) != base


def test_graph_chain_evicts_least_recently_used_and_copies_without_grad(monkeypatch):
    from jemfast.sgld import graph

    captured = []

    class FakeGraph:
        def replay(self) -> None:
            pass

    def fake_capture(self, model, x, y, spec, key, storage):
        captured.append(spec.n_steps)
        return graph._Captured(FakeGraph(), torch.zeros(x.shape), None, storage)

    monkeypatch.setattr(graph.GraphChain, "_capture", fake_capture)
    chain = graph.GraphChain(torch.device("cpu"), max_graphs=3)
    model, x = tiny_model(), chain_input().requires_grad_(True)
    for n in (1, 2, 3, 1, 4, 2):
        out = chain(model, x, None, ChainSpec(n, ALPHA, 0.0))
    assert captured == [1, 2, 3, 4, 2]  # 1 was reused; 4 evicted 2 (least recently used), 2 evicted 3
    assert [key[5].n_steps for key in chain.graphs] == [1, 4, 2]
    assert not out.requires_grad and torch.equal(out, x.detach())
    assert all(not cap.x.requires_grad for cap in chain.graphs.values())
    chain.clear()
    assert not chain.graphs

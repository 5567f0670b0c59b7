"""CUDA-only checks of the fast SGLD backends (``pytest tests -m gpu``; skipped without CUDA).

- every backend (fused, graph, compile) agrees with the reference over a 20-step chain with
  noise off (fp32 with TF32 off: ``atol = 1e-4``) and in noise statistics (as tests/test_backends.py);
- ``graph`` replays draw fresh noise each time, see in-place parameter updates, and re-capture
  when parameter storage moves; under bf16 its cast-once weights give the fused chain's result;
- ``graph`` is >= 3x the reference chain on the digits SmallCNN (batch 64, 20 steps, median of 5);
- one PCD step (buffer draw with the fused gather, graph chain, write-back) runs under
  ``torch.cuda.set_sync_debug_mode("error")`` once captured;
- ``--compile`` training on CUDA runs under ``set_sync_debug_mode("warn")`` with no
  synchronising call inside the SGLD chain (after its first two calls: compile/capture).

Tests that run torch.compile carry the ``compile`` marker: bench/gpu.sh's ``check`` stage runs
``-m "gpu and not compile"`` and its ``compile`` stage ``-m "gpu and compile"`` (with
``TORCH_LOGS=recompiles``), so each fits one short GPU command. Mark any new compiling test.
"""
from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch

from jemfast.buffer import ReplayBuffer
from jemfast.energy import JEM
from jemfast.models import SmallCNN
from jemfast.sgld import SGLD, ChainSpec, make_chain, reference_chain, sampling_mode, unavailable

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
B, SHAPE, STEPS, ALPHA, SIGMA, ATOL = 64, (1, 8, 8), 20, 1.0, 0.01, 1e-4
FAST = ["fused", "graph", pytest.param("compile", marks=pytest.mark.compile)]


@pytest.fixture(autouse=True)
def no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(hidden: int = 8, seed: int = 0) -> JEM:
    torch.manual_seed(seed)
    model = JEM(SmallCNN(1, 10, hidden)).to(DEV)
    with torch.no_grad():
        model.classifier.head.weight.mul_(20.0)
    return model


def _x(seed: int = 1) -> torch.Tensor:
    return (torch.rand((B, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(DEV)


def _chain(backend: str):
    why = unavailable(backend, DEV)
    if why:
        pytest.skip(f"{backend}: {why}")
    return make_chain(backend, DEV)[0]


def _run(chain, model, x, y=None, noise=0.0, steps=STEPS, clamp=False):
    with sampling_mode(model):
        return chain(model, x, y, ChainSpec(steps, ALPHA, noise, clamp))


@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_reference_without_noise(backend):
    chain, model, x = _chain(backend), _model(), _x()
    y = torch.arange(B, device=DEV) % 10
    for yy in (None, y):
        ref = _run(reference_chain, model, x, y=yy)
        assert (ref - x).abs().max() > 0.05
        torch.testing.assert_close(_run(chain, model, x, y=yy), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", FAST)
def test_backend_noise_statistics(backend):
    chain, model, x = _chain(backend), _model(), _x()
    clean = _run(reference_chain, model, x)
    torch.manual_seed(5)
    d_ref = _run(reference_chain, model, x, noise=SIGMA) - clean
    torch.manual_seed(6)
    d = _run(chain, model, x, noise=SIGMA) - clean
    assert abs(d.mean().item()) < 5 * d_ref.std().item() / d.numel() ** 0.5
    assert abs(d.std().item() / d_ref.std().item() - 1) < 0.06


def test_graph_replays_draw_fresh_noise_and_read_parameters_live():
    chain, model, x = _chain("graph"), _model(), _x()
    a, b = _run(chain, model, x, noise=SIGMA), _run(chain, model, x, noise=SIGMA)
    assert len(chain.graphs) == 1  # one capture, two replays
    assert not torch.equal(a, b)
    with torch.no_grad():  # an optimizer-style in-place update
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    torch.testing.assert_close(_run(chain, model, x), _run(reference_chain, model, x), rtol=0, atol=ATOL)
    assert len(chain.graphs) == 2  # noise 0 is another key; the update itself needed no capture
    model.to(memory_format=torch.channels_last)  # storage moves -> captured again, still right
    torch.testing.assert_close(_run(chain, model, x), _run(reference_chain, model, x), rtol=0, atol=ATOL)


def test_graph_bf16_casts_weights_once_and_matches_fused():
    """graph under bf16 uses bf16 weight copies made once per replay; fused runs the same loop
    and kernel update with per-op autocast, which casts to the same values: same chain."""
    graph, fused, model, x = _chain("graph"), _chain("fused"), _model(), _x()
    spec = ChainSpec(STEPS, ALPHA, 0.0, False, torch.bfloat16)
    with sampling_mode(model):
        ref, out = fused(model, x, None, spec), graph(model, x, None, spec)
    assert (ref - x).abs().max() > 0.05
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_graph_leaves_grads_and_mode_alone():
    chain, model, x = _chain("graph"), _model(), _x()
    model.train()
    sampler = SGLD(n_steps=3, backend="graph")
    sampler._chain = chain
    sampler.run(model, x)
    assert model.training and all(p.grad is None for p in model.parameters())


def _median_chain_s(chain, model, x, n: int = 5) -> float:
    times = []
    with sampling_mode(model):
        for _ in range(n + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            chain(model, x, None, ChainSpec(STEPS, ALPHA, SIGMA))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def test_graph_is_at_least_3x_reference_on_the_small_cnn():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    chain, model, x = _chain("graph"), _model(hidden=64), _x()
    ref_s, graph_s = _median_chain_s(reference_chain, model, x), _median_chain_s(chain, model, x)
    print(f"\nSmallCNN-64 1x8x8 batch {B}: reference {ref_s * 1e3:.2f} ms, graph {graph_s * 1e3:.2f} ms, "
          f"{ref_s / graph_s:.1f}x")
    assert ref_s / graph_s >= 3.0


def test_pcd_step_does_not_sync():
    _chain("graph")
    model = _model()
    buffer = ReplayBuffer(1000, SHAPE, device=DEV)
    sampler = SGLD(n_steps=STEPS, backend="graph")
    sampler.sample(model, buffer, B)  # capture (synchronises, as CUDA graph capture must)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            sampler.sample(model, buffer, B)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(buffer.data).all()


@pytest.mark.compile
def test_compile_training_has_no_sync_inside_the_chain(tmp_path, monkeypatch):
    from tests.conftest import tiny_digits_config
    from jemfast.train import train

    calls, flagged = [], []
    original = SGLD.run

    def watched(self, model, x, y=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = original(self, model, x, y)
        calls.append(1)
        if len(calls) > 2:  # the first calls compile / capture
            flagged.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
        return out

    monkeypatch.setattr(SGLD, "run", watched)
    cfg = tiny_digits_config(tmp_path / "run", run__compile=True, sampler__backend="auto", run__device="cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        summary = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["status"] == "finished" and len(calls) > 3
    assert not flagged, flagged[:3]


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["compile"])
def test_compile_chain_does_not_sync_after_warmup(backend):
    chain, model, x = _chain(backend), _model(), _x()
    for _ in range(3):
        _run(chain, model, x, noise=SIGMA, steps=3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(chain, model, x, noise=SIGMA, steps=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)

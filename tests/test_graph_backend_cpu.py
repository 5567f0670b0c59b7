"""The graph backend's CUDA-free logic on the CPU, with a fake capture (tests/fake_cuda_graph.py)
that replays the recorded ops and interpreted Triton launches on the same memory.

- a replay gives the fused chain's result bit for bit (Triton interpreter), with noise: each
  replay draws fresh noise (the captured offset add), matching successive fused calls;
- one capture per key; the batch shape, labels, a submodule's mode, the ChainSpec, the float
  settings and the layout each make a new key; the LRU keeps ``max_graphs`` and re-captures an
  evicted key;
- parameters are read live (an in-place update is seen by the next replay); moved parameter
  storage re-captures; the caller's x is never written and the result is a fresh tensor;
- what the graph holds (the captured chain) and what a call does around a replay (copy in,
  replay, clone out) have no op that would sync with the host or break capture (SyncRecorder).
"""
from __future__ import annotations

import pytest
import torch

from tests import fake_cuda_graph
from tests.conftest import triton_marker

pytest.importorskip("triton", reason="triton is not installed")

from jemfast.energy import JEM  # noqa: E402
from jemfast.models import SmallCNN  # noqa: E402
from jemfast.sgld import ChainSpec, sampling_mode  # noqa: E402
from jemfast.sgld.fused import FusedChain  # noqa: E402
from jemfast.sgld.graph import GraphChain, capture_key  # noqa: E402
from jemfast.sgld.sync_check import SyncRecorder, assert_sync_free  # noqa: E402

DEVICE, mark = triton_marker()
pytestmark = [mark, pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU stand-in for CUDA graphs")]
SPEC = ChainSpec(3, 1.0, 0.01, clamp=True)


@pytest.fixture
def graphs(monkeypatch):
    return fake_cuda_graph.install(monkeypatch)


def _model(seed: int = 0, channels: int = 1) -> JEM:
    torch.manual_seed(seed)
    model = JEM(SmallCNN(channels, 10, 8))
    with torch.no_grad():
        model.classifier.head.weight.mul_(20.0)
    return model


def _x(b: int = 4, seed: int = 1, channels: int = 1) -> torch.Tensor:
    return torch.rand((b, channels, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run(chain, model, x, y=None, spec=SPEC):
    with sampling_mode(model):
        return chain(model, x, y, spec)


def _pair(seed: int = 7):
    from jemfast.kernels import new_rng_state

    g, f = GraphChain(DEVICE), FusedChain()
    g.load_rng_state(new_rng_state(seed))
    f.load_rng_state(new_rng_state(seed))
    return g, f


def test_replays_match_the_fused_chain_bitwise_with_fresh_noise(graphs):
    model, x = _model(), _x()
    g, f = _pair()
    first = _run(g, model, x)
    # capture = warm-up on scratch state + one recorded run; the first call's result is the
    # replay after it, which draws the offsets after those of the capture run
    _run(f, model, x)
    assert torch.equal(first, _run(f, model, x))
    second = _run(g, model, x)
    assert torch.equal(second, _run(f, model, x)) and not torch.equal(first, second)
    assert len(graphs) == 1 and graphs[0].replays == 2
    assert (first - x).abs().max() > 0.05  # the chain moved


def test_one_capture_per_key_and_each_part_of_the_key_recaptures(graphs):
    model, x = _model(), _x()
    model3, x3 = _model(channels=3), _x(channels=3)
    y = torch.arange(4) % 10
    g = GraphChain(DEVICE, max_graphs=16)
    _run(g, model, x)
    _run(g, model, x)
    assert len(graphs) == 1
    variants = [lambda: _run(g, model, _x(6)),                                          # batch shape
                lambda: _run(g, model, x, y),                                           # labels
                lambda: _run(g, model, x, spec=ChainSpec(2, 1.0, 0.01, clamp=True)),   # spec
                lambda: _run(g, model3, x3),                                           # model
                lambda: _run(g, model3, x3.contiguous(memory_format=torch.channels_last))]  # layout
    for k, call in enumerate(variants, start=2):
        call()
        assert len(graphs) == k
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not old  # a float setting
    try:
        _run(g, model, x)
    finally:
        torch.backends.cudnn.benchmark = old
    assert len(graphs) == 7
    model.classifier.head.train()  # one submodule in another mode: sampling_mode sets eval for all,
    keys = {capture_key(model, x, None, SPEC)}  # so the key sees the mode the chain runs in
    with sampling_mode(model, "keep"):
        keys.add(capture_key(model, x, None, SPEC))
    assert len(keys) == 1
    with sampling_mode(model, "keep"):
        g(model, x, None, SPEC)
    assert len(graphs) == 8


def test_lru_keeps_max_graphs_and_recaptures_an_evicted_key(graphs):
    model = _model()
    g = GraphChain(DEVICE, max_graphs=2)
    xs = [_x(b) for b in (2, 3, 4)]
    for x in xs:
        _run(g, model, x)
    assert len(g.graphs) == 2 and len(graphs) == 3
    assert [k[2][0] for k in g.graphs] == [3, 4]  # the least recently used (batch 2) went
    _run(g, model, xs[1])  # a hit: moves to the end
    assert [k[2][0] for k in g.graphs] == [4, 3] and len(graphs) == 3
    _run(g, model, xs[0])  # evicted earlier: captured again, evicting batch 4
    assert [k[2][0] for k in g.graphs] == [3, 2] and len(graphs) == 4
    g.clear()
    assert not g.graphs


def test_parameters_are_read_live_and_moved_storage_recaptures(graphs):
    model, x = _model(), _x()
    spec = ChainSpec(3, 1.0, 0.0)  # no noise: results depend on the parameters alone
    g, f = _pair()
    _run(g, model, x, spec=spec)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # in place, as an optimizer step
    assert torch.equal(_run(g, model, x, spec=spec), _run(f, model, x, spec=spec))
    assert len(graphs) == 1
    model.classifier.head.weight.data = model.classifier.head.weight.data * 2  # new storage
    assert torch.equal(_run(g, model, x, spec=spec), _run(f, model, x, spec=spec))
    assert len(graphs) == 2


def test_static_buffers_leave_the_callers_x_alone_and_return_a_fresh_tensor(graphs):
    model, x = _model(channels=3), _x(channels=3)
    before = x.clone()
    g = GraphChain(DEVICE)
    a = _run(g, model, x)
    cap = next(iter(g.graphs.values()))
    assert torch.equal(x, before) and a.data_ptr() != cap.x.data_ptr() and a.data_ptr() != x.data_ptr()
    assert torch.equal(a, cap.x)  # the result is a copy of the static state after the replay
    xl = x.contiguous(memory_format=torch.channels_last)
    _run(g, model, xl)
    cap = list(g.graphs.values())[-1]
    assert cap.x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_chain_and_replay_path_are_sync_free(graphs, autocast):
    model, x = _model(), _x()
    y = torch.arange(4) % 10
    g = GraphChain(DEVICE)
    spec = ChainSpec(3, 1.0, 0.01, clamp=True, autocast_dtype=autocast)  # bf16: cast-once weights
    with SyncRecorder() as capture:
        _run(g, model, x, y, spec)  # the first call captures
    assert_sync_free(capture)
    # warm-up, the recorded capture run, then the call's replay
    assert capture.launches["_sgld_kernel"] == g.warmup_steps + 2 * SPEC.n_steps
    steps = graphs[0].steps
    assert sum(kind == "launch" for kind, *_ in steps) == SPEC.n_steps  # the graph holds the 3 updates
    with SyncRecorder() as replay:
        _run(g, model, x, y, spec)
    assert_sync_free(replay)
    assert replay.ops > 0 and len(graphs) == 1
    assert replay.launches["_sgld_kernel"] == SPEC.n_steps


def test_an_item_in_the_captured_chain_is_caught(graphs, monkeypatch):
    import jemfast.sgld.reference as reference

    real = reference.energy_of

    def energy_with_a_read(*args, **kwargs):
        e = real(*args, **kwargs)
        e.sum().item()  # illegal inside a CUDA-graph capture
        return e

    monkeypatch.setattr(reference, "energy_of", energy_with_a_read)
    g, model, x = GraphChain(DEVICE), _model(), _x()
    with SyncRecorder() as rec:
        _run(g, model, x)
    reads = [e for e in rec.events if e.op == "_local_scalar_dense"]
    assert len(reads) >= g.warmup_steps + SPEC.n_steps and len(reads) == len(rec.events)
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        assert_sync_free(rec)

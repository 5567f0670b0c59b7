"""SGLD chain backends (jemfast.sgld) against the reference chain, on the CPU.

What runs here: ``compile`` (torch.compile, CPU default mode, channels-last) and ``fused`` (the
Triton kernel under the CPU interpreter: tests/conftest.py sets ``TRITON_INTERPRET=1`` before
anything imports triton). ``graph`` needs CUDA: its tests are in tests/test_gpu.py.

Tolerances (tiny SmallCNN, 1x8x8, B = 64, its head scaled x20 so the 20-step chain moves x by
O(0.1-1), i.e. the gradient matters; step size 1):
- noise off, fp32: final state ``atol = 1e-4`` (rtol 0) vs ``reference_chain``. ``fused``
  differs from the reference only in the update's rounding; ``compile`` also in its conv
  algorithms (channels-last oneDNN) and fused elementwise code.
- noise on, same seed: ``compile`` on the CPU draws the reference's noise stream, so again
  ``atol = 1e-4``;
- noise on (sigma = 0.01, other RNG streams than the reference): with ``d = x_final -
  reference(noise off)``, ``|mean(d)| < 5 SE`` and ``std(d)`` within 6 % (~5 SE of a std over
  4096 values) of the reference's own ``std(d)``.
Compile tests reuse one model class and one input shape so the step compiles once or twice.
"""
from __future__ import annotations

import copy

import pytest
import torch

from jemfast.energy import JEM
from jemfast.models import SmallCNN
from jemfast.process.errors import UserError
from jemfast.sgld import SGLD, ChainSpec, make_chain, reference_chain, resolve_backend, sampling_mode, unavailable
from jemfast.sgld.compiled import CompiledChain
from jemfast.sgld.fused import FusedChain

B, SHAPE, STEPS, ALPHA, SIGMA = 64, (1, 8, 8), 20, 1.0, 0.01
ATOL = 1e-4


def _model(seed: int = 0) -> JEM:
    torch.manual_seed(seed)
    model = JEM(SmallCNN(1, 10, hidden=8))
    with torch.no_grad():  # larger logits -> larger energy gradients -> the chain really moves
        model.classifier.head.weight.mul_(20.0)
    return model


def _x(seed: int = 1) -> torch.Tensor:
    return torch.rand((B, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run(chain, model, x, y=None, noise=0.0, clamp=False, steps=STEPS):
    with sampling_mode(model):
        return chain(model, x, y, ChainSpec(steps, ALPHA, noise, clamp))


def _fused_or_skip() -> FusedChain:
    why = unavailable("fused", "cpu")
    if why:
        pytest.skip(f"fused backend unavailable on the CPU here: {why}")
    return FusedChain()


@pytest.fixture(scope="module")
def compiled():
    if unavailable("compile", "cpu"):
        pytest.skip(unavailable("compile", "cpu"))
    return CompiledChain(torch.device("cpu"))


def _check_noise_stats(out: torch.Tensor, ref_noisy: torch.Tensor, ref_clean: torch.Tensor) -> None:
    d, d_ref = out - ref_clean, ref_noisy - ref_clean
    n = d.numel()
    assert d_ref.std() > 0.5 * SIGMA  # the noise is really there
    assert abs(d.mean().item()) < 5 * d_ref.std().item() / n ** 0.5
    assert abs(d.std().item() / d_ref.std().item() - 1) < 0.06


# ---- resolution --------------------------------------------------------------------------
def test_reference_is_the_reference_chain():
    chain, name = make_chain("reference", "cpu")
    assert chain is reference_chain and name == "reference"


def test_auto_on_cpu_picks_reference_and_logs_why_once():
    import logging

    from jemfast.process.log import _said

    name, reason = resolve_backend("auto", "cpu")
    assert name == "reference" and "cpu/*/* -> reference" in reason and "1.00-1.16x" in reason
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("jemfast.sgld.backends")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        _said.discard(("auto", "cpu", "small", "fp32", "reference"))
        got = [make_chain("auto", torch.device("cpu"), n_params=1000)[1] for _ in range(2)]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert got == ["reference", "reference"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and lines[0].startswith("SGLD backend auto -> reference on cpu (rule cpu/"), lines


def test_unavailable_backends_raise_a_clear_error():
    with pytest.raises(UserError, match="graph.*CUDA"):
        make_chain("graph", "cpu")
    with pytest.raises(UserError, match="unknown backend"):
        make_chain("warp", "cpu")


def test_sgld_resolves_its_backend_lazily_and_reports_it():
    sampler = SGLD(n_steps=2, backend="auto")
    assert sampler.backend == "auto"
    sampler.chain_fn(torch.device("cpu"))
    assert sampler.backend == resolve_backend("auto", "cpu")[0]


def test_auto_rule_table():
    from jemfast.sgld.auto_rule import pick, size_class

    assert (size_class(36_500_000), size_class(99_000), size_class(None)) == ("large", "small", "*")
    assert pick("cpu", 36_500_000, "bf16").backend == "reference"  # compile 1.00-1.16x: not worth it
    assert pick("cpu").backend == "reference"
    assert pick("cuda", 100_000, "fp32").backend == "graph"  # default until GPU figures exist
    assert pick("mps", 100_000, "fp32").backend == "reference"


def test_auto_takes_the_first_matching_rule_and_falls_back_saying_why(monkeypatch):
    from jemfast.sgld import auto_rule

    measured = auto_rule.Rule("cuda", "large", "bf16", "compile", "WRN-28-10 bf16: compile 1.2x graph (made up)")
    monkeypatch.setattr(auto_rule, "RULES", (measured, *auto_rule.RULES))
    assert auto_rule.pick("cuda", 36_500_000, "bf16") is measured
    assert auto_rule.pick("cuda", 36_500_000, "fp32").backend == "graph"
    assert auto_rule.pick("cuda", 100_000, "bf16").backend == "graph"
    if torch.cuda.is_available():
        return
    name, reason = resolve_backend("auto", "cuda", 36_500_000, "bf16")
    assert name == "reference", reason  # neither compile nor graph can run on a missing CUDA device
    assert "rule cuda/large/bf16 -> compile: WRN-28-10 bf16" in reason and "compile unavailable" in reason


# ---- compile -----------------------------------------------------------------------------
def test_compile_matches_reference_without_noise(compiled):
    model, x = _model(), _x()
    ref = _run(reference_chain, model, x)
    out = _run(compiled, model, x)
    assert (ref - x).abs().max() > 0.05  # the chain moved
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_compile_noise_statistics_match_reference(compiled):
    model, x = _model(), _x()
    clean = _run(reference_chain, model, x)
    torch.manual_seed(5)
    ref_noisy = _run(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(6)
    _check_noise_stats(_run(compiled, model, x, noise=SIGMA), ref_noisy, clean)


def test_compile_follows_the_reference_noise_stream_on_cpu(compiled):
    """On the CPU the compile backend draws its noise eagerly in the reference's order, so with
    the same seed the noisy chains agree too (same tolerance as without noise)."""
    model, x = _model(), _x()
    torch.manual_seed(5)
    ref = _run(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(5)
    torch.testing.assert_close(_run(compiled, model, x, noise=SIGMA), ref, rtol=0, atol=ATOL)


def test_compile_reads_parameters_live(compiled):
    """An in-place (optimizer-style) parameter update is seen by the next call, no recompile."""
    model, x = _model(), _x()
    _run(compiled, model, x, steps=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    torch.testing.assert_close(_run(compiled, model, x), _run(reference_chain, model, x), rtol=0, atol=ATOL)


def test_compile_class_conditional_matches_reference(compiled):
    model, x = _model(), _x()
    y = torch.arange(B) % 10
    ref = _run(reference_chain, model, x, y=y)
    torch.testing.assert_close(_run(compiled, model, x, y=y), ref, rtol=0, atol=ATOL)


def test_compile_leaves_grads_mode_and_input_alone(compiled):
    model, x = _model(), _x()
    model.train()
    with torch.no_grad():
        next(model.parameters()).grad = torch.full_like(next(model.parameters()), 3.0)
    x0 = x.clone()
    sampler = SGLD(n_steps=3, backend="compile")
    sampler._chain = compiled
    sampler.run(model, x)
    assert model.training
    assert torch.equal(x, x0)
    grads = [p.grad for p in model.parameters()]
    assert torch.equal(grads[0], torch.full_like(grads[0], 3.0))
    assert all(g is None for g in grads[1:])
    assert all(p.requires_grad for p in model.parameters())


def test_compile_samples_train_mode_batch_norm_and_leaves_its_statistics(compiled, caplog):
    """Train-mode chains normalise with batch statistics and leave the running ones alone, so the
    compiled step can trace them (it falls back to the reference loop only where a BN would
    update its statistics)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 36, 10))
    model, x = JEM(net), _x()
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
    before = copy.deepcopy(net[1].state_dict())
    spec = ChainSpec(5, ALPHA, 0.0, False)
    with sampling_mode(model, "train"):
        ref = reference_chain(model, x, None, spec)
        with caplog.at_level("INFO", logger="jemfast.sgld.compiled"):
            out = compiled(model, x, None, spec)
    assert "reference loop" not in caplog.text
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    with sampling_mode(model, "eval"):  # the running statistics normalise here: a different chain
        assert not torch.allclose(reference_chain(model, x, None, spec), ref, atol=1e-3)
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- fused (Triton interpreter on the CPU) ---------------------------------------------
@pytest.mark.parametrize("clamp", [False, True])
def test_fused_matches_reference_without_noise(clamp):
    chain = _fused_or_skip()
    model, x = _model(), _x()
    y = torch.arange(B) % 10
    for yy in (None, y):
        ref = _run(reference_chain, model, x, y=yy, clamp=clamp)
        torch.testing.assert_close(_run(chain, model, x, y=yy, clamp=clamp), ref, rtol=0, atol=ATOL)


def test_fused_noise_statistics_and_fresh_noise():
    chain = _fused_or_skip()
    model, x = _model(), _x()
    clean = _run(reference_chain, model, x)
    torch.manual_seed(5)
    ref_noisy = _run(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(6)
    a = _run(chain, model, x, noise=SIGMA)
    assert chain.rng_state[1].item() == STEPS * x.numel()  # Philox offset advanced on the device
    b1, b2 = (_run(chain, model, x, noise=SIGMA, steps=1) for _ in range(2))
    assert not torch.equal(b1, b2)  # fresh noise on every call
    _check_noise_stats(a, ref_noisy, clean)


def test_fused_keeps_a_channels_last_chain_channels_last():
    chain = _fused_or_skip()
    torch.manual_seed(0)
    model = JEM(SmallCNN(3, 10, hidden=8))
    x = (torch.rand(8, 3, 8, 8) * 2 - 1).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    ref = _run(reference_chain, model, x, clamp=True, steps=5)
    out = _run(chain, model, x, clamp=True, steps=5)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert (ref - x).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    sampler = SGLD(n_steps=5, step_size=ALPHA, noise_std=0.0, backend="fused", clamp=True, channels_last=True)
    out = sampler.run(model, x.contiguous())  # an NCHW start (as the buffer gives) runs channels-last
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_fused_leaves_grads_and_input_alone():
    chain = _fused_or_skip()
    model, x = _model(), _x()
    x0 = x.clone()
    _run(chain, model, x, steps=2, noise=SIGMA)
    assert torch.equal(x, x0)
    assert all(p.grad is None for p in model.parameters())


def test_fused_sgld_state_dict_resumes_the_noise_stream_bit_for_bit():
    _fused_or_skip()
    model, x = _model(), _x()
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
    _fused_or_skip()
    model, x = _model(), _x()
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

    model, x = _model(), _x()
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
    model, x = _model(), _x().requires_grad_(True)
    for n in (1, 2, 3, 1, 4, 2):
        out = chain(model, x, None, ChainSpec(n, ALPHA, 0.0))
    assert captured == [1, 2, 3, 4, 2]  # 1 was reused; 4 evicted 2 (least recently used), 2 evicted 3
    assert [key[5].n_steps for key in chain.graphs] == [1, 4, 2]
    assert not out.requires_grad and torch.equal(out, x.detach())
    assert all(not cap.x.requires_grad for cap in chain.graphs.values())
    chain.clear()
    assert not chain.graphs


def test_bf16_weights_cast_once_match_autocast_per_step():
    """graph's cast-once path (bf16 copies of conv/linear weights + functional_call) computes
    what per-op autocast computes."""
    from jemfast.sgld import sgld_chain
    from jemfast.sgld.graph import lowp_params

    model, x = _model(), _x()
    params = lowp_params(model, torch.bfloat16)
    assert set(params) == {n for n, _ in model.named_parameters()}  # SmallCNN: convs and a linear
    assert all(t.dtype == torch.bfloat16 for t in params.values())
    spec = ChainSpec(3, ALPHA, 0.0, False, torch.bfloat16)
    with sampling_mode(model):
        per_step = sgld_chain(model, x.clone(), None, spec)
        once = sgld_chain(model, x.clone(), None, spec, params=params, cache=False)
    assert (per_step - x).abs().max() > 0.01
    assert torch.equal(once, per_step)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- --compile for the training step (jemfast.step) --------------------------------------
def test_compiled_train_step_matches_eager(tiny_cfg):
    from jemfast.buffer import ReplayBuffer
    from jemfast.build import build_optimizer
    from jemfast.step import train_step

    results = []
    for compile_ in (False, True):
        cfg = tiny_cfg(run__compile=compile_, sampler__backend="reference")
        model = _model()
        opt = build_optimizer(cfg, model)
        torch.manual_seed(7)
        buffer = ReplayBuffer(64, SHAPE)
        x, y = _x(2)[:16], torch.arange(16) % 10
        outs = [train_step(cfg, model, opt, SGLD(n_steps=3), buffer, x, y, 10) for _ in range(2)]
        results.append((outs, copy.deepcopy(model.state_dict())))
    (eager, p_eager), (comp, p_comp) = results
    for a, b in zip(eager, comp):
        for field in ("loss", "loss_ce", "loss_px", "e_real", "e_fake", "grad_norm"):
            torch.testing.assert_close(b.metrics[field], a.metrics[field], rtol=1e-4, atol=1e-5)
        assert torch.equal(a.metrics["acc"], b.metrics["acc"])
    for k in p_eager:
        torch.testing.assert_close(p_comp[k], p_eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_training_matches_reference_training(tiny_cfg):
    """A short digits run (3 epochs, ~60 iterations) with --compile (compiled train step + auto
    SGLD backend) vs without, same seed. The p(x) term of the loss is chaotic (the chains'
    noise comes from other RNG streams), so the cross-entropy curves are compared window by
    window (within 0.03), the total loss on average over the run (within 0.1) and the final
    test accuracy (within 5 points)."""
    import json

    from jemfast.train import train

    runs = []
    for compile_ in (False, True):
        cfg = tiny_cfg(run__compile=compile_, sampler__backend="auto" if compile_ else "reference",
                       optim__epochs=3, optim__warmup_iters=0, optim__lr=3e-3,
                       run__out=tiny_cfg().run.out + ("_c" if compile_ else "_r"))
        summary = train(cfg)
        lines = [json.loads(s) for s in open(f"{cfg.run.out}/metrics.jsonl")]
        runs.append((summary, [(r["loss"], r["loss_ce"]) for r in lines if "loss" in r]))
    (s_ref, l_ref), (s_c, l_c) = runs
    assert s_c["sgld_backend"] == resolve_backend("auto", "cpu")[0]
    assert len(l_ref) == len(l_c) > 5
    assert max(abs(a[1] - b[1]) for a, b in zip(l_ref, l_c)) < 0.03, (l_ref, l_c)
    mean = lambda rows: sum(r[0] for r in rows) / len(rows)  # noqa: E731
    assert abs(mean(l_ref) - mean(l_c)) < 0.1, (l_ref, l_c)
    assert s_ref["test_acc"] > 0.25  # it learned something
    assert abs(s_ref["test_acc"] - s_c["test_acc"]) <= 0.05, (s_ref["test_acc"], s_c["test_acc"])

"""SGLD chain backends (jemfast.backends) against the reference chain, on the CPU.

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

from jemfast.backends import CompiledChain, FusedChain, make_chain, resolve_backend, unavailable
from jemfast.energy import JEM
from jemfast.errors import UserError
from jemfast.models import SmallCNN
from jemfast.sampler import SGLD, reference_chain, sampling_mode

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
        return chain(model, x, y, steps, ALPHA, noise, clamp)


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


def test_auto_on_cpu_is_fixed_and_logged_once(capfd):
    name, reason = resolve_backend("auto", "cpu")
    assert name == ("compile" if unavailable("compile", "cpu") is None else "reference"), reason
    from jemfast import backends

    backends._said.discard(("auto", "cpu", name))
    _, got = make_chain("auto", torch.device("cpu"))
    _, again = make_chain("auto", torch.device("cpu"))
    assert got == again == name
    err = capfd.readouterr().err
    assert err.count("SGLD backend auto ->") == 1, err


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


def test_fused_leaves_grads_and_input_alone():
    chain = _fused_or_skip()
    model, x = _model(), _x()
    x0 = x.clone()
    _run(chain, model, x, steps=2, noise=SIGMA)
    assert torch.equal(x, x0)
    assert all(p.grad is None for p in model.parameters())


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

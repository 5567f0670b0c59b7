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
from jemfast.process.errors import UserError
from jemfast.sgld import SGLD, ChainSpec, make_chain, reference_chain, resolve_backend, sampling_mode, unavailable
from jemfast.sgld.compiled import CompiledChain

from tests.backend_helpers import ALPHA, ATOL, B, SHAPE, SIGMA, chain_input, check_noise_stats, run_chain, tiny_model


@pytest.fixture(scope="module")
def compiled():
    if unavailable("compile", "cpu"):
        pytest.skip(unavailable("compile", "cpu"))
    return CompiledChain(torch.device("cpu"))



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
    old_level = logger.level
    logger.setLevel(logging.INFO)  # not `logger.level =`: that skips the isEnabledFor cache a logged run filled
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
    model, x = tiny_model(), chain_input()
    ref = run_chain(reference_chain, model, x)
    out = run_chain(compiled, model, x)
    assert (ref - x).abs().max() > 0.05  # the chain moved
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_compile_noise_statistics_match_reference(compiled):
    model, x = tiny_model(), chain_input()
    clean = run_chain(reference_chain, model, x)
    torch.manual_seed(5)
    ref_noisy = run_chain(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(6)
    check_noise_stats(run_chain(compiled, model, x, noise=SIGMA), ref_noisy, clean)


def test_compile_follows_the_reference_noise_stream_on_cpu(compiled):
    """On the CPU the compile backend draws its noise eagerly in the reference's order, so with
    the same seed the noisy chains agree too (same tolerance as without noise)."""
    model, x = tiny_model(), chain_input()
    torch.manual_seed(5)
    ref = run_chain(reference_chain, model, x, noise=SIGMA)
    torch.manual_seed(5)
    torch.testing.assert_close(run_chain(compiled, model, x, noise=SIGMA), ref, rtol=0, atol=ATOL)


def test_compile_reads_parameters_live(compiled):
    """An in-place (optimizer-style) parameter update is seen by the next call, no recompile."""
    model, x = tiny_model(), chain_input()
    run_chain(compiled, model, x, steps=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    torch.testing.assert_close(run_chain(compiled, model, x), run_chain(reference_chain, model, x), rtol=0, atol=ATOL)


def test_compile_class_conditional_matches_reference(compiled):
    model, x = tiny_model(), chain_input()
    y = torch.arange(B) % 10
    ref = run_chain(reference_chain, model, x, y=y)
    torch.testing.assert_close(run_chain(compiled, model, x, y=y), ref, rtol=0, atol=ATOL)


def test_compile_leaves_grads_mode_and_input_alone(compiled):
    model, x = tiny_model(), chain_input()
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
    model, x = JEM(net), chain_input()
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


def test_bf16_weights_cast_once_match_autocast_per_step():
    """graph's cast-once path (bf16 copies of conv/linear weights + functional_call) computes
    what per-op autocast computes."""
    from jemfast.sgld import sgld_chain
    from jemfast.sgld.graph import lowp_params

    model, x = tiny_model(), chain_input()
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
        model = tiny_model()
        opt = build_optimizer(cfg, model)
        torch.manual_seed(7)
        buffer = ReplayBuffer(64, SHAPE)
        x, y = chain_input(2)[:16], torch.arange(16) % 10
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

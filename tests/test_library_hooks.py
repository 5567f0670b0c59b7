"""Library hooks for users' own loops: SGLD over any energy (a function, a LogDensity, a model
with .energy), sampling mode, gradient clipping, step size 0, per-call steps; jem_loss.

Analytic reference: the Gaussian energy E(x) = |x - mu|^2 / (2 s^2) has dE/dx = (x - mu) / s^2,
so one SGLD step with step size a is x - a (x - mu) / s^2 + sigma * xi; with a = s^2 / 2 that
is (x + mu) / 2 + sigma * xi, and the chain's stationary variance is sigma^2 / (1 - 1/4).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jemfast import JEM, SGLD, LogDensity, ReplayBuffer, jem_loss
from jemfast.options.config import Config
from jemfast.sgld import ChainSpec
from tests.conftest import triton_marker
from tests.test_energy import CCF

DEVICE, needs_triton = triton_marker()
BACKENDS = ["reference", pytest.param("fused", marks=needs_triton)]
MU, S = torch.tensor([0.5, -0.25, 0.0]), 0.5


def gaussian(x, y=None):
    """E(x) = |x - mu|^2 / (2 s^2), Tensor[B]; y ignored."""
    return ((x - MU.to(x.device)) ** 2).sum(1) / (2 * S**2)


def hand_chain(x, steps, a, sigma, clip=None):
    """The closed-form SGLD chain on :func:`gaussian`, noise from torch's generator in the
    reference chain's order."""
    for _ in range(steps):
        g = (x - MU) / S**2
        g = g if clip is None else g.clamp(-clip, clip)
        x = x - a * g + (sigma * torch.randn_like(x) if sigma else 0)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_callable_energy_follows_the_closed_form(backend):
    x0 = torch.randn(7, 3) * 2
    out = SGLD(n_steps=4, step_size=S**2 / 2, noise_std=0.0, backend=backend).run(gaussian, x0.to(DEVICE))
    assert torch.allclose(out.cpu(), (x0 + 15 * MU) / 16, atol=1e-6)  # halves the distance 4 times
    torch.manual_seed(0)
    out = SGLD(n_steps=3, step_size=0.1, noise_std=0.05).run(gaussian, x0)
    torch.manual_seed(0)
    assert torch.allclose(out, hand_chain(x0, 3, 0.1, 0.05), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_callable_energy_reaches_the_stationary_distribution(backend):
    torch.manual_seed(0)
    sigma = 0.2
    out = SGLD(n_steps=30, step_size=S**2 / 2, noise_std=sigma, backend=backend).run(
        gaussian, torch.full((4000, 3), 3.0, device=DEVICE)).cpu()
    assert (out.mean(0) - MU).abs().max() < 0.02  # se 0.23 / sqrt(4000) ~ 0.004
    assert (out.var(0) - sigma**2 * 4 / 3).abs().max() < 0.006  # var 0.053, se ~ 0.0012


def test_callable_gets_the_labels():
    seen = []

    def energy(x, y):
        seen.append(y)
        return gaussian(x)

    y = torch.tensor([2, 0])
    SGLD(n_steps=2, noise_std=0.0).run(energy, torch.zeros(2, 3), y)
    assert len(seen) == 2 and all(s is y for s in seen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conditional", [False, True])
def test_log_density_and_jem_give_identical_chains(backend, conditional):
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    x0, y = torch.rand(9, 2, device=DEVICE) * 2 - 1, (torch.arange(9, device=DEVICE) % 3 if conditional else None)
    clf.to(DEVICE)
    runs = []
    for model in (JEM(clf), LogDensity(CCF(clf))):
        torch.manual_seed(7)
        runs.append(SGLD(n_steps=5, step_size=1.0, noise_std=0.01, backend=backend).run(model, x0, y))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], x0)


# ---- modes ----------------------------------------------------------------------------------
class Spy(nn.BatchNorm1d):
    def forward(self, x):
        self.seen = getattr(self, "seen", []) + [self.training]
        return super().forward(x)


def bn_jem() -> JEM:
    torch.manual_seed(0)
    return JEM(nn.Sequential(nn.Linear(2, 4), Spy(4), nn.Tanh(), nn.Linear(4, 4), Spy(4), nn.Linear(4, 3)))


def test_train_mode_sampling_uses_batch_statistics_and_restores_every_mode():
    model = bn_jem()
    model.train()
    model.classifier[4].eval()  # a submodule the user froze
    x0 = torch.rand(16, 2) * 2 - 1
    ref = copy.deepcopy(model).train()  # what train-mode sampling is: every BN on batch statistics
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.energy(x).sum(), x)
    out = SGLD(n_steps=1, step_size=0.5, noise_std=0.0, mode="train").run(model, x0)
    assert torch.allclose(out, x0 - 0.5 * grad, atol=1e-6)
    assert model.classifier[1].seen == [True] and model.classifier[4].seen == [True]
    assert model.training and model.classifier[1].training and not model.classifier[4].training  # restored
    # batch statistics normalised the chains (above), and the running ones stay the training data's
    assert torch.equal(model.classifier[1].running_mean, torch.zeros(4))
    assert model.classifier[1].num_batches_tracked == 0 and model.classifier[1].track_running_stats
    evaled = SGLD(n_steps=1, step_size=0.5, noise_std=0.0).run(model, x0)  # default: eval, as the original
    assert model.classifier[1].seen[-1] is False and not torch.allclose(evaled, out, atol=1e-4)
    assert model.training and not model.classifier[4].training
    SGLD(n_steps=1, mode="keep").run(model, x0)
    assert model.classifier[1].seen[-1] is True and model.classifier[4].seen[-1] is False
    with pytest.raises(ValueError, match="mode"):
        SGLD(mode="training")


def test_a_function_energy_sets_modes_only_of_the_model_given():
    model = bn_jem().train()

    def energy(x, y):
        return model.energy(x, y)

    SGLD(n_steps=1).run(energy, torch.rand(4, 2))  # no model=: nothing's mode is touched
    assert model.classifier[1].seen == [True]
    SGLD(n_steps=1).run(energy, torch.rand(4, 2), model=model)
    assert model.classifier[1].seen[-1] is False and model.training and model.classifier[1].training


def test_a_module_without_energy_is_its_own_energy_function():
    class Energy(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = nn.Parameter(MU.clone())

        def forward(self, x, y=None):
            return ((x - self.mu) ** 2).sum(1) / (2 * S**2)

    net = Energy().train()
    out = SGLD(n_steps=1, step_size=S**2 / 2, noise_std=0.0).run(net, torch.zeros(2, 3))
    assert torch.allclose(out, MU.expand(2, 3) / 2) and net.training
    with pytest.raises(ValueError, match="energy"):
        SGLD().run(3.0, torch.zeros(2, 3))


# ---- gradient clipping, step size 0, per-call steps -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_clip_clamps_each_gradient_element_before_the_step(backend):
    x0 = torch.tensor([[3.0, -3.0, 0.05], [0.6, 0.0, -0.1]])  # gradients 10, -11, 0.2 | 0.4, 1, -0.4
    sgld = SGLD(n_steps=2, step_size=0.1, noise_std=0.0, backend=backend, grad_clip=0.5)
    assert sgld.spec.grad_clip == 0.5 and sgld.spec != SGLD(grad_clip=None).spec  # in the graph cache key
    out = sgld.run(gaussian, x0.to(DEVICE)).cpu()
    assert torch.allclose(out, hand_chain(x0, 2, 0.1, 0.0, clip=0.5), atol=1e-6)
    assert not torch.allclose(out, hand_chain(x0, 2, 0.1, 0.0), atol=1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="grad_clip"):
            SGLD(grad_clip=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_size_zero_is_noise_alone(backend):
    calls = []

    def energy(x, y):
        calls.append(1)
        return torch.full((x.shape[0],), float("nan"))  # never evaluated

    torch.manual_seed(0)
    x0 = torch.zeros(3000, 3, device=DEVICE)
    out = SGLD(n_steps=9, step_size=0.0, noise_std=0.1, backend=backend).run(energy, x0).cpu()
    assert not calls and torch.isfinite(out).all()
    assert abs(out.std().item() - 0.3) < 0.01 and abs(out.mean().item()) < 0.01  # sigma * sqrt(9)
    if backend == "reference":
        torch.manual_seed(0)
        assert torch.allclose(out, hand_chain(torch.zeros(3000, 3), 9, 0.0, 0.1), atol=1e-6)


def test_step_size_zero_in_the_config_and_cli():
    from jemfast.options.cli import config_from_args
    from tune.space import default_space

    cfg = config_from_args(["--sgld-step-size", "0"])
    assert cfg.sampler.step_size == 0.0
    assert default_space(cfg)["sampler.step_size"].values == (0.0,)  # no loguniform around 0
    for bad in ("-0.5", "nan"):
        with pytest.raises(ValueError, match=r"--sgld-step-size \(sampler.step_size\)"):
            config_from_args(["--sgld-step-size", bad])


def test_per_call_steps_leave_the_default():
    sgld = SGLD(n_steps=5, step_size=0.1, noise_std=0.0)
    x0 = torch.randn(4, 3)
    assert torch.allclose(sgld.run(gaussian, x0, n_steps=2), hand_chain(x0, 2, 0.1, 0.0), atol=1e-6)
    assert sgld.n_steps == 5 and sgld.spec.n_steps == 5
    buf = ReplayBuffer(10, (3,), reinit_freq=0.0)
    before = buf.data.clone()
    torch.manual_seed(3)
    x = sgld.sample(gaussian, buf, 4, n_steps=1)
    torch.manual_seed(3)
    _, idx = buf.sample(4)
    assert torch.allclose(x, hand_chain(before[idx], 1, 0.1, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="n_steps"):
        sgld.run(gaussian, x0, n_steps=0)


def test_sample_from_an_empty_buffer_is_a_fresh_chain():
    torch.manual_seed(0)
    buf = ReplayBuffer(0, (3,), init_fn=lambda n, y: MU.expand(n, 3).clone())
    x = SGLD(n_steps=1, step_size=0.1, noise_std=0.0).sample(gaussian, buf, 5)
    assert torch.allclose(x, MU.expand(5, 3)) and len(buf) == 0  # started at mu, where dE/dx = 0


def test_graph_capture_key_follows_submodule_modes():
    from jemfast.sgld.graph import capture_key

    model, x = bn_jem().train(), torch.zeros(2, 2)
    key = capture_key(model, x, None, ChainSpec(2, 1.0, 0.01))
    model.classifier[1].eval()
    assert capture_key(model, x, None, ChainSpec(2, 1.0, 0.01)) != key
    assert capture_key(model, x, None, ChainSpec(2, 1.0, 0.01, grad_clip=1.0)) != key


def test_compile_backend_runs_functions_log_densities_and_train_mode():
    from jemfast.sgld import unavailable

    if unavailable("compile", "cpu"):
        pytest.skip(unavailable("compile", "cpu"))
    model = bn_jem()
    ld = LogDensity(CCF(model.classifier))
    x2, x3 = torch.rand(8, 2) * 2 - 1, torch.randn(8, 3)
    for energy, x0, mode, clip in ((gaussian, x3, "eval", 0.5), (ld, x2, "eval", None), (ld, x2, "train", 0.3)):
        runs = []
        for backend in ("reference", "compile"):  # on the CPU compile follows the reference's noise stream
            torch.manual_seed(2)
            runs.append(SGLD(n_steps=2, step_size=0.5, noise_std=0.01, backend=backend, mode=mode,
                             grad_clip=clip).run(energy, x0))
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


# ---- jem_loss ------------------------------------------------------------------------------
def test_jem_loss_matches_the_hand_computation():
    torch.manual_seed(0)
    clf = nn.Linear(4, 3)
    x, x_fake, x_fake_y = torch.randn(6, 4), torch.randn(5, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    w = clf.weight.detach()

    def logits(t):
        return t @ w.T + clf.bias.detach()

    def lse(t):
        return torch.log(torch.exp(logits(t)).sum(1))

    ce = (lse(x) - logits(x)[torch.arange(6), y]).mean()
    px = -lse(x).mean() + lse(x_fake).mean()
    pxy = (-logits(x)[torch.arange(6), y]).mean() + logits(x_fake_y)[torch.arange(6), y].mean()
    for model in (clf, JEM(clf)):
        loss, terms = jem_loss(model, x, y, x_fake, x_fake_y=x_fake_y, p_y_given_x_weight=0.5, p_x_weight=2.0,
                               p_x_given_y_weight=0.25)
        assert torch.allclose(loss, 0.5 * ce + 2.0 * px + 0.25 * pxy, atol=1e-5)
        assert torch.allclose(terms["loss_ce"], F.cross_entropy(logits(x), y), atol=1e-6)
        assert torch.allclose(terms["loss_px"], px, atol=1e-5) and torch.allclose(terms["loss_pxy"], pxy, atol=1e-5)
        assert set(terms) == {"loss_ce", "loss_px", "loss_pxy", "e_real", "e_fake", "acc"}
    loss.backward()
    assert clf.weight.grad is not None
    only_ce, terms = jem_loss(clf, x, y)  # no samples: cross-entropy alone
    assert torch.allclose(only_ce, ce, atol=1e-6) and terms["loss_px"] == 0
    with pytest.raises(ValueError, match="x_fake_y"):
        jem_loss(clf, x, y, x_fake, p_x_given_y_weight=1.0)
    with pytest.raises(ValueError, match="p_x_weight"):
        jem_loss(clf, x, y, x_fake, p_x_weight=-1.0)


def test_class_conditional_training_buffer_must_divide(tmp_path):
    from jemfast.build import build_buffer

    cfg = Config().with_overrides({"sampler.class_cond": True, "sampler.buffer_size": 2001})
    with pytest.raises(ValueError, match=r"--buffer-size .* 2001 with --class-cond: must be a multiple of the 10"):
        build_buffer(cfg, (1, 8, 8), 10, torch.device("cpu"))
    assert len(build_buffer(cfg.with_overrides({"sampler.buffer_size": 2000}), (1, 8, 8), 10,
                            torch.device("cpu"))) == 2000

"""The paper's training variants: each flag changes what it says, and only that."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jemfast.buffer as buffer_mod
import jemfast.step as step
from jemfast.buffer import ReplayBuffer
from jemfast.data import load_data
from jemfast.energy import JEM
from jemfast.options.config import Config
from jemfast.rundir.checkpoint import read_checkpoint
from jemfast.sgld.chain_init import ClassGaussians
from jemfast.train import Trainer, train
from tests.conftest import stop_after, tiny_digits_config

CPU = torch.device("cpu")


def _key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


def _record_loss_terms(monkeypatch) -> list[dict]:
    """Wrap jemfast.step.loss_terms: every call's labelled batch, labels and p(x) batch."""
    seen, real = [], step.loss_terms

    def wrapper(model, x, x_fake, y, *args, **kwargs):
        seen.append({"x": x.detach().clone(), "y": y.clone(), "x_px": kwargs.get("x_px"),
                     "x_fake": x_fake, "x_fake_y": kwargs.get("x_fake_y")})
        return real(model, x, x_fake, y, *args, **kwargs)

    monkeypatch.setattr(step, "loss_terms", wrapper)
    return seen


# ---- --labels-per-class -------------------------------------------------------------------
def test_labels_per_class_10_feeds_exactly_100_labels_to_cross_entropy(tmp_path, monkeypatch):
    seen = _record_loss_terms(monkeypatch)
    cfg = tiny_digits_config(tmp_path / "run", data__labels_per_class=10, data__noise_std=0.0)
    summary = train(cfg)
    assert summary["iterations"] == 1257 // 64  # the epoch is still the whole training split
    data = load_data(cfg.data, CPU)
    rows = data.labelled_idx
    assert len(rows) == 100 and torch.equal(torch.bincount(data.train.y[rows]), torch.full((10,), 10))
    label_of = {_key(x): int(y) for x, y in zip(data.train.x[rows], data.train.y[rows])}
    assert len(label_of) == 100  # the chosen images are distinct
    ce_images, px_images = set(), set()
    for call in seen:
        for x, y in zip(call["x"], call["y"]):
            assert label_of.get(_key(x)) == int(y)  # only labelled images, with their true labels
            ce_images.add(_key(x))
        assert call["x_px"] is not None and call["x_px"].shape == call["x"].shape
        px_images.update(_key(x) for x in call["x_px"])
    assert ce_images == set(label_of)  # all 100, and no other, reached the cross-entropy term
    assert len(px_images - set(label_of)) > 1000  # the p(x) term sees the unlabelled images
    all_train = {_key(x) for x in data.train.x}
    assert px_images <= all_train


def test_labelled_subset_is_fixed_and_stratified():
    from jemfast.data import labelled_rows

    y = torch.arange(10).repeat_interleave(30)
    a, b = labelled_rows(y, 3, 10), labelled_rows(y, 3, 10)
    assert torch.equal(a, b) and torch.equal(torch.bincount(y[a]), torch.full((10,), 3))
    with pytest.raises(Exception, match="class 0 has only 30"):
        labelled_rows(y, 31, 10)


def test_cycled_batches_depend_only_on_seed_and_position():
    from jemfast.data import Split

    s = Split(torch.arange(7.0).view(7, 1), torch.arange(7))
    stream = torch.cat([s.cycled_batch(3, 42, b)[1] for b in range(7)])  # 21 = 3 full shuffles
    for k in range(3):
        assert sorted(stream[7 * k:7 * (k + 1)].tolist()) == list(range(7))
    assert torch.equal(s.cycled_batch(3, 42, 5)[1], stream[15:18])
    assert torch.equal(s.cycled_batch(10, 1, 0)[1][:7].sort().values, torch.arange(7))  # batch > split


def test_semi_supervised_mid_epoch_resume_is_bit_exact(tmp_path):
    kw = {"data__labels_per_class": 10, "optim__epochs": 1}
    train(tiny_digits_config(tmp_path / "a", **kw))
    trainer = Trainer(tiny_digits_config(tmp_path / "b", **kw), None)
    stop_after(trainer, 7)
    assert trainer.run()["status"] == "interrupted"
    train(tiny_digits_config(tmp_path / "b", run__resume=True, **kw))
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])


# ---- --clf-only ---------------------------------------------------------------------------
def test_clf_only_runs_no_sgld_and_leaves_the_buffer(tmp_path, monkeypatch):
    seen = _record_loss_terms(monkeypatch)
    trainer = Trainer(tiny_digits_config(tmp_path / "run", loss__clf_only=True, loss__p_x_given_y_weight=1.0), None)

    def no_sgld(*args, **kwargs):
        raise AssertionError("SGLD ran under --clf-only")

    trainer.sampler.run = trainer.sampler.sample = no_sgld
    before = trainer.buffer.data.clone()
    assert trainer.run()["status"] == "finished"
    assert torch.equal(trainer.buffer.data, before)
    assert seen and all(c["x_fake"] is None and c["x_fake_y"] is None for c in seen)


# ---- --p-x-given-y-weight -----------------------------------------------------------------
def test_p_x_given_y_weight_adds_the_class_conditional_term():
    torch.manual_seed(0)
    cfg = Config().with_overrides({"data.dataset": "toy2d", "sampler.class_cond": True,
                                   "loss.p_x_given_y_weight": 0.5, "loss.p_x_weight": 1.0})
    model = JEM(nn.Linear(2, 3))
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    fakes = {"uncond": torch.randn(4, 2), "given_y": torch.randn(4, 2)}
    calls = []

    class Stub:  # returns fixed samples; records what each draw was conditioned on
        def sample(self, model, buffer, n, y_draw):
            calls.append(y_draw)
            return fakes["given_y"] if y_draw is y else fakes["uncond"]

    w0 = {k: p.detach().clone() for k, p in model.state_dict().items()}
    logits = lambda t: w0["classifier.weight"].mm(t.T).T + w0["classifier.bias"]  # noqa: E731
    lr, lf, lfy = logits(x), logits(fakes["uncond"]), logits(fakes["given_y"])
    ce = F.cross_entropy(lr, y)
    e_real, e_fake = -torch.logsumexp(lr, 1).mean(), -torch.logsumexp(lf, 1).mean()
    e_real_y = -lr.gather(1, y[:, None]).mean()
    e_fake_y = -lfy.gather(1, y[:, None]).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = step.train_step(cfg, model, opt, Stub(), None, x, y, 3)
    assert len(calls) == 2 and calls[1] is y  # the p(x|y) samples are drawn given the batch's labels
    hand = ce + (e_real - e_fake) + 0.5 * (e_real_y - e_fake_y)
    assert torch.allclose(out.metrics["loss_pxy"], e_real_y - e_fake_y, atol=1e-6)
    assert torch.allclose(out.metrics["loss"], hand, atol=1e-6)
    off = step.train_step(cfg.with_overrides({"loss.p_x_given_y_weight": 0.0}), model, opt, Stub(), None, x, y, 3)
    assert "loss_pxy" not in off.metrics
    assert torch.allclose(out.metrics["loss"] - off.metrics["loss"], 0.5 * (e_real_y - e_fake_y), atol=1e-6)


def test_p_x_given_y_from_the_buffer_needs_class_cond():
    with pytest.raises(ValueError, match="--class-cond"):
        Config().with_overrides({"loss.p_x_given_y_weight": 1.0})
    Config().with_overrides({"loss.p_x_given_y_weight": 1.0, "sampler.sgld_init": "noise"})


# ---- --class-cond -------------------------------------------------------------------------
@pytest.mark.parametrize("class_cond", [False, True])
def test_class_cond_conditions_the_p_x_samples(class_cond):
    torch.manual_seed(0)
    cfg = Config().with_overrides({"data.dataset": "toy2d", "sampler.class_cond": class_cond,
                                   "sampler.buffer_size": 30})
    buf = ReplayBuffer(30, (2,), 3 if class_cond else None, 0.0)
    drawn = []
    real_sample = buf.sample

    def sample(n, y=None):
        x0, idx = real_sample(n, y)
        drawn.append((y, idx))
        return x0, idx

    buf.sample = sample
    model = JEM(nn.Linear(2, 3))
    step.train_step(cfg, model, torch.optim.SGD(model.parameters(), lr=0.0), step.SGLD(2, 0.1, 0.0),
                    buf, torch.randn(64, 2), torch.randint(0, 3, (64,)), 3)
    (y, idx), = drawn
    if class_cond:
        assert y is not None and y.shape == (64,) and set(y.tolist()) == {0, 1, 2}
        assert torch.equal(idx // 10, y)  # each chain comes from its class's share of the buffer
    else:
        assert y is None


# ---- --sgld-init noise --------------------------------------------------------------------
def test_sgld_init_noise_never_touches_the_buffer(tmp_path):
    trainer = Trainer(tiny_digits_config(tmp_path / "run", sampler__sgld_init="noise"), None)
    starts, real_run = [], trainer.sampler.run

    def run(model, x0, y=None):
        starts.append(x0.clone())
        return real_run(model, x0, y)

    def no_buffer(*args, **kwargs):
        raise AssertionError("the buffer was used with --sgld-init noise")

    trainer.sampler.run = run
    trainer.buffer.sample = trainer.buffer.update = no_buffer
    before = trainer.buffer.data.clone()
    assert trainer.run()["status"] == "finished"
    assert torch.equal(trainer.buffer.data, before)
    x0 = torch.cat(starts)
    assert len(starts) == 1257 // 64 and x0.shape == (len(starts) * 64, 1, 8, 8)
    assert x0.min() >= -1 and x0.max() <= 1  # U(-1, 1): mean 0, variance 1/3
    assert abs(x0.mean().item()) < 0.01 and abs(x0.var().item() - 1 / 3) < 0.01
    assert len({_key(s) for s in starts}) == len(starts)  # fresh every iteration


# ---- --init informative -------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_data(Config().with_overrides({"data.dataset": "digits"}).data, CPU)


def _class_moments(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x[y == c].reshape(int((y == c).sum()), -1).double()
    d = xc - xc.mean(0)
    return xc.mean(0), d.T @ d / xc.shape[0]


def test_informative_init_matches_the_per_class_mean_and_covariance(digits):
    torch.manual_seed(0)
    init = ClassGaussians(digits.train, 10)
    n = 200_000
    y = torch.randint(0, 10, (n,))
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=gen)
    state = torch.get_rng_state()
    x_raw = init.draw(n, y)
    torch.set_rng_state(state)
    x = init(n, y)  # the same draws, clamped
    assert x.shape == (n, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, x_raw.clamp(-1, 1))
    for c in (0, 3, 7):
        mu_data, cov_data = _class_moments(digits.train.x, digits.train.y, c)
        mu, cov = _class_moments(x_raw, y, c)  # ~20,000 draws: sampling error ~0.005
        assert (mu - mu_data).abs().max() < 0.02 and (cov - cov_data).abs().max() < 0.03
        # Clamping to [-1, 1] trims the Gaussian's tails at pixels near -1 or 1: close on average.
        mu, cov = _class_moments(x, y, c)
        assert (mu - mu_data).abs().mean() < 0.05 and (cov - cov_data).abs().mean() < 0.02
    # without labels the class is uniform: the overall mean is the mean of the class means
    x_any = init.draw(n, None).reshape(n, -1).double()
    class_means = torch.stack([_class_moments(digits.train.x, digits.train.y, c)[0] for c in range(10)])
    assert (x_any.mean(0) - class_means.mean(0)).abs().max() < 0.02


def test_informative_init_factor_reproduces_the_covariance(digits):
    init = ClassGaussians(digits.train, 10)
    for c in range(10):
        _, cov_data = _class_moments(digits.train.x, digits.train.y, c)
        s = init.scale[c].double()
        assert torch.allclose(s @ s.T, cov_data, atol=1e-5)


def test_buffer_uses_init_fn_for_initial_rows_and_reinit(digits, monkeypatch):
    torch.manual_seed(0)
    init = ClassGaussians(digits.train, 10)
    ref = {c: init(20_000, torch.full((20_000,), c)).reshape(20_000, -1).mean(0) for c in (0, 4, 5)}
    dist = lambda rows, c: (rows.reshape(len(rows), -1).mean(0) - ref[c]).abs().mean()  # noqa: E731
    buf = ReplayBuffer(2000, (1, 8, 8), 10, reinit_freq=1.0, init_fn=init)
    for c in (0, 5):  # each class's share starts from that class's Gaussian
        assert dist(buf.data[c * 200:(c + 1) * 200], c) < 0.05 < dist(buf.data[c * 200:(c + 1) * 200], 4)
    x, _ = buf.sample(5000, torch.full((5000,), 4))  # reinit_freq 1: every chain a fresh draw of class 4
    assert dist(x, 4) < 0.015 and dist(x, 0) > 0.1
    buf.reset()
    assert dist(buf.data[800:1000], 4) < 0.05 < dist(buf.data[800:1000], 0)
    monkeypatch.setattr(buffer_mod, "_kernel_usable", lambda device: True)
    # the kernel path stays with an init_fn: it gathers, init_fn's rows replace the re-initialised
    # ones (tests/test_library_hooks.py runs that path)
    assert ReplayBuffer(20, (2,), init_fn=lambda n, y: torch.zeros(n, 2))._use_kernel
    assert ReplayBuffer(20, (2,))._use_kernel


def test_default_buffer_init_is_unchanged():
    torch.manual_seed(3)
    buf = ReplayBuffer(50, (1, 4, 4), 5)
    torch.manual_seed(3)
    assert torch.equal(buf.data, torch.rand((50, 1, 4, 4)) * 2 - 1)


def test_informative_init_reaches_the_trainer_buffer(tmp_path):
    trainer = Trainer(tiny_digits_config(tmp_path / "run", sampler__init_dist="informative",
                                         sampler__sgld_init="noise"), None)
    assert isinstance(trainer.buffer.init_fn, ClassGaussians)
    starts, real_run = [], trainer.sampler.run
    trainer.sampler.run = lambda model, x0, y=None: starts.append(x0) or real_run(model, x0, y)
    trainer.cfg.optim.epochs = 1
    trainer.run()
    x0 = torch.cat(starts).reshape(-1, 64)
    data_mean = trainer.data.train.x.reshape(-1, 64).mean(0)
    assert (x0.mean(0) - data_mean).abs().mean() < 0.05  # not U(-1, 1)'s mean of 0
    assert data_mean.abs().mean() > 0.3


def test_informative_init_of_a_semi_supervised_run_uses_only_the_labelled_images(tmp_path):
    trainer = Trainer(tiny_digits_config(tmp_path / "run", sampler__init_dist="informative",
                                         data__labels_per_class=5), None)
    init = trainer.buffer.init_fn
    labelled = trainer.data.labelled
    assert len(labelled) == 50 and init.scale.shape[2] == 5  # rank: 5 images a class, not ~125
    for c in (0, 7):
        mu, _ = _class_moments(labelled.x, labelled.y, c)
        assert torch.allclose(init.mean[c].double(), mu, atol=1e-6)

"""The stability remedies as options (--energy-l2, --sgld-grad-clip, --sam-rho/--sam-adaptive,
--px-augment): each against a small hand-written reference, and exact resume with all of them on."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jemfast import SGLD, jem_loss
from jemfast.build import build_buffer, build_optimizer, build_sampler
from jemfast.data import load_data
from jemfast.energy import JEM
from jemfast.options.config import Config, apply_preset
from jemfast.rundir.checkpoint import read_checkpoint
from jemfast.step import train_step
from jemfast.train import Trainer, train
from tests.conftest import stop_after, tiny_digits_config
from tests.test_data_formats import files_exist_is_integrity, write_cifar  # noqa: F401  (autouse: the written tree loads)


def linear_jem(seed=0, d=6, c=3):
    torch.manual_seed(seed)
    return JEM(nn.Linear(d, c))


def test_energy_l2_adds_the_squared_energies_of_real_and_fake(tmp_path):
    model = linear_jem()
    x, x_fake, y = torch.randn(5, 6), torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    loss, terms = jem_loss(model, x, y, x_fake, energy_l2=0.1)
    w, b = model.classifier.weight, model.classifier.bias
    e_real = -torch.logsumexp(x @ w.T + b, 1)  # by hand: E(x) = -logsumexp f(x)
    e_fake = -torch.logsumexp(x_fake @ w.T + b, 1)
    by_hand = (F.cross_entropy(x @ w.T + b, y) + e_real.mean() - e_fake.mean()
               + 0.1 * (e_real.pow(2).mean() + e_fake.pow(2).mean()))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert terms["energy_sq"].item() == pytest.approx((e_real.pow(2).mean() + e_fake.pow(2).mean()).item(), rel=1e-6)
    g, = torch.autograd.grad(loss, w)
    g_hand, = torch.autograd.grad(by_hand, w)
    assert torch.allclose(g, g_hand, atol=1e-6)
    plain, terms0 = jem_loss(model, x, y, x_fake)  # off by default: the paper's loss
    assert "energy_sq" not in terms0 and plain.item() == pytest.approx((by_hand - 0.1 * terms["energy_sq"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="energy_l2"):
        jem_loss(model, x, y, x_fake, energy_l2=-1.0)


def test_sgld_grad_clip_flag_clamps_the_input_gradient(tmp_path):
    cfg = tiny_digits_config(tmp_path, sampler__grad_clip=0.5, sampler__step_size=0.2, sampler__noise_std=0.0,
                             sampler__n_steps=1)
    sampler = build_sampler(cfg)
    assert sampler.grad_clip == 0.5 and build_sampler(tiny_digits_config(tmp_path)).grad_clip is None
    slope = torch.tensor([3.0, -0.1, -2.0])
    energy = lambda x, y=None: (x * slope).sum(1)  # noqa: E731  dE/dx = slope
    x0 = torch.zeros(4, 3)
    got = sampler.run(energy, x0.clone())
    # by hand: x - alpha * clamp(dE/dx, -c, c)
    assert torch.allclose(got, x0 - 0.2 * slope.clamp(-0.5, 0.5).expand(4, 3), atol=1e-7)
    unclipped = SGLD(1, 0.2, 0.0).run(energy, x0.clone())
    assert torch.allclose(unclipped, x0 - 0.2 * slope.expand(4, 3), atol=1e-7)


def clf_step_setup(tmp_path, **overrides):
    cfg = tiny_digits_config(tmp_path, loss__clf_only=True, optim__optimizer="sgd", optim__lr=0.1,
                             optim__momentum=0.9, **overrides)
    torch.manual_seed(0)
    model = JEM(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    return cfg, model, build_optimizer(cfg, model)


def sam_by_hand(model, batches, rho, adaptive, lr=0.1, momentum=0.9):
    """Two SAM steps written out: e from the gradient at w, gradient again at w + e, SGD with momentum."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    bufs = [None] * len(params)
    net = lambda x: x.flatten(1) @ params[0].T + params[1]  # noqa: E731  (the model above)
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g)))
            e = [rho * p * p * gi / norm for p, gi in zip(params, g)]
        else:
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
            e = [rho * gi / norm for gi in g]
        with torch.no_grad():
            for p, ei in zip(params, e):
                p += ei
        g2 = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for i, (p, ei) in enumerate(zip(params, e)):
                p -= ei
                bufs[i] = g2[i].clone() if bufs[i] is None else momentum * bufs[i] + g2[i]
                p -= lr * bufs[i]
    return params


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_sam_steps_match_the_hand_written_update(tmp_path, adaptive):
    cfg, model, opt = clf_step_setup(tmp_path, optim__sam_rho=0.5, optim__sam_adaptive=adaptive)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(2)]
    expected = sam_by_hand(model, batches, 0.5, adaptive)
    for x, y in batches:
        out = train_step(cfg, model, opt, None, None, x, y, 10)
    for p, q in zip(model.parameters(), expected):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    # a plain step (rho 0) moves the weights elsewhere: the comparison above can tell SAM apart
    cfg0, model0, opt0 = clf_step_setup(tmp_path)
    for x, y in batches:
        train_step(cfg0, model0, opt0, None, None, x, y, 10)
    assert not torch.allclose(model0.classifier[1].weight, model.classifier[1].weight, atol=1e-4)
    # the metrics are the current weights' (the first pass): the loss of step 2 at the weights after step 1
    w1 = sam_by_hand(_fresh_twin(tmp_path), batches[:1], 0.5, adaptive)
    assert out.metrics["loss_ce"].item() == pytest.approx(
        F.cross_entropy(batches[1][0].flatten(1) @ w1[0].T + w1[1], batches[1][1]).item(), rel=1e-5)


def _fresh_twin(tmp_path):
    return clf_step_setup(tmp_path)[1]  # the same seeded initial weights


def test_sam_leaves_batch_norm_statistics_to_the_first_pass(tmp_path):
    cfg, _, _ = clf_step_setup(tmp_path, optim__sam_rho=0.5)
    torch.manual_seed(0)
    model = JEM(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)))
    twin = JEM(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    train_step(cfg, model, build_optimizer(cfg, model), None, None, x, y, 10)
    twin.train()
    twin(x)  # one forward at the same weights: the running statistics SAM must leave
    bn, bn_twin = model.classifier[2], twin.classifier[2]
    assert torch.allclose(bn.running_mean, bn_twin.running_mean) and torch.allclose(bn.running_var, bn_twin.running_var)
    assert bn.momentum == 0.1  # restored


def tiny_cifar_config(tmp_path, out, **overrides):
    """A CIFAR-10-format tree written by the test (flips and crops on), a small CNN."""
    root = tmp_path / "cifar"
    if not root.exists():
        write_cifar(root, "cifar10", 200, 40)
    cfg = Config()
    cfg.data.dataset = "cifar10"
    base = {"data.data_dir": str(root), "data.n_valid": 40, "data.num_workers": 0, "model.name": "cnn",
            "model.hidden": 8, "optim.epochs": 1, "optim.batch_size": 16, "optim.lr": 1e-3, "optim.warmup_iters": 5,
            "sampler.buffer_size": 64, "sampler.n_steps": 3, "run.out": str(out), "run.progress": False,
            "run.log_every": 5, "run.sample_every": 1000}
    base.update({key.replace("__", "."): value for key, value in overrides.items()})
    return apply_preset(cfg).with_overrides(base)


def test_px_augment_false_feeds_the_p_x_term_the_same_images_unaugmented(tmp_path, monkeypatch):
    seen = []
    import jemfast.train as train_module

    real_step = train_module.train_step

    def spy(cfg, model, optimizer, sampler, buffer, x, y, n_classes, x_px=None, loss_model=None):
        seen.append((x.clone(), None if x_px is None else x_px.clone()))
        return real_step(cfg, model, optimizer, sampler, buffer, x, y, n_classes, x_px=x_px, loss_model=loss_model)

    monkeypatch.setattr(train_module, "train_step", spy)
    for px_augment in (True, False):
        seen.clear()
        cfg = tiny_cifar_config(tmp_path, tmp_path / f"run-{px_augment}", loss__px_augment=px_augment,
                                data__noise_std=0.0)
        trainer = Trainer(cfg)
        stop_after(trainer, 3)
        trainer.run()
        data = trainer.data
        order = list(data.train.batches(cfg.optim.batch_size, trainer.progress.seed * 100_003, 0, drop_last=True))
        for (x, x_px), (raw, _) in zip(seen, order):
            if px_augment:
                assert x_px is None  # one augmented batch serves both terms
            else:
                assert torch.equal(x_px, raw)  # un-augmented, no other change (noise 0 here)
        assert any(not torch.equal(x, raw) for (x, _), (raw, _) in zip(seen, order))  # the CE batch is augmented


def test_mid_epoch_resume_is_bit_exact_with_every_remedy_on(tmp_path):
    remedies = {"loss__energy_l2": 0.1, "sampler__grad_clip": 0.5, "optim__sam_rho": 0.05,
                "optim__sam_adaptive": True, "loss__px_augment": False}
    train(tiny_cifar_config(tmp_path, tmp_path / "a", **remedies))
    trainer = Trainer(tiny_cifar_config(tmp_path, tmp_path / "b", **remedies))
    stop_after(trainer, 5)
    assert trainer.run()["status"] == "interrupted"
    train(tiny_cifar_config(tmp_path, tmp_path / "b", run__resume=True, **remedies))
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 160 // 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    assert a["config"]["optim"]["sam_rho"] == 0.05 and a["config"]["loss"]["px_augment"] is False


def test_remedies_are_off_by_default():
    cfg = apply_preset(Config())
    assert (cfg.loss.energy_l2, cfg.sampler.grad_clip, cfg.optim.sam_rho, cfg.optim.sam_adaptive,
            cfg.loss.px_augment) == (0.0, 0.0, 0.0, False, True)

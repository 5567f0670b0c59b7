"""The stability remedies as options (--energy-l2, --sgld-grad-clip, --sam-rho/--sam-adaptive,
--px-augment): each against a small hand-written reference, and exact resume with all of them on."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jemfast import SGLD, jem_loss
from jemfast.build import build_optimizer, build_sampler
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


def test_sams_second_pass_keeps_real_and_sampled_images_in_separate_batches():
    # SAM's second pass runs inside batch_norm_statistics_frozen; it must still give batch norm
    # one batch per part (measured: in one mixed batch, sadajem on digits32 trained to 40 % train
    # accuracy at 10 % validation, the network fitted to statistics eval mode never sees)
    from jemfast.energy import energy_from_logits
    from jemfast.modes import batch_norm_statistics_frozen
    from jemfast.step import loss_terms

    torch.manual_seed(0)
    model = JEM(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    x_fake = 4.0 + 3.0 * torch.randn(8, 1, 8, 8)  # far from the real batch: mixing would show
    bn = model.classifier[2]
    with batch_norm_statistics_frozen(model):
        expected = energy_from_logits(model(x)).mean()  # the real batch alone, batch statistics
        frozen_stats = (bn.running_mean.clone(), bn.running_var.clone())
        got = loss_terms(model, x, x_fake, y, 1.0, 1.0, "fp32")
        assert bn.track_running_stats is False  # the nested freeze left the outer one in force
    assert torch.allclose(got["e_real"], expected, atol=1e-6)
    assert torch.equal(bn.running_mean, frozen_stats[0]) and torch.equal(bn.running_var, frozen_stats[1])
    assert bn.track_running_stats is True


def tiny_cifar_config(tmp_path, out, **overrides):
    """A CIFAR-10-format tree written by the test (flips and crops on), a small CNN, one torch
    thread: with two, the CPU's 3x32x32 convolutions reduce in an order that depends on the load
    (measured: a mid-epoch resume differed bit-wise beside a CPU hog in 5 of 15 tries, with or
    without any remedy; with one thread, never)."""
    root = tmp_path / "cifar"
    if not root.exists():
        write_cifar(root, "cifar10", 200, 40)
    cfg = Config()
    cfg.data.dataset = "cifar10"
    base = {"data.data_dir": str(root), "data.n_valid": 40, "data.num_workers": 0, "model.name": "cnn",
            "model.hidden": 8, "optim.epochs": 1, "optim.batch_size": 16, "optim.lr": 1e-3, "optim.warmup_iters": 5,
            "sampler.buffer_size": 64, "sampler.n_steps": 3, "run.out": str(out), "run.progress": False,
            "run.log_every": 5, "run.sample_every": 1000, "run.threads": 1}
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


# ---- the recovery policy's use of the remedies (jemfast.stability.recovery) ----------------------------
def test_a_gradual_collapse_gets_one_remedy_at_a_time_in_the_order_the_diagnosis_calls_for():
    from jemfast.stability.recovery import RecoveryState, candidate_remedies, recovery_action

    cfg = apply_preset(Config())
    assert candidate_remedies(cfg, chains_lagging=True, augments=True) == [
        {"loss.px_augment": False}, {"loss.energy_l2": 0.1}]
    assert candidate_remedies(cfg, chains_lagging=True, augments=False) == [{"loss.energy_l2": 0.1}]
    assert candidate_remedies(cfg, chains_lagging=False, augments=True) == [{"loss.energy_l2": 0.1}]
    rec = RecoveryState()
    for k, expected in enumerate([{"loss.px_augment": False}, {"loss.energy_l2": 0.1}], start=1):
        action = rec.next_action(7, gradual=True, chains_lagging=True,
                                 remedies=candidate_remedies(rec.effective(cfg), True, True))
        # a remedy alone: new seed, lr warm-up again, lr and the chains' settings unchanged
        assert action.overrides == expected and action.rewarm and action.lr_factor == 1.0
        assert (action.sgld_steps_factor, action.sgld_step_size_factor, action.reset_buffer) == (1, 1.0, False)
        rec.apply(action)
        rec.restarts.append({})
    assert "--px-augment false" in recovery_action(1, 7, True, True, remedies=[{"loss.px_augment": False}]).describe()
    effective = rec.effective(cfg)
    assert (effective.loss.px_augment, effective.loss.energy_l2) == (False, 0.1)
    assert (cfg.loss.px_augment, cfg.loss.energy_l2) == (True, 0.0)  # the base config is untouched
    # no remedy left: the ladder (lr halved)
    last = rec.next_action(7, gradual=True, chains_lagging=True, remedies=candidate_remedies(effective, True, True))
    assert last.overrides == {} and last.lr_factor == 0.5
    # the informative init still comes first where it can
    assert rec.next_action(7, True, True, can_inform=True, remedies=[{"loss.energy_l2": 0.1}]).informative_init
    again = RecoveryState()
    again.load_state_dict(rec.state_dict())
    assert again.overrides == {"loss.px_augment": False, "loss.energy_l2": 0.1}  # kept in checkpoints
    # a sudden blow-up is not a collapse of the chains: no remedy, the seed/lr ladder
    assert recovery_action(1, 7, remedies=[{"loss.energy_l2": 0.1}]).overrides == {}


def test_a_restart_for_lagging_chains_on_augmented_data_takes_augmentation_out_of_p_x_and_resume_keeps_it(
        tmp_path, monkeypatch):
    import json

    import jemfast.train as train_module
    from jemfast.stability.monitor import DivergenceMonitor

    # a collapse diagnosed as gradual with lagging chains (the injection only makes it happen on cue)
    monkeypatch.setattr(DivergenceMonitor, "gradual", lambda self, onset: True)
    monkeypatch.setattr(DivergenceMonitor, "chains_lagging", lambda self, onset=-1: True)
    seen = []
    real_step = train_module.train_step

    def spy(cfg, *args, x_px=None, **kw):
        seen.append((cfg.loss.px_augment, x_px is not None))
        return real_step(cfg, *args, x_px=x_px, **kw)

    monkeypatch.setattr(train_module, "train_step", spy)
    cfg = tiny_cifar_config(tmp_path, tmp_path / "run", sampler__init_dist="informative", optim__epochs=2,
                            stability__inject_divergence=6, stability__check_every=2, stability__max_loss=100.0)
    summary = train(cfg)
    assert summary["status"] == "finished" and len(summary["restarts"]) == 1
    assert "--px-augment false" in summary["restarts"][0]["action"]
    assert summary["remedies"] == {"loss.px_augment": False}
    assert summary["config"]["loss"]["px_augment"] is True  # the config as given; the remedy on top
    assert seen[0] == (True, False) and seen[-1] == (False, True)  # after the restart: a separate p(x) batch
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["overrides"] for e in events if e.get("event") == "restart"] == [{"loss.px_augment": False}]
    # resumed (two more epochs), the remedy stays in effect
    seen.clear()
    train(tiny_cifar_config(tmp_path, tmp_path / "run", sampler__init_dist="informative", optim__epochs=3,
                            run__resume=True))
    assert seen and all(s == (False, True) for s in seen)

"""jemfast.Guard runs jemfast.train's recovery policy: the informative-init switch (from a reservoir
of the labelled batches the loop hands it) and the config remedies the loop has hooks for.

The loop is the original code's, after the swap line (jemfast.compat's ``sample_q`` and a plain
tensor buffer), on the bundled digits. The energies the guard sees are the loop's own, except in
the windows where the test scripts a natural collapse (the energy gap running away below zero
by x2.5 per check interval for two intervals: the chains lagging, as measured on digits32), so
the policy's every branch is reached on schedule.
"""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jemfast
import jemfast.compat
from jemfast.stability.recovery import candidate_remedies

BATCH, CHECK = 16, 5


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1, torch.tensor(d.target)


class CCF(nn.Module):
    """The original's class-conditional JEM around a small CNN: f(x) = logsumexp of the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU(),
                                 nn.Flatten(), nn.Linear(16 * 16, 10))

    def classify(self, x):
        return self.net(x)

    def forward(self, x, y=None):
        logits = self.net(x)
        return logits.logsumexp(1) if y is None else logits.gather(1, y[:, None])


def collapse(it: int, windows) -> float | None:
    """The scripted gap E(real) - E(fake) at loop iteration ``it`` inside a collapse window, else None."""
    for start in windows:
        if start <= it < start + 2 * CHECK:
            return -0.5 * 2.5 ** ((it - start) // CHECK + 1)
    return None


class Loop:
    """The original-style loop with the README's guard lines; ``run(n)`` trains n more iterations."""

    def __init__(self, windows=(), data=True, penalty=False, augment_hook=False, buffer="tensor", **guard_kw):
        torch.manual_seed(0)
        self.x, self.y = digits()
        self.args = Namespace(n_steps=2, sgld_lr=1.0, sgld_std=0.01, reinit_freq=0.05, batch_size=BATCH,
                              n_classes=10, uncond=False, n_ch=1, im_sz=8)
        self.sample_q = jemfast.compat.get_sample_q(self.args, "cpu")
        self.f = CCF()
        self.opt = torch.optim.Adam(self.f.parameters(), lr=1e-3)
        self.buffer = (torch.FloatTensor(200, 1, 8, 8).uniform_(-1, 1) if buffer == "tensor"
                       else jemfast.ReplayBuffer(200, (1, 8, 8), n_classes=10))
        self.guard = jemfast.Guard(self.f, self.opt, self.buffer, sampler=self.sample_q, check_every=CHECK,
                                   seed=0, **guard_kw)
        self.windows, self.data, self.penalty, self.augment_hook = windows, data, penalty, augment_hook
        self.it, self.seen_px_augment, self.lrs = 0, [], []

    def fake_batch(self) -> torch.Tensor:
        if isinstance(self.buffer, torch.Tensor):
            return self.sample_q(self.f, self.buffer)
        x0, idx = self.buffer.sample(BATCH)
        return jemfast.SGLD(n_steps=2).run(jemfast.LogDensity(self.f.net), x0)

    def run(self, n: int) -> "Loop":
        for _ in range(n):
            i = torch.randint(0, len(self.x), (BATCH,))
            x_lab, y_lab = self.x[i], self.y[i]
            if self.augment_hook:
                self.seen_px_augment.append(self.guard.px_augment)
            x_q = self.fake_batch()
            fp_all, fq_all = self.f(x_lab), self.f(x_q)
            fp, fq = fp_all.mean(), fq_all.mean()
            L = F.cross_entropy(self.f.classify(x_lab), y_lab) - (fp - fq)
            if self.penalty:
                L = L + self.guard.energy_penalty(fp_all, fq_all)
            self.opt.zero_grad()
            L.backward()
            self.lrs.append(self.opt.param_groups[0]["lr"])
            self.opt.step()
            gap = collapse(self.it, self.windows)
            e_real, e_fake = (-fp, -fq) if gap is None else (torch.tensor(0.0), torch.tensor(-gap))
            data = {"x": x_lab, "y": y_lab} if self.data else {}
            self.it += 1
            self.guard.step(L, e_real=e_real, e_fake=e_fake, x_fake=x_q, **data)
        return self


def class_of_nearest_mean(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    return torch.cdist(rows.flatten(1), means).argmin(1)


def test_a_lagging_collapse_switches_the_swapped_sampler_and_the_tensor_buffer_to_the_informative_init():
    loop = Loop(windows=(20,))
    before = loop.buffer.clone()
    ptr = loop.buffer.data_ptr()
    loop.run(20 + 3 * CHECK)
    (event,) = loop.guard.restarts
    assert "fresh chains from the informative init" in event["action"] and "lr x" not in event["action"]
    assert loop.guard.init_fn is not None and loop.sample_q.init_fn is not None
    buf = loop.buffer
    assert buf.data_ptr() == ptr and not torch.equal(buf, before)  # re-initialised in place
    # row i of 200 is class i // 20 (the original's class-conditional layout), drawn near that class's images
    rows_class = torch.arange(200) // 20
    assert (class_of_nearest_mean(buf, loop.x, loop.y) == rows_class).float().mean() > 0.9
    fresh = loop.sample_q.init_fn(loop.args, 500)  # the swapped sampler's fresh chains: digits-like, not U(-1, 1)
    assert fresh.shape == (500, 1, 8, 8) and fresh.min() >= -1 and fresh.max() <= 1
    assert abs(fresh.mean() - loop.x.mean()) < 0.05 and abs(fresh.mean()) > 0.3
    assert loop.guard.reservoir.nbytes == 10 * (500 + 1) * 64 * 4  # the default bound, allocated once
    frozen = loop.guard.reservoir.seen.clone()
    loop.run(5)
    assert torch.equal(loop.guard.reservoir.seen, frozen)  # frozen at the switch


def test_the_remedies_follow_the_policy_in_order_where_the_loop_has_hooks():
    loop = Loop(windows=(20, 60, 100), penalty=True, augment_hook=True).run(20 + 3 * CHECK)
    assert float(loop.guard.energy_penalty(torch.ones(3), torch.ones(3))) == 0.0
    loop.run(60 + 3 * CHECK - loop.it)
    assert [e["overrides"] for e in loop.guard.restarts] == [{}, {"loss.px_augment": False}]
    assert loop.seen_px_augment[-1] is False and loop.seen_px_augment[0] is True
    loop.run(100 + 3 * CHECK - loop.it)
    assert loop.guard.restarts[-1]["overrides"] == {"loss.energy_l2": 0.1}
    e_real, e_fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0])
    assert float(loop.guard.energy_penalty(e_real, e_fake)) == pytest.approx(0.1 * (5.0 + 4.0))
    assert all("lr x" not in e["action"] for e in loop.guard.restarts)  # no lr ladder while remedies remain


def test_a_gradual_collapse_starts_the_lr_warm_up_again_when_told_its_length():
    loop = Loop(windows=(20,), warmup_iters=10).run(20 + 2 * CHECK + 15)
    (event,) = loop.guard.restarts
    assert "lr warm-up again" in event["action"]
    after = loop.lrs[-15:]  # the 15 iterations after the restart at iteration 30
    assert after == pytest.approx([1e-3 * min(1.0, (k + 1) / 10) for k in range(15)])
    assert loop.guard.lr_scale == 1.0
    assert "lr warm-up again" not in Loop(windows=(20,)).run(30).guard.restarts[0]["action"]  # warmup_iters=0


def test_a_restart_during_the_warm_up_does_not_compound_it():
    loop = Loop(windows=(20, 35), warmup_iters=30).run(45 + 5)
    assert len(loop.guard.restarts) == 2 and "lr x0.5" in loop.guard.restarts[1]["action"]
    assert loop.lrs[-5:] == pytest.approx([0.5e-3 * (k + 1) / 30 for k in range(5)])


def test_without_data_or_hooks_the_guard_falls_back_to_the_lr_ladder():
    loop = Loop(windows=(20,), data=False).run(20 + 3 * CHECK)
    (event,) = loop.guard.restarts
    assert "lr x0.5" in event["action"] and "informative" not in event["action"] and event["overrides"] == {}
    assert loop.guard.init_fn is None and loop.sample_q.init_fn is None and loop.guard.reservoir is None


def test_a_dataset_handed_over_once_is_enough():
    loop = Loop(windows=(20,), data=False, reservoir_per_class=50)
    loop.guard.add_data(loop.x, loop.y)  # all 1,797 digits at once
    assert loop.guard.reservoir.seen.sum() == len(loop.y) and loop.guard.reservoir.nbytes == 10 * 51 * 64 * 4
    loop.run(20 + 2 * CHECK)
    assert "informative init" in loop.guard.restarts[0]["action"]


def test_a_replay_buffer_gets_the_informative_init_as_its_init_fn():
    loop = Loop(windows=(20,), buffer="replay").run(20 + 3 * CHECK)
    assert loop.guard.restarts and loop.buffer.init_fn is loop.guard.init_fn
    rows = loop.buffer.state_dict()["data"]
    assert (class_of_nearest_mean(rows, loop.x, loop.y) == torch.arange(200) // 20).float().mean() > 0.9


def test_a_resume_through_state_dict_continues_exactly(tmp_path):
    """Saved at a healthy check before the switch (the reservoir still filling), restored into new
    objects: the switch, the remedies and every weight and buffer row as in the uninterrupted run."""
    kw = {"windows": (30, 70), "penalty": True, "reservoir_per_class": 40}
    whole = Loop(**kw).run(100)
    part = Loop(**kw).run(30)  # the check just before the first collapse: its detection needs the history
    torch.save({"model": part.f.state_dict(), "opt": part.opt.state_dict(), "buffer": part.buffer,
                "guard": part.guard.state_dict(), "rng": torch.get_rng_state(), "it": part.it}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    again = Loop(**kw)  # a new process: fresh objects, then the user's checkpoint loaded
    again.f.load_state_dict(saved["model"])
    again.opt.load_state_dict(saved["opt"])
    again.buffer.copy_(saved["buffer"])
    again.guard.load_state_dict(saved["guard"])
    torch.set_rng_state(saved["rng"])
    again.it = saved["it"]
    again.run(70)
    assert [e["action"] for e in again.guard.restarts] == [e["action"] for e in whole.guard.restarts]
    assert len(whole.guard.restarts) == 2 and whole.guard.restarts[1]["overrides"] == {"loss.energy_l2": 0.1}
    assert all(torch.equal(v, whole.f.state_dict()[k]) for k, v in again.f.state_dict().items())
    assert torch.equal(again.buffer, whole.buffer)
    assert torch.equal(again.guard.reservoir.images, whole.guard.reservoir.images)


def test_candidate_remedies_keep_only_what_the_loop_can_apply():
    cfg = jemfast.Config()
    both = candidate_remedies(cfg, True, True)
    assert both == [{"loss.px_augment": False}, {"loss.energy_l2": 0.1}]
    assert candidate_remedies(cfg, True, True, {"loss.energy_l2"}) == [{"loss.energy_l2": 0.1}]
    assert candidate_remedies(cfg, True, True, set()) == []


def test_labelled_batches_need_the_number_of_classes():
    model = nn.Linear(4, 3)
    guard = jemfast.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="number of classes"):
        guard.step(torch.tensor(1.0), x=torch.zeros(2, 4), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reservoir_per_class must be an integer >= 2"):
        jemfast.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), reservoir_per_class=1)
    for bad in ({"logits": torch.zeros(2, 3), "y": torch.tensor([0, 1])}, {"acc": 0.5}):
        with pytest.raises(ValueError, match="a train accuracy needs n_classes"):
            guard.step(torch.tensor(1.0), **bad)
    with pytest.raises(ValueError, match="logits need the labels y"):
        jemfast.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), n_classes=3).step(
            torch.tensor(1.0), logits=torch.zeros(2, 3))


# A late collapse of the classifier as late-lr measured it (tests/test_collapse.py): 10-iteration
# intervals of (E(real) - E(fake), grad norm, train accuracy); the gap stays calm while the
# accuracy falls from 67 % (the interval ending at 70) to chance.
LATE = [(0.1, 2, 0.14), (0.09, 9, 0.24), (0.08, 6, 0.32), (0.1, 6, 0.45), (0.19, 7, 0.53), (0.18, 7.8, 0.6),
        (0.3, 4.5, 0.67), (0.28, 15, 0.37), (0.28, 17, 0.25), (0.24, 33, 0.09), (0.3, 60, 0.05)]


def logits_with_accuracy(acc: float, n: int = 200, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot logits ``[n, c]`` and labels ``[n]``: the first ``acc * n`` right, the rest wrong."""
    y = torch.arange(n) % c
    pred = torch.where(torch.arange(n) < round(acc * n), y, (y + 1) % c)
    return F.one_hot(pred, c).float(), y


@pytest.mark.parametrize("given", ["logits", "acc", "nothing"])
def test_the_classifiers_accuracy_lets_the_guard_see_and_treat_a_late_collapse(given):
    torch.manual_seed(0)
    model = nn.Linear(4, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = jemfast.Guard(model, opt, n_classes=10, check_every=10, seed=7)
    rolled_back = []
    for gap, grad_norm, acc in LATE:
        for _ in range(10):
            logits, y = logits_with_accuracy(acc)
            seen = {"logits": {"logits": logits, "y": y}, "acc": {"acc": torch.tensor(acc)}, "nothing": {}}[given]
            rolled_back.append(guard.step(torch.tensor(1.0), e_real=torch.tensor(gap), e_fake=torch.tensor(0.0),
                                          grad_norm=grad_norm, **seen))
    if given == "nothing":  # the energies and gradients alone never flag it: the run goes on at chance
        assert not any(rolled_back) and guard.restarts == [] and opt.param_groups[0]["lr"] == 1e-2
        return
    event = guard.restarts[0]
    assert rolled_back.index(True) == 109 and event["cause"] == "train accuracy fell to chance"
    assert (event["onset"], event["diagnosis"], event["overrides"]) == (70, "classifier collapsed", {})
    assert event["rolled_back_to"] <= 70 and opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved = guard.state_dict()  # the accuracy rules survive a resume: n_classes with the monitor
    again = jemfast.Guard(model, opt, check_every=10, seed=7)
    again.load_state_dict(saved)
    assert again.monitor.n_classes == 10 and again.monitor.series == guard.monitor.series

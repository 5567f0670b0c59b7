"""jemfast.Guard: divergence detection and rollback inside a user's own training loop.

The loop below is written like the original JEM code (train_wrn_ebm.py): a classifier whose
logsumexp is log p(x), a plain CPU tensor as replay buffer, a hand-written SGLD ``sample_q``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jemfast
from jemfast.process.errors import DivergenceExhausted
from jemfast.stability.inject import inject_divergence
from jemfast.stability.recovery import recovery_action

BATCH, STEPS, CHECK = 32, 5, 5


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1, torch.tensor(d.target)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 2, 1),
                         nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def sample_q(f: nn.Module, replay_buffer: torch.Tensor, n_steps: int) -> torch.Tensor:
    """PCD as the original code does it: draw, re-init 5 %, SGLD on log p(x), write back in place."""
    inds = torch.randint(0, replay_buffer.size(0), (BATCH,))
    buffer_samples = replay_buffer[inds]
    choose_random = (torch.rand(BATCH) < 0.05).float()[:, None, None, None]
    x_k = choose_random * torch.empty_like(buffer_samples).uniform_(-1, 1) + (1 - choose_random) * buffer_samples
    x_k.requires_grad_(True)
    f.eval()
    for _ in range(n_steps):
        f_prime = torch.autograd.grad(f(x_k).logsumexp(1).sum(), [x_k])[0]
        x_k.data += 1.0 * f_prime + 0.01 * torch.randn_like(x_k)
    f.train()
    replay_buffer[inds] = x_k.detach().cpu()
    return x_k.detach()


def snapshot(f, opt, replay_buffer):
    return copy.deepcopy(f.state_dict()), copy.deepcopy(opt.state_dict()["state"]), replay_buffer.clone()


def assert_state(f, opt, replay_buffer, good):
    model, opt_state, buf = good
    assert all(torch.equal(v, model[k]) for k, v in f.state_dict().items())
    live = opt.state_dict()["state"]
    assert live.keys() == opt_state.keys()
    assert all(torch.equal(v, opt_state[i][k]) for i in live for k, v in live[i].items())
    assert torch.equal(replay_buffer, buf)


def user_loop(n_iters, inject_at=(), on_rollback=None, guard_hook=None, **guard_kw):
    """The user's own loop with the guard's three lines; returns (model, guard, losses, accuracy)."""
    torch.manual_seed(0)
    x, y = digits()
    f = small_cnn()
    opt = torch.optim.Adam(f.parameters(), lr=1e-3)
    replay_buffer = torch.FloatTensor(200, 1, 8, 8).uniform_(-1, 1)
    guard = jemfast.Guard(f, opt, replay_buffer, check_every=CHECK, seed=0, **guard_kw)
    if guard_hook:
        guard_hook(guard)
    goods, losses = {0: snapshot(f, opt, replay_buffer)}, []  # the state of every check, by iteration
    for it in range(n_iters):
        if it in inject_at:
            inject_divergence(f)
        idx = torch.randint(0, len(x), (BATCH,))
        x_q = sample_q(f, replay_buffer, STEPS * guard.sgld_steps_factor)
        logits_real, logits_fake = f(torch.cat([x[idx], x_q])).split(BATCH)
        fp, fq = logits_real.logsumexp(1).mean(), logits_fake.logsumexp(1).mean()
        loss = F.cross_entropy(logits_real, y[idx]) - (fp - fq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_before, ptr = opt.param_groups[0]["lr"], replay_buffer.data_ptr()
        if guard.step(loss, e_real=-fp, e_fake=-fq, x_fake=x_q):
            if on_rollback:
                on_rollback(f, opt, replay_buffer, goods[guard.restarts[-1]["rolled_back_to"]], lr_before, ptr, guard)
            continue
        losses.append(loss.detach())
        if guard.iteration % CHECK == 0:
            goods[guard.iteration] = snapshot(f, opt, replay_buffer)
    with torch.no_grad():
        acc = (f(x).argmax(1) == y).float().mean().item()
    return f, guard, losses, acc


def test_injected_divergence_rolls_back_bit_exactly_and_training_continues():
    seen = []

    def on_rollback(f, opt, replay_buffer, good, lr_before, ptr, guard):
        assert_state(f, opt, replay_buffer, good)  # the state of the check rolled back to, bit for bit
        assert guard.buffer is replay_buffer and replay_buffer.data_ptr() == ptr  # restored in place
        k = len(guard.restarts)
        assert opt.param_groups[0]["lr"] == lr_before * recovery_action(k, 0).lr_factor
        assert torch.initial_seed() == recovery_action(k, 0).new_seed
        seen.append(k)

    # the guard's own testing aid blows the model up after step 23, the library function before 48
    f, guard, losses, acc = user_loop(80, inject_at=(48,), on_rollback=on_rollback, inject_divergence=23)
    assert seen == [1, 2]
    # the first blow-up is sudden: back to the last check before it; each rollback lands on the
    # divergence's onset (the second's may be a check earlier, where a gap that had been doubling began)
    assert [(e["restart"], e["step"], e["rolled_back_to"]) for e in guard.restarts][0] == (1, 25, 20)
    assert guard.restarts[1]["step"] == 50 and guard.restarts[1]["rolled_back_to"] in (40, 45)
    assert all(e["rolled_back_to"] == e["onset"] for e in guard.restarts)
    # both blow-ups are sudden (x1e4 in one interval): the paper's ladder, a new seed first
    assert [e["action"] for e in guard.restarts] == [recovery_action(k, 0).describe() for k in (1, 2)]
    assert guard.lr_scale == recovery_action(1, 0).lr_factor * recovery_action(2, 0).lr_factor
    assert guard.restarts[0]["event"] == "restart"
    assert all(torch.isfinite(p).all() for p in f.parameters())
    assert all(torch.isfinite(v) and abs(v) < 10 for v in losses[-10:])
    calm_acc = user_loop(80)[3]  # measured: 0.84 calm, 0.88 with the two rollbacks
    assert acc > 0.75 and abs(acc - calm_acc) < 0.1, (acc, calm_acc)


def test_no_divergence_no_rollback_and_no_host_sync_between_checks(monkeypatch):
    syncs = {"n": 0, "counting": False}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            syncs["n"] += syncs["counting"]
            return real(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def hook(guard):
        real_step = guard.step

        def step(*args, **kwargs):
            syncs["counting"] = True
            try:
                return real_step(*args, **kwargs)
            finally:
                syncs["counting"] = False
        guard.step = step

    f, guard, losses, _ = user_loop(60, guard_hook=hook)
    assert guard.restarts == [] and len(losses) == 60
    assert syncs["n"] == 60 // CHECK  # one read of the flags per check, nothing else


def synthetic(buffer_kind="tensor", **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    buffer = {"tensor": torch.zeros(6, 4), "replay": jemfast.ReplayBuffer(6, (4,)), "none": None}[buffer_kind]
    sampler = jemfast.SGLD(n_steps=5)
    guard = jemfast.Guard(model, opt, buffer, sampler, check_every=1, seed=7, **kw)
    return model, opt, buffer, sampler, guard


def train_once(model, opt, value=None):
    """One real optimizer step (moves the weights and Adam's state), or set the weights to ``value``."""
    loss = model(torch.ones(2, 4)).square().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if value is not None:
        with torch.no_grad():
            model[0].weight.fill_(value)
    return loss.detach()


@pytest.mark.parametrize("buffer_kind", ["tensor", "replay", "none"])
def test_policy_is_the_trainers_and_exhaustion_raises(buffer_kind):
    model, opt, buffer, sampler, guard = synthetic(buffer_kind, max_restarts=4)
    data = buffer if buffer_kind == "tensor" else getattr(buffer, "data", None)
    ptr = data.data_ptr() if buffer is not None else None
    for k in range(1, 5):
        if buffer is not None:
            data.fill_(k)  # in place: the buffer of the good state below
        assert guard.step(train_once(model, opt)) is False
        lr = opt.param_groups[0]["lr"]
        if buffer is not None:
            data.fill_(99.0)  # what the diverging stretch wrote
        assert guard.step(torch.tensor(float("nan")), e_real=torch.zeros(3)) is True
        action = recovery_action(k, 7)
        assert guard.restarts[-1]["action"] == action.describe()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * action.lr_factor)
        assert sampler.n_steps == (10 if k >= 3 else 5)
        if buffer_kind == "replay":
            data = buffer.data  # a ReplayBuffer may hold a new tensor after a restore
        if buffer is not None and k < 4:
            assert torch.equal(data, torch.full_like(data, k))  # restored
        elif buffer is not None:  # restart 4 re-initialises it to U(-1, 1)
            assert data.abs().amax() <= 1 and data.unique().numel() > 10
    if buffer_kind == "tensor":
        assert buffer.data_ptr() == ptr  # the user's tensor, restored and re-initialised in place
    guard.step(train_once(model, opt, value=0.25))
    good = copy.deepcopy(model.state_dict())
    train_once(model, opt)
    with pytest.raises(DivergenceExhausted, match="after 4 restart"):
        guard.step(float("inf"))
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())  # left at the last good state


@pytest.mark.parametrize("with_out", [True, False])
def test_recurring_divergence_goes_further_back_in_the_on_disk_ring(tmp_path, with_out, caplog):
    out = tmp_path / "guard" if with_out else None
    model, opt, _, _, guard = synthetic(out=out, good_ring=3, max_restarts=10)
    nan = torch.tensor(float("nan"))
    # good states at iterations 1, 2, 3 (0 leaves the ring of 3); falling weights, so the gradient
    # norm does not grow and each NaN dates its divergence to the last check
    with torch.no_grad():
        model[0].weight.fill_(4.0)
    for value in (3.0, 2.0, 1.0):
        guard.step(train_once(model, opt, value))
    if with_out:
        assert sorted(p.name for p in out.glob("guard-*.pt")) == [f"guard-00000000{i}.pt" for i in (1, 2, 3)]
    adam_good = copy.deepcopy(opt.state_dict()["state"])
    back = []
    for _ in range(3):  # each divergence comes back before a new good state
        train_once(model, opt)  # the diverging stretch moves the weights and Adam's state on
        guard.step(nan)
        back.append((guard.restarts[-1]["rolled_back_to"], model[0].weight[0, 0].item()))
        if len(back) == 1:  # the first rollback left the in-memory state unaliased
            live = opt.state_dict()["state"]
            assert all(torch.equal(v, adam_good[i][k]) for i in live for k, v in live[i].items())
    assert back == [(3, 1.0), (2, 2.0), (1, 3.0)]  # the in-memory ring (and the files) hold each
    if not with_out:
        return
    assert sorted(p.name for p in out.glob("guard-*.pt")) == ["guard-000000001.pt"]  # the abandoned ones go
    guard.step(train_once(model, opt, 0.7))
    guard.step(train_once(model, opt, 0.6))  # the ring: 8, 7, 1
    (out / "guard-000000007.pt").write_bytes(b"torn")
    guard.recovery.memory = []  # as in a new process: only the files are left
    guard.mark_good()  # iteration 8 again, in memory
    guard.step(nan)
    guard.step(nan)
    assert [e["rolled_back_to"] for e in guard.restarts[-2:]] == [8, 1]  # 7 is unreadable: one further
    assert model[0].weight[0, 0].item() == 3.0 and "rolling back further" in caplog.text


def test_state_dict_continues_the_policy_in_a_new_process(tmp_path):
    model, opt, buffer, sampler, guard = synthetic()
    for _ in range(3):  # restarts 1-3: lr x0.5, SGLD steps x2
        guard.step(train_once(model, opt))
        guard.step(float("nan"))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    model2, opt2, buffer2, sampler2, guard2 = synthetic()  # a fresh process: SGLD(n_steps=5) again
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    guard2.load_state_dict(saved["guard"])
    assert (guard2.restarts, guard2.lr_scale, guard2.iteration) == (guard.restarts, 0.5, 6)
    assert sampler2.n_steps == 10 and opt2.param_groups[0]["lr"] == 0.05
    guard2.step(float("nan"))  # restart 4 follows, back to the loaded state
    assert guard2.restarts[-1]["action"] == recovery_action(4, 7).describe()
    assert guard2.restarts[-1]["rolled_back_to"] == 6 and opt2.param_groups[0]["lr"] == 0.025
    assert all(torch.equal(v, saved["model"][k]) for k, v in model2.state_dict().items())


def test_settings_are_checked_by_name():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="check_every: must be >= 1"):
        jemfast.Guard(model, opt, check_every=0)
    with pytest.raises(TypeError, match="no stability setting check_evry"):
        jemfast.Guard(model, opt, check_evry=5)
    with pytest.raises(TypeError, match="buffer must be"):
        jemfast.Guard(model, opt, [])
    cfg = jemfast.Config()
    cfg.stability.max_restarts = 1
    assert jemfast.Guard(model, opt, config=cfg, check_every=3).cfg.max_restarts == 1

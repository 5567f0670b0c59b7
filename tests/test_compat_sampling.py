"""jemfast.compat.get_sample_q against a faithful re-implementation of the original JEM sampler.

The reference is the hand-written ``sample_q`` of examples/jem_original_style.py, which restates
step by step what ``sample_q`` in wgrathwohl/JEM ``train_wrn_ebm.py`` does (buffer draw with
re-init, SGLD ascent on f, in-place write-back), random numbers in the original's order.
With the same seed, jemfast.compat must draw the same random numbers in the same order, so the
samples and the updated buffer agree to float tolerance (the update's additions associate
differently, nothing more).
"""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch import nn

import jemfast.compat as compat
from tests.compat_example import example

SHAPE = (1, 8, 8)


def make_args(**kw) -> Namespace:
    base = dict(n_steps=12, sgld_lr=1.0, sgld_std=0.01, reinit_freq=0.3, batch_size=16, n_classes=4,
                uncond=False, n_ch=1, im_sz=8, sgld_backend="reference")
    base.update(kw)
    return Namespace(**base)


class CCF(nn.Module):
    """A log-density model as the original's: forward(x, y) = logsumexp of logits or logits[y];
    batch norm makes its mode matter. Records its mode at every forward."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                               nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SiLU())
        self.class_output = nn.Linear(16, n_classes)
        self.seen_modes: list[bool] = []

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_output(self.f(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_modes.append(self.training)
        logits = self.classify(x)
        return logits.logsumexp(1) if y is None else torch.gather(logits, 1, y[:, None])


def original_sample_q(args: Namespace, f: nn.Module, buffer, y=None, n_steps=None) -> torch.Tensor:
    """The original sampler as examples/jem_original_style.py restates it (its ``get_sample_q``):
    eval mode; start rows from the buffer (or fresh U(-1, 1) when it is empty), each restarted
    with probability reinit_freq; n_steps of x += lr * df/dx + std * noise; train mode; write
    back in place. Its images are 1x8x8, this file's SHAPE."""
    sample_q = example().get_sample_q(args, torch.device("cpu"))
    return sample_q(f, buffer, y) if n_steps is None else sample_q(f, buffer, y, n_steps=n_steps)


def both(args: Namespace, buffer_rows: int, y=None, n_steps=None, seed: int = 3):
    """Run the original and compat from the same model, buffer and seed; returns
    ``(original samples, original buffer, compat samples, compat buffer, compat's buffer object)``."""
    torch.manual_seed(0)
    f = CCF(args.n_classes)
    start = torch.rand(buffer_rows, *SHAPE) * 2 - 1 if buffer_rows else []
    buf_a = start.clone() if buffer_rows else []
    buf_b = start.clone() if buffer_rows else []
    torch.manual_seed(seed)
    xa = original_sample_q(args, f, buf_a, y, n_steps)
    sample_q = compat.get_sample_q(args, "cpu")
    torch.manual_seed(seed)
    kw = {} if n_steps is None else {"n_steps": n_steps}
    xb = sample_q(f, buf_b, y, **kw)
    return xa, buf_a, xb, buf_b


@pytest.mark.parametrize("reinit", [0.0, 0.3, 1.0])
def test_unconditional_matches_original(reinit):
    xa, buf_a, xb, buf_b = both(make_args(reinit_freq=reinit), 40)
    assert xa.shape == xb.shape == (16, *SHAPE)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=2e-5)
    assert (xb - xa).abs().max() < 1e-3 * (xa - buf_a.mean()).abs().max()  # the chains moved


def test_class_conditional_matches_original_and_uses_class_shares():
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    xa, buf_a, xb, buf_b = both(make_args(), 40, y=y)
    assert xb.shape == (8, *SHAPE)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=2e-5)


def test_per_call_steps_and_empty_buffer_match_original():
    for rows in (0,):  # the original's `replay_buffer = []`: fresh chains, nothing written back
        xa, _, xb, buf_b = both(make_args(), rows, n_steps=5)
        torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
        assert buf_b == []
    xa, _, xb, _ = both(make_args(), 40, n_steps=3)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)


def test_buffer_is_updated_in_place_and_modes_as_original():
    args = make_args()
    f = CCF()
    f.eval()  # the original sets train() after sampling whatever the mode before
    buffer = torch.rand(40, *SHAPE) * 2 - 1
    before, ptr = buffer.clone(), buffer.data_ptr()
    sample_q = compat.get_sample_q(args, "cpu")
    x = sample_q(f, buffer)
    assert buffer.data_ptr() == ptr and not torch.equal(buffer, before)
    changed = (buffer != before).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= args.batch_size
    assert any(torch.equal(row, x_i) for row in buffer[changed] for x_i in x)  # chains written back
    assert f.seen_modes and not any(f.seen_modes)  # eval while sampling
    assert f.training and all(m.training for m in f.modules())  # train after
    empty = torch.empty(0, *SHAPE)
    assert sample_q(f, empty).shape == (args.batch_size, *SHAPE) and empty.numel() == 0


def test_uncond_model_f_with_energy_head():
    class F(nn.Module):  # the original unconditional F: log p(x) from its own energy head
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.SiLU())
            self.energy_output = nn.Linear(16, 1)

        def forward(self, x, y=None):
            return self.energy_output(self.f(x)).squeeze()

    args = make_args(uncond=True)
    f, buffer = F(), torch.rand(32, *SHAPE) * 2 - 1
    ref = buffer.clone()
    torch.manual_seed(5)
    xa = original_sample_q(args, f, ref)
    torch.manual_seed(5)
    xb = compat.get_sample_q(args, "cpu")(f, buffer)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="args.uncond"):
        compat.get_sample_q(args, "cpu")(f, buffer, y=torch.zeros(4, dtype=torch.long))


def test_bad_class_share_and_backend_names(monkeypatch):
    f = CCF()
    with pytest.raises(ValueError, match="divisible by args.n_classes"):
        compat.get_sample_q(make_args(), "cpu")(f, torch.zeros(42, *SHAPE), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="args.sgld_backend: unknown SGLD backend 'fast'"):
        compat.get_sample_q(make_args(sgld_backend="fast"), "cpu")
    monkeypatch.setenv(compat.BACKEND_ENV, "warp")
    with pytest.raises(ValueError, match="JEMFAST_SGLD_BACKEND: unknown SGLD backend 'warp'"):
        compat.get_sample_q(make_args(sgld_backend=None), "cpu")


def test_backend_from_env_and_auto(monkeypatch):
    f, buffer = CCF(), torch.rand(40, *SHAPE) * 2 - 1
    monkeypatch.delenv(compat.BACKEND_ENV, raising=False)
    sample_q = compat.get_sample_q(make_args(sgld_backend=None), "cpu")
    sample_q(f, buffer)
    assert sample_q.sampler.backend == "reference"  # auto on a CPU
    monkeypatch.setenv(compat.BACKEND_ENV, "fused")  # Triton's CPU interpreter (tests/conftest.py)
    sample_q = compat.get_sample_q(make_args(sgld_backend=None, n_steps=2, batch_size=4), "cpu")
    x = sample_q(f, buffer)
    assert sample_q.sampler.backend == "fused" and torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-resident buffer path needs CUDA")
def test_device_buffer_stays_on_the_device_and_is_updated_in_place():
    args = make_args(sgld_backend=None)
    f = CCF().cuda()
    buffer = (torch.rand(40, *SHAPE) * 2 - 1).cuda()
    before, ptr = buffer.clone(), buffer.data_ptr()
    sample_q = compat.get_sample_q(args, "cuda")
    x = sample_q(f, buffer)
    assert x.is_cuda and buffer.is_cuda and buffer.data_ptr() == ptr and not torch.equal(buffer, before)
    assert sample_q.sampler.backend == "graph" and torch.isfinite(x).all()

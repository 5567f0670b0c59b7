"""jemfast.compat on images of any shape, as an original script adapted to other data has them.

The original keeps ``n_ch`` and ``im_sz`` as module constants, not in ``args``. The reference is
examples/jem_original_style.py's restatement of the original sampler with those constants set
to each shape (as a user adapting the script sets them); ``args`` here hold no ``n_ch``/``im_sz``.
A tensor buffer says the shape; for ``[]`` jemfast takes ``shape=`` or the script's own
``init_random``, and otherwise fails with one line before drawing any random number.
"""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch import nn

import jemfast.compat as compat
from tests.compat_example import example

SHAPES = [(1, 28, 28), (1, 8, 8), (3, 64, 64), (3, 32, 32)]
N_CLASSES = 3


def make_args(uncond: bool, **kw) -> Namespace:
    base = dict(n_steps=3, sgld_lr=1.0, sgld_std=0.01, reinit_freq=0.3, batch_size=4, n_classes=N_CLASSES,
                uncond=uncond, sgld_backend="reference")
    return Namespace(**{**base, **kw})


class Model(nn.Module):
    """The original's F (uncond: its energy head) or CCF (logsumexp / logit of y) on C channels.
    Counts its forward passes."""

    def __init__(self, n_ch: int, uncond: bool) -> None:
        super().__init__()
        self.uncond, self.calls = uncond, 0
        self.f = nn.Sequential(nn.Conv2d(n_ch, 6, 3, stride=2, padding=1), nn.SiLU())
        self.energy_output, self.class_output = nn.Linear(6, 1), nn.Linear(6, N_CLASSES)

    def forward(self, x, y=None):
        self.calls += 1
        z = self.f(x).mean(dim=(2, 3))
        if self.uncond:
            return self.energy_output(z).squeeze()
        logits = self.class_output(z)
        return logits.logsumexp(1) if y is None else torch.gather(logits, 1, y[:, None])


@pytest.fixture
def original(monkeypatch):
    """``set_shape(shape)``: the example's module constants n_ch, im_sz set to ``shape``; returns
    the example module, whose ``get_sample_q``/``init_random`` then use them."""
    ex = example()

    def set_shape(shape):
        monkeypatch.setattr(ex, "n_ch", shape[0])
        monkeypatch.setattr(ex, "im_sz", shape[1])
        return ex
    return set_shape


def run_both(ex, args, image, buffer_kind, y, **compat_kw):
    """The original and compat from one model, buffer and seed: ``(x_orig, buf_orig, x_compat, buf_compat)``."""
    torch.manual_seed(0)
    f = Model(image[0], args.uncond)
    rows = 2 * N_CLASSES
    start = torch.rand(rows, *image) * 2 - 1
    make = {"tensor": lambda: start.clone(), "list": lambda: [], "no rows": lambda: torch.empty(0, *image)}[buffer_kind]
    buf_a, buf_b = make(), make()
    torch.manual_seed(7)
    xa = ex.get_sample_q(args, torch.device("cpu"))(f, buf_a, y)
    sample_q = compat.get_sample_q(args, "cpu", **compat_kw)
    torch.manual_seed(7)
    xb = sample_q(f, buf_b, y)
    return xa, buf_a, xb, buf_b


def assert_buffers_agree(buf_b, buf_a, xb, xa, atol=2e-5):
    """The buffers agree row by row, except that a row drawn twice in a batch may hold either
    of its two chains (which write wins is unspecified, in the original as here)."""
    differ = ((buf_b - buf_a).flatten(1).abs().amax(1) > atol).nonzero().flatten()
    for i in differ.tolist():
        assert (xb - buf_b[i]).flatten(1).abs().amax(1).min() <= atol, f"row {i} holds no chain of this batch"
        assert (xa - buf_a[i]).flatten(1).abs().amax(1).min() <= atol, f"row {i} holds no chain of this batch"
    assert len(differ) <= len(xb) // 2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("uncond", [True, False], ids=["uncond", "cond"])
def test_every_shape_matches_the_original(original, shape, uncond):
    ex = original(shape)
    args = make_args(uncond)
    y = None if uncond else torch.tensor([0, 2, 1, 2])
    cases = [("tensor", {}), ("no rows", {}), ("list", {"shape": shape}), ("list", {"init_fn": ex.init_random})]
    for buffer_kind, kw in cases:
        xa, buf_a, xb, buf_b = run_both(ex, args, shape, buffer_kind, y, **kw)
        assert xb.shape == (4, *shape), (buffer_kind, kw)
        torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
        if buffer_kind == "tensor":
            assert_buffers_agree(buf_b, buf_a, xb, xa)
        else:
            assert len(buf_b) == 0
    assert not hasattr(args, "n_ch") and not hasattr(args, "im_sz")  # the args said nothing


@pytest.mark.parametrize("uncond", [True, False], ids=["uncond", "cond"])
def test_an_unknown_shape_fails_in_one_line_before_any_work(uncond):
    args = make_args(uncond)
    f = Model(1, uncond)
    sample_q = compat.get_sample_q(args, "cpu")
    rng = torch.get_rng_state()
    y = None if uncond else torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError) as err:
        sample_q(f, [], y)
    message = str(err.value)
    assert "\n" not in message and "empty replay buffer ([])" in message
    assert "shape=(n_ch, im_sz, im_sz)" in message and "args.n_ch and args.im_sz" in message and "init_fn" in message
    assert f.calls == 0 and torch.equal(torch.get_rng_state(), rng)  # nothing ran, nothing drawn
    assert f.training  # the mode untouched too
    with pytest.raises(ValueError, match=r"empty replay buffer"):
        compat.eval_sample_q(args, "cpu", f, [], y)  # the evaluation script's sampler says the same


def test_disagreements_fail_in_one_line_before_any_work():
    f = Model(1, False)
    buffer = torch.rand(6, 1, 28, 28)
    with pytest.raises(ValueError, match=r"holds images of shape \[1, 28, 28\], but \[3, 32, 32\] was declared"):
        compat.get_sample_q(make_args(False), "cpu", shape=(3, 32, 32))(f, buffer)
    with pytest.raises(ValueError, match=r"holds images of shape \[1, 28, 28\], but \[1, 8, 8\] was declared"):
        compat.get_sample_q(make_args(False, n_ch=1, im_sz=8), "cpu")(f, buffer)
    with pytest.raises(ValueError, match=r"shape=\(1, 28, 28\) disagrees with args.n_ch=3, args.im_sz=32"):
        compat.get_sample_q(make_args(False, n_ch=3, im_sz=32), "cpu", shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"args.im_sz is not set but args.n_ch is"):
        compat.get_sample_q(make_args(False, n_ch=1), "cpu")
    for bad in [(0, 28, 28), "1x28x28", (1.0, 28, 28)]:
        with pytest.raises(ValueError, match="a tuple of positive ints"):
            compat.get_sample_q(make_args(False), "cpu", shape=bad)
        with pytest.raises(ValueError, match="a tuple of positive ints"):
            compat.get_eval_sample_q(shape=bad)
    with pytest.raises(ValueError, match=r"init_fn\(args, 4\) returned shape \[4, 3, 32, 32\]; the chains are "
                                         r"\[4, 1, 28, 28\]"):
        compat.get_sample_q(make_args(False), "cpu", init_fn=lambda a, bs: torch.rand(bs, 3, 32, 32))(f, buffer)
    with pytest.raises(ValueError, match="not \\[rows, \\*image shape\\]"):
        compat.get_sample_q(make_args(False), "cpu")(f, torch.rand(5))
    assert f.calls == 0


def test_args_shape_and_keyword_agree_and_init_random_follows_them():
    args = make_args(False, n_ch=1, im_sz=28)
    x = compat.get_sample_q(args, "cpu", shape=(1, 28, 28))(Model(1, False), [])
    assert x.shape == (4, 1, 28, 28)
    assert compat.init_random(args, 2).shape == (2, 1, 28, 28)
    assert compat.init_random(make_args(False), 2, shape=(3, 64, 64)).shape == (2, 3, 64, 64)
    assert compat.init_random(make_args(False), 2).shape == (2, 3, 32, 32)  # the original's constants

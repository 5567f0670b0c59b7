"""jemfast.compat's swap for the original evaluation script (wgrathwohl/JEM ``eval_wrn_ebm.py``).

References: examples/jem_original_eval.py restates that script's ``sample_q(args, device, f,
replay_buffer, y=None)`` (buffer draw with re-init, ``args.n_steps`` SGLD steps, modes, in-place
write-back, random numbers in the original's order); its refinement ``sample(x, n_steps)`` is a
closure inside ``test_clf``, restated here as :func:`original_refine`. With the same seed
jemfast.compat must draw the same numbers in the same order, so samples, buffers, batch-norm
statistics and accuracies agree to float rounding.
"""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch
from torch import nn

import jemfast.compat as compat
from tests.compat_example import EVAL_EXAMPLE, eval_example, example, original_checkpoint, run_example

SHAPE = (1, 8, 8)  # the examples' digits


def make_args(**kw) -> Namespace:
    """The evaluation script's args: no n_classes, n_ch or im_sz (module constants there)."""
    base = dict(n_steps=6, sgld_lr=1.0, sgld_std=0.01, reinit_freq=0.3, batch_size=12, uncond=False,
                sgld_backend="reference")
    return Namespace(**{**base, **kw})


class BNCCF(nn.Module):
    """The original CCF with batch norm (so its mode matters) and a class_output head of 10."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.class_output = nn.Linear(8, 10)
        self.seen_modes: list[bool] = []

    def classify(self, x):
        return self.class_output(self.f(x).mean(dim=(2, 3)))

    def forward(self, x, y=None):
        self.seen_modes.append(self.training)
        logits = self.classify(x)
        return logits.logsumexp(1) if y is None else torch.gather(logits, 1, y[:, None])


def original_refine(f, x, n_steps):
    """``sample(x, n_steps)`` of the original ``test_clf``/``logp_hist``: from a copy of x,
    n_steps of x += df/dx + 0.01 * noise; f's mode untouched; no labels."""
    x_k = x.clone().requires_grad_(True)
    for _ in range(n_steps):
        x_k.data += torch.autograd.grad(f(x_k).sum(), [x_k])[0] + 1e-2 * torch.randn_like(x_k)
    return x_k.detach()


def both_sample_q(args, rows, y=None, seed=3):
    torch.manual_seed(0)
    f = BNCCF()
    start = torch.rand(rows, *SHAPE) * 2 - 1
    buf_a, buf_b = start.clone(), start.clone()
    torch.manual_seed(seed)
    xa = eval_example().sample_q(args, torch.device("cpu"), f, buf_a, y)
    modes_a, f.seen_modes = f.seen_modes, []
    torch.manual_seed(seed)
    xb = compat.eval_sample_q(args, "cpu", f, buf_b, y)
    return xa, buf_a, xb, buf_b, modes_a, f


@pytest.mark.parametrize("reinit", [0.0, 0.3, 1.0])
def test_sample_q_matches_the_original_unconditional(reinit):
    xa, buf_a, xb, buf_b, modes_a, f = both_sample_q(make_args(reinit_freq=reinit), 40)
    assert xb.shape == (12, *SHAPE)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=2e-5)
    assert modes_a == f.seen_modes and not any(f.seen_modes) and f.training  # eval while sampling, train after
    assert (buf_b - (torch.manual_seed(0), torch.rand(40, *SHAPE) * 2 - 1)[1]).abs().amax() > 0.01  # written back


def test_sample_q_class_shares_from_the_model_head_and_zero_steps():
    y = torch.tensor([0, 9, 3, 3, 7])
    xa, buf_a, xb, buf_b, _, _ = both_sample_q(make_args(), 50, y=y)  # 50 rows, 10 classes (the head): 5 each
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=2e-5)
    xa, buf_a, xb, buf_b, _, _ = both_sample_q(make_args(n_steps=0), 40)  # the eval script's default n_steps
    assert torch.equal(xb, xa) and torch.equal(buf_b, buf_a)
    with pytest.raises(ValueError, match=r"divisible by args.n_classes \(10\), got 42 rows"):
        compat.eval_sample_q(make_args(), "cpu", BNCCF(), torch.zeros(42, *SHAPE), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="args.uncond is set"):
        compat.eval_sample_q(make_args(uncond=True), "cpu", BNCCF(), torch.zeros(40, *SHAPE),
                             torch.zeros(2, dtype=torch.long))


def test_uncond_samples_loop_matches_the_original():
    """``uncond_samples``: n_sample_steps PCD steps on a fresh buffer, the original sampler vs the swap."""
    ev = eval_example()
    args = make_args(buffer_size=30, n_sample_steps=4, print_every=100, n_steps=5)
    f = BNCCF()
    torch.manual_seed(11)
    buf_a = ev.uncond_samples(f, args, torch.device("cpu"), save=False)
    original = ev.sample_q
    try:
        ev.sample_q = compat.eval_sample_q  # the script's swap line
        torch.manual_seed(11)
        buf_b = ev.uncond_samples(f, args, torch.device("cpu"), save=False)
    finally:
        ev.sample_q = original
    assert buf_b.shape == (30, *SHAPE)
    torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=5e-5)


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_refine_matches_the_original_and_leaves_the_mode(train_mode):
    torch.manual_seed(0)
    f = BNCCF()
    f.train(train_mode)
    x = torch.rand(10, *SHAPE) * 2 - 1
    stats = {k: v.clone() for k, v in f.state_dict().items()}
    torch.manual_seed(5)
    xa = original_refine(f, x, 7)
    stats_a = {k: v.clone() for k, v in f.state_dict().items()}
    f.load_state_dict(stats)
    modes_a, f.seen_modes = f.seen_modes, []
    sample = compat.eval_refine(f, make_args(n_steps=7))
    torch.manual_seed(5)
    xb = sample(x)
    torch.testing.assert_close(xb, xa, rtol=0, atol=2e-5)
    assert f.seen_modes == modes_a == [train_mode] * 7 and f.training == train_mode
    for k, v in f.state_dict().items():  # batch-norm statistics moved (train mode) or not, as the original's
        torch.testing.assert_close(v, stats_a[k], rtol=0, atol=1e-6)
    assert torch.equal(sample(x, n_steps=0), x) and sample(x, n_steps=0) is not x


def test_test_clf_with_refinement_matches_the_original(tmp_path):
    ev = eval_example()
    f = original_checkpoint(tmp_path / "ckpt.pt")
    _, _, (x_test, y_test) = example().get_data(None, torch.device("cpu"))
    x_test, y_test = x_test[:200], y_test[:200]
    got = {}
    for sampler in ("original", "jemfast"):
        args = ev.parse_args(["--load_path", "unused", "--n_steps", "3", "--sampler", sampler,
                              "--sgld_backend", "reference"])
        torch.manual_seed(1)
        got[sampler] = ev.test_clf(f, args, torch.device("cpu"), x_test, y_test)
    (acc_a, loss_a), (acc_b, loss_b) = got["original"], got["jemfast"]
    assert acc_a > 0.3  # the refined test images are still classified (chance is 0.1)
    assert acc_b == acc_a and abs(loss_b - loss_a) < 1e-4


@pytest.mark.slow
def test_the_example_script_gives_the_same_results_with_jemfast(tmp_path):
    """examples/jem_original_eval.py run as a script, each eval with its own samplers and with
    the swap (--sampler jemfast): same accuracy, same sampled buffer, same class counts."""
    ckpt = tmp_path / "ckpt.pt"
    original_checkpoint(ckpt)
    runs = {
        "test_clf": ["--eval", "test_clf", "--n_steps", "3"],
        "uncond_samples": ["--eval", "uncond_samples", "--buffer_size", "40", "--n_sample_steps", "3",
                           "--n_steps", "4"],
        "cond_samples": ["--eval", "cond_samples", "--fresh_samples", "--buffer_size", "40",
                         "--n_sample_steps", "2", "--n_steps", "3"],
    }
    for name, flags in runs.items():
        out = {}
        for sampler in ("original", "jemfast"):
            save = tmp_path / f"{name}-{sampler}"
            proc = run_example(["--load_path", str(ckpt), "--hidden", "8", "--device", "cpu", "--save_dir", str(save),
                                "--sampler", sampler, "--sgld_backend", "reference", *flags], script=EVAL_EXAMPLE)
            assert proc.returncode == 0, proc.stderr[-2000:]
            out[sampler] = (json.loads((save / "eval_results.json").read_text()), save)
        (res_a, dir_a), (res_b, dir_b) = out["original"], out["jemfast"]
        if name == "test_clf":
            assert res_a["accuracy"] > 0.3 and res_b["accuracy"] == res_a["accuracy"]
        if name == "uncond_samples":
            buf_a, buf_b = torch.load(dir_a / "buffer.pt"), torch.load(dir_b / "buffer.pt")
            torch.testing.assert_close(buf_b, buf_a, rtol=0, atol=5e-5)
        if name == "cond_samples":
            assert res_b["per_class"] == res_a["per_class"] and sum(res_a["per_class"]) == 40

"""A JEM training script in the style of the original code (wgrathwohl/JEM ``train_wrn_ebm.py``),
on scikit-learn's bundled digits, with the sampler swappable for jemfast's.

Everything here is the original design: ``F``/``CCF`` around a small CNN, ``init_random``,
``get_model_and_buffer``, a hand-written ``get_sample_q``, a replay buffer that is a plain CPU
tensor, the loss cross-entropy + (f(x_q) - f(x_data)), and ``checkpoint()`` writing
``{"model_state_dict", "replay_buffer"}``. Switching to jemfast changes one line (see
``--sampler``); ``--guard`` adds jemfast's divergence guard (the lines marked below).

``--dataset digits`` (default): 1x8x8 images and a small CNN, stable. ``--dataset digits32``: the
digits at 3x32x32 and a Wide-ResNet like the original's (WRN-10-2, no normalisation, the original
block layout) with the settings of jemfast's digits32 preset (batch 32, buffer 1,000, 5 SGLD steps,
lr 1e-3 with a 20-iteration warm-up, 12 epochs): JEM's own collapse, which the guard rescues
(docs/swap-in.md has the figures). ``--p_x_weight 0`` trains the plain classifier.

    python examples/jem_original_style.py --sampler original --save_dir runs/example
    python examples/jem_original_style.py --sampler jemfast --save_dir runs/example-jemfast
    python examples/jem_original_style.py --sampler jemfast --guard --inject_divergence 30
    python examples/jem_original_style.py --sampler jemfast --guard --dataset digits32
    python -m jemfast.compat convert runs/example/last_ckpt.pt --out runs/converted --dataset digits --hidden 64

``--sgld_backend`` (or ``JEMFAST_SGLD_BACKEND``) picks jemfast's SGLD backend; ``--device_buffer``
keeps the buffer on the training device (jemfast's fast path; the original sampler accepts it too).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch as t
import torch.nn as nn

import jemfast
import jemfast.compat
from jemfast.data import load_digits_bundle
from jemfast.models import WideResNet
from jemfast.stability.inject import inject_divergence

n_ch, im_sz = 1, 8
# jemfast's digits32 preset (python -m jemfast.train --dataset digits32): where plain JEM collapses
DIGITS32 = {"batch_size": 32, "buffer_size": 1000, "n_steps": 5, "lr": 1e-3, "warmup_iters": 20, "n_epochs": 12,
            "decay_epochs": [8, 10]}


class ConvNet(nn.Module):
    """Three 3x3 convolutions (h, 2h, 4h channels; the last two stride 2), SiLU, global mean."""

    def __init__(self, hidden: int, n_ch: int = 1) -> None:
        super().__init__()
        layers, c = [], n_ch
        for i, width in enumerate((hidden, 2 * hidden, 4 * hidden)):
            layers += [nn.Conv2d(c, width, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.last_dim = c

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


class WRN(nn.Module):
    """jemfast's Wide-ResNet in the original code's block layout, as a feature extractor."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.net = WideResNet(3, 1, depth, width, norm="none", layout="original")
        self.net.head = nn.Identity()
        self.last_dim = self.net.feature_dim

    def forward(self, x):
        return self.net(x)


class F(nn.Module):
    def __init__(self, hidden=64, n_classes=10, wrn=None):
        super().__init__()
        self.f = ConvNet(hidden) if wrn is None else WRN(*wrn)  # wrn: (depth, width) for digits32
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, n_classes)

    def forward(self, x, y=None):
        return self.energy_output(self.f(x)).squeeze()

    def classify(self, x):
        return self.class_output(self.f(x)).squeeze()


class CCF(F):
    def forward(self, x, y=None):
        logits = self.classify(x)
        return logits.logsumexp(1) if y is None else t.gather(logits, 1, y[:, None])


def init_random(args, bs):
    return t.FloatTensor(bs, n_ch, im_sz, im_sz).uniform_(-1, 1)


def get_model_and_buffer(args, device):
    wrn = (args.depth, args.width) if args.dataset == "digits32" else None
    f = (F if args.uncond else CCF)(args.hidden, args.n_classes, wrn)
    if not args.uncond:
        assert args.buffer_size % args.n_classes == 0, "Buffer size must be divisible by args.n_classes"
    if args.load_path is None:
        replay_buffer = init_random(args, args.buffer_size)
    else:
        ckpt_dict = t.load(args.load_path, weights_only=True)
        f.load_state_dict(ckpt_dict["model_state_dict"])
        replay_buffer = ckpt_dict["replay_buffer"]
    if args.device_buffer:
        replay_buffer = replay_buffer.to(device)
    return f.to(device), replay_buffer


def get_sample_q(args, device):
    def sample_p_0(replay_buffer, bs, y=None):
        if len(replay_buffer) == 0:
            return init_random(args, bs), []
        buffer_size = len(replay_buffer) if y is None else len(replay_buffer) // args.n_classes
        inds = t.randint(0, buffer_size, (bs,))
        if y is not None:
            inds = y.cpu() * buffer_size + inds
        buffer_samples = replay_buffer[inds.to(replay_buffer.device)].cpu()
        random_samples = init_random(args, bs)
        choose_random = (t.rand(bs) < args.reinit_freq).float()[:, None, None, None]
        samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
        return samples.to(device), inds

    def sample_q(f, replay_buffer, y=None, n_steps=args.n_steps):
        f.eval()
        bs = args.batch_size if y is None else y.size(0)
        init_sample, buffer_inds = sample_p_0(replay_buffer, bs=bs, y=y)
        x_k = init_sample.clone().requires_grad_(True)
        for _ in range(n_steps):
            f_prime = t.autograd.grad(f(x_k, y=y).sum(), [x_k])[0]
            x_k.data += args.sgld_lr * f_prime + args.sgld_std * t.randn_like(x_k)
        f.train()
        final_samples = x_k.detach()
        if len(replay_buffer) > 0:
            replay_buffer[buffer_inds.to(replay_buffer.device)] = final_samples.to(replay_buffer.device)
        return final_samples
    return sample_q


def get_data(args, device):
    """Digits in [-1, 1] as jemfast splits them: 1,257 train, 180 valid, 360 test (stratified);
    digits32: jemfast's own (bilinear upscaling to 3x32x32)."""
    if getattr(args, "dataset", "digits") == "digits32":
        bundle = load_digits_bundle(device, side=32)
        return [(split.x, split.y) for split in (bundle.train, bundle.valid, bundle.test)]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = t.tensor(digits.images, dtype=t.float32)[:, None] / 16.0 * 2.0 - 1.0
    y = t.tensor(digits.target, dtype=t.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=360, stratify=digits.target, random_state=0)
    train, valid = train_test_split(rest, test_size=180, stratify=digits.target[rest], random_state=0)
    return [(x[i].to(device), y[i].to(device)) for i in (train, valid, test)]


def batches(x, y, bs, forever=False):
    while True:
        perm = t.randperm(len(x)).to(x.device)
        for b in range(len(x) // bs):
            i = perm[b * bs:(b + 1) * bs]
            yield x[i], y[i]
        if not forever:
            return


def eval_classification(f, x, y):
    f.eval()
    with t.no_grad():
        correct = (f.classify(x).argmax(1) == y).float().mean().item()
    f.train()
    return correct


def checkpoint(f, buffer, tag, args, device):
    f.cpu()
    ckpt_dict = {"model_state_dict": f.state_dict(), "replay_buffer": buffer}
    t.save(ckpt_dict, os.path.join(args.save_dir, tag))
    f.to(device)


def iteration(f, sample_q, replay_buffer, x_p_d, x_lab, y_lab, args, guard=None):
    """The loss of one iteration: p_x_weight * -(f(x_data) - f(x_q)) + cross-entropy (+ the
    guard's energy penalty, 0 until a restart applies it); returns (L, fp, fq, x_q)."""
    L = nn.functional.cross_entropy(f.classify(x_lab), y_lab)
    if args.p_x_weight == 0:  # the plain classifier
        zero = t.zeros((), device=x_lab.device)
        return L, zero, zero, None
    x_q = sample_q(f, replay_buffer)
    fp_all, fq_all = f(x_p_d), f(x_q)
    fp, fq = fp_all.mean(), fq_all.mean()
    L = L + args.p_x_weight * -(fp - fq)
    if guard is not None:
        L = L + guard.energy_penalty(fp_all, fq_all)  # optional guard line: the energy L2 remedy
    return L, fp, fq, x_q


def main(args):
    os.makedirs(args.save_dir, exist_ok=True)
    t.manual_seed(args.seed)
    device = t.device(args.device)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = get_data(args, device)
    if args.sampler == "jemfast":
        sample_q = jemfast.compat.get_sample_q(args, device)  # the one line that switches to jemfast
    else:
        sample_q = get_sample_q(args, device)
    f, replay_buffer = get_model_and_buffer(args, device)
    optim = t.optim.Adam(f.parameters(), lr=args.lr, betas=(.9, .999))
    guard = None
    if args.guard:  # jemfast's divergence guard, line 1 of 3; the swapped sampler: steps, step size, fresh chains
        guard = jemfast.Guard(f, optim, buffer=replay_buffer, sampler=sample_q if args.sampler == "jemfast" else args,
                              n_classes=args.n_classes, warmup_iters=args.warmup_iters)
    labelled = batches(x_train, y_train, args.batch_size, forever=True)
    cur_iter, history, t0 = 0, [], time.perf_counter()
    for epoch in range(args.n_epochs):
        if epoch in args.decay_epochs:
            for group in optim.param_groups:
                group["lr"] *= args.decay_rate
        for x_p_d, _ in batches(x_train, y_train, args.batch_size):
            if cur_iter <= args.warmup_iters:
                for group in optim.param_groups:
                    group["lr"] = args.lr * cur_iter / float(args.warmup_iters)
            if cur_iter == args.inject_divergence:
                inject_divergence(f)  # testing aid: blow up the logits, as a diverging JEM does
            x_p_d = x_p_d + args.sigma * t.randn_like(x_p_d)
            x_lab, y_lab = next(labelled)
            L, fp, fq, x_q = iteration(f, sample_q, replay_buffer, x_p_d, x_lab, y_lab, args, guard)
            if not args.guard and L.abs().item() > 1e8:  # the original's own stop, when unguarded
                raise SystemExit(f"diverged at iteration {cur_iter}: |L| = {L.abs().item():.3g}")
            optim.zero_grad()
            L.backward()
            optim.step()
            cur_iter += 1
            if args.guard and guard.step(L, e_real=-fp, e_fake=-fq, x_fake=x_q, x=x_lab, y=y_lab):  # line 2 of 3
                continue  # rolled back to the last good state: line 3 of 3
        valid_acc, test_acc = eval_classification(f, x_valid, y_valid), eval_classification(f, x_test, y_test)
        history.append({"epoch": epoch, "iterations": cur_iter, "valid_acc": valid_acc, "test_acc": test_acc})
        print(f"epoch {epoch}: valid acc {valid_acc:.4f}, test acc {test_acc:.4f}", flush=True)
        checkpoint(f, replay_buffer, "last_ckpt.pt", args, device)
    restarts = guard.restarts if args.guard else []
    for event in restarts:
        event.pop("overrides", None)
    with open(os.path.join(args.save_dir, "results.json"), "w") as fh:
        json.dump({"sampler": args.sampler, "history": history, "restarts": restarts,
                   "wall_time_s": time.perf_counter() - t0}, fh, indent=1, default=str)
    return history


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Original-style JEM on digits; --sampler jemfast swaps in jemfast")
    p.add_argument("--sampler", choices=["original", "jemfast"], default="original")
    p.add_argument("--sgld_backend", default=None, help="jemfast's SGLD backend (default: $JEMFAST_SGLD_BACKEND or auto)")
    p.add_argument("--guard", action="store_true", help="jemfast.Guard: detect divergence and roll back")
    p.add_argument("--inject_divergence", type=int, default=-1, help="testing aid: blow up the model at this iteration")
    p.add_argument("--device", default="cuda" if t.cuda.is_available() else "cpu")
    p.add_argument("--device_buffer", action="store_true", help="keep the replay buffer on --device")
    p.add_argument("--save_dir", default="runs/jem_original_style")
    p.add_argument("--load_path", default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--decay_epochs", type=int, nargs="*", default=[20, 25])
    p.add_argument("--decay_rate", type=float, default=0.3)
    p.add_argument("--sigma", type=float, default=0.03, help="std of the noise added to training images")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--n_classes", type=int, default=10)
    p.add_argument("--uncond", action="store_true")
    p.add_argument("--buffer_size", type=int, default=2000)
    p.add_argument("--reinit_freq", type=float, default=0.05)
    p.add_argument("--n_steps", type=int, default=20)
    p.add_argument("--sgld_lr", type=float, default=1.0)
    p.add_argument("--sgld_std", type=float, default=0.01)
    p.add_argument("--p_x_weight", type=float, default=1.0, help="weight of the p(x) term (0: the plain classifier)")
    p.add_argument("--dataset", choices=["digits", "digits32"], default="digits",
                   help="digits32: 3x32x32 digits, a WRN and the settings of DIGITS32 (flags still override)")
    p.add_argument("--depth", type=int, default=10, help="WRN depth (digits32)")
    p.add_argument("--width", type=int, default=2, help="WRN width (digits32)")
    if p.parse_known_args(argv)[0].dataset == "digits32":
        p.set_defaults(**DIGITS32)
    args = p.parse_args(argv)
    global n_ch, im_sz  # module constants, as in the original
    n_ch, im_sz = (3, 32) if args.dataset == "digits32" else (1, 8)
    args.n_ch, args.im_sz = n_ch, im_sz
    return args


if __name__ == "__main__":
    main(parse_args())

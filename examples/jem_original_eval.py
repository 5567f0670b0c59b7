"""An evaluation script in the style of the original code (wgrathwohl/JEM ``eval_wrn_ebm.py``), on
scikit-learn's 8x8 digits, for checkpoints of examples/jem_original_style.py, with both of its
samplers swappable for jemfast's.

Everything here is the original design: a module-level ``sample_q(args, device, f, replay_buffer,
y=None)``; ``uncond_samples`` runs ``--n_sample_steps`` PCD steps of ``--n_steps`` SGLD steps
each on a fresh buffer of ``--buffer_size`` rows; ``cond_samples`` sorts a buffer by the predicted
class; ``test_clf`` classifies the (noised) test images after ``--n_steps`` steps of its own
refinement ``sample(x, n_steps)``, the model left in the mode it was loaded in. ``--sampler
jemfast`` switches both samplers with one line each (marked below).

    python examples/jem_original_style.py --save_dir runs/example --hidden 32
    python examples/jem_original_eval.py --load_path runs/example/last_ckpt.pt --hidden 32 --eval test_clf --n_steps 5
    python examples/jem_original_eval.py --load_path runs/example/last_ckpt.pt --hidden 32 --eval uncond_samples \
        --sampler jemfast --buffer_size 100 --n_sample_steps 20 --n_steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch as t
import torch.nn as nn
import torchvision as tv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jem_original_style as training  # noqa: E402  (the model classes and data of the training example)

import jemfast.compat  # noqa: E402

n_classes = 10


def init_random(bs):
    return t.FloatTensor(bs, training.n_ch, training.im_sz, training.im_sz).uniform_(-1, 1)


def sample_p_0(args, device, replay_buffer, bs, y=None):
    if len(replay_buffer) == 0:
        return init_random(bs), []
    buffer_size = len(replay_buffer) if y is None else len(replay_buffer) // n_classes
    inds = t.randint(0, buffer_size, (bs,))
    if y is not None:
        inds = y.cpu() * buffer_size + inds
        assert not args.uncond, "conditional samples need a conditional model"
    buffer_samples = replay_buffer[inds]
    random_samples = init_random(bs)
    choose_random = (t.rand(bs) < args.reinit_freq).float()[:, None, None, None]
    samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
    return samples.to(device), inds


def sample_q(args, device, f, replay_buffer, y=None):
    f.eval()
    bs = args.batch_size if y is None else y.size(0)
    init_sample, buffer_inds = sample_p_0(args, device, replay_buffer, bs=bs, y=y)
    x_k = init_sample.clone().requires_grad_(True)
    for _ in range(args.n_steps):
        f_prime = t.autograd.grad(f(x_k, y=y).sum(), [x_k])[0]
        x_k.data += args.sgld_lr * f_prime + args.sgld_std * t.randn_like(x_k)
    f.train()
    final_samples = x_k.detach()
    if len(replay_buffer) > 0:
        replay_buffer[buffer_inds] = final_samples.cpu()
    return final_samples


def plot(path, x):
    tv.utils.save_image(t.clamp(x, -1, 1), path, normalize=True, nrow=max(1, int(len(x) ** 0.5)))


def uncond_samples(f, args, device, save=True):
    replay_buffer = t.FloatTensor(args.buffer_size, training.n_ch, training.im_sz, training.im_sz).uniform_(-1, 1)
    for i in range(args.n_sample_steps):
        samples = sample_q(args, device, f, replay_buffer)
        if i % args.print_every == 0 and save:
            plot(f"{args.save_dir}/samples_{i}.png", samples)
    return replay_buffer


def cond_samples(f, replay_buffer, args, device, fresh=False):
    if fresh:
        replay_buffer = uncond_samples(f, args, device, save=False)
    with t.no_grad():
        all_y = t.cat([f.classify(replay_buffer[i:i + 100].to(device)).max(1)[1].cpu()
                       for i in range(0, len(replay_buffer), 100)])
    each_class = [replay_buffer[all_y == label] for label in range(n_classes)]
    grid = t.cat([c[:10] for c in each_class])
    if len(grid):
        plot(f"{args.save_dir}/cond_samples.png", grid)
    return [len(c) for c in each_class]


def test_clf(f, args, device, x_test, y_test):
    def sample(x, n_steps=args.n_steps):
        x_k = x.clone().requires_grad_(True)
        for _ in range(n_steps):
            f_prime = t.autograd.grad(f(x_k).sum(), [x_k])[0]
            x_k.data += f_prime + 1e-2 * t.randn_like(x_k)
        return x_k.detach()

    if args.sampler == "jemfast":
        sample = jemfast.compat.eval_refine(f, args)  # the one line that switches the refinement to jemfast

    corrects, losses = [], []
    for i in range(0, len(x_test), 100):
        x_p_d, y_p_d = x_test[i:i + 100], y_test[i:i + 100]
        x_p_d = x_p_d + args.sigma * t.randn_like(x_p_d)  # the original's test transform
        if args.n_steps > 0:
            x_p_d = sample(x_p_d)
        logits = f.classify(x_p_d)
        losses.extend(nn.functional.cross_entropy(logits, y_p_d, reduction="none").tolist())
        corrects.extend((logits.max(1)[1] == y_p_d).float().tolist())
    return sum(corrects) / len(corrects), sum(losses) / len(losses)


def main(args):
    global sample_q
    if args.sampler == "jemfast":
        sample_q = jemfast.compat.eval_sample_q  # the one line that switches sample_q to jemfast
    os.makedirs(args.save_dir, exist_ok=True)
    t.manual_seed(args.seed)
    device = t.device(args.device)
    f = (training.F if args.uncond else training.CCF)(args.hidden, n_classes)
    ckpt_dict = t.load(args.load_path, weights_only=True)
    f.load_state_dict(ckpt_dict["model_state_dict"])
    replay_buffer = ckpt_dict["replay_buffer"]
    f = f.to(device)
    results = {"eval": args.eval, "sampler": args.sampler}
    if args.eval == "test_clf":
        _, _, (x_test, y_test) = training.get_data(args, device)
        results["accuracy"], results["loss"] = test_clf(f, args, device, x_test, y_test)
    if args.eval == "uncond_samples":
        replay_buffer = uncond_samples(f, args, device)
        t.save(replay_buffer, os.path.join(args.save_dir, "buffer.pt"))
    if args.eval == "cond_samples":
        results["per_class"] = cond_samples(f, replay_buffer, args, device, args.fresh_samples)
    with open(os.path.join(args.save_dir, "eval_results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results), flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Original-style JEM evaluation on digits; --sampler jemfast swaps in jemfast")
    p.add_argument("--eval", default="test_clf", choices=["uncond_samples", "cond_samples", "test_clf"])
    p.add_argument("--sampler", choices=["original", "jemfast"], default="original")
    p.add_argument("--sgld_backend", default=None, help="jemfast's SGLD backend (default: $JEMFAST_SGLD_BACKEND or auto)")
    p.add_argument("--device", default="cuda" if t.cuda.is_available() else "cpu")
    p.add_argument("--load_path", required=True)
    p.add_argument("--save_dir", default="runs/jem_original_eval")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--sigma", type=float, default=3e-2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--uncond", action="store_true")
    p.add_argument("--n_steps", type=int, default=0)
    p.add_argument("--buffer_size", type=int, default=0)
    p.add_argument("--reinit_freq", type=float, default=.05)
    p.add_argument("--sgld_lr", type=float, default=1.0)
    p.add_argument("--sgld_std", type=float, default=1e-2)
    p.add_argument("--print_every", type=int, default=100)
    p.add_argument("--n_sample_steps", type=int, default=100)
    p.add_argument("--fresh_samples", action="store_true", help="cond_samples: sample a new buffer first")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

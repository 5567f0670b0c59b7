"""The real original JEM script (wgrathwohl/JEM ``train_wrn_ebm.py``) on the bundled digits, as a
swap-in user runs it: unguarded, with the Guard lines of jemfast 9c5625c ("before"), or with
today's README Guard lines. The script is never part of jemfast: fetch it yourself
(``git clone https://github.com/wgrathwohl/JEM``) and pass its directory.

    python bench/original_script.py --original ../JEM --mode guarded --out runs/original-guarded

What it does, in OUT:

- ``data/cifar-10-batches-py``: the digits at 3x32x32 (bilinear, as ``--dataset digits32``) in
  CIFAR-10's on-disk format, jemfast's train + validation split as the train batches (1,437
  images; the script holds out ``--n_valid 180``), its test split as ``test_batch`` (360);
- ``script/``: a copy of the script's directory, ``train_wrn_ebm.py`` with the lines of the mode
  inserted (:data:`LINES`; the text it is anchored to must be found once, or it stops);
- runs it with torchvision's CIFAR-10 checksum test passed (the files are not CIFAR's) and the
  digits32 settings (WRN-10-2, no normalisation, batch 32, buffer 1,000, 5 SGLD steps, lr 1e-3
  with a 20-iteration warm-up, 12 epochs, lr x0.3 at epochs 8 and 10), its log in ``log.txt``.

``--jemfast DIR`` puts another jemfast checkout first on the path (the "before" mode's, e.g. a
``git worktree`` of 9c5625c). Extra arguments go to the script.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SWAP = ("    sample_q = get_sample_q(args, device)\n",
        "    import jemfast, jemfast.compat\n    sample_q = jemfast.compat.get_sample_q(args, device)\n")
# mode -> [(anchor found once in train_wrn_ebm.py, the text that replaces it)]
LINES = {
    "unguarded": [SWAP],
    "guarded-before": [
        SWAP,
        ("    best_valid_acc = 0.0\n",
         "    best_valid_acc = 0.0\n    guard = jemfast.Guard(f, optim, replay_buffer, sampler=args)\n"),
        ("            optim.step()\n            cur_iter += 1\n",
         "            optim.step()\n            cur_iter += 1\n"
         "            if guard.step(L, e_real=-fp, e_fake=-fq, x_fake=x_q):\n                continue\n"),
    ],
    "guarded": [
        SWAP,
        ("    best_valid_acc = 0.0\n",
         "    best_valid_acc = 0.0\n    guard = jemfast.Guard(f, optim, replay_buffer, sampler=sample_q, "
         "n_classes=args.n_classes, warmup_iters=args.warmup_iters)\n"),
        ("                L += args.p_x_weight * l_p_x\n",
         "                L += args.p_x_weight * l_p_x\n                L = L + guard.energy_penalty(fp_all, fq_all)\n"),
        ("            optim.step()\n            cur_iter += 1\n",
         "            optim.step()\n            cur_iter += 1\n"
         "            if guard.step(L, e_real=-fp, e_fake=-fq, x_fake=x_q, x=x_lab, y=y_lab):\n                continue\n"),
    ],
}
DIGITS32 = ["--dataset", "cifar10", "--n_valid", "180", "--depth", "10", "--width", "2", "--batch_size", "32",
            "--buffer_size", "1000", "--n_steps", "5", "--lr", "1e-3", "--warmup_iters", "20", "--n_epochs", "12",
            "--decay_epochs", "8", "10", "--print_every", "20"]
LAUNCH = """import os, runpy, sys, torchvision
torchvision.datasets.CIFAR10._check_integrity = lambda self: True  # digits in CIFAR-10's format
torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_digits_as_cifar10(root: Path) -> None:
    """The digits (jemfast's split, 3x32x32 bilinear) as ``root/cifar-10-batches-py``."""
    import torch

    from jemfast.data import load_digits_bundle

    bundle = load_digits_bundle(torch.device("cpu"), side=32)

    def rows(x: torch.Tensor) -> np.ndarray:  # [-1, 1] -> uint8 rows of R, G, B planes
        return ((x + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).reshape(len(x), 3072).numpy()

    train_x = torch.cat([bundle.train.x, bundle.valid.x])
    train_y = torch.cat([bundle.train.y, bundle.valid.y]).tolist()
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        _dump({"data": rows(train_x[part]), "labels": [train_y[i] for i in part]}, base / f"data_batch_{k}")
    _dump({"data": rows(bundle.test.x), "labels": bundle.test.y.tolist()}, base / "test_batch")
    _dump({"label_names": [str(i) for i in range(10)]}, base / "batches.meta")


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def patched(source: str, mode: str) -> str:
    """``source`` with the mode's lines in; each anchor must occur exactly once."""
    for anchor, text in LINES[mode]:
        if source.count(anchor) != 1:
            raise SystemExit(f"original_script: {anchor.strip()!r} occurs {source.count(anchor)} times in "
                             f"train_wrn_ebm.py (expected once): not the script this harness knows")
        source = source.replace(anchor, text)
    return source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, help="directory of wgrathwohl/JEM (train_wrn_ebm.py, wideresnet.py)")
    p.add_argument("--mode", choices=list(LINES), default="guarded")
    p.add_argument("--out", required=True)
    p.add_argument("--jemfast", default=None, help="a jemfast checkout to import instead of the installed one")
    args, extra = p.parse_known_args(argv)
    original, out = Path(args.original).resolve(), Path(args.out).resolve()
    if not (original / "train_wrn_ebm.py").exists():
        raise SystemExit(f"original_script: no train_wrn_ebm.py in {original}")
    script = out / "script"
    shutil.copytree(original, script, ignore=shutil.ignore_patterns(".git", "figs"), dirs_exist_ok=True)
    (script / "train_wrn_ebm.py").write_text(patched((original / "train_wrn_ebm.py").read_text(), args.mode))
    write_digits_as_cifar10(out / "data")
    (out / "launch.py").write_text(LAUNCH)
    env_path = [args.jemfast] if args.jemfast else []
    cmd = [sys.executable, str(out / "launch.py"), str(script / "train_wrn_ebm.py"), *DIGITS32,
           "--data_root", str(out / "data"), "--save_dir", str(out / "save"), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path + [os.environ.get("PYTHONPATH", "")])}
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, cwd=script, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"{args.mode}: exit {rc}; log in {out / 'log.txt'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

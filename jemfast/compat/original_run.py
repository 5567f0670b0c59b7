"""The real original JEM script (wgrathwohl/JEM ``train_wrn_ebm.py``, fetched by the user, never
part of jemfast) run on the bundled digits as a swap-in user runs it, for the benchmarks'
comparison rows (``python -m jemfast.recipe_benchmark --original DIR``; ``bench/original_script.py``).

What :func:`run_original` does in ``out``:

- ``data/cifar-10-batches-py``: the digits at 3x32x32 (bilinear, as ``--dataset digits32``) in
  CIFAR-10's on-disk format, jemfast's train + validation split as the train batches (1,437
  images; the script holds out ``--n_valid 180``), its test split as ``test_batch`` (360);
- ``script/``: a copy of the script's directory, ``train_wrn_ebm.py`` with the lines of the
  mode in (:data:`LINES`; each anchor must be found once, or it stops) and its hard-coded
  ``seed = 1`` replaced by the run's seed;
- runs it with torchvision's CIFAR-10 checksum test passed (the files are not CIFAR's) and the
  digits32 settings (:data:`DIGITS32`: WRN-10-2 without normalisation, batch 32, buffer 1,000,
  5 SGLD steps, lr 1e-3 with a 20-iteration warm-up, 12 epochs, lr x0.3 at epochs 8 and 10),
  its output in ``log.txt``, each epoch's validation accuracy timed as it is printed.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..process.errors import UserError

SWAP = ("    sample_q = get_sample_q(args, device)\n",
        "    import jemfast, jemfast.compat\n    sample_q = jemfast.compat.get_sample_q(args, device)\n")
SEED = "seed = 1\n"
# mode -> [(anchor found once in train_wrn_ebm.py, the text that replaces it)]
LINES = {
    "unguarded": [SWAP],
    "guarded-before": [  # the README's Guard lines before the reservoir (jemfast 9c5625c)
        SWAP,
        ("    best_valid_acc = 0.0\n",
         "    best_valid_acc = 0.0\n    guard = jemfast.Guard(f, optim, replay_buffer, sampler=args)\n"),
        ("            optim.step()\n            cur_iter += 1\n",
         "            optim.step()\n            cur_iter += 1\n"
         "            if guard.step(L, e_real=-fp, e_fake=-fq, x_fake=x_q):\n                continue\n"),
    ],
    "guarded": [  # the README's Guard lines (docs/swap-in.md)
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
EPOCH_LINE = re.compile(r"Epoch (\d+): (Valid|Test) Loss \S+, (?:Valid|Test) Acc ([0-9.eE+-]+)")
RESTART_LINE = re.compile(r"restart (\d+): ")
ITERATION_LINE = re.compile(r"P\(y\|x\) \d+:(\d+)")


def write_digits_as_cifar10(root: Path) -> None:
    """The digits (jemfast's split, 3x32x32 bilinear) as ``root/cifar-10-batches-py``."""
    import torch

    from ..data import load_digits_bundle

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


def patched(source: str, mode: str, seed: int | None = None) -> str:
    """``source`` with the mode's lines in (and ``seed = 1`` made ``seed``); each anchor must occur
    exactly once."""
    edits = list(LINES[mode]) + ([(SEED, f"seed = {int(seed)}\n")] if seed is not None else [])
    for anchor, text in edits:
        if source.count(anchor) != 1:
            raise UserError(f"{anchor.strip()!r} occurs {source.count(anchor)} times in train_wrn_ebm.py "
                            f"(expected once): not the script this harness knows")
        source = source.replace(anchor, text)
    return source


def run_original(original: str | Path, out: str | Path, mode: str = "guarded", seed: int | None = None,
                 threads: int | None = None, extra: Sequence[str] = (), jemfast_dir: str | None = None
                 ) -> dict[str, Any]:
    """Run ``original``'s ``train_wrn_ebm.py`` patched for ``mode`` in ``out`` (module docstring);
    ``threads``: OMP_NUM_THREADS for it; ``jemfast_dir``: a jemfast checkout put first on its
    path. Returns ``{"exit", "status" (finished | diverged | failed), "restarts", "iterations",
    "valid_acc", "test_acc", "curve" [(seconds, validation accuracy) per epoch], "wall_s",
    "save_dir", "log"}``."""
    original, out = Path(original).resolve(), Path(out).resolve()
    if not (original / "train_wrn_ebm.py").is_file():
        raise UserError(f"no train_wrn_ebm.py in {original} (fetch wgrathwohl/JEM and pass its directory)")
    script = out / "script"
    shutil.copytree(original, script, ignore=shutil.ignore_patterns(".git", "figs"), dirs_exist_ok=True)
    (script / "train_wrn_ebm.py").write_text(patched((original / "train_wrn_ebm.py").read_text(), mode, seed))
    write_digits_as_cifar10(out / "data")
    (out / "launch.py").write_text(LAUNCH)
    cmd = [sys.executable, str(out / "launch.py"), str(script / "train_wrn_ebm.py"), *DIGITS32,
           "--data_root", str(out / "data"), "--save_dir", str(out / "save"), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        ([jemfast_dir] if jemfast_dir else []) + [str(Path(__file__).resolve().parents[2]),
                                                   os.environ.get("PYTHONPATH", "")])}
    env["PYTHONUNBUFFERED"] = "1"  # each line as it is printed: the epochs are timed on arrival
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    row: dict[str, Any] = {"restarts": 0, "iterations": 0, "valid_acc": math.nan, "test_acc": math.nan,
                           "curve": [], "save_dir": str(out / "save"), "log": str(out / "log.txt")}
    t0 = time.perf_counter()
    with open(out / "log.txt", "w", buffering=1) as log:  # line-buffered: readable while it runs
        proc = subprocess.Popen(cmd, cwd=script, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:  # tqdm's \r updates arrive inside lines: search, not match
            log.write(line)
            _read_line(line, row, time.perf_counter() - t0)
        exit_code = proc.wait()
    row["wall_s"] = time.perf_counter() - t0
    row["exit"] = exit_code
    text = (out / "log.txt").read_text(errors="replace")
    diverged = "DivergenceExhausted" in text or "BAD BOIIIIIIIIII" in text
    row["status"] = "finished" if exit_code == 0 else "diverged" if diverged else "failed"
    return row


def _read_line(line: str, row: dict[str, Any], seconds: float) -> None:
    for m in ITERATION_LINE.finditer(line):
        row["iterations"] = max(row["iterations"], int(m.group(1)))
    for m in RESTART_LINE.finditer(line):
        row["restarts"] = max(row["restarts"], int(m.group(1)))
    for m in EPOCH_LINE.finditer(line):
        acc = float(m.group(3))
        if m.group(2) == "Valid":
            row["valid_acc"] = acc
            row["curve"].append((seconds, acc))
        else:
            row["test_acc"] = acc

"""Fault injection: kill -9 a tiny training run at random moments many times in a row, resuming
each time, then check that every checkpoint loads, the metrics log is consistent, and the final
model equals an uninterrupted run with the same seed (resume is bit-exact from any checkpoint,
so wherever a kill falls the run replays the lost iterations identically)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from jemfast.rundir.checkpoint import read_checkpoint
from jemfast.rundir.directory import checkpoint_candidates
from tests.conftest import REPO

ARGS = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "100", "--sgld-steps", "20", "--no-progress",
        "--epochs", "8", "--ckpt-every", "3", "--log-every", "1"]
KILLS = 20


def last_inode(out) -> int | None:
    try:
        return os.stat(out / "checkpoints" / "last.pt").st_ino
    except FileNotFoundError:
        return None


def kill_moment(rng: random.Random, out, proc: subprocess.Popen) -> None:
    """Wait for a random moment of this process's life: during start-up (a quarter of the kills),
    or after it wrote 1-2 new checkpoints (each replaces last.pt: a new inode), plus a random
    delay of up to a few iterations, so kills land in iterations and in checkpoint writes.
    Tied to progress, not to the clock: a fast or a busy machine gets the same mix."""
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.0, 2.0))
        return
    seen, changes, wanted = last_inode(out), 0, rng.randint(1, 2)
    t0 = time.time()
    while changes < wanted and proc.poll() is None and time.time() - t0 < 300:
        inode = last_inode(out)
        if inode != seen:
            seen, changes = inode, changes + 1
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.1))


@pytest.mark.slow
def test_twenty_random_kills_then_resume_equals_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"  # in a fresh process like the killed runs (same thread count: results
    # depend bit-wise on it, and earlier tests may have changed this process's)
    done = subprocess.run([sys.executable, "-m", "jemfast.train", *ARGS, "--out", str(ref)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < KILLS:
        resume = ["--resume"] if checkpoint_candidates(out) else []
        proc = subprocess.Popen([sys.executable, "-m", "jemfast.train", *ARGS, "--out", str(out), *resume],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kill_moment(rng, out, proc)
        if proc.poll() is not None:
            pytest.fail(f"run ended before kill {kills + 1}: {proc.returncode} {proc.stderr.read()[-1000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        for path in sorted((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []:
            read_checkpoint(path)  # every checkpoint on disk loads after every kill
    resume = ["--resume"] if checkpoint_candidates(out) else []
    done = subprocess.run([sys.executable, "-m", "jemfast.train", *ARGS, "--out", str(out), *resume], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]

    a = read_checkpoint(ref / "checkpoints" / "last.pt")
    b = read_checkpoint(out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8 * (1257 // 64)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    assert b["recovery"]["restarts"] == []
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps == list(range(1, b["step"] + 1)), "each iteration logged exactly once, in order"
    assert not [l for l in lines if l.get("event") == "restart"]
    assert not list((out / "checkpoints").glob(".*.tmp")), "orphaned temp files were cleaned up"

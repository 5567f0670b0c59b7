"""Fault injection: kill -9 a tiny training run at random moments many times in a row, resuming
each time, then check that every checkpoint loads, the metrics log is consistent, and the final
model equals an uninterrupted run with the same seed (resume is bit-exact from any checkpoint,
so wherever a kill falls the run replays the lost iterations identically)."""
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from jemfast.checkpoint import read_checkpoint
from jemfast.rundir import checkpoint_candidates
from jemfast.train import main
from tests.conftest import REPO

ARGS = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "100", "--sgld-steps", "2", "--no-progress",
        "--epochs", "8", "--ckpt-every", "3", "--log-every", "1"]
KILLS = 20


def logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def kill_moment(rng: random.Random, out, proc: subprocess.Popen, start_lines: int) -> None:
    """Wait for a random moment of this process's life: during start-up (a quarter of the kills),
    or after 1-6 more iterations were logged, plus a random fraction of an iteration. Tied to
    progress, not to the clock, so a fast or a busy machine gets the same mix of moments."""
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.0, 2.0))
        return
    target = start_lines + rng.randint(1, 6)
    t0 = time.time()
    while logged_steps(out) < target and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))


@pytest.mark.slow
def test_twenty_random_kills_then_resume_equals_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    assert main([*ARGS, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < KILLS:
        resume = ["--resume"] if checkpoint_candidates(out) else []
        proc = subprocess.Popen([sys.executable, "-m", "jemfast.train", *ARGS, "--out", str(out), *resume],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        done = read_checkpoint(out / "checkpoints" / "last.pt")["step"] if resume else 0
        kill_moment(rng, out, proc, start_lines=min(logged_steps(out), done))
        if proc.poll() is not None:
            pytest.fail(f"run ended before kill {kills + 1}: {proc.returncode} {proc.stderr.read()[-1000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        for path in sorted((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []:
            read_checkpoint(path)  # every checkpoint on disk loads after every kill
    resume = ["--resume"] if checkpoint_candidates(out) else []
    assert main([*ARGS, "--out", str(out), *resume]) == 0

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

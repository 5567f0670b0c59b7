"""Crash safety: SIGKILL at many moments, SIGTERM/SIGINT, corrupt/truncated/malicious checkpoints."""
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from jemfast.process.errors import UserError
from jemfast.rundir.checkpoint import read_checkpoint
from jemfast.train import main, train
from tests.conftest import start_train, tiny_digits_config, wait_until

TINY = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "100", "--sgld-steps", "2",
        "--no-progress", "--log-every", "1"]


def start(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return start_train([*TINY, "--out", str(out), *extra], env=env)


def wait_for(pred, timeout=120.0):
    return wait_until(pred, timeout)


def n_metric_lines(out: Path) -> int:
    p = out / "metrics.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


def all_checkpoints_load(out: Path) -> list[int]:
    steps = []
    for p in sorted((out / "checkpoints").glob("*.pt")):
        steps.append(read_checkpoint(p)["step"])  # raises on a torn file
    return steps


@pytest.mark.slow
def test_sigkill_at_many_moments_never_corrupts_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = ("--epochs", "3", "--ckpt-every", "4")
    moments = [("after 6 iterations", 6), ("during a checkpoint write", None), ("after 23 iterations", 23),
               ("during a checkpoint write", None), ("after 45 iterations", 45)]
    first = True
    for label, lines in moments:
        extra = args if first else (*args, "--resume")
        env = {"JEMFAST_TEST_SAVE_DELAY": "0.5"} if lines is None else None
        proc = start(out, *extra, env=env)
        if lines is None:  # kill while a new temp checkpoint file exists but is not renamed yet
            torn = set((out / "checkpoints").glob(".good-*.tmp"))  # left by earlier kills
            assert wait_for(lambda: bool(set((out / "checkpoints").glob(".good-*.tmp")) - torn)), label
        else:
            base = n_metric_lines(out)
            assert wait_for(lambda: n_metric_lines(out) >= base + lines or proc.poll() is not None), label
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert all_checkpoints_load(out), label
        first = False
    proc = start(out, *args, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "resuming from" in stderr
    final = read_checkpoint(out / "checkpoints" / "last.pt")
    assert final["epoch"] == 3 and final["step"] == 3 * 19
    steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if '"loss"' in l]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # crashed tails were dropped


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    proc = start(out, "--epochs", "3")
    assert wait_for(lambda: n_metric_lines(out) >= 5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    assert 5 <= ckpt["step"] < 3 * 19
    assert json.load(open(out / "summary.json"))["status"] == "interrupted"
    assert main([*TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3 * 19


@pytest.fixture
def finished_run(tmp_path):
    cfg = tiny_digits_config(tmp_path / "run", optim__epochs=2, stability__good_ring=3,
                             sampler__buffer_size=100, sampler__n_steps=2)  # as TINY
    train(cfg)
    return Path(cfg.run.out)


def digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_truncated_last_falls_back_to_previous_good(finished_run, capsys):
    ckpts = finished_run / "checkpoints"
    newest = sorted(ckpts.glob("good-*.pt"))[-1]
    data = newest.read_bytes()
    (ckpts / "last.pt").unlink()  # break the hard link, then write a torn copy
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])
    newest.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_checkpoint(ckpts / "last.pt")
    assert main([*TINY, "--epochs", "3", "--out", str(finished_run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "resuming from" in err and "good-" in err
    assert read_checkpoint(ckpts / "last.pt")["epoch"] == 3


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_checkpoint(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/jemfast_pickle_payload_ran")


def test_malicious_pickle_is_refused_not_run(tmp_path):
    MARKER.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "x": Payload()}, evil)
    with pytest.raises(UserError, match="refused"):
        read_checkpoint(evil)
    assert not MARKER.exists()

"""kill -9 of one rank under real torchrun: the run ends (no hang), the survivor says at most one
line, the last checkpoint is intact, and ``--resume`` under torchrun finishes the run."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from jemfast.distributed.ranks import lost_peer, peer_lost
from tests.ddp_helpers import (PER_EPOCH, end_group, last, rank_output, start_torchrun, torchrun, wait_for, wait_gone,
                               worker_pids)

NO_HANG_S = 180  # torchrun's agent SIGTERMs the others at once and SIGKILLs them 30 s later


def test_a_failed_collective_is_one_line_and_a_bug_is_not_hidden():
    gloo = RuntimeError("[/w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:4242. This is typically caused by a remote worker crashing.\nmore")
    assert lost_peer(gloo) and lost_peer(RuntimeError("NCCL communicator was aborted on rank 1."))
    assert str(peer_lost(gloo, "continue with --resume")) == (
        "lost contact with another process of the run (Connection closed by peer [127.0.0.1]:4242); "
        "continue with --resume")
    assert peer_lost(gloo, "x").exit_code == 1
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug keeps its traceback
    assert not lost_peer(ValueError("ProcessGroup"))


@contextlib.contextmanager
def past_first_epoch(out: Path, logs: Path) -> Iterator[tuple[subprocess.Popen, dict[int, int]]]:
    """A 2-rank run (long enough never to finish here) once its first epoch's checkpoint exists:
    ``(torchrun process, {rank: worker pid})``; whatever is left of it is killed afterwards."""
    proc = start_torchrun(["--epochs", "300", "--out", str(out)], logs)
    try:
        wait_for(out / "checkpoints" / f"good-{PER_EPOCH:09d}.pt", proc=proc)
        yield proc, worker_pids(proc.pid)
    finally:
        end_group(proc)


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_run_then_resume_finishes(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    with past_first_epoch(out, logs) as (proc, pids):
        assert sorted(pids) == [0, 1], pids
        before = rank_output(logs, 0)
        os.kill(pids[1], signal.SIGKILL)
        agent_output, _ = proc.communicate(timeout=NO_HANG_S)
    assert proc.returncode != 0, agent_output[-3000:]
    assert "SIGKILL" in agent_output  # torchrun names the rank that died
    survivor = rank_output(logs, 0)
    assert len(survivor.splitlines()) - len(before.splitlines()) == 1, survivor[-3000:]  # no traceback
    assert "lost contact with another process of the run" in survivor and "--resume" in survivor
    assert rank_output(logs, 1) == ""

    ckpt = last(out)  # intact: read_checkpoint checks the whole structure
    assert ckpt["step"] >= PER_EPOCH and ckpt["world"]["size"] == 2
    assert ckpt["world"]["param_checksums"][0] == ckpt["world"]["param_checksums"][1]
    epochs = ckpt["step"] // PER_EPOCH + 2  # at least one more whole epoch, however far it got
    r = torchrun(["--epochs", str(epochs), "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"iteration {ckpt['step']})" in r.stderr  # resumed from the checkpoint the kill left
    final = last(out)
    assert final["step"] == epochs * PER_EPOCH
    assert final["world"]["param_checksums"][0] == final["world"]["param_checksums"][1]


@pytest.mark.slow
def test_kill_9_of_torchrun_itself_stops_its_workers_with_a_checkpoint(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    with past_first_epoch(out, logs) as (proc, pids):
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers live in sessions of their own
        proc.wait(timeout=60)
        wait_gone(list(pids.values()), timeout=NO_HANG_S)  # they got SIGTERM as their parent died
    assert "interrupted: checkpoint saved" in rank_output(logs, 0)
    ckpt = last(out)
    assert ckpt["step"] > PER_EPOCH and ckpt["world"]["param_checksums"][0] == ckpt["world"]["param_checksums"][1]
    epochs = ckpt["step"] // PER_EPOCH + 1
    r = torchrun(["--epochs", str(epochs), "--out", str(out), "--resume"])  # the lock went with them
    assert r.returncode == 0, r.stderr[-3000:]
    assert last(out)["step"] == epochs * PER_EPOCH

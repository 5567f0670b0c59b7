"""Helpers of the torchrun tests: 2 processes, gloo on the CPU, digits, tiny settings."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jemfast.rundir.checkpoint import read_checkpoint
from tests.conftest import REPO

TINY = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "200", "--sgld-steps", "2", "--warmup-iters", "0",
        "--device", "cpu", "--no-progress", "--seed", "3"]
PER_EPOCH = 1257 // 128  # global batch 2 x 64


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "JEMFAST_DIST_TIMEOUT": "120"}
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args: list[str], module: str = "jemfast.train", log_dir: Path | None = None) -> list[str]:
    """``torchrun --nproc_per_node 2 [--log-dir DIR --redirects 3] -m module TINY args``: with a
    log directory each rank's stdout and stderr go to their own files (:func:`rank_output`)."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *logs, "-m", module, *TINY, *args]


def torchrun(args: list[str], timeout: float = 400, module: str = "jemfast.train",
             **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, module), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env))


def start_torchrun(args: list[str], log_dir: Path, module: str = "jemfast.train", **extra_env: str) -> subprocess.Popen:
    """torchrun with its output to a pipe; :func:`end_group` cleans up after it."""
    return subprocess.Popen(torchrun_cmd(args, module, log_dir), cwd=REPO, env=env(**extra_env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of torchrun ``proc`` and its workers (a test that failed half-way)."""
    workers = children(proc.pid)  # torchrun starts its workers in sessions of their own
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    wait_gone(workers)


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_pids(agent_pid: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes the torchrun agent ``agent_pid`` started."""
    ranks = {}
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    t0 = time.time()
    while any(_state(pid) != "Z" for pid in pids):
        assert time.time() - t0 < timeout, f"processes {pids} still alive"
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process state letter of ``pid`` ("Z" also when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def rank_output(log_dir: Path, rank: int) -> str:
    """What local rank ``rank`` wrote to stdout and stderr (torchrun --log-dir --redirects 3)."""
    files = sorted(log_dir.glob(f"*/attempt_0/{rank}/std*.log"))
    assert files, f"no logs of rank {rank} under {log_dir}"
    return "".join(f.read_text() for f in files)


def wait_for(path: Path, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc is None or proc.poll() is None, f"the run ended before {path} appeared"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.1)


def last(out: Path) -> dict:
    return read_checkpoint(out / "checkpoints" / "last.pt")

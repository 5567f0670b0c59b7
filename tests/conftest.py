"""Shared fixtures: small, fast configurations of real training runs."""
from __future__ import annotations

import os

# Under pytest-xdist (the README's `-n 3`) every worker, and every process a test starts, uses one
# torch thread: these tests are small and often wait on processes they start; three workers at one
# thread each keep 2 cores busy, where two threads each would oversubscribe them. A user's count is kept.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Importing jemfast before torch chooses OpenMP's wait policy (jemfast.process.threads says why); test
# modules import torch first, so import jemfast here, before any of them.
import jemfast  # noqa: F401,E402

import torch

# Triton reads TRITON_INTERPRET when it is first imported (torchvision imports it): set it
# before anything else so the kernels run on the CPU interpreter where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from jemfast.options.config import Config, apply_preset

REPO = Path(__file__).resolve().parents[1]


def tiny_digits_config(out: Path, **overrides) -> Config:
    """A digits run that trains in seconds: small CNN, short chains, small buffer.

    ``overrides`` are dotted config keys with '__' for '.', e.g. ``optim__epochs=2``.
    """
    cfg = Config()
    cfg.data.dataset = "digits"
    tiny = {"model.hidden": 8, "optim.epochs": 1, "sampler.buffer_size": 200, "sampler.n_steps": 5,
            "run.out": str(out), "run.progress": False, "run.log_every": 5}
    tiny.update({key.replace("__", "."): value for key, value in overrides.items()})
    return apply_preset(cfg).with_overrides(tiny)


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda **kw: tiny_digits_config(tmp_path / "run", **kw)


def stop_after(trainer, n: int) -> None:
    """Make ``trainer`` believe a SIGTERM arrived after its ``n``-th iteration (the monitor
    observes once per iteration), so it stops there and saves a checkpoint."""
    real_observe, count = trainer.monitor.observe, {"n": 0}

    def observe(*args):
        real_observe(*args)
        count["n"] += 1
        if count["n"] == n:
            trainer.stop_signal = 15

    trainer.monitor.observe = observe


def start_train(args: list[str], stderr: Any = subprocess.PIPE, env: dict | None = None) -> subprocess.Popen:
    """``python -m jemfast.train ARGS`` started in the background (stdout piped, text mode);
    ``env`` adds to this process's environment."""
    return subprocess.Popen([sys.executable, "-m", "jemfast.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env={**os.environ, **(env or {})})


def outside_xdist_env() -> dict[str, str]:
    """This process's environment without pytest-xdist's worker variables: a pytest that a test
    starts must not take itself for an xdist worker (pytest-benchmark then times nothing)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}


def wait_until(pred: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(poll)
    return False


def run_module(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a fresh interpreter; returns the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def triton_marker() -> tuple[torch.device, pytest.MarkDecorator]:
    """The device Triton kernels run on here and a skip marker for when they cannot run."""
    from jemfast.kernels import triton_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, pytest.mark.skipif(
        not triton_available(device),
        reason="Triton cannot run here: no CUDA, and triton was imported before TRITON_INTERPRET=1 "
               "was set (export TRITON_INTERPRET=1 for the CPU interpreter)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort: file order otherwise kept): under pytest-xdist the long
    end-to-end runs then start at once and the short tests fill in around them, instead of one
    long run starting last and running on alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

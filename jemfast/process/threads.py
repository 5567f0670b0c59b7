"""CPU threads for training on a machine that other work shares.

Two settings, both made once per process:

- OpenMP wait policy. torch's CPU kernels run in libgomp parallel regions; between regions
  idle threads spin-wait (libgomp: 300,000 spins, then sleep; ``OMP_WAIT_POLICY=ACTIVE``: for
  ever) or sleep at once (``PASSIVE``). On a quiet machine spinning is fastest: the threads are
  awake when the next region starts (measured 1.3-1.4x PASSIVE on the 2-core reference machine).
  Beside other work it is the opposite: the spinning steals the other processes' time slices and
  every barrier waits for a thread that is not running (3-7x slower than PASSIVE beside a second
  training, and no spin count between was good at both: bench/test_quickstart_speed.py, table in
  bench/RESULTS.md). So :func:`choose_wait_policy` looks when jemfast is imported: if the
  CPUs this process's threads need are free (sampled from ``/proc/stat`` over
  :data:`SAMPLE_S`), threads spin (``OMP_WAIT_POLICY=ACTIVE``), else they sleep (``PASSIVE``).
  A training run that chose ACTIVE then follows the load while it runs (:func:`configure_threads`
  starts :mod:`jemfast.process.load_follower`): while other work needs the CPUs its threads
  sleep instead of spinning, and spin again once the CPUs are free. libgomp reads
  the variables when torch is imported, so the choice is made in ``jemfast/__init__`` before
  jemfast imports torch, and only if the user set neither ``OMP_WAIT_POLICY`` nor
  ``GOMP_SPINCOUNT``; a program that imported torch first keeps its own policy. Child processes
  inherit the variable and :data:`CHOICE_VAR`, which tells them it was jemfast's choice, so each
  looks again for itself (Ray Tune trials and torchrun workers run one thread each by default,
  where there is nothing to spin for).
- Thread count (``--threads N``; 0 = auto). Auto keeps torch's count (its default, or what
  ``OMP_NUM_THREADS`` or the program set) but never more than the CPUs this process may use:
  its CPU affinity, capped by a cgroup CPU quota (a container limited to 2 CPUs on a 64-core
  host would otherwise run 64 threads). It deliberately does not follow the load average:
  results depend bit-wise on the thread count (the CNN's reductions split by thread), so a
  count that changed with the load would make two runs of one seed, or a run and its
  resumption, differ.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from .load_follower import busy_between, cpu_ticks, follow_load
from .log import get_logger, log_once

log = get_logger(__name__)


SAMPLE_S = 0.06  # how long /proc/stat is sampled at import (6 clock ticks of 10 ms per CPU)
CHOICE_VAR = "JEMFAST_OMP_WAIT"  # set with the policy jemfast chose: "<policy>: <why>"


def busy_cpus(sample_s: float = SAMPLE_S, stat: Path = Path("/proc/stat")) -> tuple[float, int] | None:
    """(CPUs busy, CPUs in all) over the next ``sample_s`` seconds, machine-wide, from the
    ``cpu`` line of ``stat`` (this process sleeps meanwhile, so the busy ones are other work's);
    None where it cannot be read (not Linux)."""
    before = cpu_ticks(stat)
    if before is None:
        return None
    time.sleep(sample_s)
    after = cpu_ticks(stat)
    if after is None:
        return None
    return busy_between(before[0], after[0], before[1])[0], before[1]


def wanted_threads() -> int:
    """The thread count torch will start with: ``OMP_NUM_THREADS`` if set, else the usable CPUs."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
    except (KeyError, ValueError):
        return available_cpus()


def choose_wait_policy(busy: Callable[[], tuple[float, int] | None] = busy_cpus) -> str | None:
    """Set ``OMP_WAIT_POLICY`` to ACTIVE when the CPUs this process's threads need are free now,
    else to PASSIVE, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (a setting
    from jemfast in a parent process, marked by :data:`CHOICE_VAR`, is chosen again). One thread
    has nothing to spin for: no sampling, nothing set. Returns the choice as the start-up log
    names it, or None where nothing was chosen. Effective only before torch's first import."""
    if CHOICE_VAR in os.environ:
        os.environ.pop("OMP_WAIT_POLICY", None)
        del os.environ[CHOICE_VAR]
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    threads = wanted_threads()
    if threads == 1:
        return None
    sample = busy()
    if sample is None:
        return None
    used, n = sample
    policy = "ACTIVE" if cpus_free(used, n, threads) else "PASSIVE"
    choice = f"{policy}: {used:.1f} of {n} CPUs busy at start, {threads} thread(s) wanted"
    os.environ["OMP_WAIT_POLICY"] = policy
    os.environ[CHOICE_VAR] = choice
    return choice


def cpus_free(busy: float, n: int, threads: int) -> bool:
    """Whether ``threads`` threads have CPUs to themselves with ``busy`` of the machine's ``n``
    CPUs busy with other work: this process's share of the idle CPUs (its
    :func:`available_cpus` times the idle fraction) is at least ``threads - 0.5``."""
    return available_cpus() * (1.0 - busy / n) >= threads - 0.5


def wait_policy() -> str:
    """The OpenMP wait policy this process's environment asks for, as the start-up log names it."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if CHOICE_VAR in os.environ:
        return f"OMP_WAIT_POLICY={os.environ[CHOICE_VAR]}"
    if policy:
        return f"OMP_WAIT_POLICY={policy} (set by the user)"
    return f"GOMP_SPINCOUNT={spins} (set by the user)" if spins else "libgomp default (spin 300000)"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by this container's cgroup CPU quota (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None when there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


_torch_count: int | None = None  # torch's thread count before jemfast first changed it


def auto_threads() -> int:
    """The thread count of ``--threads 0``: torch's count as it was before jemfast first set it
    (its default, ``OMP_NUM_THREADS``, or the program's choice), at most :func:`available_cpus`."""
    import torch  # here, not at the top: jemfast/__init__ imports this module before torch

    global _torch_count
    if _torch_count is None:
        _torch_count = torch.get_num_threads()
    return max(1, min(_torch_count, available_cpus()))


def configure_threads(requested: int) -> int:
    """Set torch's intra-op thread count: ``requested`` if > 0, else :func:`auto_threads`, and
    follow the load from now on where jemfast chose ACTIVE spinning (module docstring).
    Returns the count now in use; logs it (with the wait policy and the 1-minute load)."""
    import torch

    auto = auto_threads()  # always first: it notes torch's own count before we change it
    n = requested if requested > 0 else auto
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    following = n > 1 and os.environ.get(CHOICE_VAR, "").startswith("ACTIVE") and follow_load(n, cpus_free)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log_once(log, ("threads", n), f"CPU: {n} torch thread(s) ({'--threads' if requested > 0 else 'auto'}; "
             f"{available_cpus()} CPU(s) available, load {load:.1f}, "
             f"OpenMP wait: {wait_policy()}{', following the load' if following else ''})")
    return n

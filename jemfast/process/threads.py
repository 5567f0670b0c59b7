"""CPU threads for training on a machine that other work shares.

Two settings, both made once per process:

- OpenMP wait policy. torch's CPU kernels run in libgomp parallel regions; between regions
  idle threads spin-wait, by default for 300,000 spins before they sleep. When other processes
  want the same cores, that spinning steals their time slices and every barrier waits for a
  thread that is not running (measured: 4-5x slower beside a second training). Sleeping at once
  (``OMP_WAIT_POLICY=PASSIVE``) fixes that but costs ~1.5x on a quiet machine, where the threads
  wake from a sleep every region. A short bounded spin, ``GOMP_SPINCOUNT=2000``, keeps the quiet
  speed and is as gentle as PASSIVE beside other work (bench/test_quickstart_speed.py, table in
  bench/RESULTS.md). libgomp reads these once, when torch is imported, so
  :func:`prefer_bounded_spin` runs in ``jemfast/__init__`` (before jemfast imports torch) and
  only if the user set neither variable; a program that imported torch before jemfast keeps its
  own policy. Child processes (Ray Tune trials, torchrun workers) inherit the environment.
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
from pathlib import Path

from .log import get_logger, log_once

log = get_logger(__name__)


BOUNDED_SPIN = "2000"  # libgomp spins before an idle thread sleeps (its default: 300000)


def prefer_bounded_spin() -> None:
    """Set ``GOMP_SPINCOUNT=2000`` unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
    (effective only if torch has not been imported yet in this process; child processes inherit
    it either way)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = BOUNDED_SPIN


def wait_policy() -> str:
    """The OpenMP wait policy this process's environment asks for, as the start-up log names it."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if policy:
        return f"OMP_WAIT_POLICY={policy}"
    return f"GOMP_SPINCOUNT={spins}" if spins else "libgomp default (spin 300000)"


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
    """Set torch's intra-op thread count: ``requested`` if > 0, else :func:`auto_threads`.
    Returns the count now in use; logs it (with the wait policy and the 1-minute load)."""
    import torch

    auto = auto_threads()  # always first: it notes torch's own count before we change it
    n = requested if requested > 0 else auto
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log_once(log, ("threads", n), f"CPU: {n} torch thread(s) ({'--threads' if requested > 0 else 'auto'}; "
             f"{available_cpus()} CPU(s) available, load {load:.1f}, "
             f"OpenMP wait: {wait_policy()})")
    return n

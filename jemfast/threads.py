"""CPU threads for training on a machine that other work shares.

Two settings, both made once per process:

- OpenMP wait policy. torch's CPU kernels run in libgomp parallel regions; between regions
  idle threads spin-wait by default. When other processes want the same cores, the spinning
  steals their time slices and every barrier waits for a thread that is not running.
  ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep instead. libgomp reads the variable
  once, when torch is imported, so :func:`prefer_passive_wait` runs in ``jemfast/__init__``
  (before jemfast imports torch) and only if the user has not set the variable; a program that
  imported torch before jemfast keeps its own policy.
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


def prefer_passive_wait() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy (effective only if torch
    has not been imported yet in this process; child processes inherit it either way)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    return n

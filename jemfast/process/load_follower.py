"""The OpenMP wait policy follows the machine's load while a run trains.

libgomp reads ``OMP_WAIT_POLICY`` once, so a run that chose ACTIVE at start
(:func:`jemfast.process.threads.choose_wait_policy`) would spin beside work that arrives later
(3-7x slower than PASSIVE there). libgomp has no call to change the policy, but it has a rule
of its own: while it manages more threads than the CPUs it found at start, every wait spins
only briefly (its "throttled" spin count, 1,000 under ACTIVE) and then sleeps, as PASSIVE
does. :class:`LoadFollower` uses that rule: when other work needs the CPUs this process's
threads would spin on, a parked thread opens one idle OpenMP team of more threads than the
machine has CPUs (they sleep in libgomp's pool and cost nothing but their stacks); when the
CPUs are free again, the team is closed and the threads spin as before. The thread count,
hence every result, is unchanged (results depend bit-wise on the thread count, not on how
threads wait).

Sampling: every :data:`PERIOD_S` seconds, the CPUs busy machine-wide (``/proc/stat``) less
this process's own CPU time over the same interval is the other work's load; this process's
share of the rest (:func:`jemfast.process.threads.cpus_free`, the rule the start-up choice
uses) decides. Throttling starts at the first busy sample and stops after
:data:`QUIET_SAMPLES` quiet ones in a row, so a brief lull does not bring back the spinning.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .log import get_logger

log = get_logger(__name__)

PERIOD_S = 1.0
QUIET_SAMPLES = 2


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded into this process (None: torch uses another OpenMP, or none)."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "/libgomp" in line), None)
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


class Throttle:
    """One idle OpenMP team of more threads than CPUs, held open by a parked thread while
    :meth:`engage`\\ d (libgomp then sleeps instead of spinning in every wait of this process)."""

    def __init__(self, gomp: ctypes.CDLL) -> None:
        self._parallel = gomp.GOMP_parallel
        self._parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        # each team thread runs fn(NULL): libc's free(NULL) does nothing, without Python or the GIL
        self._noop = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)
        self._release = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def engaged(self) -> bool:
        return self._thread is not None

    def _hold(self) -> None:
        self._parallel(self._noop, None, (os.cpu_count() or 1) + 1, 0)  # the team stays in this thread's pool
        self._release.wait()  # the pool (and its threads) goes when this thread ends

    def engage(self) -> None:
        if self._thread is None:
            self._release.clear()
            self._thread = threading.Thread(target=self._hold, name="jemfast-omp-throttle", daemon=True)
            self._thread.start()

    def release(self) -> None:
        if self._thread is not None:
            self._release.set()
            self._thread.join()
            self._thread = None


def cpu_ticks(stat: Path = Path("/proc/stat")) -> tuple[list[int], int] | None:
    """The tick counters of ``stat``'s machine-wide ``cpu`` line and the number of CPUs (None
    where it cannot be read: not Linux)."""
    try:
        lines = stat.read_text().splitlines()
        ticks = [int(v) for v in lines[0].split()[1:]]
        return ticks, sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    except (OSError, ValueError, IndexError):
        return None


def busy_between(before: list[int], after: list[int], n: int) -> tuple[float, int]:
    """(CPUs busy, ticks of all ``n`` CPUs) between two :func:`cpu_ticks` readings."""
    delta = [b - a for a, b in zip(before, after)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (n * (total - idle) / total if total > 0 else 0.0), total


class LoadSampler:
    """Other work's busy CPUs since the previous call: machine-wide busy CPUs (``stat``) less
    this process's own CPU time (``time.process_time``, all its threads) over the interval."""

    def __init__(self, stat: Path = Path("/proc/stat"), own: Callable[[], float] = time.process_time) -> None:
        self.stat, self.own = stat, own
        self._last = self._read()

    def _read(self) -> tuple[list[int], float, int] | None:
        read = cpu_ticks(self.stat)
        return None if read is None else (read[0], self.own(), read[1])

    def __call__(self) -> tuple[float, int] | None:
        """(other work's busy CPUs, CPUs in all), or None where ``stat`` cannot be read."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None:
            return None
        busy, total = busy_between(last[0], now[0], now[2])
        if total <= 0:
            return None
        seconds = total / now[2] / os.sysconf("SC_CLK_TCK")  # the interval's wall time
        return max(0.0, busy - (now[1] - last[1]) / seconds), now[2]


class LoadFollower:
    """Throttles libgomp's spinning while other work needs the CPUs (module docstring).

    ``threads``: this process's torch thread count; ``free(other, n, threads) -> bool`` says
    whether the CPUs the threads need are free with ``other`` of ``n`` CPUs busy elsewhere;
    ``sample()`` gives (other, n) or None. :meth:`step` takes one sample and decides; :meth:`start`
    does so every ``period_s`` in a daemon thread.
    """

    def __init__(self, threads: int, free: Callable[[float, int, int], bool], throttle: Throttle,
                 sample: Callable[[], tuple[float, int] | None] | None = None, period_s: float = PERIOD_S) -> None:
        self.threads, self.free, self.throttle = threads, free, throttle
        self.sample = sample or LoadSampler()
        self.period_s = period_s
        self.quiet_streak = 0
        self.switches = 0  # how often the throttle was engaged or released
        self._stop = threading.Event()

    def step(self) -> bool:
        """One decision; returns whether the throttle is engaged after it."""
        s = self.sample()
        if s is None:
            return self.throttle.engaged
        if not self.free(s[0], s[1], self.threads):
            self.quiet_streak = 0
            if not self.throttle.engaged:
                self.throttle.engage()
                self.switches += 1
                log.debug(f"{s[0]:.1f} CPU(s) busy with other work: OpenMP threads sleep instead of spinning")
        else:
            self.quiet_streak += 1
            if self.throttle.engaged and self.quiet_streak >= QUIET_SAMPLES:
                self.throttle.release()
                self.switches += 1
                log.debug("the CPUs are free again: OpenMP threads spin")
        return self.throttle.engaged

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.step()

    def start(self) -> None:
        self.step()  # at once: a run that starts beside other work does not spin for a period first
        threading.Thread(target=self._loop, name="jemfast-load-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.throttle.release()


_follower: LoadFollower | None = None


def follow_load(threads: int, free: Callable[[float, int, int], bool]) -> LoadFollower | None:
    """Start this process's :class:`LoadFollower` (once; later calls update its thread count).
    None where libgomp is not torch's OpenMP (nothing to follow)."""
    global _follower
    if _follower is None:
        gomp = _libgomp()
        if gomp is None:
            return None
        _follower = LoadFollower(threads, free, Throttle(gomp))
        _follower.start()
    _follower.threads = threads
    return _follower

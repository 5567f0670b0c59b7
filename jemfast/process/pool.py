"""Many runs of one function, in this process or ``jobs`` at a time in fresh ones: what the
benchmark commands (natural_divergence, recipe_benchmark) share."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, Callable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stop_with_parent(parent: int) -> None:
    """A pool worker's initializer: on Linux the kernel sends it SIGTERM when the benchmark's
    process dies (killed, or stopped by a signal), so no run goes on computing for nobody; a run
    stops on SIGTERM as on a scheduler's (it saves a checkpoint and ends)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def run_all(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple[Any, ...]], jobs: int,
            done: Callable[[dict[str, Any]], None]) -> None:
    """``done(fn(*args))`` for every ``args`` of ``calls``: in order here when ``jobs`` is 1, else
    in a pool of ``jobs`` spawned processes (fresh interpreters: no state shared between runs;
    they end with this process), each result as it comes. ``fn`` must be importable (a
    module-level function)."""
    if jobs == 1:
        for args in calls:
            done(fn(*args))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_stop_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for future in as_completed([pool.submit(fn, *args) for args in calls]):
            done(future.result())

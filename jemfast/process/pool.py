"""Many runs of one function, in this process or ``jobs`` at a time in fresh ones: what the
benchmark commands (natural_divergence, recipe_benchmark) share.

A pool's workers end with the process that started them (killed, or stopped by a signal): on
Linux the kernel sends each one SIGTERM then (a training run stops as on a scheduler's SIGTERM:
it saves and returns), a worker whose parent is gone starts no further call, and an idle one
exits within a second."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_busy = threading.Event()  # a call is running in this worker


def _orphaned_exit() -> None:
    os._exit(128 + signal.SIGTERM)


def _parent_gone(parent: int) -> bool:
    """Whether the benchmark's process is dead or dying. While a killed process's threads wind
    down, its children belong to one of them: getppid() still names it (and the parent-death
    signal has already come), but its main thread is a zombie in /proc."""
    if os.getppid() != parent:
        return True
    try:
        with open(f"/proc/{parent}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False  # no /proc: getppid() alone


def _stop_with_parent(parent: int) -> None:
    """A pool worker's initializer: the parent-death signal, and a thread that ends an idle worker
    whose parent is gone (it would wait for calls that never come)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while _busy.is_set() or not _parent_gone(parent):
            time.sleep(0.5)
        _orphaned_exit()

    threading.Thread(target=watch, name="jemfast-pool-parent-watch", daemon=True).start()


def _call_while_parent_lives(parent: int, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a worker, unless the benchmark's process is gone (before or after it)."""
    if _parent_gone(parent):
        _orphaned_exit()
    _busy.set()
    try:
        return fn(*args)
    finally:
        _busy.clear()
        if _parent_gone(parent):  # nobody reads the result
            _orphaned_exit()


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

    parent = os.getpid()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_stop_with_parent,
                             initargs=(parent,)) as pool:
        for future in as_completed([pool.submit(_call_while_parent_lives, parent, fn, *args) for args in calls]):
            done(future.result())

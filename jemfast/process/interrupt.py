"""A process-wide "stop requested" flag that long loops poll between cheap units of work.

The trainer's SIGTERM/SIGINT handler calls :func:`request_stop`; the SGLD loops call
:func:`raise_if_stopped` between steps (a Python bool test: no device sync), so a scheduler's
SIGTERM is answered within one SGLD step instead of one whole iteration. The trainer catches
:class:`StopRequested`, discards the unfinished iteration, writes a checkpoint and exits.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

_requested: int | None = None


class StopRequested(Exception):
    """Raised inside a long loop after :func:`request_stop`; carries the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stop requested by signal {signum}")
        self.signum = signum


def request_stop(signum: int) -> None:
    global _requested
    _requested = signum


def clear() -> None:
    global _requested
    _requested = None


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _requested


def raise_if_stopped() -> None:
    if _requested is not None:
        raise StopRequested(_requested)


def quiet_startup_signals() -> None:
    """Until a CLI installs its own handlers, SIGINT/SIGTERM end the process with one line and
    exit code 128 + signal, instead of a KeyboardInterrupt traceback from deep inside an import."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: object) -> None:
        os.write(2, f"jemfast: stopped by signal {signum} during start-up\n".encode())
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


@contextlib.contextmanager
def handling_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` while inside (main thread only; elsewhere a no-op);
    the previous handlers are restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals(on_first: Callable[[int], None], collective: bool = False) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM calls ``on_first(signum)`` and :func:`request_stop`
    (long loops then stop at their next unit of work); a second one exits at once with
    128 + signal and one line (files on disk are intact: every write is atomic).

    ``collective`` (under torchrun): only ``on_first``; the ranks agree on when to stop at
    their next collective check, and a repeated signal is ignored (torchrun forwards the
    signal it got to every rank, which may have had it already)."""
    clear()
    seen: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if seen and collective:
            return
        if seen:
            os.write(2, f"jemfast: second signal {signum}: exiting without a checkpoint\n".encode())
            os._exit(128 + signum)
        seen.append(signum)
        if not collective:
            request_stop(signum)
        on_first(signum)

    try:
        with handling_signals(handler):
            yield
    finally:
        clear()

"""A process-wide "stop requested" flag that long loops poll between cheap units of work.

The trainer's SIGTERM/SIGINT handler calls :func:`request_stop`; the SGLD loops call
:func:`raise_if_stopped` between steps (a Python bool test: no device sync), so a scheduler's
SIGTERM is answered within one SGLD step instead of one whole iteration. The trainer catches
:class:`StopRequested`, discards the unfinished iteration, writes a checkpoint and exits.
"""
from __future__ import annotations

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

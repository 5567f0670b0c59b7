"""Logging for jemfast: one ``logging`` logger tree (``jemfast``, ``jemfast.eval``, ...).

Library code calls ``log = get_logger(__name__)`` and ``log.info(...)``; nothing is printed
unless the application configures logging. The CLIs call :func:`setup_cli_logging`, which writes
``prog: message`` lines to stderr through tqdm's logging redirect, so lines never tear a
progress bar. :func:`log_once` says a thing once per process (backend choices, compile times).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Hashable, Iterator

ROOT = "jemfast"
_said: set[Hashable] = set()


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger for module ``name`` (``__name__``), inside the ``jemfast`` tree."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def log_once(logger: logging.Logger, key: Hashable, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process, never again."""
    if key in _said:
        return
    _said.add(key)
    logger.log(level, message)


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time of each record (pytest and
    other tools swap it; a handler holding the old object would write to a closed stream)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prog}: {record.getMessage()}"


def setup_cli_logging(prog: str, level: int = logging.INFO) -> None:
    """Send the ``jemfast`` loggers to stderr as ``prog: message`` lines (idempotent)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_jemfast_cli", False):
            logger.removeHandler(h)
    handler = _CurrentStderr()
    handler._jemfast_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_PrefixFormatter(prog))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@contextlib.contextmanager
def progress_safe_logging() -> Iterator[None]:
    """Route the ``jemfast`` loggers through ``tqdm.write`` while progress bars are open."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger(ROOT)]):
        yield

"""One process per run directory: an OS file lock on ``DIR/.lock`` holding the owner's pid.

``fcntl.flock`` locks are released by the kernel when the process dies (even by ``kill -9``),
so a stale lock file never blocks a later run; only a live process holds it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..process.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive lock on ``directory`` (created if missing). Raises UserError naming the holder."""

    def __init__(self, directory: str | Path, what: str = "--out") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.what} {self.path.parent} is not writable ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.what} {self.path.parent} is in use by another jemfast process "
                            f"(pid {holder}); wait for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

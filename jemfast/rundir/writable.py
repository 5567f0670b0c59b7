"""Checks of directories a command will write, made before anything is written."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..process.errors import UserError, one_line


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path if it is, or could be created as, a writable directory.

    Creates nothing: the nearest existing ancestor must be a directory in which a temporary
    file can be made (a read-only file system or a file in the way fails). Raises UserError
    ``"<flag> <path> ..."``.
    """
    p = Path(path).expanduser()
    shown = one_line(str(p), 200)
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is not a directory" if probe == p else f"cannot be created: {one_line(str(probe), 200)} is a file"
        raise UserError(f"{flag} {shown} {where}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {shown} is not writable ({exc.strerror or exc})") from None
    return p

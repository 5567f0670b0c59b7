"""Errors a user can cause. The CLIs print them as one line and exit with ``exit_code``."""
from __future__ import annotations


class UserError(Exception):
    """Bad flag, missing/corrupt file, unavailable device or dataset: exit code 2."""

    exit_code = 2


class DivergenceExhausted(Exception):
    """Training kept diverging after ``max_restarts`` automatic restarts: exit code 3."""

    exit_code = 3


def one_line(text: str, limit: int = 200) -> str:
    """``text`` made safe for a one-line message: the first non-empty line, control characters
    (terminal escape codes included) written as escapes, cut at a word boundary with '...'."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    line = lines[0].strip() if lines else ""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else line[:limit]).rstrip(" ,;:") + "..."

"""Errors a user can cause. The CLIs print them as one line and exit with ``exit_code``."""
from __future__ import annotations


class UserError(Exception):
    """Bad flag, missing/corrupt file, unavailable device or dataset: exit code 2."""

    exit_code = 2


class DivergenceExhausted(Exception):
    """Training kept diverging after ``max_restarts`` automatic restarts: exit code 3."""

    exit_code = 3

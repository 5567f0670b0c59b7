"""Many runs of one function, in this process or ``jobs`` at a time in fresh ones: what the
benchmark commands (natural_divergence, recipe_benchmark) share."""
from __future__ import annotations

from typing import Any, Callable, Sequence


def run_all(fn: Callable[..., dict[str, Any]], calls: Sequence[tuple[Any, ...]], jobs: int,
            done: Callable[[dict[str, Any]], None]) -> None:
    """``done(fn(*args))`` for every ``args`` of ``calls``: in order here when ``jobs`` is 1, else
    in a pool of ``jobs`` spawned processes (fresh interpreters: no state shared between runs),
    each result as it comes. ``fn`` must be importable (a module-level function)."""
    if jobs == 1:
        for args in calls:
            done(fn(*args))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(fn, *args) for args in calls]):
            done(future.result())

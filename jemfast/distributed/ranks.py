"""torch.distributed for runs launched by ``torchrun``: the process group and small collectives.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE`` > 1,
:func:`session` starts the process group (NCCL on CUDA, one GPU per process = ``LOCAL_RANK``;
gloo on the CPU) and a second, gloo group for the control plane: divergence and stop flags,
checkpoint gathering and broadcasting (Python objects and CPU tensors, whatever the device).
Every collective has a timeout (``JEMFAST_DIST_TIMEOUT`` seconds, default 600), so a rank that
died never leaves the others waiting forever; ``torchrun`` also stops the group when one of its
processes dies (SIGTERM to the others, SIGKILL 30 s later). A collective that fails because a
peer died (gloo sees its connection close at once; NCCL at the timeout) ends this process with
:class:`PeerLost`: one line on rank 0, none elsewhere, no traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import re
import signal
import sys
import threading
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..process.errors import UserError, one_line

T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
_control: Any = None  # the gloo group of the control-plane collectives


class PeerFailed(UserError):
    """Another rank failed (rank 0 reports why, as one line): this rank stops silently."""


class PeerLost(UserError):
    """A collective failed: another process of the run died or cannot be reached (exit code 1)."""

    exit_code = 1


def lost_peer(exc: BaseException) -> bool:
    """``exc`` is a failed collective (torch's DistError, or the RuntimeError that gloo/NCCL
    raise through DistributedDataParallel's backward), not a bug of ours."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("/gloo/", "Gloo", "NCCL", "ProcessGroup"))


def peer_lost(exc: BaseException, hint: str) -> PeerLost:
    """The one-line error of a failed collective ``exc``, ending with ``hint``."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", one_line(str(exc), 1000)).split(". ")[0]  # gloo: "[file:line] why. ..."
    return PeerLost(f"lost contact with another process of the run ({one_line(reason, 120)}); {hint}")


def _ignore_further_signals() -> None:
    """On the way out after a lost peer, torchrun's SIGTERM would only cut our one line short."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_is_main() -> bool:
    """``RANK`` from the environment is 0 (or unset): this process reports for the run."""
    return os.environ.get("RANK", "0") in ("", "0")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes the run directory."""
    return rank() == 0


def rank_device(name: str) -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK`` (auto/cuda with CUDA) or cpu."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if name == "cpu" or not torch.cuda.is_available():
        if name == "cuda":
            raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cpu")
    if local >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local}: this machine has only {torch.cuda.device_count()} CUDA "
                        f"device(s); start at most that many processes per node (--nproc_per_node)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def stop_with_launcher() -> None:
    """Under torchrun, ask Linux to send this worker SIGTERM when the launcher dies.

    torchrun starts its workers in sessions of their own, so a ``kill -9`` of the torchrun
    process (or of its process group) would leave them training on, unattended, holding the run
    directory's lock. With the parent-death signal they stop as on any SIGTERM: one consistent
    checkpoint, exit 143, and ``--resume`` continues. No-op outside torchrun or Linux.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def session(device_name: str) -> Iterator[None]:
    """Start the process groups when launched with ``WORLD_SIZE`` > 1 (else do nothing);
    destroy them on exit. A collective that failed inside becomes :class:`PeerLost`."""
    global _control
    if env_world_size() <= 1 or active():
        yield
        return
    stop_with_launcher()
    timeout = timedelta(seconds=float(os.environ.get("JEMFAST_DIST_TIMEOUT", "600") or 600))
    use_nccl = device_name != "cpu" and torch.cuda.is_available()
    if use_nccl:
        rank_device(device_name)
    dist.init_process_group("nccl" if use_nccl else "gloo", timeout=timeout)
    _control = dist.new_group(backend="gloo", timeout=timeout) if use_nccl else dist.group.WORLD
    if dist.get_rank() != 0:  # rank 0 logs for the run
        logging.getLogger("jemfast").setLevel(logging.ERROR)
    try:
        yield
        dist.barrier(group=_control)  # every rank leaves together (see the comment below)
    except (PeerLost, RuntimeError) as exc:
        if not isinstance(exc, PeerLost) and not lost_peer(exc):
            raise
        _ignore_further_signals()
        if isinstance(exc, PeerLost):
            raise
        raise peer_lost(exc, "torchrun names the one that failed") from None
    finally:
        _control = None
        # gloo can abort a process at exit ("terminate called without an active exception",
        # SIGABRT) when it tears down its connections while a peer still runs, or when a
        # DistributedDataParallel kept alive by a reference cycle is freed during interpreter
        # shutdown: the ranks leave together (the barrier above) and such objects go first.
        gc.collect()
        dist.destroy_process_group()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (tensors travel pickled, on the CPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None elsewhere."""
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_control)
    return out


def all_max(values: list[int]) -> list[int]:
    """Element-wise maximum over the ranks of a short list of ints (a host sync)."""
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return t.tolist()


def all_mean(values: list[float]) -> list[float]:
    """Element-wise mean over the ranks of a short list of floats (a host sync)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control)
    return (t / world_size()).tolist()


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then make sure every rank succeeded: if any failed, rank 0
    raises the first failure as one line (naming the rank) and the others raise PeerFailed."""
    try:
        result, error = fn(), None
    except (UserError, ValueError, OSError, RuntimeError) as exc:
        result, error = None, exc
    errors = [None] * world_size()
    dist.all_gather_object(errors, None if error is None else one_line(str(error), 500), group=_control)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return result  # type: ignore[return-value]
    if error is not None and rank() == failed[0][0] == 0:
        raise error
    if is_main():
        raise UserError(f"rank {failed[0][0]}: {failed[0][1]}")
    raise PeerFailed(f"rank {failed[0][0]} failed")


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; an error there is raised on
    rank 0 and as PeerFailed elsewhere (nobody waits forever for a result that never comes)."""
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            broadcast_object(("error", one_line(str(exc), 500)))
            raise
        return broadcast_object(("ok", result))[1]
    status, value = broadcast_object(None)
    if status == "error":
        raise PeerFailed(f"rank 0 failed: {value}")
    return value

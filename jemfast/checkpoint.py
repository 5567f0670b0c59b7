"""Checkpoints that resume bit-for-bit, written atomically and read weights-only.

A checkpoint is a dict of tensors and plain Python values only (so ``torch.load(...,
weights_only=True)`` reads it; a file carrying any other pickled object is refused), built by
:func:`training_state` and read back by :func:`restore_training_state`::

    format_version, jemfast_version, config (Config.to_dict()), input_shape, n_classes,
    model (state_dict), optimizer (state_dict), buffer (ReplayBuffer.state_dict()),
    sampler (SGLD.state_dict(): n_steps, kernel Philox state), recovery (restarts, lr_scale, sgld_steps_factor),
    rng {torch, cuda, numpy, python}, step, epoch, batch_in_epoch, best_valid_acc, seed

Format 1 (jemfast 0.1 before this layout) kept the learning-rate factor under
``scheduler.lr_scale`` and the restart list at the top level; it is still read.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
target, so a crash (even ``kill -9``) leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .build import build_buffer, build_model
from .config import Config
from .buffer import ReplayBuffer
from .errors import UserError
from .sgld import SGLD
from .stability import RecoveryState

FORMAT_VERSION = 2
# Testing aid: seconds to pause between writing a checkpoint's bytes and renaming it into place.
_TEST_SAVE_DELAY = float(os.environ.get("JEMFAST_TEST_SAVE_DELAY", "0") or 0)


def rng_state() -> dict[str, Any]:
    """All RNG states: torch CPU, every CUDA device, numpy's global, Python's ``random``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename over ``path``, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if _TEST_SAVE_DELAY:  # fault-injection tests kill the process inside this window
                time.sleep(_TEST_SAVE_DELAY)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict weights-only. Raises UserError (one line) when the file is missing,
    truncated/corrupt, carries pickled objects, or is not a jemfast checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling error"
        if "global" in str(exc).lower():  # weights-only unpickler met a class/function reference
            raise UserError(f"checkpoint {path} was refused: it carries pickled objects that "
                            f"weights-only loading does not run ({first[:120]})") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first[:120]})") from None
    except Exception as exc:  # noqa: BLE001 - torn zips and garbage raise many kinds (IndexError, EOFError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first[:120]})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not a jemfast checkpoint")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {ckpt['format_version']}, "
                        f"this jemfast reads up to {FORMAT_VERSION}; upgrade jemfast")
    return _upgrade(ckpt)


@dataclass
class Progress:
    """Where a run is: iterations done, epochs done, batches done in the current epoch, the best
    validation accuracy so far (-1 before the first), and the seed in force (restarts change it)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_valid_acc: float = -1.0
    seed: int = 0


def training_state(cfg: Config, input_shape: tuple[int, ...], n_classes: int, model: nn.Module,
                   optimizer: torch.optim.Optimizer, buffer: ReplayBuffer, sampler: SGLD,
                   progress: Progress, recovery: RecoveryState) -> dict[str, Any]:
    """The checkpoint dict of a live run (tensors are the live ones: clone or save it at once)."""
    return {
        "format_version": FORMAT_VERSION, "jemfast_version": __version__, "config": cfg.to_dict(),
        "input_shape": list(input_shape), "n_classes": n_classes, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "buffer": buffer.state_dict(),
        "sampler": sampler.state_dict(), "recovery": recovery.state_dict(),
        "rng": rng_state(), **dataclasses.asdict(progress),
    }


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           buffer: ReplayBuffer, sampler: SGLD, progress: Progress,
                           recovery: RecoveryState | None = None, restore_rng: bool = True) -> None:
    """Load ``ckpt`` into the live objects. ``recovery=None`` keeps the live recovery state (a
    rollback: the effects of restarts persist); ``restore_rng=False`` keeps the RNG streams."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    buffer.load_state_dict(ckpt["buffer"])
    sampler.load_state_dict(ckpt["sampler"])  # n_steps and the fused/graph kernel noise state
    for f in dataclasses.fields(progress):
        setattr(progress, f.name, type(getattr(progress, f.name))(ckpt[f.name]))
    if recovery is not None:
        recovery.load_state_dict(ckpt["recovery"])
        recovery.restarts = list(ckpt["recovery"]["restarts"])
    if restore_rng:
        set_rng_state(ckpt["rng"])


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring a format-1 checkpoint to the current layout (in place)."""
    if ckpt.get("format_version") == 1:
        ckpt["recovery"] = {"restarts": ckpt.pop("restarts", []), "sgld_steps_factor": 1,
                            "lr_scale": float(ckpt.pop("scheduler", {}).get("lr_scale", 1.0))}
        ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint for library use.

    Returns ``{"model": JEM (eval mode, on device), "buffer": ReplayBuffer, "config": Config,
    "step": int, "epoch": int, "raw": the checkpoint dict}``.
    """
    device = torch.device(device)
    ckpt = read_checkpoint(path, map_location=device)
    cfg = Config.from_dict(ckpt["config"])
    shape, n_classes = tuple(ckpt["input_shape"]), int(ckpt["n_classes"])
    model = build_model(cfg, shape, n_classes, device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: model weights do not fit the model in its config "
                        f"({str(exc).splitlines()[0][:120]})") from None
    model.eval()
    buffer = build_buffer(cfg, shape, n_classes, device)
    buffer.load_state_dict(ckpt["buffer"])
    return {"model": model, "buffer": buffer, "config": cfg, "step": ckpt["step"],
            "epoch": ckpt["epoch"], "raw": ckpt}

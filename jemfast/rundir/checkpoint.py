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

:func:`read_checkpoint` checks a file's whole structure (:mod:`jemfast.rundir.checkpoint_schema`) before any
of it is used, so a wrong or hostile file is one "corrupt" line and ``--resume`` moves on to
an older checkpoint; :func:`restore_training_state` is all or nothing.

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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..buffer import ReplayBuffer
from ..build import build_buffer, build_model
from ..options.config import Config
from ..process.errors import UserError
from ..sgld import SGLD
from ..stability.recovery import RecoveryState, clone_state
from .checkpoint_schema import Corrupt, parse_checkpoint, shorten

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
    if state["cuda"] and torch.cuda.is_available():  # a run may resume on fewer GPUs than it saved
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
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


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Any, int]:
    """``(object, file size in bytes)``: what ``torch.load(path, weights_only=True)`` returns, after
    checking the file exists and is a complete, uncompressed zip archive (:func:`_check_archive`).
    Raises UserError (one line) for a missing, torn or truncated file and for one carrying
    pickled objects; the object's structure is the caller's to check."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    file_bytes = _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True), file_bytes
    except pickle.UnpicklingError as exc:
        first = _first_line(exc)
        if "global" in str(exc).lower():  # weights-only unpickler met a class/function reference
            raise UserError(f"checkpoint {path} was refused: it carries pickled objects that "
                            f"weights-only loading does not run ({first})") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first})") from None
    except Exception as exc:  # noqa: BLE001 - torn zips and garbage raise many kinds (IndexError, EOFError, ...)
        raise UserError(f"checkpoint {path} is corrupt or truncated ({_first_line(exc)})") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint weights-only and check its whole structure (:mod:`jemfast.rundir.checkpoint_schema`).

    Returns the clean checkpoint dict (current format, only the known keys). Raises UserError
    (one line) when the file is missing, not an uncompressed zip archive, truncated, carries
    pickled objects, is not a jemfast checkpoint, or is corrupt (any key of the wrong type,
    shape, size or range); nothing read from the file is used before that check passes.
    """
    path = Path(path)
    ckpt, file_bytes = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"checkpoint {path} is not a jemfast checkpoint")
    version = ckpt["format_version"]
    if type(version) is not int or version < 1:
        raise UserError(f"checkpoint {path} is corrupt (format_version is {ascii(version)[:40]}, "
                        f"not a format number)")
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {version}, "
                        f"this jemfast reads up to {FORMAT_VERSION}; upgrade jemfast")
    try:
        return parse_checkpoint(ckpt, file_bytes, FORMAT_VERSION)
    except Corrupt as exc:
        raise UserError(f"checkpoint {path} is corrupt ({exc})") from None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, printable, at most 120 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return shorten("".join(c if c.isprintable() else "?" for c in first), 120)


def _check_archive(path: Path) -> int:
    """The file's size, after checking it is a zip archive (torch.save's format) whose entries are
    all stored uncompressed and together no larger than the file: a compressed entry could
    inflate a small file into gigabytes, an older non-zip format claims storage sizes unchecked."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or truncated (not a complete zip archive: "
                        f"{_first_line(exc)})") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise UserError(f"checkpoint {path} is corrupt (it holds compressed entries; torch.save writes none)")
    if sum(e.file_size for e in entries) > size:
        raise UserError(f"checkpoint {path} is corrupt (its entries claim more bytes than the file holds)")
    return size


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
                           recovery: RecoveryState | None = None, restore_rng: bool = True,
                           source: str | Path = "(in memory)") -> None:
    """Load ``ckpt`` (from :func:`read_checkpoint`, or a snapshot of :func:`training_state`) into
    the live objects, all or nothing: raises UserError naming ``source`` before changing anything
    if it does not fit them. ``recovery=None`` keeps the live recovery state (a rollback: the
    effects of restarts persist); ``restore_rng=False`` keeps the RNG streams."""
    fits_run(ckpt, model, buffer, source, optimizer)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(clone_state(ckpt["optimizer"]))  # it would keep ckpt's tensors (a snapshot's) as its own
    buffer.load_state_dict(ckpt["buffer"])
    sampler.load_state_dict(ckpt["sampler"])  # n_steps and the fused/graph kernel noise state
    for f in dataclasses.fields(progress):
        setattr(progress, f.name, type(getattr(progress, f.name))(ckpt[f.name]))
    if recovery is not None:
        recovery.load_state_dict(ckpt["recovery"])
        recovery.restarts = list(ckpt["recovery"]["restarts"])
    if restore_rng:
        set_rng_state(ckpt["rng"])


def fits_run(ckpt: dict[str, Any], model: nn.Module, buffer: ReplayBuffer, source: str | Path,
             optimizer: torch.optim.Optimizer | None = None, buffer_rows: int | None = None) -> None:
    """Raise UserError unless ``ckpt`` (as :func:`read_checkpoint` returns it) loads as a whole
    into this model, optimizer (when given) and buffer; ``buffer_rows`` replaces the buffer's
    capacity (a data-parallel rank keeps a shard of the checkpoint's rows)."""
    try:
        _check_fits(ckpt, model, buffer, optimizer, buffer.capacity if buffer_rows is None else buffer_rows)
    except Corrupt as exc:
        raise UserError(f"checkpoint {source} does not fit this run ({exc})") from None


def _check_fits(ckpt: dict[str, Any], model: nn.Module, buffer: ReplayBuffer,
                optimizer: torch.optim.Optimizer | None, rows: int) -> None:
    live = model.state_dict()
    if set(live) != set(ckpt["model"]):
        raise Corrupt("its model has other tensors than this run's model")
    for k, v in live.items():
        if tuple(v.shape) != tuple(ckpt["model"][k].shape):
            raise Corrupt(f"model tensor {k} has shape {list(ckpt['model'][k].shape)}, this run's {list(v.shape)}")
    params = list(model.parameters())
    for pid, entry in ckpt["optimizer"]["state"].items():
        for key, v in entry.items():
            if key != "step" and v is not None and (pid >= len(params) or tuple(v.shape) != tuple(params[pid].shape)):
                raise Corrupt(f"optimizer state {pid} {key} does not match this run's parameter")
    name = ckpt["config"]["optim"]["optimizer"]
    if optimizer is not None and name != ("sgd" if isinstance(optimizer, torch.optim.SGD) else "adam"):
        raise Corrupt(f"its optimizer state is {name}'s, this run's optimizer is {type(optimizer).__name__}")
    data = ckpt["buffer"]["data"]
    if tuple(data.shape) != (rows, *buffer.sample_shape):
        raise Corrupt(f"buffer data has shape {list(data.shape)}, this run's buffer {[rows, *buffer.sample_shape]}")
    if ckpt["buffer"]["n_classes"] != (-1 if buffer.n_classes is None else buffer.n_classes):
        raise Corrupt("its buffer is split by class differently from this run's")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint for library use.

    Returns ``{"model": JEM (eval mode, on device), "buffer": ReplayBuffer, "config": Config,
    "step": int, "epoch": int, "raw": the checkpoint dict}``. Raises UserError (one line) for
    any file :func:`read_checkpoint` refuses; what it accepts fits the model its config builds.
    """
    device = torch.device(device)
    ckpt = read_checkpoint(path, map_location=device)
    cfg = Config.from_dict(ckpt["config"])
    shape, n_classes = tuple(ckpt["input_shape"]), int(ckpt["n_classes"])
    model = build_model(cfg, shape, n_classes, device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    buffer = build_buffer(cfg, shape, n_classes, device)
    buffer.load_state_dict(ckpt["buffer"])
    return {"model": model, "buffer": buffer, "config": cfg, "step": ckpt["step"],
            "epoch": ckpt["epoch"], "raw": ckpt}

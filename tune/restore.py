"""Restoring a Tune checkpoint into a trial's jemfast run directory (no Ray needed here).

A Tune checkpoint of a trial is a directory with ``last.pt`` (a copy of the run's
``checkpoints/last.pt``) and ``tune_state.json`` (epoch, step, restarts). :func:`restore_checkpoint`
writes it back as ``run/checkpoints/last.pt`` adapted to the trial's *current* hyperparameters,
which differ from the checkpoint's after a PBT exploit/explore step.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from jemfast.rundir.checkpoint import atomic_save, read_checkpoint
from jemfast.options.config import Config

from .space import space_from_json, trial_overrides

RUN_DIR = "run"
CKPT_FILE = "last.pt"
STATE_FILE = "tune_state.json"
ATTEMPTS_FILE = "attempts.jsonl"


def trial_config(base: dict[str, Any], params: dict[str, Any], space: dict[str, Any]) -> Config:
    """The trial's validated Config: ``base`` (``Config.to_dict()``) with the searched ``params``
    (by parameter name; kept inside the ranges of ``space``, its JSON form) applied."""
    return Config.from_dict(base).with_overrides(trial_overrides(space_from_json(space), params))


def _resize_rows(rows: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if n <= rows.shape[0]:
        keep = torch.randperm(rows.shape[0], generator=gen)[:n].sort().values
        return rows[keep.to(rows.device)]
    fresh = torch.rand((n - rows.shape[0], *rows.shape[1:]), generator=gen) * 2 - 1
    return torch.cat([rows, fresh.to(rows.device, rows.dtype)])


def resize_buffer(data: torch.Tensor, capacity: int, n_classes: int | None, seed: int = 0) -> torch.Tensor:
    """Resize a replay buffer ``data: Tensor[old, *shape]`` to ``capacity`` rows.

    Shrinking keeps a random subset of the chains (rows are exchangeable: draws are uniform);
    growing appends fresh U(-1, 1) chains, as a re-initialisation would. A class-conditional
    buffer (``n_classes``) is resized share by share, so class ``c`` keeps owning rows
    ``[c * share, (c + 1) * share)``; rows past ``n_classes * share`` are never drawn.
    """
    old = data.shape[0]
    if old == capacity:
        return data
    gen = torch.Generator().manual_seed(seed)
    if not n_classes:
        return _resize_rows(data, capacity, gen)
    old_share, new_share = old // n_classes, capacity // n_classes
    parts = [_resize_rows(data[c * old_share:(c + 1) * old_share], new_share, gen) for c in range(n_classes)]
    tail = capacity - n_classes * new_share
    parts.append((torch.rand((tail, *data.shape[1:]), generator=gen) * 2 - 1).to(data.device, data.dtype))
    return torch.cat(parts)


def restore_checkpoint(ckpt_dir: Path, run_dir: Path, cfg: Config) -> dict[str, Any]:
    """Write the Tune checkpoint in ``ckpt_dir`` into ``run_dir/checkpoints/last.pt``, adapted to
    ``cfg`` (buffer size/reinit frequency, recorded config). Returns its tune_state.json."""
    ckpt = read_checkpoint(ckpt_dir / CKPT_FILE, map_location="cpu")
    buf = ckpt["buffer"]
    n_classes = int(buf.get("n_classes", -1))
    buf["data"] = resize_buffer(buf["data"], cfg.sampler.buffer_size, n_classes if n_classes > 0 else None,
                                seed=cfg.run.seed + int(ckpt["step"]))
    buf["reinit_freq"] = cfg.sampler.reinit_freq
    ckpt["config"] = cfg.to_dict()
    ckpt_path = run_dir / "checkpoints"
    shutil.rmtree(ckpt_path, ignore_errors=True)
    atomic_save(ckpt, ckpt_path / CKPT_FILE)
    state_file = ckpt_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    state.setdefault("epoch", int(ckpt["epoch"]))
    state.setdefault("step", int(ckpt["step"]))
    return state

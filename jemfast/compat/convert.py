"""Conversion between the original JEM checkpoint format and jemfast runs, both ways.

- :func:`original_to_run`: an original ``{"model_state_dict", "replay_buffer"}`` file becomes a
  jemfast run directory whose ``checkpoints/last.pt`` (jemfast's format, written by
  :mod:`jemfast.rundir.checkpoint`'s own writers) ``python -m jemfast.train --resume`` continues with the
  same flags. The original format holds no optimizer, iteration or schedule, so the run starts
  at iteration 0 (warm-up included) with a fresh optimizer, the original's weights and its
  buffer. ``--buffer-size`` defaults to the original buffer's rows; a WRN gets
  ``--wrn-layout original``.
- :func:`run_to_original`: a jemfast checkpoint becomes an original-format file that the
  original ``CCF`` (or examples/jem_original_style.py's) loads with ``load_state_dict``.

Model keys are mapped by :mod:`.keymap`; a model that does not correspond is refused with one
line naming the first tensor that does not fit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..build import build_buffer, build_model, build_optimizer, build_sampler, seed_all
from ..options.config import Config, build_config
from ..process.errors import UserError
from ..process.log import get_logger
from ..rundir.checkpoint import Progress, read_checkpoint, training_state
from ..rundir.directory import holds_run, prepare_out, save_good_checkpoint
from ..stability.recovery import RecoveryState
from . import keymap
from .original_format import write_original

log = get_logger(__name__)
_CPU = torch.device("cpu")

# (input shape, classes) of each dataset, to check an original file against --dataset before
# anything is written (the images themselves are not needed to convert).
DATASET_SHAPES = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10),
                  "digits": ((1, 8, 8), 10)}


def run_config(original: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[Config, tuple[int, ...], int, dict]:
    """``(config, input shape, classes, added)`` of the run an original checkpoint becomes: the
    train flags ``overrides`` (dotted keys) over the dataset's preset, plus ``added``:
    ``sampler.buffer_size`` from the file and, for a WRN, ``model.wrn_layout`` ``original``,
    unless given. Raises UserError when the file does not fit the dataset."""
    if overrides.get("run.resume") or overrides.get("run.overwrite"):
        raise UserError("convert writes a new run: give an --out that holds none (no --resume or --overwrite)")
    buffer = original["replay_buffer"]
    added: dict[str, Any] = {}
    if len(buffer) and "sampler.buffer_size" not in overrides:
        added["sampler.buffer_size"] = int(buffer.shape[0])
    if build_config(overrides).model.name == "wrn" and "model.wrn_layout" not in overrides:
        added["model.wrn_layout"] = "original"
    cfg = build_config({**overrides, **added})
    if cfg.data.dataset not in DATASET_SHAPES:
        raise UserError(f"--dataset {cfg.data.dataset} has no counterpart in the original JEM code")
    shape, n_classes = DATASET_SHAPES[cfg.data.dataset]
    if len(buffer) and tuple(buffer.shape[1:]) != shape:
        raise UserError(f"the original replay buffer holds images of shape {list(buffer.shape[1:])}, "
                        f"--dataset {cfg.data.dataset} has {list(shape)}")
    if len(buffer) and buffer.shape[0] != cfg.sampler.buffer_size:
        raise UserError(f"--buffer-size {cfg.sampler.buffer_size}: the original replay buffer has "
                        f"{buffer.shape[0]} rows (leave --buffer-size out to keep them all)")
    head = original["model_state_dict"].get("class_output.weight")
    if head is not None and head.shape[0] != n_classes:
        raise UserError(f"the original model has {head.shape[0]} classes, --dataset {cfg.data.dataset} {n_classes}")
    return cfg, shape, n_classes, added


def original_model(original: Mapping[str, Any], overrides: Mapping[str, Any],
                   device: torch.device = _CPU) -> tuple[Config, tuple[int, ...], int, dict[str, Any], Any]:
    """Check the original checkpoint ``original`` against the train flags ``overrides`` and map
    its keys (:func:`run_config`, :func:`.keymap.to_jemfast`); returns ``(config, input shape,
    classes, added, build)``, ``build()`` making ``(JEM model, ReplayBuffer)`` on ``device`` with
    the original's weights and buffer rows (an empty ``[]`` buffer: the config's fresh one).
    Raises UserError (one line) before anything is built."""
    cfg, shape, n_classes, added = run_config(original, overrides)
    state = keymap.to_jemfast(original["model_state_dict"], cfg, shape, n_classes)

    def build() -> tuple[torch.nn.Module, Any]:
        model = build_model(cfg, shape, n_classes, device)
        model.load_state_dict(state)
        buffer = build_buffer(cfg, shape, n_classes, device)
        if len(original["replay_buffer"]):
            buffer.load_state_dict({"data": original["replay_buffer"], "reinit_freq": cfg.sampler.reinit_freq})
        return model, buffer

    return cfg, shape, n_classes, added, build


def original_to_run(original: Mapping[str, Any], overrides: Mapping[str, Any],
                    src: str | Path = "the original checkpoint") -> tuple[Path, dict[str, Any]]:
    """Write the original checkpoint ``original`` (:func:`.original_format.read_original`'s dict)
    as a new jemfast run in ``overrides["run.out"]`` (train flags as dotted config keys); returns
    ``(last.pt path, the config keys convert added to overrides)``: ``jemfast.train --resume``
    continues the run given both."""
    cfg, shape, n_classes, added, build = original_model(original, overrides)
    if holds_run(Path(cfg.run.out)):
        raise UserError(f"--out {cfg.run.out} holds a run; convert writes a new run: choose another --out")
    out, lock = prepare_out(cfg.run)
    try:
        seed_all(cfg.run.seed)
        model, buffer = build()
        ckpt = training_state(cfg, shape, n_classes, model, build_optimizer(cfg, model), buffer,
                              build_sampler(cfg), Progress(seed=cfg.run.seed), RecoveryState())
        path = save_good_checkpoint(ckpt, out, 0, cfg.stability.good_ring)
    finally:
        lock.release()
    log.info(f"converted {src} into the run {out} ({keymap.describe(cfg)}, buffer "
             f"{cfg.sampler.buffer_size} rows, iteration 0)")
    return path.parent / "last.pt", added


def run_to_original(src: str | Path, dest: str | Path) -> Path:
    """Write the jemfast checkpoint ``src`` as an original-format file ``dest``; returns it."""
    ckpt = read_checkpoint(src)
    cfg = Config.from_dict(ckpt["config"])
    state = keymap.to_original(ckpt["model"], cfg)
    path = write_original(dest, state, ckpt["buffer"]["data"])
    log.info(f"wrote {path} ({keymap.describe(cfg)}, original CCF keys, buffer "
             f"{ckpt['buffer']['data'].shape[0]} rows)")
    return path


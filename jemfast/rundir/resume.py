"""What ``--resume`` decides beyond loading tensors: is the checkpoint this run's, which changed
flags apply, and which automatic restarts happened after the checkpoint was written.

Changed flags (each gets one log line saying what happened):

- identity fields (dataset, model architecture, buffer size, class-conditional buffer) must
  match: a checkpoint of another run is refused;
- :data:`KEEP` fields continue with the checkpoint's value (changing them mid-run would not
  mean what the flag says);
- every other field applies from the resumed iteration on (learning rate, epochs, SGLD steps,
  step size and noise, reinit frequency, backend, precision, logging and checkpoint cadence,
  stability thresholds, ...).

The config recorded in checkpoints and ``summary.json`` is the one actually used.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..options.config import Config
from ..process.errors import UserError
from ..process.log import get_logger
from .checkpoint import fits_run, read_checkpoint
from .directory import checkpoint_candidates

log = get_logger(__name__)

IDENTITY = ("data.dataset", "model.name", "model.depth", "model.width", "model.norm", "model.wrn_layout",
            "model.hidden", "sampler.buffer_size", "sampler.class_cond")
KEEP = {
    "run.seed": "the run's data order and random streams follow it",
    "optim.batch_size": "the position inside the epoch is counted in batches",
    "optim.optimizer": "the saved optimizer state belongs to it",
    "data.n_valid": "it would move images between the training and validation sets",
    "data.labels_per_class": "it would change which images are labelled",
}
SILENT = {"run.resume", "run.overwrite", "run.out", "run.progress"}


def dotted_fields(cfg: Config) -> Iterator[tuple[str, Any]]:
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            yield f"{section.name}.{f.name}", getattr(sub, f.name)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def flag_of(key: str) -> str:
    """The command-line flag of a dotted config key (from the field's metadata when declared)."""
    section, name = key.split(".")
    sub = getattr(Config(), section)
    for f in dataclasses.fields(sub):
        if f.name == name and f.metadata.get("flag"):
            return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def check_identity(saved: Config, cfg: Config, path: Path) -> None:
    for key in IDENTITY:
        a, b = _get(saved, key), _get(cfg, key)
        if a != b:
            raise UserError(f"checkpoint {path} is from another run: {key} is {a!r} there, {b!r} here")


def reconcile(saved: Config, cfg: Config, step: int) -> list[str]:
    """Apply the per-flag rule to ``cfg`` in place; returns one line per changed flag."""
    lines = []
    for key, new in dotted_fields(cfg):
        old = _get(saved, key)
        if key in SILENT or key in IDENTITY or old == new:
            continue
        if key in KEEP:
            _set(cfg, key, old)
            lines.append(f"{flag_of(key)}: continuing with the checkpoint's {old!r}, not {new!r} "
                         f"({KEEP[key]})")
        else:
            lines.append(f"{flag_of(key)}: {old!r} in the checkpoint, {new!r} from iteration {step} on")
    return lines


def restarts_after_checkpoint(metrics_path: Path, n_known: int) -> list[dict[str, Any]]:
    """Restart events logged in metrics.jsonl after the checkpoint that knows ``n_known`` of them
    (a process killed between a restart and its next checkpoint)."""
    if not metrics_path.exists():
        return []
    found = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "restart" and int(record.get("restart", 0)) > n_known:
            found[int(record["restart"])] = record
    return [found[k] for k in sorted(found)]


def read_resume_checkpoint(out: Path, device: torch.device, cfg: Config, model: nn.Module,
                           buffer: ReplayBuffer) -> tuple[dict[str, Any], Path, list[dict[str, Any]]]:
    """The newest checkpoint in ``out`` that reads and fits this run (older ones tried in turn;
    another run's stops at once), with ``cfg`` reconciled to it; its path; the restarts logged
    after it. Raises UserError when none is usable."""
    errors = []
    for path in checkpoint_candidates(out):
        try:
            ckpt = read_checkpoint(path, map_location=device)
        except UserError as exc:
            errors.append(str(exc))
            log.warning(f"{exc}; trying an older checkpoint")
            continue
        saved_cfg = Config.from_dict(ckpt["config"])
        check_identity(saved_cfg, cfg, path)  # another run's checkpoint: the flags are wrong, stop
        try:
            fits_run(ckpt, model, buffer, path, buffer_rows=cfg.sampler.buffer_size)
        except UserError as exc:
            errors.append(str(exc))
            log.warning(f"{exc}; trying an older checkpoint")
            continue
        for line in reconcile(saved_cfg, cfg, int(ckpt["step"])):
            log.warning(line)
        return ckpt, path, restarts_after_checkpoint(out / "metrics.jsonl", len(ckpt["recovery"]["restarts"]))
    raise UserError(f"--resume: no readable checkpoint in {out / 'checkpoints'} ({'; '.join(errors)})")

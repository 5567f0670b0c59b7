"""The run directory ``--out``: guarding it, metrics.jsonl, and the ring of good checkpoints.

Layout::

    OUT/metrics.jsonl            one JSON object per line: iteration metrics and events
    OUT/summary.json             final figures, restarts, device, versions, full config
    OUT/samples/*.png            sample grids (or 2-D density plots)
    OUT/checkpoints/good-STEP.pt the last ``good_ring`` checkpoints that passed a divergence check
    OUT/checkpoints/last.pt      hard link to (or copy of) the newest good-STEP.pt
    OUT/checkpoints/best.pt      best validation accuracy so far
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import atomic_save
from .config import RunConfig
from .errors import UserError

RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "samples")


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_FILES)


def prepare_out(run: RunConfig) -> Path:
    """Check ``--out`` against ``--resume``/``--overwrite`` and that it is writable.

    Changes nothing on disk but creating the directory. Raises UserError.
    """
    out = Path(run.out)
    if run.resume and not list(checkpoint_candidates(out)):
        raise UserError(f"--resume: no checkpoint to resume in {out / 'checkpoints'}")
    if not run.resume and not run.overwrite and holds_run(out):
        raise UserError(f"--out {out} holds another run; pass --resume to continue it "
                        f"or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserError(f"--out {out} is not writable ({exc.strerror or exc})") from None
    return out


def clear_run(out: Path) -> None:
    """Remove a previous run's files from ``out`` (``--overwrite``, once the new run starts)."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def checkpoint_candidates(out: Path) -> list[Path]:
    """Checkpoints to resume from, best first: last.pt, then good-*.pt newest first."""
    ckpt_dir = out / "checkpoints"
    found = [ckpt_dir / "last.pt"] if (ckpt_dir / "last.pt").is_file() else []
    found += sorted(ckpt_dir.glob("good-*.pt"), reverse=True)
    return found


def save_good_checkpoint(obj: dict[str, Any], out: Path, step: int, ring: int) -> Path:
    """Write ``good-STEP.pt`` atomically, point ``last.pt`` at it, keep the newest ``ring``."""
    ckpt_dir = out / "checkpoints"
    path = ckpt_dir / f"good-{step:09d}.pt"
    atomic_save(obj, path)
    _replace_with_link(path, ckpt_dir / "last.pt")
    for old in sorted(ckpt_dir.glob("good-*.pt"), reverse=True)[ring:]:
        old.unlink(missing_ok=True)
    return path


def _replace_with_link(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a hard link to ``src`` (a copy where links are unsupported)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def mark_best(src: Path, out: Path) -> None:
    _replace_with_link(src, out / "checkpoints" / "best.pt")


def write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)

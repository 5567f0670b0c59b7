"""The run directory ``--out``: guarding it, metrics.jsonl, and the ring of good checkpoints.

Layout::

    OUT/metrics.jsonl            one JSON object per line: iteration metrics and events
    OUT/summary.json             final figures, restarts, device, versions, full config
    OUT/samples/*.png            sample grids (or 2-D density plots)
    OUT/checkpoints/good-STEP.pt the last ``good_ring`` checkpoints that passed a divergence check
    OUT/checkpoints/last.pt      hard link to (or copy of) the newest good-STEP.pt
    OUT/checkpoints/best.pt      best validation accuracy so far
    OUT/.lock                    held by the one process writing the run (jemfast.rundir.lock)
    OUT/.previous-run/           --overwrite: the old run, until the new one has a checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..options.config import RunConfig
from ..process.errors import UserError
from ..process.log import get_logger
from .checkpoint import atomic_save
from .lock import RunLock

log = get_logger(__name__)

RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints", "samples")
PREVIOUS = ".previous-run"  # where --overwrite keeps the old run until the new one has a checkpoint
WRITTEN_DIRS = ("", "checkpoints", "samples")


def holds_run(out: Path) -> bool:
    """A run lives in ``out``: it has a checkpoint or a summary (a failed first start has neither)."""
    return bool(checkpoint_candidates(out)) or (out / "summary.json").exists()


def check_writable(out: Path) -> None:
    """Every directory a run writes (OUT, OUT/checkpoints, OUT/samples) that exists accepts a
    new file; raises UserError naming the first that does not."""
    for sub in WRITTEN_DIRS:
        d = out / sub
        if not d.is_dir():
            continue
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as exc:
            raise UserError(f"--out: {d} is not writable ({exc.strerror or exc})") from None


def prepare_out(run: RunConfig) -> tuple[Path, RunLock]:
    """Take ``--out`` for this process and check it against ``--resume``/``--overwrite``.

    Creates the directory, takes its lock (one process per run directory), puts back a run
    that an interrupted ``--overwrite`` had set aside, and checks that every directory we will
    write is writable. Deletes nothing. Raises UserError (the lock is then released).
    """
    out = Path(run.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    lock = RunLock(out).acquire()
    try:
        if (out / PREVIOUS).is_dir() and not checkpoint_candidates(out):
            restore_previous(out)
            log.warning(f"--out {out}: put back the run that an interrupted --overwrite had set aside")
        if run.resume and not checkpoint_candidates(out):
            hint = "; start it without --resume" if not holds_run(out) else ""
            raise UserError(f"--resume: no checkpoint to resume in {out / 'checkpoints'}{hint}")
        if not run.resume and not run.overwrite and holds_run(out):
            raise UserError(f"--out {out} holds another run; pass --resume to continue it "
                            f"or --overwrite to replace it")
        check_writable(out)
    except BaseException:
        lock.release()
        raise
    return out, lock


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temp files a killed process left in OUT/checkpoints (each may be a whole
    checkpoint). Only safe while holding the run's lock: no other writer can own them."""
    stale = [p for p in (out / "checkpoints").glob(".*") if p.name.endswith((".tmp", ".link")) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def set_aside_previous(out: Path) -> Path | None:
    """``--overwrite``: move the old run's files into OUT/.previous-run (renames, nothing
    deleted) so a new run that fails before its first checkpoint can put them back."""
    present = [out / n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return None
    keep = out / PREVIOUS
    if keep.exists():
        shutil.rmtree(keep)  # an earlier overwrite that was interrupted after its commit point
    keep.mkdir()
    for p in present:
        os.replace(p, keep / p.name)
    return keep


def restore_previous(out: Path) -> None:
    """Put the files :func:`set_aside_previous` moved back (the new run wrote no checkpoint)."""
    keep = out / PREVIOUS
    if not keep.is_dir():
        return
    for name in RUN_FILES:
        new = out / name
        if new.is_dir():
            shutil.rmtree(new)
        elif new.exists():
            new.unlink()
        if (keep / name).exists():
            os.replace(keep / name, new)
    shutil.rmtree(keep, ignore_errors=True)


def drop_previous(out: Path) -> None:
    """The new run has its first checkpoint: the old run can go."""
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def checkpoint_candidates(out: Path) -> list[Path]:
    """Checkpoints to resume from, best first: last.pt, then good-*.pt newest first."""
    if not (out / "checkpoints").is_dir():
        return []
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

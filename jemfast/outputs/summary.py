"""``OUT/summary.json``: what a run reports when it ends (finished, interrupted, diverged or
failed), and reading it back for a finished run that is resumed."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from .. import __version__
from ..distributed import ranks
from ..rundir.directory import write_json


# A finished run whose test accuracy is at most this many times chance did not learn (the same bound
# as the collapse test's "train accuracy fell to chance", jemfast.stability.collapse). Runs shorter than
# JUDGED_FROM iterations are not judged: smoke tests and 1-epoch trials of the presets (19-40 iterations,
# partly inside the lr warm-up) end near chance by design; every preset's full run has 400 or more.
CHANCE_FACTOR = 1.5
JUDGED_FROM = 100


def learned(test_acc: float, n_classes: int, iterations: int) -> bool | None:
    """Whether a test accuracy (fraction) is clearly above chance, 1 / ``n_classes``; None for
    a run of fewer than :data:`JUDGED_FROM` iterations."""
    if iterations < JUDGED_FROM:
        return None
    return math.isfinite(test_acc) and test_acc > CHANCE_FACTOR / n_classes


def run_summary(trainer: Any, status: str, test_acc: float) -> dict[str, Any]:
    """The summary dict of ``trainer`` (a :class:`jemfast.train.Trainer`) ending with ``status``.
    ``learned``: for a finished run of 100 iterations or more, whether its test accuracy is above
    chance (else None);
    ``remedies``: the config remedies the restarts put in effect (dotted keys)."""
    p, device = trainer.progress, trainer.device
    return {
        "status": status, "valid_acc": trainer.valid_acc, "best_valid_acc": p.best_valid_acc,
        "test_acc": test_acc, "learned": learned(test_acc, trainer.data.n_classes, p.step) if status == "finished" else None,
        "remedies": dict(trainer.recovery.overrides), "epochs": p.epoch, "iterations": p.step,
        "wall_time_s": time.perf_counter() - trainer.t0, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "jemfast_version": __version__, "torch_threads": torch.get_num_threads(),
        "sgld_backend": trainer.sampler.backend, "restarts": trainer.recovery.restarts,
        "out": str(trainer.out), "stop_signal": trainer.stop_signal, "config": trainer.cfg.to_dict(),
        "world_size": ranks.world_size(),
        "global_batch": trainer.cfg.optim.batch_size * ranks.world_size(),
    }


def existing_summary(trainer: Any) -> dict[str, Any]:
    """The summary a finished run already wrote (a minimal one if it cannot be read)."""
    try:
        return json.loads((trainer.out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        p = trainer.progress
        return {"status": "finished", "out": str(trainer.out), "epochs": p.epoch, "iterations": p.step,
                "restarts": trainer.recovery.restarts, "test_acc": math.nan, "valid_acc": math.nan,
                "wall_time_s": 0.0}


def write_failure_summary(trainer: Any) -> None:
    """Best effort after an I/O failure (the disk may still be full): status ``failed``."""
    p = trainer.progress
    try:
        write_json({"status": "failed", "iterations": p.step, "epochs": p.epoch,
                    "last_good_checkpoint": str(trainer.recovery.last_good), "out": str(trainer.out),
                    "restarts": trainer.recovery.restarts, "config": trainer.cfg.to_dict()},
                   trainer.out / "summary.json")
    except OSError:
        pass

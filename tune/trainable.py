"""The Ray Tune function trainable: one trial = one ``jemfast.train.train(cfg, report=...)`` run.

Per trial directory (``EXPERIMENT/<trial dir name>``, beside Tune's result.json and checkpoints)::

    run/            the jemfast run directory (metrics.jsonl, summary.json, checkpoints/, samples/)
    attempts.jsonl  one line per start of the trainable: pid, Ray node id, niceness, and the epoch/step it resumed at

Every epoch the trainable reports the epoch's metrics plus the objective (jemfast.tune.objective)
and, every ``checkpoint_interval`` epochs and at the last one, a Tune checkpoint: a directory
holding a copy of ``run/checkpoints/last.pt`` and ``tune_state.json``. On a (re)start with
``tune.get_checkpoint()`` (a crashed worker retried by ``FailureConfig``, ``Tuner.restore``, or a
PBT exploit), that ``last.pt`` is written into ``run/checkpoints/`` -- replacing whatever the
run directory holds, so the trial continues from exactly the state Tune knows about -- and the
run resumes with ``cfg.run.resume = True``.

Restoring applies the trial's current hyperparameters to the checkpoint
(:func:`jemfast.tune.restore.restore_checkpoint`): the buffer's reinit frequency and the recorded
config are replaced, and when ``buffer_size`` differs (a PBT perturbation, or a clone of a trial
with another size) the replay buffer is resized. The SGLD step size, noise and learning rate are
read from the config on resume anyway; the SGLD step count is not changed (a checkpoint's count
may have been doubled by a recovery action, which must persist).

A run that exhausts its automatic restarts (``DivergenceExhausted``) is reported once more with
``status = "diverged"`` and its score (quality 0 plus the divergence penalty), then the trial
ends normally: diverged trials stay in the results.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from jemfast.process.errors import DivergenceExhausted
from jemfast.train import train

from .objective import ScoreWeights, evaluate
from .restore import ATTEMPTS_FILE, CKPT_FILE, RUN_DIR, STATE_FILE, restore_checkpoint, trial_config


def _link_or_copy(src: str | Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _node_id() -> str:
    """The Ray node this trial runs on (a cluster places trials across nodes)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


class EpochReporter:
    """The ``report`` callback handed to ``train``: objective + tune.report (+ checkpoint)."""

    def __init__(self, run_dir: Path, trial_dir: Path, settings: dict[str, Any], resumed: bool) -> None:
        self.run_dir, self.trial_dir, self.settings, self.resumed = run_dir, trial_dir, settings, resumed
        self.weights = ScoreWeights(**settings["weights"])
        self.interval = max(1, int(settings.get("checkpoint_interval", 1)))
        self.final: dict[str, Any] | None = None

    def metrics(self, epoch: int, step: int, valid_acc: float, restarts: int, status: str) -> dict[str, Any]:
        fig = evaluate(self.run_dir / "metrics.jsonl", valid_acc, restarts, status == "diverged", epoch, self.weights)
        return {"epoch": epoch, "step": step, "valid_acc": valid_acc, "restarts": restarts,
                "status": status, "node_id": _node_id(), **fig}

    def __call__(self, d: dict[str, Any]) -> None:
        if d["done"]:
            self.final = d  # reported after train() returns, with the test accuracy
            return
        self.report(d, {})

    def report(self, d: dict[str, Any], extra: dict[str, Any]) -> None:
        epoch = int(d["epoch"])
        status = "finished" if d["done"] else "running"
        metrics = self.metrics(epoch, int(d["step"]), float(d["valid_acc"]), int(d["restarts"]), status)
        metrics.update(extra)
        if d["done"] or epoch % self.interval == 0:
            with tempfile.TemporaryDirectory(dir=self.trial_dir, prefix=".ckpt-") as tmp:
                _link_or_copy(d["checkpoint"], Path(tmp) / CKPT_FILE)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(
                    {"epoch": epoch, "step": int(d["step"]), "restarts": int(d["restarts"])}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)
        kill_at = self.settings.get("kill_at_epoch")
        if kill_at is not None and epoch == kill_at and not self.resumed:
            # TESTING AID (--inject-worker-kill): the worker dies as a crashed node would.
            os.kill(os.getpid(), signal.SIGKILL)


def _trial_dir(settings: dict[str, Any]) -> Path:
    """The trial's directory in the experiment directory (on the storage path, which a
    multi-node cluster shares), so the jemfast run directory survives worker crashes and
    ``--resume`` in a new Ray session. (``get_trial_dir()`` itself is a staging directory in the
    Ray session's temp dir; its name is the trial directory's name.)"""
    local = Path(tune.get_context().get_trial_dir())
    return Path(settings["exp_dir"]) / local.name if settings.get("exp_dir") else local


def jem_trainable(config: dict[str, Any], base: dict[str, Any] | None = None,
                  settings: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable (wrap with ``tune.with_parameters(jem_trainable, base=, settings=)``).

    ``base``: ``Config.to_dict()`` of the experiment; ``config``: this trial's searched values;
    ``settings``: weights, space, checkpoint_interval, threads, gpus_per_trial, kill_at_epoch.
    """
    assert base is not None and settings is not None
    torch.set_num_threads(max(1, int(settings.get("threads", 1))))
    cfg = trial_config(base, config, settings["space"])
    if cfg.run.device == "auto" and not settings.get("gpus_per_trial"):
        cfg.run.device = "cpu"  # no GPU was reserved for this trial: do not grab one
    trial_dir = _trial_dir(settings)
    run_dir = trial_dir / RUN_DIR
    cfg.run.out, cfg.run.progress = str(run_dir), False
    checkpoint = tune.get_checkpoint()
    state: dict[str, Any] = {"epoch": 0, "step": 0}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = restore_checkpoint(Path(d), run_dir, cfg)
        cfg.run.resume, cfg.run.overwrite = True, False
    else:
        cfg.run.resume, cfg.run.overwrite = False, True
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / ATTEMPTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), "node_id": _node_id(), "time": time.time(),
                            "niceness": os.getpriority(os.PRIO_PROCESS, 0), "resumed": checkpoint is not None,
                            "epoch": state["epoch"], "step": state["step"],
                            "config": {k: v for k, v in config.items()}}) + "\n")
    reporter = EpochReporter(run_dir, trial_dir, settings, resumed=checkpoint is not None)
    try:
        summary = train(cfg, report=reporter)
        if reporter.final is not None:
            reporter.report(reporter.final, {"test_acc": summary["test_acc"], "train_time_s": summary["wall_time_s"]})
    except DivergenceExhausted as exc:
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        valid_acc = _finite(summary.get("valid_acc"))
        metrics = reporter.metrics(int(summary.get("epochs", state["epoch"])), int(summary.get("iterations", 0)),
                                   valid_acc if valid_acc is not None else math.nan,
                                   len(summary.get("restarts", [])), "diverged")
        metrics["cause"] = str(exc)
        tune.report(metrics)

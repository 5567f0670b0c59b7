"""Quiet console progress (``--verbose 1``): one log line per ended, failed or retried trial."""
from __future__ import annotations

from typing import Any

from ray import tune

from jemfast.process.log import get_logger

log = get_logger("jemfast.tune")


def _line(trial: Any, what: str) -> None:
    r = trial.last_result or {}
    fig = ", ".join(f"{k} {r[k]:.4g}" if isinstance(r.get(k), float) else f"{k} {r[k]}"
                    for k in ("epoch", "score", "valid_acc", "restarts") if k in r)
    log.info(f"trial {trial.trial_id} {what}" + (f": {fig}" if fig else ""))


class Progress(tune.Callback):
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = (trial.last_result or {}).get("status", "ended")
        _line(trial, "stopped early by the scheduler" if status == "running" else status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _line(trial, "failed for good (status error)")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _line(trial, "crashed; retrying from its last checkpoint")

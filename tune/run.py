"""Running an experiment on Ray: start or join Ray, build the Tuner from a plan, stop gracefully,
and write the outputs. Ray is imported inside the functions, so this module imports without it."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from jemfast.process.errors import UserError, one_line
from jemfast.process.log import get_logger

from .space import PBT_MUTABLE, key_of, space_from_json

log = get_logger(__name__)


def _trainable(plan: dict[str, Any]) -> Any:
    from ray import tune

    from .trainable import jem_trainable

    fn = tune.with_parameters(jem_trainable, base=plan["base"], settings=plan["settings"])
    return tune.with_resources(fn, {"cpu": plan["cpus_per_trial"], "gpu": plan["gpus_per_trial"],
                                    **plan.get("custom_resources", {})})


def _scheduler(plan: dict[str, Any]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if plan["scheduler"] == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan["max_epochs"],
                             grace_period=min(plan["grace_period"], plan["max_epochs"]),
                             reduction_factor=plan["reduction_factor"])
    if plan["scheduler"] == "pbt":
        mutations = {n: r.to_tune() for n, r in space_from_json(plan["space"]).items()
                     if key_of(n) in PBT_MUTABLE and r.searched and r.kind != "grid"}
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=plan["perturbation_interval"],
                                       hyperparam_mutations=mutations, quantile_fraction=0.25,
                                       resample_probability=0.25)
    return None


def _run_config(plan: dict[str, Any], storage: Path, name: str, verbose: int) -> Any:
    from ray import tune

    from .progress import Progress

    return tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=plan["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1 if verbose >= 2 else 0,
        callbacks=[Progress()] if verbose == 1 else None)


def quiet_tune(verbose: int) -> None:
    """Ray Tune's own console output only with --verbose 2 (the legacy reporter at verbosity 0
    prints nothing; the new one would still print its header and footer)."""
    if verbose < 2:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def make_tuner(plan: dict[str, Any], storage: Path, name: str, verbose: int) -> Any:
    """A new Tuner: the plan's search space as Ray search-space objects, its scheduler and resources."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=plan["num_samples"], scheduler=_scheduler(plan),
        search_alg=BasicVariantGenerator(random_state=plan["search_seed"]),
        max_concurrent_trials=plan["max_concurrent"] or None, reuse_actors=True)
    param_space = {n: r.to_tune() for n, r in space_from_json(plan["space"]).items()}
    return tune.Tuner(_trainable(plan), param_space=param_space, tune_config=tune_config,
                      run_config=_run_config(plan, storage, name, verbose))


def restore_tuner(plan: dict[str, Any], exp_dir: Path) -> Any:
    from ray import tune

    return tune.Tuner.restore(str(exp_dir), trainable=_trainable(plan), resume_unfinished=True,
                              resume_errored=True)


class GracefulStop:
    """SIGINT/SIGTERM during ``fit()``: remember it and ask Tune to stop gracefully (Tune saves
    the experiment state and stops the trials; ``--resume`` continues). A second signal falls
    back to the previous handler. Tune's own SIGINT handler is disabled
    (TUNE_DISABLE_SIGINT_HANDLER) so that the interruption is known here; the stop request goes
    through the SIGUSR1 handler Tune always installs."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        for s, h in self.old.items():
            signal.signal(s, h)
        tune_handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if first and callable(tune_handler):
            log.warning("stopping; saving the experiment state (again to abort)")
            tune_handler(signum, frame)
        elif callable(self.old.get(signum)):
            self.old[signum](signum, frame)
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


# Ray starts its workers, the trials, at nice 15 unless told otherwise: beside any other work on the
# machine they then get almost no CPU (measured: 20 iterations in 13 minutes beside a test suite and
# two trainings, where a plain run did 150). A local Ray's trials are the user's job, so they run
# at the command's own priority; a user's RAY_worker_niceness wins. A cluster's workers keep the
# niceness its `ray start` gave them.
WORKER_NICENESS = "RAY_worker_niceness"


def start_ray(address: str | None, num_cpus: int | None, verbose: int) -> bool:
    """Connect to (``address``) or start a local Ray (its workers at this process's priority:
    :data:`WORKER_NICENESS`). Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose >= 2 else logging.WARNING
    try:
        if address:
            ray.init(address=address, log_to_driver=verbose >= 2, logging_level=level)
        else:
            cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            # address="local": a Ray of its own, even where a `ray start` cluster (or another
            # experiment's Ray) already runs on this machine and plain ray.init() would join it
            os.environ.setdefault(WORKER_NICENESS, "0")
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=verbose >= 2,
                     logging_level=level)
    except Exception as exc:  # ConnectionError, RuntimeError, ...: one line, exit 2
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise UserError(f"could not {where} ({one_line(str(exc), 200) or type(exc).__name__})") from None
    return True


def result_rows(grid: Any) -> list[dict[str, Any]]:
    """One results-table row per trial of a ResultGrid."""
    from .results import row_from_result

    results = [grid[i] for i in range(len(grid))]
    return [row_from_result(r.metrics, r.config or {}, r.path, r.error,
                            Path(r.checkpoint.path).name if r.checkpoint is not None else None) for r in results]


def write_outputs(exp_dir: Path, plan: dict[str, Any], rows: list[dict[str, Any]],
                  map_axes: tuple[str, ...] = ()) -> dict[str, Any]:
    """results.csv/json, best_command.txt, search.png and stability_map.png. Returns what was written."""
    from .results import best_command, best_row, plot_search, sort_rows, write_table
    from .stability_map import plot_stability_map

    rows = sort_rows(rows)
    best = best_row(rows)
    cmd = best_command(best, plan["train_overrides"], plan["max_epochs"], str(exp_dir / "best")) if best else None
    extra = {"experiment": str(exp_dir), "objective": "score = valid_acc + Wq*quality - Wr*restarts - "
             "Wd*diverged; quality = 1/(1 + |mean g| + std g), g = E(real) - E(fake) over the last epoch",
             "weights": plan["settings"]["weights"], "scheduler": plan["scheduler"],
             "best_command": cmd}
    csv_path, json_path = write_table(rows, exp_dir, extra)
    if cmd:
        (exp_dir / "best_command.txt").write_text(cmd + "\n", encoding="utf-8")
    space = space_from_json(plan["space"])
    png = plot_search(rows, space, exp_dir / "search.png")
    stability = plot_stability_map(rows, space, exp_dir / "stability_map.png", map_axes)
    return {"rows": rows, "best": best, "command": cmd, "csv": csv_path, "json": json_path, "png": png,
            "stability_map": stability}


def saved_rows(exp_dir: Path) -> list[dict[str, Any]]:
    """The results-table rows an experiment's results.json holds (NaN restored for nulls)."""
    import json
    import math

    trials = json.loads((exp_dir / "results.json").read_text(encoding="utf-8"))["trials"]
    return [{k: (math.nan if v is None and k not in ("restarts", "epoch", "step") else v) for k, v in t.items()
             if k != "rank"} for t in trials]

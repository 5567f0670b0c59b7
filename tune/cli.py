"""``python -m jemfast.tune``: search for stable, good JEM settings with Ray Tune.

Local by default: starts Ray on this machine (``ray.init(num_cpus=<this machine's cores>,
include_dashboard=False)``) and stops it at the end. ``--address auto`` (on a cluster node) or
``--address ray://HEAD:10001`` joins an existing cluster instead. Every ``python -m
jemfast.train`` flag (``--dataset``, ``--model``, ``--sgld-steps``, ...) is accepted and sets the
base configuration of all trials (``--out`` excepted: each trial writes into its own directory).

Exit codes: 0 done; 2 user error (bad flag or range, missing Ray); 130 interrupted (continue with
``--resume``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from jemfast.cli import OneLineParser, run_cli
from jemfast.config import FLAGS_BY_KEY, Config, build_config
from jemfast.errors import UserError
from jemfast.schema import add_flags, given_values, to_argv

from .objective import ScoreWeights
from .results import STATUSES
from .space import CORE, PARAMS, PBT_MUTABLE, Spec, build_specs, flag_for, read_space_file

PROG = "python -m jemfast.tune"
PLAN_FILE = "jemfast_tune.json"
NO_RAY = ("Ray Tune is not installed; install the tune extra: pip install 'jemfast[tune]'")
# each trial has its own run directory, resumes and overwrites as Tune says, and shows no progress bar
NOT_PASSED = ("run.out", "run.resume", "run.overwrite", "run.progress")
TRAIN = "train:"  # argparse dest prefix of the training flags

# --smoke-test: 4 small digits trials (one with an injected divergence), ~1 minute on 2 cores.
SMOKE_TRAIN = {"data.dataset": "digits", "model.hidden": 16, "sampler.n_steps": 5, "optim.warmup_iters": 10,
               "run.log_every": 5, "stability.check_every": 5, "run.sample_every": 100000}
SMOKE_SPACE = {"buffer_size": "choice:250,500,1000", "inject_divergence": "grid:12,-1,-1,-1"}
SMOKE_TUNE = {"num_samples": 1, "max_epochs": 3, "cpus_per_trial": 1.0, "grace_period": 1}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Search JEM hyperparameters for stable, accurate training "
                      "with Ray Tune (locally or on a Ray cluster).")
    s = p.add_argument_group("search")
    s.add_argument("--num-samples", type=int, default=None, help="trials to sample (times each grid value; default 8)")
    s.add_argument("--max-epochs", type=int, default=None,
                   help="epochs per trial (default: --epochs or the dataset preset)")
    s.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha",
                   help="trial scheduler (default asha)")
    s.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: epochs before a trial can be stopped (default 1)")
    s.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA reduction factor (default 3)")
    s.add_argument("--perturbation-interval", type=int, default=2, help="PBT: epochs between perturbations; "
                   "also its checkpoint interval (default 2)")
    s.add_argument("--checkpoint-interval", type=int, default=None,
                   help="epochs between Tune checkpoints (default 1; PBT: the perturbation interval)")
    s.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                   help=f"range of a parameter ({', '.join(PARAMS)}); SPEC: choice:a,b,c | uniform:lo,hi | "
                        "loguniform:lo,hi | randint:lo,hi | lograndint:lo,hi | grid:a,b | a fixed number")
    s.add_argument("--space-file", default=None, help="YAML or JSON mapping NAME: SPEC (--space wins)")
    s.add_argument("--search-seed", type=int, default=0, help="seed of the random search (default 0)")
    o = p.add_argument_group("objective: score = valid_acc + Wq*quality - Wr*restarts - Wd*diverged")
    o.add_argument("--quality-weight", type=float, default=ScoreWeights.quality, help="Wq (default 0.1)")
    o.add_argument("--restart-penalty", type=float, default=ScoreWeights.restart, help="Wr (default 0.05)")
    o.add_argument("--diverged-penalty", type=float, default=ScoreWeights.diverged, help="Wd (default 0.2)")
    r = p.add_argument_group("resources and fault tolerance")
    r.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs reserved per trial (default 1)")
    r.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractional allowed (default 1 if this machine has CUDA, else 0)")
    r.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default 0: as resources allow)")
    r.add_argument("--max-failures", type=int, default=2,
                   help="retries of a crashed trial, each from its last checkpoint (default 2)")
    c = p.add_argument_group("where it runs")
    c.add_argument("--address", default=None, help="join a running Ray cluster: 'auto' or 'ray://HOST:10001' "
                   "(default: start a local Ray for this command)")
    c.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: this machine's)")
    c.add_argument("--storage-path", default="./runs/tune", help="experiments directory (default ./runs/tune; "
                   "on a multi-node cluster a path every node shares)")
    c.add_argument("--name", default=None, help="experiment name = subdirectory of --storage-path "
                   "(default: the dataset name)")
    c.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name in "
                   "--storage-path with its saved settings (search and training flags given now are ignored; "
                   "--address, --num-cpus and --verbose apply)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing experiment of that name")
    m = p.add_argument_group("other")
    m.add_argument("--smoke-test", action="store_true", help="4 small digits trials, 3 epochs each, one with an "
                   "injected divergence (about a minute on 2 CPU cores); other flags still apply")
    m.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="0 quiet, 1 progress (default), 2 also the trials' own logs")
    m.add_argument("--inject-worker-kill", type=int, default=None, metavar="EPOCH",
                   help="TESTING AID: every trial's worker process kills itself (SIGKILL) after reporting "
                        "this epoch, on its first attempt only")
    t = p.add_argument_group("training flags (as for python -m jemfast.train; they set every trial's base)")
    add_flags(t, Config, skip=NOT_PASSED, dest_prefix=TRAIN)
    return p


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags given, as dotted config overrides (smoke-test defaults first)."""
    given = given_values(args, Config, TRAIN)
    return {**SMOKE_TRAIN, **given} if args.smoke_test else given


def as_pairs(overrides: dict[str, Any]) -> list[list[Any]]:
    """Overrides as ``[[flag, text-or-None], ...]`` (None: a switch), for printed commands."""
    pairs = []
    for key, value in overrides.items():
        argv = to_argv(Config, {key: value})
        if argv:
            pairs.append([argv[0], argv[1] if len(argv) > 1 else None])
    return pairs


def _parse_space_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--space: expected NAME=SPEC, got {item!r}")
        out[name.strip()] = spec.strip()
    return out


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything an experiment needs, JSON-serialisable (saved as jemfast_tune.json)."""
    overrides = train_overrides(args)
    pairs = as_pairs(overrides)
    base = build_config({**overrides, "run.progress": False})
    smoke = SMOKE_TUNE if args.smoke_test else {}
    max_epochs = args.max_epochs if args.max_epochs is not None else smoke.get("max_epochs", base.optim.epochs)
    if max_epochs < 1:
        raise ValueError(f"--max-epochs: must be >= 1, got {max_epochs}")
    base.optim.epochs = max_epochs
    base.data.data_dir = str(Path(base.data.data_dir).expanduser().resolve())
    given: dict[str, Any] = dict(SMOKE_SPACE) if args.smoke_test else {}
    if args.space_file:
        given.update(read_space_file(args.space_file))
    given.update(_parse_space_args(args.space))
    flags_given = {FLAGS_BY_KEY[k] for k in overrides}
    fixed_by_flag = {n for n in CORE if flag_for(PARAMS[n]) in flags_given and n not in given}
    specs = build_specs(base, given, fixed_by_flag)
    num_samples = args.num_samples if args.num_samples is not None else smoke.get("num_samples", 8)
    if num_samples < 1:
        raise ValueError(f"--num-samples: must be >= 1, got {num_samples}")
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else smoke.get("cpus_per_trial", 1.0)
    if args.gpus_per_trial is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    else:
        gpus = args.gpus_per_trial
    if not (cpus > 0 and math.isfinite(cpus)):
        raise ValueError(f"--cpus-per-trial: must be > 0, got {cpus}")
    if not (gpus >= 0 and math.isfinite(gpus)):
        raise ValueError(f"--gpus-per-trial: must be >= 0, got {gpus}")
    if gpus > 1 and not float(gpus).is_integer():
        raise ValueError(f"--gpus-per-trial: above 1 it must be a whole number, got {gpus}")
    if base.run.device == "cuda" and gpus == 0:
        raise ValueError("--device cuda needs --gpus-per-trial > 0")
    for name, v in (("--grace-period", args.grace_period), ("--perturbation-interval", args.perturbation_interval),
                    ("--checkpoint-interval", args.checkpoint_interval)):
        if v is not None and v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if args.reduction_factor <= 1:
        raise ValueError(f"--reduction-factor: must be > 1, got {args.reduction_factor}")
    if args.max_failures < 0:
        raise ValueError(f"--max-failures: must be >= 0, got {args.max_failures}")
    for name in ("quality_weight", "restart_penalty", "diverged_penalty"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {v}")
    ckpt_interval = args.checkpoint_interval or (args.perturbation_interval if args.scheduler == "pbt" else 1)
    if args.scheduler == "pbt" and not any(n in specs and specs[n].searched for n in PBT_MUTABLE):
        raise ValueError(f"--scheduler pbt: nothing to perturb; search one of {', '.join(PBT_MUTABLE)}")
    return {
        "version": 1,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "train_pairs": pairs,
        "base": base.to_dict(),
        "specs": {n: sp.to_json() for n, sp in specs.items()},
        "num_samples": num_samples, "max_epochs": max_epochs, "scheduler": args.scheduler,
        "grace_period": args.grace_period or smoke.get("grace_period") or 1,
        "reduction_factor": args.reduction_factor, "perturbation_interval": args.perturbation_interval,
        "search_seed": args.search_seed, "cpus_per_trial": cpus, "gpus_per_trial": gpus,
        "max_concurrent": args.max_concurrent, "max_failures": args.max_failures,
        "settings": {
            "weights": {"quality": args.quality_weight, "restart": args.restart_penalty,
                        "diverged": args.diverged_penalty},
            "specs": {n: sp.to_json() for n, sp in specs.items()},
            "checkpoint_interval": ckpt_interval,
            "threads": max(1, int(cpus)),
            "gpus_per_trial": gpus,
            "kill_at_epoch": args.inject_worker_kill,
        },
    }


def _trainable(plan: dict[str, Any]) -> Any:
    from ray import tune

    from .trainable import jem_trainable

    fn = tune.with_parameters(jem_trainable, base=plan["base"], settings=plan["settings"])
    return tune.with_resources(fn, {"cpu": plan["cpus_per_trial"], "gpu": plan["gpus_per_trial"]})


def _scheduler(plan: dict[str, Any]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if plan["scheduler"] == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan["max_epochs"],
                             grace_period=min(plan["grace_period"], plan["max_epochs"]),
                             reduction_factor=plan["reduction_factor"])
    if plan["scheduler"] == "pbt":
        specs = {n: Spec.from_json(d) for n, d in plan["specs"].items()}
        mutations = {n: sp.to_tune() for n, sp in specs.items()
                     if n in PBT_MUTABLE and sp.searched and sp.kind != "grid"}
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=plan["perturbation_interval"],
                                       hyperparam_mutations=mutations, quantile_fraction=0.25,
                                       resample_probability=0.25)
    return None


def _progress_callback() -> Any:
    from .progress import Progress

    return Progress()


def _run_config(plan: dict[str, Any], storage: Path, name: str, verbose: int) -> Any:
    from ray import tune

    return tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=plan["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1 if verbose >= 2 else 0,
        callbacks=[_progress_callback()] if verbose == 1 else None)


def _quiet_tune(verbose: int) -> None:
    """Ray Tune's own console output only with --verbose 2 (the legacy reporter at verbosity 0
    prints nothing; the new one would still print its header and footer)."""
    if verbose < 2:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _new_tuner(plan: dict[str, Any], storage: Path, name: str, verbose: int) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    specs = {n: Spec.from_json(d) for n, d in plan["specs"].items()}
    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=plan["num_samples"], scheduler=_scheduler(plan),
        search_alg=BasicVariantGenerator(random_state=plan["search_seed"]),
        max_concurrent_trials=plan["max_concurrent"] or None, reuse_actors=True)
    return tune.Tuner(_trainable(plan), param_space={n: sp.to_tune() for n, sp in specs.items()},
                      tune_config=tune_config, run_config=_run_config(plan, storage, name, verbose))


class _GracefulStop:
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
            sys.stderr.write("jemfast.tune: stopping; saving the experiment state (again to abort)\n")
            tune_handler(signum, frame)
        elif callable(self.old.get(signum)):
            self.old[signum](signum, frame)
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> "_GracefulStop":
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _start_ray(address: str | None, num_cpus: int | None, verbose: int) -> bool:
    """Connect to (``address``) or start a local Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose >= 2 else logging.WARNING
    try:
        if address:
            ray.init(address=address, log_to_driver=verbose >= 2, logging_level=level)
        else:
            cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=verbose >= 2, logging_level=level)
    except Exception as exc:  # ConnectionError, RuntimeError, ...: one line, exit 2
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise UserError(f"could not {where} ({first})") from None
    return True


def write_outputs(exp_dir: Path, plan: dict[str, Any], result_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results.csv/json, best_command.txt and search.png. Returns what was written."""
    from .results import best_command, best_row, plot_search, sort_rows, write_table

    rows = sort_rows(result_rows)
    best = best_row(rows)
    cmd = best_command(best, plan["train_pairs"], plan["max_epochs"], str(exp_dir / "best")) if best else None
    extra = {"experiment": str(exp_dir), "objective": "score = valid_acc + Wq*quality - Wr*restarts - "
             "Wd*diverged; quality = 1/(1 + |mean g| + std g), g = E(real) - E(fake) over the last epoch",
             "weights": plan["settings"]["weights"], "scheduler": plan["scheduler"],
             "best_command": cmd}
    csv_path, json_path = write_table(rows, exp_dir, extra)
    if cmd:
        (exp_dir / "best_command.txt").write_text(cmd + "\n", encoding="utf-8")
    specs = {n: Spec.from_json(d) for n, d in plan["specs"].items()}
    png = plot_search(rows, specs, exp_dir / "search.png")
    return {"rows": rows, "best": best, "command": cmd, "csv": csv_path, "json": json_path, "png": png}


def _rows(grid: Any) -> list[dict[str, Any]]:
    from .results import row_from_result

    rows = []
    for i in range(len(grid)):
        res = grid[i]
        rows.append(row_from_result(res.metrics, res.config or {}, res.path, res.error))
    return rows


def _import_ray() -> Any:
    try:
        import ray  # noqa: F401
        from ray import tune
    except ImportError:
        raise UserError(NO_RAY) from None
    return tune


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    tune = _import_ray()
    if "://" in args.storage_path:
        raise UserError(f"--storage-path {args.storage_path}: give a local directory, or on a multi-node "
                        "cluster a directory every node mounts (NFS); URIs are not supported")
    storage = Path(args.storage_path).expanduser().resolve()
    name = _default_name(args)
    exp_dir = storage / name
    if args.resume:
        if not (exp_dir / PLAN_FILE).is_file() or not tune.Tuner.can_restore(str(exp_dir)):
            raise UserError(f"--resume: no jemfast.tune experiment state to restore in {exp_dir}")
        plan = json.loads((exp_dir / PLAN_FILE).read_text(encoding="utf-8"))
        plan["settings"]["exp_dir"] = str(exp_dir)  # the directory may have moved
    else:
        plan = make_plan(args)
        if tune.Tuner.can_restore(str(exp_dir)) or (exp_dir / "results.json").exists():
            if not args.overwrite:
                raise UserError(f"experiment {exp_dir} exists; pass --resume to continue it or "
                                f"--overwrite to replace it (or choose another --name)")
        if exp_dir.exists():
            shutil.rmtree(exp_dir)
        exp_dir.mkdir(parents=True)
        plan["settings"]["exp_dir"] = str(exp_dir)
        (exp_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2), encoding="utf-8")
    _quiet_tune(args.verbose)
    started = _start_ray(args.address, args.num_cpus, args.verbose)
    t0 = time.perf_counter()
    try:
        if args.resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=_trainable(plan), resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = _new_tuner(plan, storage, name, args.verbose)
        with _GracefulStop() as stop:
            grid = tuner.fit()
        rows = _rows(grid)
    finally:
        if started:
            import ray

            ray.shutdown()
    out = write_outputs(exp_dir, plan, rows)
    wall = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in out["rows"]) for s in STATUSES}
    print(f"{len(rows)} trials in {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; results: {out['csv']}")
    if out["png"]:
        print(f"search plot: {out['png']}")
    if stop.signum is not None:
        print(f"interrupted: experiment state saved in {exp_dir}; continue with: "
              f"{PROG} --resume --storage-path {storage} --name {name}")
        return 130
    if out["best"] is None:
        sys.stderr.write("jemfast.tune: error: no trial produced a score\n")
        return 1
    b = out["best"]
    print(f"best: trial {b['trial_id']} score {b['score']:.4f} (valid_acc {b['valid_acc']:.4f}, "
          f"quality {b['quality']:.3f}, {b['restarts']} restart(s), {b['status']})")
    print(f"best command (also in {exp_dir / 'best_command.txt'}):\n{out['command']}")
    return 0


def _default_name(args: argparse.Namespace) -> str:
    """--name, else the dataset (digits for --smoke-test, cifar10 as for jemfast.train)."""
    return args.name or getattr(args, TRAIN + "data.dataset", None) or ("digits" if args.smoke_test else "cifar10")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _main(argv), "jemfast.tune")

"""What an experiment of ``python -m jemfast.tune`` is: its options, its plan and its directory.

:class:`TuneOptions` declares the command's own flags once (as :mod:`jemfast.options.config` declares the
training flags); :func:`make_plan` turns them and the training flags into the JSON plan saved as
``jemfast_tune.json``; :func:`experiment_dir` decides where the experiment lives and refuses to
touch any directory that is not one of ours.
"""
from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jemfast.options.config import Config, build_config
from jemfast.process.errors import UserError, one_line
from jemfast.rundir.writable import check_writable_dir
from jemfast.options.schema import check_fields, given_values, option

from .objective import ScoreWeights
from .space import CORE, KEYS, PBT_MUTABLE, build_space, key_of, read_space_file, space_to_json
from .stability_map import map_axes

PLAN_FILE = "jemfast_tune.json"  # marks a directory as an experiment made by jemfast.tune
PLAN_VERSION = 2
TRAIN = "train:"  # argparse dest prefix of the training flags
# each trial has its own run directory, resumes and overwrites as Tune says, and shows no progress bar
NOT_PASSED = ("run.out", "run.resume", "run.overwrite", "run.progress")

# --smoke-test: 4 small digits trials (one with an injected divergence), ~1 minute on 2 cores.
SMOKE_TRAIN = {"data.dataset": "digits", "model.hidden": 16, "sampler.n_steps": 5, "optim.warmup_iters": 10,
               "run.log_every": 5, "stability.check_every": 5, "run.sample_every": 100000}
SMOKE_SPACE = {"buffer_size": "choice:250,500,1000", "energy_l2": "choice:0,0.1",
               "inject_divergence": "grid:12,-1,-1,-1"}
SMOKE_TUNE = {"num_samples": 1, "max_epochs": 3, "cpus_per_trial": 1.0, "grace_period": 1}

SEARCH, OBJECTIVE = "search", "objective: score = valid_acc + Wq*quality - Wr*restarts - Wd*diverged"
RESOURCES, WHERE, OTHER = "resources and fault tolerance", "where it runs", "other"


def _whole_above_one(g: float) -> str | None:
    return None if g <= 1 or float(g).is_integer() else f"above 1 it must be a whole number, got {g}"


@dataclass
class TuneOptions:
    num_samples: int | None = option(None, "--num-samples", "trials to sample (times each grid value; default 8)",
                                     lo=1, hi=1_000_000, group=SEARCH)
    max_epochs: int | None = option(None, "--max-epochs", "epochs per trial (default: --epochs or the dataset "
                                    "preset)", lo=1, hi=100_000, group=SEARCH)
    scheduler: str = option("asha", "--scheduler", "trial scheduler", choices=("asha", "pbt", "fifo"), group=SEARCH)
    grace_period: int | None = option(None, "--grace-period", "ASHA: epochs before a trial can be stopped "
                                      "(default 1)", lo=1, group=SEARCH)
    reduction_factor: float = option(3.0, "--reduction-factor", "ASHA reduction factor", gt=1.0, hi=1e3,
                                     group=SEARCH)
    perturbation_interval: int = option(2, "--perturbation-interval", "PBT: epochs between perturbations; also "
                                        "its checkpoint interval", lo=1, group=SEARCH)
    checkpoint_interval: int | None = option(None, "--checkpoint-interval", "epochs between Tune checkpoints "
                                             "(default 1; PBT: the perturbation interval)", lo=1, group=SEARCH)
    space: tuple[str, ...] = option((), "--space", "range of a parameter (a jemfast.train flag without dashes, "
                                    "e.g. buffer_size, sgld_steps, lr); SPEC: choice:a,b,c | uniform:lo,hi | "
                                    "loguniform:lo,hi | randint:lo,hi | lograndint:lo,hi | grid:a,b | a fixed "
                                    "value", action="append", metavar="NAME=SPEC", group=SEARCH)
    space_file: str | None = option(None, "--space-file", "YAML or JSON mapping NAME: SPEC (--space wins)",
                                    group=SEARCH)
    search_seed: int = option(0, "--search-seed", "seed of the random search", lo=0, hi=2**32 - 1, group=SEARCH)
    quality_weight: float = option(ScoreWeights.quality, "--quality-weight", "Wq", lo=0.0, hi=1e6, group=OBJECTIVE)
    restart_penalty: float = option(ScoreWeights.restart, "--restart-penalty", "Wr", lo=0.0, hi=1e6,
                                    group=OBJECTIVE)
    diverged_penalty: float = option(ScoreWeights.diverged, "--diverged-penalty", "Wd", lo=0.0, hi=1e6,
                                     group=OBJECTIVE)
    cpus_per_trial: float | None = option(None, "--cpus-per-trial", "CPUs reserved per trial (default 1)",
                                          gt=0.0, hi=4096, group=RESOURCES)
    gpus_per_trial: float | None = option(None, "--gpus-per-trial", "GPUs per trial, fractional allowed "
                                          "(default 1 if this machine has CUDA, else 0)", lo=0.0, hi=64,
                                          check=_whole_above_one, group=RESOURCES)
    trial_resource: tuple[str, ...] = option((), "--trial-resource", "a custom Ray resource every trial reserves "
                                             "(repeatable), e.g. to keep trials on the nodes started with "
                                             "--resources '{\"jem\": 4}'", action="append",
                                             metavar="NAME=AMOUNT", group=RESOURCES)
    max_concurrent: int = option(0, "--max-concurrent", "trials at once (0: as resources allow)", lo=0,
                                 group=RESOURCES)
    max_failures: int = option(2, "--max-failures", "retries of a crashed trial, each from its last checkpoint",
                               lo=0, hi=1000, group=RESOURCES)
    address: str | None = option(None, "--address", "join a running Ray cluster: 'auto' or 'ray://HOST:10001' "
                                 "(default: start a local Ray for this command)", group=WHERE)
    num_cpus: int | None = option(None, "--num-cpus", "CPUs of the local Ray (default: this machine's)", lo=1,
                                  hi=100_000, group=WHERE)
    storage_path: str = option("./runs/tune", "--storage-path", "experiments directory (on a multi-node "
                               "cluster a path every node shares)", group=WHERE)
    name: str | None = option(None, "--name", "experiment name: a directory inside --storage-path (default: the "
                              "dataset name)", group=WHERE)
    resume: bool = option(False, "--resume", "continue the interrupted experiment --name in --storage-path with "
                          "its saved settings (search and training flags given now are ignored; --address, "
                          "--num-cpus and --verbose apply)", action="store_true", group=WHERE)
    overwrite: bool = option(False, "--overwrite", "replace an existing jemfast.tune experiment of that name "
                             "(never another directory)", action="store_true", group=WHERE)
    map_axes: tuple[str, ...] = option((), "--map-axes", "the two searched parameters stability_map.png is drawn "
                                       "over (default: the first two searched)", metavar="NAME1,NAME2", group=OTHER)
    report: bool = option(False, "--report", "redraw the report (results table, search.png, stability_map.png) of "
                          "the experiment --name in --storage-path from its results, without running anything",
                          action="store_true", group=OTHER)
    smoke_test: bool = option(False, "--smoke-test", "4 small digits trials, 3 epochs each, one with an injected "
                              "divergence (about a minute on 2 CPU cores); other flags still apply",
                              action="store_true", group=OTHER)
    verbose: int = option(1, "--verbose", "0 quiet, 1 progress, 2 also the trials' own logs", choices=(0, 1, 2),
                          group=OTHER)
    inject_worker_kill: int | None = option(None, "--inject-worker-kill", "TESTING AID: every trial's worker "
                                            "process kills itself (SIGKILL) after reporting this epoch, on its "
                                            "first attempt only", lo=1, metavar="EPOCH", group=OTHER)


def read_options(args: argparse.Namespace) -> tuple[TuneOptions, dict[str, Any]]:
    """The validated command options and the training flags given (dotted overrides; the
    smoke test's defaults under them)."""
    opts = check_fields(TuneOptions(**given_values(args, TuneOptions)))
    train = given_values(args, Config, TRAIN)
    return opts, ({**SMOKE_TRAIN, **train} if opts.smoke_test else train)


def _space_args(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--space: expected NAME=SPEC, got {one_line(repr(item), 80)}")
        out[name.strip()] = spec.strip()
    return out


def _resource_args(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or name.strip() in ("cpu", "gpu", "CPU", "GPU") or not value > 0:
            raise ValueError(f"--trial-resource: expected NAME=AMOUNT (a custom resource, AMOUNT > 0), "
                             f"got {one_line(repr(item), 80)}")
        out[name.strip()] = value
    return out


def make_plan(opts: TuneOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything an experiment needs, JSON-serialisable (saved as jemfast_tune.json)."""
    smoke = SMOKE_TUNE if opts.smoke_test else {}
    base = build_config({**overrides, "run.progress": False})
    max_epochs = opts.max_epochs or smoke.get("max_epochs", base.optim.epochs)
    base = base.with_overrides({"optim.epochs": max_epochs,
                                "data.data_dir": str(Path(base.data.data_dir).expanduser().resolve())})
    given: dict[str, Any] = dict(SMOKE_SPACE) if opts.smoke_test else {}
    if opts.space_file:
        given.update(read_space_file(opts.space_file))
    given.update(_space_args(opts.space))
    named = {key_of(n) for n in given}
    space = build_space(base, given, fixed_by_flag={k for k in CORE if k in overrides and k not in named})
    map_axes(space, opts.map_axes)  # a bad --map-axes fails now, not after the search
    cpus = opts.cpus_per_trial or smoke.get("cpus_per_trial", 1.0)
    gpus = opts.gpus_per_trial
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    if base.run.device == "cuda" and gpus == 0:
        raise ValueError("--device cuda needs --gpus-per-trial > 0")
    if opts.scheduler == "pbt" and not any(key_of(n) in PBT_MUTABLE and r.searched for n, r in space.items()):
        raise ValueError("--scheduler pbt: nothing to perturb; search one of "
                         + ", ".join(KEYS[k] for k in PBT_MUTABLE))
    ckpt_interval = opts.checkpoint_interval or (opts.perturbation_interval if opts.scheduler == "pbt" else 1)
    return {
        "version": PLAN_VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": asdict(opts),
        "train_overrides": overrides,
        "base": base.to_dict(),
        "space": space_to_json(space),
        "num_samples": opts.num_samples or smoke.get("num_samples", 8), "max_epochs": max_epochs,
        "scheduler": opts.scheduler, "grace_period": opts.grace_period or smoke.get("grace_period") or 1,
        "reduction_factor": opts.reduction_factor, "perturbation_interval": opts.perturbation_interval,
        "search_seed": opts.search_seed, "cpus_per_trial": cpus, "gpus_per_trial": gpus,
        "max_concurrent": opts.max_concurrent, "max_failures": opts.max_failures,
        "custom_resources": _resource_args(opts.trial_resource),
        "settings": {
            "weights": {"quality": opts.quality_weight, "restart": opts.restart_penalty,
                        "diverged": opts.diverged_penalty},
            "space": space_to_json(space),
            "checkpoint_interval": ckpt_interval,
            "threads": max(1, int(cpus)),
            "gpus_per_trial": gpus,
            "kill_at_epoch": opts.inject_worker_kill,
        },
    }


def default_name(opts: TuneOptions, overrides: dict[str, Any]) -> str:
    """--name, else the dataset (digits for --smoke-test, cifar10 as for jemfast.train)."""
    return opts.name or overrides.get("data.dataset") or "cifar10"


def experiment_dir(opts: TuneOptions, name: str) -> tuple[Path, Path]:
    """``(storage, storage/name)``, checked: the storage path is (or can be made) a writable
    directory, and ``name`` is one directory inside it. Raises UserError."""
    if "://" in opts.storage_path:
        raise UserError(f"--storage-path {one_line(opts.storage_path, 200)}: give a local directory, or on a "
                        "multi-node cluster a directory every node mounts (NFS); URIs are not supported")
    storage = check_writable_dir(opts.storage_path, "--storage-path").resolve()
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise UserError(f"--name {one_line(repr(name), 80)}: must be a plain directory name inside "
                        f"--storage-path (no '/', '..' or absolute path)")
    return storage, storage / name


def is_ours(exp_dir: Path) -> bool:
    """True if ``exp_dir`` holds an experiment made by jemfast.tune (its plan file)."""
    return (exp_dir / PLAN_FILE).is_file()


def claim_experiment_dir(exp_dir: Path, overwrite: bool) -> None:
    """Make ``exp_dir`` ready for a new experiment. Never deletes a directory we did not make:
    an existing jemfast.tune experiment is replaced only with ``overwrite``; any other non-empty
    directory (a training run, a user's folder) is refused. Raises UserError."""
    if exp_dir.is_symlink() or (exp_dir.exists() and not exp_dir.is_dir()):
        raise UserError(f"--name: {exp_dir} exists and is not a directory; choose another --name")
    if exp_dir.is_dir() and any(exp_dir.iterdir()):
        if not is_ours(exp_dir):
            raise UserError(f"--name: {exp_dir} exists and is not a jemfast.tune experiment; it is left "
                            f"alone (--overwrite replaces only experiments) -- choose another --name")
        if not overwrite:
            raise UserError(f"experiment {exp_dir} exists; pass --resume to continue it or --overwrite to "
                            f"replace it (or choose another --name)")
        shutil.rmtree(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)

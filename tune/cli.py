"""``python -m jemfast.tune``: search for stable, good JEM settings with Ray Tune.

Local by default: starts a Ray of its own on this machine (``ray.init(address="local",
num_cpus=<this machine's cores>, include_dashboard=False)``, even where another Ray already runs
here) and stops it at the end. ``--address auto`` (on a cluster node) or
``--address ray://HEAD:10001`` joins an existing cluster instead. Every ``python -m
jemfast.train`` flag (``--dataset``, ``--model``, ``--sgld-steps``, ...) is accepted and sets the
base configuration of all trials (``--out``, ``--resume``, ``--overwrite`` excepted: each trial
has its own run directory). Both sets of flags are generated from their declarations
(:class:`jemfast.tune.plan.TuneOptions`, :mod:`jemfast.options.config`).

The experiment lives in ``--storage-path/--name``; a directory there that is not a jemfast.tune
experiment is never written into or deleted (:func:`jemfast.tune.plan.claim_experiment_dir`).

Exit codes: 0 done; 1 no trial produced a score; 2 user error (bad flag or range, a directory
that is not ours, missing Ray); 130 interrupted (continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Sequence

from jemfast.options.cli import OneLineParser, run_cli
from jemfast.options.config import Config
from jemfast.process.errors import UserError
from jemfast.process.log import get_logger, setup_cli_logging
from jemfast.options.schema import add_flags

from .plan import (NOT_PASSED, PLAN_FILE, PLAN_VERSION, TRAIN, TuneOptions, claim_experiment_dir,
                   default_name, experiment_dir, is_ours, make_plan, read_options)
from .results import STATUSES

PROG = "python -m jemfast.tune"
NO_RAY = ("Ray Tune is not installed; install the tune extra: pip install 'jemfast[tune]'")
log = get_logger("jemfast.tune")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Search JEM hyperparameters for stable, accurate training "
                      "with Ray Tune (locally or on a Ray cluster).")
    add_flags(p, TuneOptions)
    t = p.add_argument_group("training flags (as for python -m jemfast.train; they set every trial's base)")
    add_flags(p, Config, skip=NOT_PASSED, dest_prefix=TRAIN, group=t)
    return p


def _import_ray() -> Any:
    try:
        import ray  # noqa: F401
        from ray import tune
    except ImportError:
        raise UserError(NO_RAY) from None
    return tune


def _saved_plan(exp_dir: Any, tune: Any) -> dict[str, Any]:
    if not is_ours(exp_dir) or not tune.Tuner.can_restore(str(exp_dir)):
        raise UserError(f"--resume: no jemfast.tune experiment state to restore in {exp_dir}")
    try:
        plan = json.loads((exp_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {exp_dir / PLAN_FILE} cannot be read ({exc})") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise UserError(f"--resume: {exp_dir} was made by another version of jemfast.tune; "
                        f"start a new experiment (another --name)")
    plan["settings"]["exp_dir"] = str(exp_dir)  # the directory may have moved
    return plan


def _main(argv: Sequence[str] | None) -> int:
    opts, overrides = read_options(build_parser().parse_args(argv))
    tune = _import_ray()
    name = default_name(opts, overrides)
    storage, exp_dir = experiment_dir(opts, name)
    if opts.report:
        return _report(exp_dir, opts)
    if opts.resume:
        plan = _saved_plan(exp_dir, tune)
    else:
        plan = make_plan(opts, overrides)  # every check before the directory is touched
        claim_experiment_dir(exp_dir, opts.overwrite)
        plan["settings"]["exp_dir"] = str(exp_dir)
        (exp_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2), encoding="utf-8")
    from .run import GracefulStop, make_tuner, quiet_tune, restore_tuner, result_rows, start_ray, write_outputs

    quiet_tune(opts.verbose)
    started = start_ray(opts.address, opts.num_cpus, opts.verbose)
    t0 = time.perf_counter()
    try:
        tuner = restore_tuner(plan, exp_dir) if opts.resume else make_tuner(plan, storage, name, opts.verbose)
        with GracefulStop() as stop:
            grid = tuner.fit()
        rows = result_rows(grid)
    finally:
        if started:
            import ray

            ray.shutdown()
    out = write_outputs(exp_dir, plan, rows, opts.map_axes)
    wall = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in out["rows"]) for s in STATUSES}
    # results go to stdout (what the command produces); diagnostics go through logging to stderr
    print(f"{len(rows)} trials in {wall:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; results: {out['csv']}")
    for key, what in (("png", "search plot"), ("stability_map", "stability map")):
        if out[key]:
            print(f"{what}: {out[key]}")
    if stop.signum is not None:
        print(f"interrupted: experiment state saved in {exp_dir}; continue with: "
              f"{PROG} --resume --storage-path {storage} --name {name}")
        return 130
    if out["best"] is None:
        log.error("error: no trial produced a score")
        return 1
    b = out["best"]
    print(f"best: trial {b['trial_id']} score {b['score']:.4f} (valid_acc {b['valid_acc']:.4f}, "
          f"quality {b['quality']:.3f}, {b['restarts']} restart(s), {b['status']})")
    print(f"best command (also in {exp_dir / 'best_command.txt'}):\n{out['command']}")
    return 0


def _report(exp_dir: Any, opts: TuneOptions) -> int:
    """``--report``: rewrite an experiment's table and pictures from its saved results."""
    from .run import saved_rows, write_outputs

    if not is_ours(exp_dir) or not (exp_dir / "results.json").is_file():
        raise UserError(f"--report: no finished jemfast.tune experiment (results.json) in {exp_dir}")
    plan = json.loads((exp_dir / PLAN_FILE).read_text(encoding="utf-8"))
    try:
        out = write_outputs(exp_dir, plan, saved_rows(exp_dir), opts.map_axes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"{len(out['rows'])} trials; results: {out['csv']}")
    for key, what in (("png", "search plot"), ("stability_map", "stability map")):
        if out[key]:
            print(f"{what}: {out[key]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_cli_logging("jemfast.tune")
    return run_cli(lambda: _main(argv), "jemfast.tune")

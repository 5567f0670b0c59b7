"""``python -m jemfast.recipe_benchmark``: time to a good JEM, per recipe (``--recipe``), on the
embedded digits, side by side on one machine.

Every recipe x seed x dataset is an ordinary ``jemfast.train`` run (``OUT/DATASET/RECIPE/seed-S``)
with jemfast's defaults otherwise (divergence recovery on). After it, the sample quality of its
replay buffer in the features of the digits classifier (``jemfast.eval``'s generation part:
digits FID and IS against the training digits). The report (:mod:`jemfast.outputs.recipe_report`):
per recipe the final test accuracy, digits FID/IS, restarts, wall time, and the time at which
each run first reached the ``jem`` recipe's final validation accuracy (the mean over its seeds),
against ``jem``'s own wall time; ``table.md``, ``recipes.png`` (validation accuracy against wall
time), ``results.jsonl`` one line per run as they finish. Runs go ``--jobs`` at a time with
CPUs / jobs torch threads each, so compare wall times within one invocation only.

``--original DIR`` adds the real original script (wgrathwohl/JEM's ``train_wrn_ebm.py``, fetched
by the user; :mod:`jemfast.compat.original_run`) on digits32 as more rows, one per seed and
``--original-modes`` (unguarded: its own code after the swap line; guarded: with the README's
Guard lines), scored alike from its saved replay buffer. Rows accumulate in ``results.jsonl``
and the report covers them all, so ``--recipes ""`` with ``--original`` adds only those rows to
an earlier run's report. docs/recipes.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .compat.original_run import LINES as ORIGINAL_MODES
from .options.cli import OneLineParser, run_cli
from .options.config import Config, build_config
from .options.recipes import NAMES as RECIPES
from .options.schema import add_flags, check_fields, given_values, option
from .process.errors import DivergenceExhausted, UserError
from .process.log import get_logger, setup_cli_logging

PROG = "python -m jemfast.recipe_benchmark"
TRAIN = "train:"
log = get_logger("jemfast.recipe_benchmark")


@dataclass
class BenchOptions:
    datasets: tuple[str, ...] = option(("digits32",), "--datasets", "embedded datasets to run on",
                                       choices=("digits", "digits32"), metavar="D1,D2")
    recipes: tuple[str, ...] = option(tuple(r for r in RECIPES if r != "none"), "--recipes", "recipes to compare",
                                      choices=tuple(r for r in RECIPES if r != "none"), metavar="R1,R2,...")
    seeds: tuple[int, ...] = option((1, 2, 3), "--seeds", "training seeds", lo=0, hi=2**32 - 1, metavar="S1,S2,...")
    jobs: int = option(1, "--jobs", "runs at a time (each with CPUs / jobs torch threads)", lo=1, hi=256)
    gen_n: int = option(1000, "--gen-n", "buffer samples scored for the digits FID/IS", lo=10, hi=1_000_000)
    out: str = option("runs/recipes", "--out", "directory of the benchmark's runs and report")
    overwrite: bool = option(False, "--overwrite", "replace the runs already in --out", action="store_true")
    original: str = option("", "--original", "directory of wgrathwohl/JEM's code, fetched by you (train_wrn_ebm.py): "
                           "adds it on digits32 as rows ('' : none)")
    original_modes: tuple[str, ...] = option(("unguarded", "guarded"), "--original-modes",
                                             "the original script's rows: as is after the swap line, with the "
                                             "README's Guard lines, with the Guard lines of 9c5625c",
                                             choices=tuple(ORIGINAL_MODES), metavar="M1,M2")
    original_seeds: tuple[int, ...] = option((), "--original-seeds", "seeds of the original script's rows (none "
                                             "given: --seeds)", lo=0, hi=2**32 - 1, metavar="S1,S2,...")
    report: bool = option(False, "--report", "only write table.md and recipes.png again from --out's results.jsonl",
                          action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="The JEM recipes side by side: accuracy, sample quality, "
                                             "restarts and the time to the jem recipe's accuracy.")
    add_flags(p, BenchOptions)
    t = p.add_argument_group("training flags (as for python -m jemfast.train; they change every run)")
    add_flags(p, Config, skip=("data.dataset", "run.out", "run.seed", "run.resume", "run.overwrite", "run.recipe"),
              dest_prefix=TRAIN, group=t)
    return p


def run_one(cfg: Config, dataset: str, recipe: str, seed: int, gen_n: int) -> dict[str, Any]:
    """Train one run and score its buffer; its row of the report."""
    from .eval.runner import digits_quality
    from .train import train

    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except DivergenceExhausted:
        summary = json.loads((Path(cfg.run.out) / "summary.json").read_text())
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    curve = [(e["time"], e["valid_acc"]) for e in events if e.get("event") == "epoch" and "valid_acc" in e]
    row = {"dataset": dataset, "recipe": recipe, "seed": seed, "status": summary["status"],
           "restarts": len(summary.get("restarts") or []), "test_acc": summary.get("test_acc", math.nan),
           "valid_acc": summary.get("valid_acc", math.nan), "learned": summary.get("learned"), "wall_s": wall,
           "curve": curve, "out": cfg.run.out,
           "digits_fid": math.nan, "digits_is": math.nan}
    if summary["status"] == "finished":
        row.update(digits_quality(cfg.run.out, gen_n))
    return row


def run_original_row(original: str, out: str, mode: str, seed: int, threads: int, gen_n: int) -> dict[str, Any]:
    """Run the original script (:func:`jemfast.compat.original_run.run_original`) and score its
    saved buffer as :func:`run_one` does; its row of the report (recipe ``original (MODE)``)."""
    import torch

    from .compat.original_run import run_original
    from .data import load_digits_bundle
    from .eval.digits_fidelity import digits_fidelity
    from .outputs.summary import learned as run_learned

    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} is not empty: pick another --out or pass --overwrite")
    r = run_original(original, out, mode, seed, threads)
    learned = run_learned(r["test_acc"], 10, r["iterations"]) if r["status"] == "finished" else None
    row = {"dataset": "digits32", "recipe": f"original ({mode})", "seed": seed, "status": r["status"],
           "restarts": r["restarts"], "test_acc": r["test_acc"], "valid_acc": r["valid_acc"], "learned": learned,
           "wall_s": r["wall_s"], "curve": r["curve"], "out": out, "digits_fid": math.nan, "digits_is": math.nan}
    ckpt = Path(r["save_dir"]) / "last_ckpt.pt"
    if r["status"] == "finished" and ckpt.is_file():
        fake = torch.load(ckpt, map_location="cpu", weights_only=True)["replay_buffer"][:gen_n]
        train = load_digits_bundle(torch.device("cpu"), side=32).train.x
        real = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:gen_n]]
        scores = digits_fidelity(fake, real)
        row.update(digits_fid=scores["digits_fid"], digits_is=scores["digits_is"])
    return row


def _run_job(kind: str, *args: Any) -> dict[str, Any]:
    return run_one(*args) if kind == "recipe" else run_original_row(*args)


def write_report(out: Path) -> None:
    """table.md and recipes.png again from ``out``'s results.jsonl (a row without ``learned``, from
    an older version, takes it from its run's summary.json)."""
    from .outputs.recipe_report import plot, write_table
    from .outputs.result_rows import read_result_rows

    rows = read_result_rows(out / "results.jsonl")
    for row in rows:
        summary = Path(row["out"]) / "summary.json"
        if "learned" not in row and summary.is_file():
            row["learned"] = json.loads(summary.read_text(encoding="utf-8")).get("learned")
    write_table(rows, out / "table.md")
    plot(rows, out / "recipes.png")


def run_benchmark(opts: BenchOptions, base: dict[str, Any]) -> list[dict[str, Any]]:
    from .process.pool import run_all
    from .process.threads import available_cpus

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if opts.overwrite:
        results.unlink(missing_ok=True)
    if "run.threads" not in base:
        base = {**base, "run.threads": max(1, available_cpus() // opts.jobs)}
    plan = [(d, r, s, build_config({"data.dataset": d, "run.recipe": r, **base, "run.seed": s, "run.progress": False,
                                    "run.out": str(out / d / r / f"seed-{s}"), "run.overwrite": opts.overwrite}))
            for d in opts.datasets for s in opts.seeds for r in opts.recipes]
    jobs = [("recipe", cfg, d, r, s, opts.gen_n) for d, r, s, cfg in plan]
    if opts.original:
        seeds = opts.original_seeds or opts.seeds
        if opts.overwrite:
            for mode in opts.original_modes:
                for s in seeds:
                    shutil.rmtree(out / "digits32" / "original" / f"{mode}-seed-{s}", ignore_errors=True)
        # first: the longest runs, so the pool's last minutes are not one run alone
        jobs = [("original", opts.original, str(out / "digits32" / "original" / f"{mode}-seed-{s}"), mode, s,
                 base["run.threads"], opts.gen_n) for s in seeds for mode in opts.original_modes] + jobs
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        write_report(out)  # every row in results.jsonl, an earlier invocation's too
        eta = (time.perf_counter() - t0) / len(rows) * (len(jobs) - len(rows))
        log.info(f"{len(rows)}/{len(jobs)} {row['dataset']} {row['recipe']} seed {row['seed']}: {row['status']}, "
                 f"test {row['test_acc']:.3f}, digits FID {row['digits_fid']:.1f} ({row['wall_s']:.0f} s; "
                 f"ETA {eta:.0f} s)")

    run_all(_run_job, jobs, opts.jobs, done)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    setup_cli_logging("jemfast.recipe_benchmark")

    def _run() -> int:
        args = build_parser().parse_args(argv)
        opts = check_fields(BenchOptions(**given_values(args, BenchOptions)))
        if opts.report:
            write_report(Path(opts.out))
        elif not opts.seeds or not (opts.recipes or opts.original) or not opts.datasets:
            raise UserError("--datasets, --recipes (or --original) and --seeds must name at least one")
        else:
            run_benchmark(opts, given_values(args, Config, TRAIN))
        print((Path(opts.out) / "table.md").read_text(encoding="utf-8"))
        return 0

    return run_cli(_run, PROG)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m jemfast.natural_divergence``: JEM's own divergences over a matrix of settings,
with recovery off and on, against what each network reaches as a plain classifier.

Every setting is the paper's architecture family, a Wide-ResNet (WRN-10-2 at a CPU size), on the
embedded digits at 3x32x32 (no download), changed one step at a time (:data:`SETTINGS`: data
path, augmentation, upscaling, WRN layout, lr, batch norm, semi-supervised, class-conditional).
No fault is injected. Each setting runs for several seeds, each seed in up to four modes:

- ``off``: recovery off (``--max-restarts 0``): the run stops at the first detected divergence;
- ``defaults``: jemfast's defaults (detection and the recovery policy of jemfast.stability);
- ``clf-only``: the same network and schedule as a plain classifier (``--clf-only``): the
  accuracy a JEM run of that setting is measured against;
- ``reference``: the setting made stable from the start (:func:`reference_overrides`): where a
  ``defaults`` run ends short of ``clf-only``, its ``reference`` run says whether the JEM itself
  falls short there (the report's "why" column) or the recovery cost the difference.

Every run is an ordinary ``jemfast.train`` run directory ``OUT/SETTING/seed-S-MODE``
(metrics.jsonl, curves.png, checkpoints). ``OUT/results.jsonl`` gets one line per finished run
as they come; ``OUT/table.md`` and ``OUT/natural_divergence.png`` are rewritten after each, from
every row in results.jsonl (earlier invocations into the same OUT too: seeds accumulate).
``--jobs N`` runs N at a time, each with CPUs / N torch threads. Training flags (``--epochs``,
``--lr``, ...) change the base of every run. docs/stability.md has the results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .options.cli import OneLineParser, run_cli
from .options.config import Config, build_config
from .options.schema import add_flags, check_fields, given_values, option
from .outputs.result_rows import read_result_rows
from .process.errors import DivergenceExhausted, UserError
from .process.log import get_logger, setup_cli_logging

PROG = "python -m jemfast.natural_divergence"
TRAIN = "train:"
MODES = ("off", "defaults", "clf-only", "reference")
# The stable setting of the same architecture (the digits32 preset otherwise): fresh chains from JEM++'s
# informative init (per-class Gaussians) instead of U(-1, 1). From uniform noise, SGLD on a network
# without normalisation (input gradients ~1e-4 per pixel) cannot bring the chains near the data and
# the energy gap runs away; from the class Gaussians they start near it (docs/stability.md).
REFERENCE = {"sampler.init_dist": "informative"}
CIFAR_PATH = {"data.augment": True, "data.upscale": "nearest"}  # flips, crops and noise as CIFAR's batches
# name -> (what it changes, overrides of the digits32 preset)
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits32": ("the preset: WRN-10-2 without normalisation, bilinear upscaling, no augmentation, lr 1e-3", {}),
    "cifar-path": ("CIFAR's flips and crops, nearest upscaling", CIFAR_PATH),
    "cifar-path-noaug": ("nearest upscaling, no augmentation", {"data.upscale": "nearest"}),
    "bicubic-aug": ("CIFAR's flips and crops, bicubic upscaling", {**CIFAR_PATH, "data.upscale": "bicubic"}),
    "original-layout": ("the original code's WRN block layout, CIFAR's augmentation",
                        {**CIFAR_PATH, "model.wrn_layout": "original"}),
    "lr3e-4": ("lr 3e-4", {"optim.lr": 3e-4}),
    "batch-norm": ("batch norm in the WRN", {"model.norm": "batch"}),
    "semi-supervised": ("10 labels per class", {"data.labels_per_class": 10}),
    "class-cond": ("class-conditional buffer and chains", {"sampler.class_cond": True}),
    # The late case: past the early collapse (the informative init from the start), the lr warmed up
    # over 200 iterations (5 epochs) to 1e-2; measured with recovery off (seed 7): 54 % valid after
    # 4 epochs, then the loss and the gradient norm jump and the run diverges at iteration 180.
    "late-lr": ("the informative init, lr warmed up over 200 iterations to 1e-2: learns, then diverges",
                {"sampler.init_dist": "informative", "optim.lr": 1e-2, "optim.warmup_iters": 200}),
}
log = get_logger("jemfast.natural_divergence")


def reference_overrides(setting: str) -> dict[str, Any]:
    """The stable JEM of a setting: :data:`REFERENCE`, and on augmented batches also the p(x) term's
    real images un-augmented (``--px-augment false``, SADA-JEM): with the informative init alone the
    augmented settings still collapse (docs/stability.md), so that is what the recovery reaches."""
    augments = SETTINGS[setting][1].get("data.augment", False)
    return {**REFERENCE, **({"loss.px_augment": False} if augments else {})}


@dataclass
class BenchOptions:
    settings: tuple[str, ...] = option(tuple(SETTINGS), "--settings", "which settings (docs/stability.md lists them)",
                                       choices=tuple(SETTINGS), metavar="S1,S2,...")
    seeds: tuple[int, ...] = option((1, 2, 3, 4, 5), "--seeds", "training seeds", lo=0, hi=2**32 - 1,
                                    metavar="S1,S2,...")
    modes: tuple[str, ...] = option(("off", "defaults", "clf-only"), "--modes",
                                    "which runs per seed: off (--max-restarts 0), defaults, clf-only (the plain "
                                    "classifier), reference (the stable setting)", choices=MODES, metavar="M1,M2,...")
    jobs: int = option(1, "--jobs", "runs at a time (each with CPUs / jobs torch threads)", lo=1, hi=256)
    out: str = option("runs/natural_divergence", "--out", "directory of the benchmark's runs and report")
    overwrite: bool = option(False, "--overwrite", "train again the runs of --settings/--seeds/--modes already in "
                             "--out (their new rows replace the old; every other row stays)", action="store_true")
    report: bool = option(False, "--report", "only write table.md and natural_divergence.png again from --out's "
                          "results.jsonl", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Natural JEM divergences per setting and seed, with recovery off "
                                             "and on, against the plain classifier.")
    add_flags(p, BenchOptions)
    t = p.add_argument_group("training flags (as for python -m jemfast.train; they change every run's base)")
    add_flags(p, Config, skip=("data.dataset", "run.out", "run.seed", "run.resume", "run.overwrite",
                               "stability.max_restarts"), dest_prefix=TRAIN, group=t)
    return p


def run_config(base: dict[str, Any], setting: str, seed: int, mode: str, out: Path, overwrite: bool) -> Config:
    """The Config of one benchmark run: the digits32 preset < the setting < ``base`` (the
    command's training flags) < the mode."""
    overrides = {"data.dataset": "digits32", **SETTINGS[setting][1], **base, "run.seed": seed, "run.out": str(out),
                 "run.overwrite": overwrite, "run.progress": False}
    if mode == "off":
        overrides["stability.max_restarts"] = 0
    if mode == "clf-only":
        overrides["loss.clf_only"] = True
    if mode == "reference":
        overrides.update(reference_overrides(setting))
    return build_config(overrides)


def valid_before_divergence(events: list[dict[str, Any]]) -> float:
    """The best validation accuracy (fraction) of the epochs before a run's first divergence, from
    its metrics.jsonl lines in order; NaN if it never diverged or diverged before its first epoch."""
    best = math.nan
    for e in events:
        if e.get("event") in ("restart", "diverged"):
            return best
        if e.get("event") == "epoch" and e.get("valid_acc") is not None:
            best = e["valid_acc"] if math.isnan(best) else max(best, e["valid_acc"])
    return math.nan


def run_one(cfg: Config, setting: str, seed: int, mode: str) -> dict[str, Any]:
    """Train one run; its row of the table (``exit`` is what ``python -m jemfast.train`` exits with)."""
    from .eval.runner import digits_quality
    from .train import NOT_LEARNED_EXIT, train

    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except DivergenceExhausted:
        summary = json.loads((Path(cfg.run.out) / "summary.json").read_text())
    restarts = summary.get("restarts") or []
    events = [json.loads(line) for line in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    stop = next((e for e in events if e.get("event") == "diverged"), None)
    first = restarts[0] if restarts else stop
    learned = summary.get("learned") is not False
    return {"setting": setting, "seed": seed, "mode": mode, "status": summary["status"], "restarts": len(restarts),
            "exit": 3 if summary["status"] == "diverged" else 0 if learned else NOT_LEARNED_EXIT,
            "diverged": summary["status"] == "diverged" or bool(restarts),
            "detected_at": first["step"] if first else None, "cause": first["cause"] if first else "",
            "stopped_at": stop["step"] if stop else None,
            "valid_before": valid_before_divergence(events), "remedies": summary.get("remedies") or {},
            "valid_acc": summary.get("valid_acc", math.nan), "test_acc": summary.get("test_acc", math.nan),
            "wall_s": time.perf_counter() - t0, "out": cfg.run.out,
            **(digits_quality(cfg.run.out) if summary["status"] == "finished" and mode != "clf-only"
               else {"digits_fid": math.nan, "digits_is": math.nan})}


def run_key(row: dict[str, Any]) -> tuple[str, int, str]:
    return row["setting"], row["seed"], row["mode"]


def table_order(row: dict[str, Any]) -> tuple[int, int, int]:
    """Settings and modes in their declared order, then seeds."""
    known = list(SETTINGS)
    return (known.index(row["setting"]) if row["setting"] in known else len(known), row["seed"],
            MODES.index(row["mode"]) if row["mode"] in MODES else len(MODES))


def earlier_rows(results: Path, missing_ok: bool = True) -> list[dict[str, Any]]:
    """The rows already in ``results`` (results.jsonl; a missing file: none, or one clear line
    without ``missing_ok``), a rerun's row in place of its first."""
    try:
        return list({run_key(row): row for row in read_result_rows(results, missing_ok)}.values())
    except KeyError as e:
        raise UserError(f"{results}: a row without {e}; move it away") from None


def write_report(out: Path) -> None:
    """table.md and natural_divergence.png again from ``out``'s results.jsonl."""
    from .outputs.divergence_matrix import plot, write_table

    rows = sorted(earlier_rows(out / "results.jsonl", missing_ok=False), key=table_order)
    write_table(rows, out / "table.md")
    plot(rows, out / "natural_divergence.png")


def run_benchmark(opts: BenchOptions, base: dict[str, Any]) -> list[dict[str, Any]]:
    from .process.pool import run_all
    from .process.threads import available_cpus
    from .outputs.divergence_matrix import outcome

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if opts.jobs > 1 and "run.threads" not in base:
        base = {**base, "run.threads": max(1, available_cpus() // opts.jobs)}
    plan = [(setting, seed, mode, run_config(base, setting, seed, mode, out / setting / f"seed-{seed}-{mode}",
                                             opts.overwrite))
            for setting in opts.settings for seed in opts.seeds for mode in opts.modes]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    earlier_rows(results)  # a corrupt results.jsonl stops the benchmark before it trains

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        write_report(out)  # every row in results.jsonl: earlier invocations' (more seeds, settings) too
        left = len(plan) - len(rows)
        eta = (time.perf_counter() - t0) / len(rows) * left
        log.info(f"{len(rows)}/{len(plan)} {row['setting']} seed {row['seed']} {row['mode']}: {outcome(row)}"
                 f" ({row['wall_s']:.0f} s; ETA {eta:.0f} s)")

    run_all(run_one, [(cfg, setting, seed, mode) for setting, seed, mode, cfg in plan], opts.jobs, done)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    setup_cli_logging("jemfast.natural_divergence")

    def _run() -> int:
        args = build_parser().parse_args(argv)
        opts = check_fields(BenchOptions(**given_values(args, BenchOptions)))
        base = given_values(args, Config, TRAIN)
        if opts.report:
            write_report(Path(opts.out))
        elif not opts.seeds or not opts.modes or not opts.settings:
            raise UserError("--settings, --seeds and --modes must name at least one")
        else:
            run_benchmark(opts, base)
        print((Path(opts.out) / "table.md").read_text(encoding="utf-8"))
        return 0

    return run_cli(_run, PROG)


if __name__ == "__main__":
    sys.exit(main())

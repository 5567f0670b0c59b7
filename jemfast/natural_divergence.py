"""``python -m jemfast.natural_divergence``: JEM's own divergences, with recovery off and on.

Runs the paper's architecture family, a Wide-ResNet without normalisation (WRN-10-2 at a CPU
size), on ``--dataset digits32`` (the embedded digits at 3x32x32; no download) for several seeds,
each in up to three modes, and reports per seed whether it diverged, how the recovery went and
the accuracy it ended with. No fault is injected: the setting is one where plain JEM diverges by
itself (docs/stability.md says which and why).

- ``off``: recovery off (``--max-restarts 0``): the run stops at the first detected divergence;
- ``defaults``: jemfast's defaults (detection and the recovery policy of jemfast.stability);
- ``reference``: a stable setting of the same architecture (:data:`REFERENCE`): the accuracy a
  rescued run is measured against.

Every run is an ordinary ``jemfast.train`` run directory ``OUT/seed-S-MODE`` (metrics.jsonl,
curves.png, checkpoints). ``OUT/results.jsonl`` gets one line per finished run as they come;
``OUT/table.md`` and ``OUT/natural_divergence.png`` are rewritten after each. Training flags
(``--epochs``, ``--lr``, ...) change the benchmark's base setting for every mode.
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
from .process.errors import DivergenceExhausted, UserError
from .process.log import get_logger, setup_cli_logging

PROG = "python -m jemfast.natural_divergence"
TRAIN = "train:"
MODES = ("off", "defaults", "reference")
# The stable setting of the same architecture (the digits32 preset otherwise): fresh chains from JEM++'s
# informative init (per-class Gaussians) instead of U(-1, 1). From uniform noise, SGLD on a network
# without normalisation (input gradients ~1e-4 per pixel) cannot bring the chains near the data and
# the energy gap runs away; from the class Gaussians they start near it (docs/stability.md).
REFERENCE = {"sampler.init_dist": "informative"}
log = get_logger("jemfast.natural_divergence")


@dataclass
class BenchOptions:
    seeds: tuple[int, ...] = option((1, 2, 3, 4), "--seeds", "training seeds", lo=0, hi=2**32 - 1, metavar="S1,S2,...")
    modes: tuple[str, ...] = option(MODES, "--modes", "which runs per seed: off (--max-restarts 0), defaults, "
                                    "reference (the stable setting)", choices=MODES, metavar="M1,M2,...")
    out: str = option("runs/natural_divergence", "--out", "directory of the benchmark's runs and report")
    overwrite: bool = option(False, "--overwrite", "replace the runs already in --out", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Natural JEM divergences per seed, with recovery off and on.")
    add_flags(p, BenchOptions)
    t = p.add_argument_group("training flags (as for python -m jemfast.train; they change every run's base)")
    add_flags(p, Config, skip=("data.dataset", "run.out", "run.seed", "run.resume", "run.overwrite",
                               "stability.max_restarts"), dest_prefix=TRAIN, group=t)
    return p


def run_config(base: dict[str, Any], seed: int, mode: str, out: Path, overwrite: bool) -> Config:
    """The Config of one benchmark run."""
    overrides = {"data.dataset": "digits32", **base, "run.seed": seed, "run.out": str(out),
                 "run.overwrite": overwrite, "run.progress": False}
    if mode == "off":
        overrides["stability.max_restarts"] = 0
    if mode == "reference":
        overrides.update(REFERENCE)
    return build_config(overrides)


def run_one(cfg: Config, seed: int, mode: str) -> dict[str, Any]:
    """Train one run; its row of the table."""
    from .train import train

    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except DivergenceExhausted:
        summary = json.loads((Path(cfg.run.out) / "summary.json").read_text())
    restarts = summary.get("restarts") or []
    events = [json.loads(line) for line in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    stop = next((e for e in events if e.get("event") == "diverged"), None)
    first = restarts[0] if restarts else stop
    return {"seed": seed, "mode": mode, "status": summary["status"], "restarts": len(restarts),
            "diverged": summary["status"] == "diverged" or bool(restarts),
            "detected_at": first["step"] if first else None, "cause": first["cause"] if first else "",
            "stopped_at": stop["step"] if stop else None,
            "valid_acc": summary.get("valid_acc", math.nan), "test_acc": summary.get("test_acc", math.nan),
            "wall_s": time.perf_counter() - t0, "out": cfg.run.out}


def outcome(row: dict[str, Any]) -> str:
    if row["status"] == "diverged":
        after = f" after {row['restarts']} restart(s)" if row["restarts"] else ""
        return f"diverged{after} (stopped at iteration {row['stopped_at']})"
    if row["restarts"]:
        return f"recovered ({row['restarts']} restart(s), first at iteration {row['detected_at']})"
    return "stable" if row["status"] == "finished" else row["status"]


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["| seed | mode | outcome | first detection | valid acc | test acc | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cause = r["cause"].split(";")[0] if r["cause"] else ""
        lines.append(f"| {r['seed']} | {r['mode']} | {outcome(r)} | {cause} | {_pct(r['valid_acc'])} | "
                     f"{_pct(r['test_acc'])} | {r['wall_s']:.0f} |")
    off = [r for r in rows if r["mode"] == "off"]
    if off:
        lines.append(f"\nWith recovery off, {sum(r['diverged'] for r in off)} of {len(off)} seeds diverged.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pct(v: Any) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.1f} %"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy per seed and mode; red hatching = diverged, orange edge = recovered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    colours = {"off": "tab:gray", "defaults": "tab:blue", "reference": "tab:green"}
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(seeds), 4.2))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        for i, seed in enumerate(seeds):
            r = next((r for r in rows if r["seed"] == seed and r["mode"] == mode), None)
            if r is None:
                continue
            acc = r["test_acc"] if math.isfinite(r["test_acc"]) else 0.0
            x = i + (j - (len(modes) - 1) / 2) * width
            edge = "tab:red" if r["status"] == "diverged" else "tab:orange" if r["restarts"] else "black"
            ax.bar(x, acc, width * 0.9, color=colours[mode], edgecolor=edge, linewidth=1.5,
                   hatch="//" if r["status"] == "diverged" else None, label=mode if i == 0 else None)
            ax.annotate("diverged" if r["status"] == "diverged" else f"{r['restarts']}r" if r["restarts"] else "",
                        (x, acc), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (0 = stopped)")
    ax.set_title("natural divergence: WRN without normalisation on digits32\n"
                 "(red hatch: diverged, stopped; orange edge: recovered, Nr = restarts)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_benchmark(opts: BenchOptions, base: dict[str, Any]) -> list[dict[str, Any]]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if opts.overwrite:
        results.unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []
    plan = [(s, m) for s in opts.seeds for m in opts.modes]
    t0 = time.perf_counter()
    for k, (seed, mode) in enumerate(plan):
        cfg = run_config(base, seed, mode, out / f"seed-{seed}-{mode}", opts.overwrite)
        eta = (time.perf_counter() - t0) / k * (len(plan) - k) if k else math.nan
        log.info(f"run {k + 1}/{len(plan)}: seed {seed}, {mode} (ETA {eta:.0f} s)")
        row = run_one(cfg, seed, mode)
        rows.append(row)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        write_table(rows, out / "table.md")
        plot(rows, out / "natural_divergence.png")
        log.info(f"seed {seed}, {mode}: {outcome(row)}, test {_pct(row['test_acc'])}, {row['wall_s']:.0f} s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    setup_cli_logging("jemfast.natural_divergence")

    def _run() -> int:
        args = build_parser().parse_args(argv)
        opts = check_fields(BenchOptions(**given_values(args, BenchOptions)))
        base = given_values(args, Config, TRAIN)
        if not opts.seeds or not opts.modes:
            raise UserError("--seeds and --modes must name at least one")
        run_benchmark(opts, base)
        print((Path(opts.out) / "table.md").read_text(encoding="utf-8"))
        return 0

    return run_cli(_run, PROG)


if __name__ == "__main__":
    sys.exit(main())

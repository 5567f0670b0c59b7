"""Experiment outputs: the results table (CSV + JSON), the best command, the search plot.

Written into the experiment directory by ``python -m jemfast.tune`` after the search::

    results.csv / results.json   one row per trial, sorted by score (best first)
    best_command.txt             the best trial as a ready-to-run ``python -m jemfast.train`` line
    search.png                   score and divergence rate against each searched parameter

Status column: ``finished`` (ran all epochs), ``stopped`` (ended early by the scheduler, or the
experiment was interrupted before it finished), ``diverged`` (exhausted jemfast's automatic
restarts; still scored), ``error`` (the trial failed more than ``--max-failures`` times),
``pending`` (never reported: the experiment was interrupted before it started).
"""
from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path
from typing import Any

from jemfast.options.config import Config, field_kind
from jemfast.process.errors import one_line
from jemfast.options.schema import to_argv

from .space import KEYS, TESTING_AIDS, Range, key_of
from .stability_map import axis_positions

STATUSES = ("finished", "stopped", "diverged", "error", "pending")
METRIC_COLUMNS = ("score", "valid_acc", "quality", "gap_mean", "gap_std", "restarts", "epoch", "step")


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def row_from_result(metrics: dict[str, Any] | None, config: dict[str, Any], path: str | None,
                    error: Any, checkpoint: str | None = None) -> dict[str, Any]:
    """One table row from a trial's last reported metrics, config, directory, error and the name
    of its latest checkpoint that Tune recorded (the one ``--resume`` continues it from)."""
    metrics = metrics or {}
    reported = metrics.get("status")
    if error is not None:
        status = "error"
    elif "score" not in metrics:
        status = "pending"
    elif reported in ("finished", "diverged"):
        status = reported
    else:
        status = "stopped"
    row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or (Path(path).name if path else "?"),
                           "status": status}
    for key in METRIC_COLUMNS:
        v = _num(metrics.get(key))
        row[key] = int(v) if key in ("restarts", "epoch", "step") and math.isfinite(v) else v
    row.update({k: v for k, v in config.items() if k in KEYS.values()})
    row["node_id"] = str(metrics.get("node_id", ""))
    row["path"] = path or ""
    row["checkpoint"] = checkpoint or ""
    row["error"] = "" if error is None else one_line(str(error), 300) or type(error).__name__
    return row


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best score first; NaN scores (nothing reported) last."""
    return sorted(rows, key=lambda r: (not math.isfinite(r["score"]), -r["score"] if math.isfinite(r["score"]) else 0))


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_table(rows: list[dict[str, Any]], exp_dir: Path, extra: dict[str, Any]) -> tuple[Path, Path]:
    """Write results.csv and results.json (rows already sorted). Returns both paths."""
    columns = ["rank", "trial_id", "status", *METRIC_COLUMNS]
    columns += [k for k in KEYS.values() if any(k in r for r in rows)] + ["node_id", "path", "checkpoint", "error"]
    csv_path, json_path = exp_dir / "results.csv", exp_dir / "results.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows, 1):
            w.writerow({"rank": i, **{k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                                      for k, v in r.items()}})
    trials = [{"rank": i, **{k: _json_safe(v) for k, v in r.items()}} for i, r in enumerate(rows, 1)]
    json_path.write_text(json.dumps({**extra, "trials": trials}, indent=2), encoding="utf-8")
    return csv_path, json_path


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The top row with a finite score that is not an error."""
    for r in rows:
        if r["status"] != "error" and math.isfinite(r["score"]):
            return r
    return None


def searched_value(name: str, v: Any) -> Any:
    """A trial's value as a command line gives it: integers whole, floats to 6 digits."""
    if field_kind(key_of(name)).base is int:
        return int(round(float(v)))
    return float(format(float(v), ".6g")) if isinstance(v, float) else v


def best_command(row: dict[str, Any], train_overrides: dict[str, Any], epochs: int, out: str) -> str:
    """``python -m jemfast.train`` with the experiment's training flags and the row's values.

    The row's parameters replace the same training flags; testing aids
    (``--inject-divergence``) and ``--epochs``/``--out`` are dropped and set afresh.
    """
    params = {key_of(k): searched_value(k, row[k]) for k in KEYS.values()
              if k in row and key_of(k) not in TESTING_AIDS}
    drop = {*params, *TESTING_AIDS, "optim.epochs", "run.out"}
    values = {k: v for k, v in train_overrides.items() if k not in drop}
    values.update(params)
    values.update({"optim.epochs": epochs, "run.out": out})
    return shlex.join(["python", "-m", "jemfast.train", *to_argv(Config, values)])


def plot_search(rows: list[dict[str, Any]], space: dict[str, Range], path: Path) -> Path | None:
    """search.png: per searched parameter, score (top) and divergence rate (bottom).

    A trial counts as diverging if it needed at least one restart or ended ``diverged``.
    Ranges are binned into up to 5 bins (log-spaced for log ranges); choices by value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in space.items() if r.searched and key_of(n) not in TESTING_AIDS]
    rows = [r for r in rows if r["status"] != "error"]
    if not names or not rows:
        return None
    colors = {"finished": "tab:blue", "stopped": "tab:gray", "diverged": "tab:red"}
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.2), squeeze=False)
    for j, name in enumerate(names):
        sp = space[name]
        sub = [r for r in rows if name in r]
        values = [r[name] for r in sub]
        xs, categories = axis_positions(values, sp)  # categories: a choice of names (init), at their index
        diverging = [(r["restarts"] if isinstance(r["restarts"], int) else 0) > 0 or r["status"] == "diverged"
                     for r in sub]
        ax = axes[0][j]
        for status, c in colors.items():
            pts = [(x, r["score"]) for x, r in zip(xs, sub) if r["status"] == status and math.isfinite(r["score"])]
            if pts:
                ax.scatter(*zip(*pts), color=c, label=status, s=26, alpha=0.85)
        ring = [(x, r["score"]) for x, r, d in zip(xs, sub, diverging) if d and math.isfinite(r["score"])]
        if ring:
            ax.scatter(*zip(*ring), s=90, facecolors="none", edgecolors="tab:red", linewidths=1.4,
                       label="needed a restart")
        ax.set_title(name)
        ax.set_ylabel("score" if j == 0 else "")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7, loc="best")
        bx = axes[1][j]
        per_value = sp.kind in ("choice", "grid") or len(set(xs)) <= 5
        if categories:
            labels = categories
            groups = [[d for v, d in zip(values, diverging) if str(v) == c] for c in categories]
            ax.set_xticks(range(len(categories)), categories)
        elif per_value:
            keys = sorted(set(xs))
            labels = [format(k, ".4g") for k in keys]
            groups = [[d for x, d in zip(xs, diverging) if x == k] for k in keys]
        else:
            lo, hi = min(xs), max(xs)
            n_bins = 5
            if sp.log and lo > 0:
                edges = [lo * (hi / lo) ** (i / n_bins) for i in range(n_bins + 1)]
            else:
                edges = [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]
            groups = [[d for x, d in zip(xs, diverging)
                       if edges[i] <= x < edges[i + 1] or (i == n_bins - 1 and x == hi)] for i in range(n_bins)]
            labels = [f"{edges[i]:.2g}-{edges[i + 1]:.2g}" for i in range(n_bins)]
        rates = [sum(g) / len(g) if g else 0.0 for g in groups]
        bars = bx.bar(range(len(rates)), rates, color="tab:red", alpha=0.7)
        for b, g in zip(bars, groups):
            bx.annotate(f"n={len(g)}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=7)
        bx.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        bx.set_ylim(0, 1.1)
        bx.set_ylabel("divergence rate" if j == 0 else "")
        bx.set_xlabel(name + ("" if per_value else " (log bins)" if sp.log else " (bins)"))
        if sp.log and not categories:
            from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(LogFormatterSciNotation())
    fig.suptitle(f"jemfast.tune: score and divergence rate (restart or diverged) of {len(rows)} trials",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

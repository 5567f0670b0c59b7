"""``stability_map.png``: where in the searched space JEM trained stably, recovered, or diverged.

Each trial is a point over two searched parameters (the first two of the search space, or the
two named by ``--map-axes``), coloured by its outcome and sized by its validation accuracy,
which is also written beside it:

- **stable**: no restart and not diverged;
- **recovered**: at least one automatic restart, finished (or stopped by the scheduler) all the same;
- **diverged**: restarts used up (status ``diverged``);
- grey: no outcome yet (pending, error).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .space import TESTING_AIDS, Range, is_number, key_of

OUTCOME_COLOURS = {"stable": "tab:green", "recovered": "tab:orange", "diverged": "tab:red", "unknown": "tab:gray"}


def outcome(row: dict[str, Any]) -> str:
    """stable / recovered / diverged / unknown, from a results-table row."""
    if row["status"] == "diverged":
        return "diverged"
    if row["status"] in ("error", "pending"):
        return "unknown"
    restarts = row.get("restarts")
    return "recovered" if isinstance(restarts, int) and restarts > 0 else "stable"


def map_axes(space: dict[str, Range], wanted: tuple[str, ...] = ()) -> list[str]:
    """The two parameters the map is drawn over: ``wanted`` if given, else the first two searched
    ones (fewer when fewer are searched). Raises ValueError naming an unknown one."""
    searched = [n for n, r in space.items() if r.searched and key_of(n) not in TESTING_AIDS]
    for name in wanted:
        if name not in searched:
            raise ValueError(f"--map-axes: {name!r} is not a searched parameter of this experiment "
                             f"(searched: {', '.join(searched) or 'none'})")
    return list(wanted) if wanted else searched[:2]


def axis_positions(values: list[Any], rng: Range) -> tuple[list[float], list[str]]:
    """Where trials with ``values`` of one parameter sit on its axis, and the axis' tick labels.

    Numbers sit at their value (no labels: a linear or log axis). The values of a ``choice`` that
    are not all numbers (``init``: uniform, informative) are categories: each sits at its index in
    the choice, trials spread evenly within +-0.3 of it so that they do not hide each other."""
    if all(is_number(v) for v in values):
        return [float(v) for v in values], []
    keys = [str(v) for v in values]
    labels = [str(c) for c in rng.values] if rng.kind in ("choice", "grid") else sorted(set(keys))
    labels += [k for k in dict.fromkeys(keys) if k not in labels]
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        k, n = seen.get(key, 0), keys.count(key)
        seen[key] = k + 1
        out.append(labels.index(key) + (0.0 if n == 1 else 0.6 * (k / (n - 1) - 0.5)))
    return out, labels


def plot_stability_map(rows: list[dict[str, Any]], space: dict[str, Range], path: Path,
                       axes: tuple[str, ...] = ()) -> Path | None:
    """Draw the map into ``path``; None when no parameter is searched or no trial has values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = map_axes(space, axes)
    rows = [r for r in rows if all(n in r for n in names)]
    if not names or not rows:
        return None
    coords = [axis_positions([r[n] for r in rows], space[n]) for n in names]
    xs = coords[0][0]
    ys = coords[1][0] if len(names) > 1 else [0.0] * len(rows)
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    for kind, colour in OUTCOME_COLOURS.items():
        idx = [i for i, r in enumerate(rows) if outcome(r) == kind]
        if not idx:
            continue
        accs = [rows[i]["valid_acc"] if math.isfinite(rows[i]["valid_acc"]) else 0.0 for i in idx]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=[30 + 400 * a for a in accs], color=colour,
                   alpha=0.7, edgecolors="black", linewidths=0.6, label=f"{kind} ({len(idx)})")
        for i, a in zip(idx, accs):
            ax.annotate(f"{100 * a:.0f}%", (xs[i], ys[i]), fontsize=7, ha="center", va="bottom",
                        xytext=(0, 6), textcoords="offset points")
    for axis, name, (_, labels) in zip(("x", "y"), names, coords):
        if labels:
            getattr(ax, f"set_{axis}ticks")(range(len(labels)), labels)
            getattr(ax, f"set_{axis}lim")(-0.5, len(labels) - 0.5)
        elif space[name].log:
            getattr(ax, f"set_{axis}scale")("log")
        getattr(ax, f"set_{axis}label")(name)
    if len(names) == 1:
        ax.set_yticks([])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="outcome (trials)", title_fontsize=8)
    ax.set_title(f"stability map of {len(rows)} trials (size and label: validation accuracy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The natural-divergence matrix's report (``python -m jemfast.natural_divergence``): table.md
and natural_divergence.png from its result rows (one dict per run: setting, seed, mode, status,
exit, restarts, remedies, test_acc, wall_s, ...)."""
from __future__ import annotations

import math
import statistics
from typing import Any

TOLERANCE = 0.05  # a defaults run counts as good within 5 points of its setting's plain classifier
LEARNED = 0.2  # a divergence is late when validation accuracy had passed 2x chance (10 digits) before it


def late(row: dict[str, Any]) -> bool:
    """The run had learned before its first divergence (rows of older runs lack ``valid_before``)."""
    before = row.get("valid_before", math.nan)
    return before is not None and math.isfinite(before) and before >= LEARNED


def _after_learning(row: dict[str, Any]) -> str:
    return f", after {100 * row['valid_before']:.1f} % valid" if late(row) else ""


def outcome(row: dict[str, Any]) -> str:
    """One run's fate in a few words."""
    if row["status"] == "diverged":
        after = f" after {row['restarts']} restart(s)" if row["restarts"] else ""
        return f"diverged{after} (stopped at iteration {row['stopped_at']}{_after_learning(row)})"
    if row["status"] != "finished":
        return row["status"]
    words = (f"recovered ({row['restarts']} restart(s), first at {row['detected_at']}{_after_learning(row)})"
             if row["restarts"] else "stable")
    return words + (", did not learn" if row["exit"] == 4 else "")


def _pct(v: Any) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{100 * v:.1f} %"


def _num(v: Any) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _by(rows: list[dict[str, Any]]) -> dict[str, dict[tuple[int, str], dict[str, Any]]]:
    out: dict[str, dict[tuple[int, str], dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["setting"], {})[(r["seed"], r["mode"])] = r
    return out


def gap_to_classifier(runs: dict[tuple[int, str], dict[str, Any]], seed: int, mode: str = "defaults") -> float:
    """Test accuracy of the seed's ``mode`` run minus its clf-only run (NaN if either is missing;
    a stopped run counts as 0)."""
    d, c = runs.get((seed, mode)), runs.get((seed, "clf-only"))
    if d is None or c is None:
        return math.nan
    acc = d["test_acc"] if d["status"] == "finished" and math.isfinite(d["test_acc"]) else 0.0
    return acc - c["test_acc"]


def why_short(runs: dict[tuple[int, str], dict[str, Any]]) -> str:
    """Why the setting's defaults runs that end more than 5 points short of clf-only do, measured
    by the same seeds' ``reference`` runs (the JEM made stable from the start; a defaults run
    that never restarted is one itself): short too, the JEM itself falls short at this network and
    schedule; within 5 points, the recovery cost it."""
    short = [s for s, m in runs if m == "defaults" and gap_to_classifier(runs, s) < -TOLERANCE]
    if not short:
        return "—"
    # a defaults run that never restarted was stable from the start: it is its own reference
    unrestarted = [s for s in short if runs[s, "defaults"]["status"] == "finished"
                   and runs[s, "defaults"]["restarts"] == 0 and (s, "reference") not in runs]

    def reference_gap(seed: int) -> float:
        return gap_to_classifier(runs, seed, "defaults" if seed in unrestarted else "reference")

    unmeasured = [s for s in short if math.isnan(reference_gap(s))]
    short = [s for s in short if s not in unmeasured]  # judged on the seeds with a reference run
    if not short:
        return "not measured (no reference run of those seeds)"
    note = f"; seed(s) {', '.join(map(str, unmeasured))} short too, no reference run" if unmeasured else ""
    if unrestarted:
        note += f"; seed(s) {', '.join(map(str, unrestarted))} never restarted: the run is its own reference"
    ref = [reference_gap(s) for s in short]
    itself = [g for g in ref if g < -TOLERANCE]
    if len(itself) == len(short):
        cost = statistics.fmean(gap_to_classifier(runs, s) for s in short) - statistics.fmean(ref)
        return (f"the JEM itself: stable from the start it is short too ({len(itself)}/{len(short)} seeds, "
                f"{min(itself) * 100:+.1f} to {max(itself) * 100:+.1f} points; the defaults {cost * 100:+.1f} "
                f"from it{note})")
    if not itself:
        return (f"the recovery: stable from the start the JEM is within 5 points ({len(short)}/{len(short)} seeds"
                f"{note})")
    return f"mixed: stable from the start the JEM is short on {len(itself)} of those {len(short)} seeds too{note}"


def _diverged_cell(off: list[dict[str, Any]]) -> str:
    if not off:
        return "—"
    diverged = [r for r in off if r["diverged"]]
    n_late = sum(late(r) for r in diverged)
    return f"{len(diverged)}/{len(off)}" + (f" ({n_late} after learning)" if n_late else "")


def summary_row(setting: str, runs: dict[tuple[int, str], dict[str, Any]]) -> str:
    seeds = sorted({s for s, _ in runs})
    mode = lambda m: [runs[(s, m)] for s in seeds if (s, m) in runs]  # noqa: E731
    off, defaults, clf = mode("off"), mode("defaults"), mode("clf-only")
    gaps = [g for g in (gap_to_classifier(runs, s) for s in seeds) if math.isfinite(g)]
    remedies = sorted({f"{k}={v}" for r in defaults for k, v in r["remedies"].items()})
    cells = [
        setting,
        _diverged_cell(off),
        f"{sum(r['exit'] == 0 for r in defaults)}/{len(defaults)}" if defaults else "—",
        f"{sum(g >= -TOLERANCE for g in gaps)}/{len(gaps)}" if gaps else "—",
        f"{_pct(_mean([r['test_acc'] for r in defaults]))} / {_pct(_mean([r['test_acc'] for r in clf]))}",
        f"{min(gaps) * 100:+.1f}" if gaps else "—",
        " ".join(str(r["restarts"]) for r in defaults) or "—",
        ", ".join(remedies) or "—",
        f"{_mean([r['wall_s'] for r in defaults]):.0f}" if defaults else "—",
        why_short(runs),
    ]
    return "| " + " | ".join(cells) + " |"


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The overview table: one line per setting."""
    lines = ["| setting | off: diverged | defaults: exit 0 | defaults within 5 points of clf-only | "
             "test acc, defaults / clf-only (mean) | worst gap (points) | restarts per seed | remedies | "
             "wall s (defaults, mean) | why short of clf-only |", "|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [summary_row(setting, runs) for setting, runs in _by(rows).items()]


def write_table(rows: list[dict[str, Any]], path: Any) -> None:
    """``path`` (table.md): the overview, then each setting's runs per seed."""
    lines = summary_lines(rows)
    for setting, runs in _by(rows).items():
        lines += ["", f"**{setting}**", "", "| seed | mode | outcome | first detection | remedies | test acc | "
                  "minus clf-only | digits FID | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for (seed, mode), r in sorted(runs.items()):
            gap = gap_to_classifier(runs, seed, mode) if mode in ("defaults", "reference") else math.nan
            cause = r["cause"].split(";")[0] if r["cause"] else ""
            remedies = ", ".join(f"{k}={v}" for k, v in r["remedies"].items())
            lines.append(f"| {seed} | {mode} | {outcome(r)} | {cause} | {remedies} | {_pct(r['test_acc'])} | "
                         f"{'' if math.isnan(gap) else f'{100 * gap:+.1f}'} "
                         f"| {_num(r.get('digits_fid', math.nan))} | {r['wall_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    """Test accuracy per setting and mode: bars = mean over seeds (a stopped run counts 0), dots =
    seeds; red hatching where a seed stopped diverged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by(rows)
    modes = [m for m in ("off", "defaults", "clf-only", "reference") if any(r["mode"] == m for r in rows)]
    colours = {"off": "tab:gray", "defaults": "tab:blue", "clf-only": "tab:green", "reference": "tab:olive"}
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(by), 4.4))
    width = 0.8 / max(1, len(modes))
    labelled: set[str] = set()  # each mode in the legend once, whichever setting first has it
    for i, (setting, runs) in enumerate(by.items()):
        for j, mode in enumerate(modes):
            accs = [r["test_acc"] if r["status"] == "finished" and math.isfinite(r["test_acc"]) else 0.0
                    for (_, m), r in runs.items() if m == mode]
            if not accs:
                continue
            x = i + (j - (len(modes) - 1) / 2) * width
            stopped = any(r["status"] == "diverged" for (_, m), r in runs.items() if m == mode)
            ax.bar(x, statistics.fmean(accs), width * 0.9, color=colours[mode], alpha=0.8,
                   hatch="//" if stopped else None, edgecolor="tab:red" if stopped else "black",
                   label=None if mode in labelled else mode)
            labelled.add(mode)
            ax.scatter([x] * len(accs), accs, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(by)), list(by), rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (0 = stopped)")
    ax.set_title("natural divergence: WRN-10-2 on 3x32x32 digits, per setting\n"
                 "(bars: mean over seeds, dots: seeds; red hatch: some seed diverged and stopped)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The recipe benchmark's report (``python -m jemfast.recipe_benchmark``): table.md and recipes.png
from its result rows (one dict per run: dataset, recipe, seed, status, restarts, test_acc,
valid_acc, wall_s, digits_fid, digits_is, curve = [(seconds, validation accuracy) per epoch],
learned: the run's summary's verdict, False when it finished at chance accuracy)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

REFERENCE = "jem"  # the recipe whose final accuracy the others race to
# A recipe meets the bar when every run of it reached the reference's final accuracy, on average
# within this fraction of the reference's wall time, with a mean digits FID no worse than its.
SPEEDUP_BAR = 1 / 3


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _pm(values: list[float], fmt: str, scale: float = 1.0) -> str:
    finite = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    sd = f" ± {format(statistics.stdev(finite), fmt)}" if len(finite) > 1 else ""
    return f"{format(statistics.fmean(finite), fmt)}{sd}"


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """Seconds until the validation accuracy first reached ``target`` (NaN: never)."""
    return next((t for t, acc in curve if acc >= target - 1e-9), math.nan)


def _learned(row: dict[str, Any]) -> bool:
    return row["status"] == "finished" and row.get("learned") is not False


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{dataset: {recipe: figures}}``: means over seeds, and the time to the reference's accuracy."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        runs = [r for r in rows if r["dataset"] == dataset]
        ref = [r for r in runs if r["recipe"] == REFERENCE and _learned(r)]  # a run at chance sets no target
        target = _mean([r["valid_acc"] for r in ref])
        ref_wall = _mean([r["wall_s"] for r in ref])
        ref_fid = _mean([r["digits_fid"] for r in ref])
        for recipe in dict.fromkeys(r["recipe"] for r in runs):
            mine = [r for r in runs if r["recipe"] == recipe]
            reach = [time_to(r["curve"], target) for r in mine]  # all NaN without a target
            mean_reach = _mean(reach)
            ratio = mean_reach / ref_wall if ref_wall else math.nan
            fid = _mean([r["digits_fid"] for r in mine])
            out.setdefault(dataset, {})[recipe] = {
                "runs": mine, "target": target, "ref_wall": ref_wall, "times_to_target": reach,
                "reached": sum(math.isfinite(t) for t in reach), "time_to_target": mean_reach, "ratio": ratio,
                "meets_bar": (recipe != REFERENCE and bool(mine) and all(math.isfinite(t) for t in reach)
                              and ratio <= SPEEDUP_BAR and not fid > ref_fid)}
    return out


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = []
    for dataset, recipes in summarise(rows).items():
        any_row = next(iter(recipes.values()))
        target = (f"Target: the `{REFERENCE}` recipe's final validation accuracy, {100 * any_row['target']:.1f} % "
                  f"(mean over its seeds that learned); its mean wall time {any_row['ref_wall']:.0f} s."
                  if math.isfinite(any_row["target"]) else
                  f"No target: no `{REFERENCE}` run finished above chance accuracy.")
        lines += [f"## {dataset}", "", target, "",
                  "| recipe | runs | finished | learned | restarts | test acc % | digits FID | digits IS | wall s "
                  "| reached target | time to target s | / jem's wall time | meets the bar |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for recipe, f in recipes.items():
            runs = f["runs"]
            lines.append(
                f"| {recipe} | {len(runs)} | {sum(r['status'] == 'finished' for r in runs)} "
                f"| {sum(_learned(r) for r in runs)} "
                f"| {sum(r['restarts'] for r in runs)} | {_pm([r['test_acc'] for r in runs], '.1f', 100)} "
                f"| {_pm([r['digits_fid'] for r in runs], '.1f')} | {_pm([r['digits_is'] for r in runs], '.2f')} "
                f"| {_pm([r['wall_s'] for r in runs], '.0f')} | {f['reached']}/{len(runs)} "
                f"| {_fmt(f['time_to_target'], '.0f')} | {_fmt(f['ratio'], '.2f')} "
                f"| {'—' if recipe == REFERENCE else 'yes' if f['meets_bar'] else 'no'} |")
        lines += ["", f"The bar: every run reached the target, on average within {SPEEDUP_BAR:.2g} of `{REFERENCE}`'s "
                  f"mean wall time, with a mean digits FID no worse than `{REFERENCE}`'s. Met by: "
                  + (", ".join(f"`{r}`" for r, f in recipes.items() if f["meets_bar"]) or "none") + ".",
                  "", "Per run:", "",
                  "| recipe | seed | status | restarts | test acc % | digits FID | wall s | time to target s |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for recipe, f in recipes.items():
            for r, reached_at in sorted(zip(f["runs"], f["times_to_target"]), key=lambda rt: rt[0]["seed"]):
                status = r["status"] + (" (at chance: did not learn)" if r.get("learned") is False else "")
                lines.append(f"| {recipe} | {r['seed']} | {status} | {r['restarts']} "
                             f"| {_fmt(100 * r['test_acc'], '.1f')} | {_fmt(r['digits_fid'], '.1f')} "
                             f"| {r['wall_s']:.0f} | {_fmt(reached_at, '.0f')} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fmt(v: float, fmt: str) -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy against wall time, one panel per dataset, one colour per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    colours = {}
    for ax, (dataset, recipes) in zip(axes[0], summary.items()):
        for recipe, f in recipes.items():
            colour = colours.setdefault(recipe, f"C{len(colours)}")
            for i, r in enumerate(f["runs"]):
                if r["curve"]:
                    t, acc = zip(*r["curve"])
                    ax.plot(t, [100 * a for a in acc], color=colour, alpha=0.8, label=recipe if i == 0 else None)
        target = next(iter(recipes.values()))["target"]
        if math.isfinite(target):
            ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"{REFERENCE}'s final accuracy")
        ax.set(title=dataset, xlabel="wall time (s)", ylabel="validation accuracy (%)", ylim=(0, 100))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

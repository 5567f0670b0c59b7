"""``OUT/curves.png``: a run's training curves, drawn from its ``metrics.jsonl``.

Four panels over iterations: loss and cross-entropy, E(real) and E(fake), train and valid
accuracy, and the gradient norm. A restart rolls the run back to an earlier iteration, so the
iterations after it are drawn as a new *pass* (its own colour, starting at the iteration it rolled
back to); each restart is marked where it was detected (red dashed line, "restart k") and where
it rolled back to (green dotted line). Energies and the gradient norm use a symmetric log scale:
a diverging run's values span many decades.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..distributed import ranks

PANELS = (("loss", ("loss", "loss_ce")), ("energy", ("e_real", "e_fake")), ("accuracy", ("acc", "valid_acc")),
          ("gradient norm", ("grad_norm",)))
LABELS = {"loss": "loss", "loss_ce": "cross-entropy", "e_real": "E(real)", "e_fake": "E(fake)",
          "acc": "train acc", "valid_acc": "valid acc", "grad_norm": "grad norm"}


def read_passes(metrics_path: Path) -> tuple[list[dict[str, list[tuple[int, float]]]], list[dict[str, Any]]]:
    """The series of each pass (``{metric: [(step, value), ...]}``, one dict per pass) and the
    restart events of ``metrics.jsonl``. Torn or foreign lines are skipped."""
    passes: list[dict[str, list[tuple[int, float]]]] = [{}]
    restarts: list[dict[str, Any]] = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "restart":
            restarts.append(rec)
            passes.append({})
            continue
        for name, value in rec.items():
            if name in LABELS and isinstance(value, (int, float)):
                passes[-1].setdefault(name, []).append((rec["step"], float(value)))
    return passes, restarts


def save_curves(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Draw ``metrics_path``'s curves into ``png_path`` (written atomically); None when the log
    has no iteration lines yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes, restarts = read_passes(metrics_path)
    if not any(passes):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, names) in zip(axes.flat, PANELS):
        for k, series in enumerate(passes):
            for j, name in enumerate(names):
                if name not in series:
                    continue
                steps, values = zip(*series[name])
                label = LABELS[name] + (f" (pass {k + 1})" if len(passes) > 1 else "")
                ax.plot(steps, values, color=colours[(2 * k + j) % len(colours)], label=label,
                        linestyle="-" if j == 0 else "--", marker="o" if name == "valid_acc" else None,
                        markersize=3, linewidth=1.2)
        for r in restarts:
            ax.axvline(r["step"], color="tab:red", linestyle="--", linewidth=0.8)
            if isinstance(r.get("rolled_back_to"), int):
                ax.axvline(r["rolled_back_to"], color="tab:green", linestyle=":", linewidth=0.8)
        if panel == "accuracy":
            ax.set_ylim(0, 1)
        else:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel may have nothing yet (no iteration line logged)
            ax.legend(fontsize=7, loc="best")
    top = axes[0][0]
    for r in restarts:
        top.annotate(f"restart {r.get('restart', '?')}", (r["step"], 1.0), xycoords=("data", "axes fraction"),
                     fontsize=7, color="tab:red", rotation=90, va="top", ha="right")
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    fig.suptitle(title or f"training curves ({len(restarts)} restart(s): red = detected, green = rolled back to)",
                 fontsize=10)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


# Drawing the curves costs ~0.3-0.5 s of matplotlib (2-core CPU machine): every epoch of the digits
# quickstart (30 epochs of ~2.5 s) that was a tenth of its time. Mid-run they are redrawn at most this often.
CURVES_EVERY_S = 30.0


def save_training_curves(trainer: Any, every_s: float = 0.0) -> None:
    """OUT/curves.png from the metrics written so far (:func:`save_curves`; rank 0 only), unless
    it was drawn less than ``every_s`` seconds ago (0: always; the end of a run always draws)."""
    now = time.monotonic()
    if not ranks.is_main() or now - getattr(trainer, "curves_drawn_at", -math.inf) < every_s:
        return
    save_curves(trainer.out / "metrics.jsonl", trainer.out / "curves.png")
    trainer.curves_drawn_at = now

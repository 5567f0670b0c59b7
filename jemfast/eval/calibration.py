"""Accuracy and calibration: top-1 accuracy per split, ECE (paper: 20 equal-width bins) and
a reliability diagram of the test split."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DataBundle
from .common import logits_of
from .figures import plt, save
from .metrics import expected_calibration_error, reliability_bins


def accuracy_part(model: nn.Module, data: DataBundle, batch_size: int) -> dict[str, Any]:
    out = {}
    for name in ("valid", "test"):
        split = getattr(data, name)
        if len(split) == 0:
            continue
        pred = logits_of(model, split.x, batch_size).argmax(1)
        out[name] = {"accuracy": float((pred == split.y).float().mean().item()), "n": len(split)}
    return out


def calibration_part(model: nn.Module, data: DataBundle, n_bins: int, batch_size: int,
                     out_dir: Path) -> dict[str, Any]:
    split = data.test
    probs = torch.softmax(logits_of(model, split.x, batch_size), 1)
    conf, pred = probs.max(1)
    conf_np = conf.cpu().numpy()
    correct = (pred == split.y).cpu().numpy().astype(np.float64)
    ece = expected_calibration_error(conf_np, correct, n_bins)
    bins = reliability_bins(conf_np, correct, n_bins)
    png = reliability_diagram(bins, ece, float(correct.mean()), data.name, out_dir / "reliability.png")
    return {"split": "test", "n": len(split), "bins": n_bins, "ece": ece,
            "accuracy": float(correct.mean()), "mean_confidence": float(conf_np.mean()),
            "per_bin": {k: [None if np.isnan(v) else float(v) for v in bins[k]]
                        for k in ("count", "confidence", "accuracy")},
            "figure": png}


def reliability_diagram(bins: dict[str, np.ndarray], ece: float, acc: float, dataset: str,
                        path: Path) -> str:
    """Accuracy per confidence bin against the diagonal, with the bin counts underneath."""
    pyplot = plt()
    edges = bins["edges"]
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    filled = bins["count"] > 0
    fig, (ax, ax_n) = pyplot.subplots(2, 1, figsize=(5.2, 6.0), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers[filled], bins["accuracy"][filled], width=width * 0.95, color="tab:blue",
           edgecolor="black", linewidth=0.5, label="accuracy in bin")
    acc_f, conf_f = bins["accuracy"][filled], bins["confidence"][filled]
    ax.bar(centers[filled], np.abs(conf_f - acc_f), bottom=np.minimum(acc_f, conf_f), width=width * 0.95,
           facecolor="none", edgecolor="tab:red", hatch="///", linewidth=0.8,
           label="gap to mean confidence in bin")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    fig.suptitle(f"{dataset} test: ECE {100 * ece:.2f} % ({len(centers)} bins), accuracy {100 * acc:.1f} %",
                 fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7.5, frameon=False)
    ax.grid(alpha=0.3)
    ax_n.bar(centers, bins["count"], width=width * 0.95, color="gray", edgecolor="black", linewidth=0.5)
    ax_n.set_yscale("symlog", linthresh=1)
    ax_n.set_xlabel("confidence  max_y p(y|x)")
    ax_n.set_ylabel("images")
    ax_n.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)

"""Matplotlib helpers for the evaluation pictures: labelled image mosaics and figure saving."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DPI = 100


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt().close(fig)
    return path.name


def mosaic(rows: Sequence[torch.Tensor], pad: int = 1) -> np.ndarray:
    """Tile ``rows`` (each ``Tensor[k, C, H, W]`` in [-1, 1], k may differ) into one
    ``[H', W', 3]`` array in [0, 1]; padding and missing cells are white."""
    c, h, w = rows[0].shape[1:]
    n_cols = max(1, max(r.shape[0] for r in rows))
    canvas = np.ones((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        imgs = ((row.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
        for j, img in enumerate(imgs):
            img = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top:top + h, left:left + w] = img.transpose(1, 2, 0)
    return canvas


def show_mosaic(ax, rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None = None,
                title: str = "", pad: int = 1) -> None:
    """Draw a mosaic on ``ax`` with optional labels at the left of each row."""
    canvas = mosaic(rows, pad)
    ax.imshow(canvas, interpolation="nearest")
    h = rows[0].shape[2]
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([pad + i * (h + pad) + (h - 1) / 2 for i in range(len(rows))])
        ax.set_yticklabels(row_labels, fontsize=9)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)


def mosaic_figure(panels: Sequence[tuple[str, Sequence[torch.Tensor], Sequence[str] | None]],
                  path: Path, suptitle: str = "", cell_inches: float = 0.45) -> str:
    """One figure with side-by-side mosaic ``panels`` of (title, rows, row_labels); returns the
    file name. Images are drawn ``cell_inches`` wide, so 8x8 digits stay readable."""
    pyplot = plt()
    widths = [max(1, max(r.shape[0] for r in rows)) for _, rows, _ in panels]
    n_rows = max(len(rows) for _, rows, _ in panels)
    fig_w = max(3.0, sum(widths) * cell_inches + 0.9 * len(panels))
    fig_h = n_rows * cell_inches + (0.9 if suptitle else 0.5)
    fig, axes = pyplot.subplots(1, len(panels), figsize=(fig_w, fig_h),
                                gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (title, rows, labels) in zip(axes[0], panels):
        show_mosaic(ax, rows, labels, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return save(fig, path)

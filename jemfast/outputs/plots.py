"""PNG pictures: sample grids for images, density + samples for 2-D data; a training run's
pictures in OUT/samples (under torchrun only rank 0 draws them)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed import ranks


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None,
                    min_side: int = 32) -> None:
    """Save ``x: Tensor[B, C, H, W]`` in [-1, 1] as a grid PNG; small images are upscaled
    (nearest) to at least ``min_side`` pixels so 8x8 digits are visible."""
    import torchvision.utils as vutils

    x = x.detach().float().cpu().clamp(-1, 1)
    scale = max(1, math.ceil(min_side / x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, int(math.sqrt(x.shape[0])))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image((x + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def save_toy2d_plot(model: torch.nn.Module, samples: torch.Tensor, data: torch.Tensor,
                    path: str | Path, lim: float = 1.0, res: int = 120) -> None:
    """Left: the model's density exp(-E(x)) on [-lim, lim]^2; right: data vs buffer samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    axis = torch.linspace(-lim, lim, res, device=device)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    was_training = model.training
    model.eval()
    log_p = -model.energy(grid).view(res, res)
    model.train(was_training)
    density = torch.exp(log_p - log_p.max()).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    axes[0].set_title("model density exp(-E(x))")
    d, s = data.detach().cpu().numpy(), samples.detach().cpu().numpy()
    axes[1].scatter(d[:, 0], d[:, 1], s=3, alpha=0.3, label="data", color="tab:blue")
    axes[1].scatter(s[:, 0], s[:, 1], s=3, alpha=0.5, label="buffer samples", color="tab:red")
    axes[1].set_xlim(-lim, lim)
    axes[1].set_ylim(-lim, lim)
    axes[1].set_aspect("equal")
    axes[1].legend(loc="upper right")
    axes[1].set_title("data vs replay-buffer samples")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_samples(trainer: Any, x: torch.Tensor, name: str) -> None:
    """A grid of ``x: Tensor[B, C, H, W]`` (first 64), or a 2-D density plot, as OUT/samples/name."""
    if not ranks.is_main():
        return
    path = trainer.out / "samples" / name
    if len(trainer.data.input_shape) == 3:
        save_image_grid(x[:64], path)
    else:
        save_toy2d_plot(trainer.model, trainer.buffer.data[:2000], trainer.data.train.x[:2000], path)


def save_buffer_grid(trainer: Any, name: str) -> None:
    """A grid of buffer rows spread over the whole buffer (rank 0's shard; no RNG used)."""
    buffer = trainer.buffer
    rows = torch.linspace(0, buffer.capacity - 1, min(100, buffer.capacity)).long()
    save_samples(trainer, buffer.data[rows.to(buffer.device)], name)

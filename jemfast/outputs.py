"""What a run shows while it trains: metrics.jsonl lines, the progress bar's figures, and
sample pictures in OUT/samples. Under torchrun only rank 0 writes (the others return at once)."""
from __future__ import annotations

import time
from typing import Any

import torch

from . import distributed
from .curves import save_curves
from .plots import save_image_grid, save_toy2d_plot


def log_metrics(trainer: Any) -> None:
    """One metrics.jsonl line: the means since the last one (one host sync), the learning rate,
    images per second (all ranks' images: the global batch) and elapsed seconds."""
    means = trainer.window.mean()
    if not distributed.is_main():
        return
    now, n = time.perf_counter(), trainer.cfg.run.log_every
    global_batch = trainer.cfg.optim.batch_size * distributed.world_size()
    record = {"step": trainer.progress.step, "epoch": trainer.progress.epoch, **means, "lr": trainer.lr,
              "images_per_s": n * global_batch / max(now - trainer.t_window, 1e-9),
              "time": now - trainer.t0}
    trainer.t_window = now
    trainer.metrics.write(record)
    trainer.bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['acc']:.3f}",
                            img_s=f"{record['images_per_s']:.0f}")


def save_samples(trainer: Any, x: torch.Tensor, name: str) -> None:
    """A grid of ``x: Tensor[B, C, H, W]`` (first 64), or a 2-D density plot, as OUT/samples/name."""
    if not distributed.is_main():
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


def save_training_curves(trainer: Any) -> None:
    """OUT/curves.png from the metrics written so far (jemfast.curves)."""
    if distributed.is_main():
        save_curves(trainer.out / "metrics.jsonl", trainer.out / "curves.png")

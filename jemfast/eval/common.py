"""Helpers shared by the evaluation parts: batched forward passes, progress bars, the SGLD
sampler of a checkpoint, and the ``Skipped`` signal."""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm import tqdm

from ..modes import eval_mode
from ..options.config import Config
from ..sgld import SGLD

# eval_mode is imported from here by robustness.py; new code imports it from jemfast.modes
__all__ = ["Skipped", "eval_mode", "is_image", "logits_of", "make_sampler", "progress"]


class Skipped(Exception):
    """A part (or one OOD set) cannot run here; the message is the one line that says why."""


def progress(iterable, desc: str, enabled: bool, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False,
                file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
              show: bool = False, desc: str = "logits") -> torch.Tensor:
    """``Tensor[N, C]`` fp32 logits of ``x: Tensor[N, *shape]`` in batches, eval mode."""
    out = []
    with eval_mode(model):
        starts = range(0, x.shape[0], batch_size)
        for i in progress(starts, desc, show, total=len(starts)):
            out.append(model(x[i:i + batch_size]).float())
    if not out:
        return torch.zeros((0, 0), device=x.device)
    return torch.cat(out)


def make_sampler(cfg: Config, n_steps: int, backend: str, device: torch.device) -> SGLD:
    """An SGLD with the checkpoint's step size and noise, ``n_steps`` steps, on ``backend``
    (resolved on ``device`` at the first run)."""
    return SGLD(n_steps, cfg.sampler.step_size, cfg.sampler.noise_std, backend=backend)


def is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3

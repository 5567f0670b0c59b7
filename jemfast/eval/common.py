"""Helpers shared by the evaluation parts: model mode handling, batched forward passes,
progress bars, the SGLD sampler of a checkpoint, and the ``Skipped`` signal."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..sgld import SGLD


class Skipped(Exception):
    """A part (or one OOD set) cannot run here; the message is the one line that says why."""


def say(msg: str) -> None:
    """One line of progress/notice on stderr (stdout stays free for the final summary)."""
    sys.stderr.write(f"jemfast.eval: {msg}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore its previous train/eval mode afterwards.

    Parameters are never touched: every gradient taken by the evaluation is an *input*
    gradient (``torch.autograd.grad(..., inputs=x)``), so ``p.grad`` stays as it was.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    """An SGLD with the checkpoint's step size and noise, ``n_steps`` steps, on ``backend``.

    A fast backend that this jemfast does not ship (no ``jemfast.backends``) falls back to the
    reference chain, said once; other backend errors (bad name, unusable device) propagate.
    """
    sampler = SGLD(n_steps, cfg.sampler.step_size, cfg.sampler.noise_std, backend=backend)
    if backend != "reference":
        try:
            sampler.chain_fn(device)
        except ModuleNotFoundError:
            say(f"SGLD backend {backend!r} is not available in this jemfast; using reference")
            sampler = SGLD(n_steps, cfg.sampler.step_size, cfg.sampler.noise_std, backend="reference")
    return sampler


def is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3

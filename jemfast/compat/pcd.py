"""One PCD step of the original JEM code, written once for both of its samplers.

The training script's ``sample_q(f, replay_buffer, y, n_steps)`` (:mod:`.sampling`) and the
evaluation script's ``sample_q(args, device, f, replay_buffer, y)`` (:mod:`.eval_script`) do the
same thing and differ only in where their numbers come from. :func:`pcd_step` is that thing:

1. ``f.eval()``;
2. the starts (the original's ``sample_p_0``): an empty buffer gives ``bs`` fresh rows and no
   indices; otherwise ``bs`` row indices (within class ``y[i]``'s share ``N // n_classes`` when
   labels are given), fresh rows, and per row a coin flip with probability ``reinit_freq``
   choosing the fresh row -- random numbers drawn in this order, on the buffer's device;
3. ``n_steps`` of ``x <- x + sgld_lr * d f(x, y)/dx + sgld_std * N(0, I)`` (:class:`jemfast.SGLD`
   on :class:`jemfast.LogDensity`), on ``device``; none when ``n_steps`` is 0;
4. ``f.train()``, then the chains written back into the drawn rows of the buffer, in place.

Fresh rows are U(-1, 1) of the chain shape (:mod:`.shape`), drawn on the CPU for a CPU buffer
(as the original's ``init_random``) and on the buffer's device otherwise, unless the caller's
``init_fn(args, bs)`` draws them.
"""
from __future__ import annotations

import os
from argparse import Namespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..energy import LogDensity
from ..process.log import get_logger, log_once
from ..sgld import NAMES, SGLD
from .shape import Shape, chain_shape, check_fresh, unknown_shape_error

log = get_logger(__name__)
BACKEND_ENV = "JEMFAST_SGLD_BACKEND"
Buffer = torch.Tensor | Sequence  # a tensor of rows, or the original's empty list ``[]``
InitFn = Callable[[Namespace, int], torch.Tensor]
_CPU = torch.device("cpu")


def sgld_backend(args: Namespace) -> tuple[str, str]:
    """``(backend, where it was set)``: ``args.sgld_backend``, else ``$JEMFAST_SGLD_BACKEND``, else
    ``auto`` (reference on a CPU, the CUDA graph on a GPU: :mod:`jemfast.sgld.backends`)."""
    if getattr(args, "sgld_backend", None):
        name, source = str(args.sgld_backend), "args.sgld_backend"
    elif os.environ.get(BACKEND_ENV):
        name, source = os.environ[BACKEND_ENV], BACKEND_ENV
    else:
        name, source = "auto", "default"
    if name not in ("auto", *NAMES):
        raise ValueError(f"{source}: unknown SGLD backend {name!r}; choose one of auto, {', '.join(NAMES)}")
    return name, source


class LogDensities:
    """One :class:`jemfast.LogDensity` per model object, kept (captured CUDA graphs key on it)."""

    def __init__(self) -> None:
        self._held: tuple[nn.Module, LogDensity] | None = None

    def __call__(self, f: nn.Module) -> LogDensity:
        if self._held is None or self._held[0] is not f:
            self._held = (f, LogDensity(f))
        return self._held[1]


def fresh_rows(args: Namespace, bs: int, shape: Shape | None, on: torch.device, init_fn: InitFn | None,
               where: str) -> torch.Tensor:
    """``Tensor[bs, *shape]`` of fresh chain starts on ``on``: ``init_fn(args, bs)`` when given,
    else U(-1, 1) (on the CPU as the original's ``init_random``, or on ``on``'s device)."""
    if init_fn is not None:
        return check_fresh(init_fn(args, bs), bs, shape, f"{where}: init_fn").to(on)
    if shape is None:
        raise unknown_shape_error(where)
    return torch.empty(bs, *shape, device=on).uniform_(-1, 1)


def starts(args: Namespace, replay_buffer: Buffer, bs: int, y: torch.Tensor | None, n_classes: int | None,
           shape: Shape | None, init_fn: InitFn | None, where: str) -> tuple[torch.Tensor, Any]:
    """``(Tensor[bs, *shape] of chain starts, the drawn rows' indices or [])``: step 2 of
    :func:`pcd_step`, with ``shape`` from :func:`.shape.chain_shape`."""
    on = replay_buffer.device if isinstance(replay_buffer, torch.Tensor) else _CPU
    if len(replay_buffer) == 0:
        return fresh_rows(args, bs, shape, on, init_fn, where), []
    share = len(replay_buffer)
    if y is not None:
        if getattr(args, "uncond", False):  # the original asserts this, for a buffer drawn from by class
            raise ValueError(f"{where}: class-conditional samples (y given) need a class-conditional model; "
                             f"args.uncond is set")
        if n_classes is None or share % n_classes:
            raise ValueError(f"{where}: a class-conditional buffer needs a size divisible by args.n_classes "
                             f"({n_classes}), got {share} rows")
        share //= n_classes
    inds = torch.randint(0, share, (bs,), device=on)
    if y is not None:
        inds = y.to(on) * share + inds
    x = replay_buffer[inds]
    random_samples = fresh_rows(args, bs, shape, on, init_fn, where)
    restart = torch.rand(bs, device=on) < args.reinit_freq
    return torch.where(restart.view(-1, *[1] * (x.dim() - 1)), random_samples, x), inds


def pcd_step(args: Namespace, device: torch.device, sampler: SGLD, density: LogDensity, f: nn.Module,
             replay_buffer: Buffer, y: torch.Tensor | None, n_steps: int, n_classes: int | None,
             declared: Shape | None, init_fn: InitFn | None, where: str, source: str) -> torch.Tensor:
    """The module docstring's steps 1-4; returns ``Tensor[bs, *shape]`` of samples on ``device``
    (bs: ``args.batch_size``, or ``y.size(0)``). The shape checks run before any random number is
    drawn, except that of ``init_fn``'s rows, checked as they are drawn; all before any SGLD step."""
    shape = chain_shape(replay_buffer, declared, where)
    if shape is None and init_fn is None:
        raise unknown_shape_error(where)
    f.eval()
    bs = args.batch_size if y is None else y.size(0)
    x0, inds = starts(args, replay_buffer, bs, y, n_classes, shape, init_fn, where)
    if n_steps > 0:
        x = sampler.run(density, x0.to(device), y, n_steps=n_steps)
        log_once(log, ("compat", sampler.backend, device.type),
                 f"jemfast.compat {where}: SGLD backend {sampler.backend} on {device.type} ({source})")
    else:  # the original runs no step: the starts are the samples
        x = x0.to(device).clone()
    f.train()
    if len(replay_buffer) > 0:
        replay_buffer[inds] = x.to(replay_buffer.device)  # a CPU buffer: the host copy, as the original
    return x

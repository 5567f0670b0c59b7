"""The original JEM training script's sampler interface, ``init_random`` and ``get_sample_q``, run by jemfast.

Semantics (those of ``get_sample_q`` in wgrathwohl/JEM ``train_wrn_ebm.py``; the PCD step itself
is :func:`.pcd.pcd_step`):

- ``f(x, y=y)`` is a log-density (the original ``F``/``CCF``): SGLD climbs it,
  ``x <- x + sgld_lr * d f(x, y)/dx + sgld_std * N(0, I)``, for ``n_steps`` steps, with
  ``f.eval()`` while sampling and ``f.train()`` afterwards.
- ``replay_buffer`` is a plain tensor ``[N, n_ch, im_sz, im_sz]``. A batch draws ``batch_size``
  rows (``y.size(0)`` given labels ``y``: then row ``y[i] * (N // n_classes) + j``, the class's
  share), and each drawn row restarts, with probability ``reinit_freq``, from ``init_random``.
  The finished chains are written back into the same tensor, in place. An empty buffer (``[]``
  or a tensor with no rows) means fresh chains from ``init_random``, nothing written back.
- The image shape is the buffer's; for ``[]`` it must be declared (``shape=``, ``args.n_ch`` and
  ``args.im_sz``, or the script's own ``init_fn``): :mod:`.shape`.
- The random numbers are drawn in the original's order (row indices, fresh rows, re-init coin
  flips, then per step the gradient and the noise), on the buffer's device; so with a CPU buffer
  and the ``reference`` backend a seeded run draws the same numbers as the original code.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Sequence

import torch
from torch import nn

from ..sgld import SGLD
from .pcd import BACKEND_ENV, Buffer, InitFn, LogDensities, pcd_step, sgld_backend
from .shape import declared_shape

__all__ = ["BACKEND_ENV", "SampleQ", "get_sample_q", "init_random", "sgld_backend"]


def init_random(args: Namespace, bs: int, shape: Sequence[int] | None = None) -> torch.Tensor:
    """``Tensor[bs, *shape]`` fp32 of U(-1, 1) on the CPU, as the original draws it; the shape is
    ``shape``, else ``(args.n_ch, args.im_sz, args.im_sz)``, else the original's 3 x 32 x 32."""
    return torch.empty(bs, *(declared_shape(args, shape, "init_random") or (3, 32, 32))).uniform_(-1, 1)


class SampleQ:
    """The original ``sample_q(f, replay_buffer, y=None, n_steps=args.n_steps) -> Tensor[B, ...]``
    (module docstring), its chains run by :class:`jemfast.SGLD` (``.sampler``) on ``device``.

    ``n_steps`` and ``step_size`` are ``args.n_steps`` and ``args.sgld_lr``, read at every call
    (setting them sets ``args``'s), and ``init_fn`` (``(args, bs) -> Tensor[bs, *shape]`` or None:
    U(-1, 1)) draws the fresh chains: so ``jemfast.Guard(..., sampler=sample_q)`` can scale the
    steps and switch fresh chains to the informative init.
    """

    def __init__(self, args: Namespace, device: torch.device, init_fn: InitFn | None,
                 declared: Sequence[int] | None) -> None:
        self.args, self.device, self.init_fn, self.declared = args, device, init_fn, declared
        backend, self.source = sgld_backend(args)
        self.sampler = SGLD(n_steps=args.n_steps, step_size=args.sgld_lr, noise_std=args.sgld_std, backend=backend)
        self.densities = LogDensities()

    @property
    def n_steps(self) -> int:
        return self.args.n_steps

    @n_steps.setter
    def n_steps(self, value: int) -> None:
        self.args.n_steps = value

    @property
    def step_size(self) -> float:
        return self.args.sgld_lr

    @step_size.setter
    def step_size(self, value: float) -> None:
        self.args.sgld_lr = value
        self.sampler.step_size = value

    def __call__(self, f: nn.Module, replay_buffer: Buffer, y: torch.Tensor | None = None,
                 n_steps: int | None = None) -> torch.Tensor:
        """``Tensor[B, n_ch, im_sz, im_sz]`` of samples on ``device`` (B: ``args.batch_size``, or
        ``y.size(0)``); ``replay_buffer`` is updated in place unless empty. ``n_steps`` None:
        ``args.n_steps`` as it is now."""
        args = self.args
        steps = args.n_steps if n_steps is None else n_steps
        self.sampler.step_size, self.sampler.noise_std = args.sgld_lr, args.sgld_std  # as the original reads them
        return pcd_step(args, self.device, self.sampler, self.densities(f), f, replay_buffer, y, steps,
                        getattr(args, "n_classes", None), self.declared, self.init_fn, "sample_q", self.source)


def get_sample_q(args: Namespace, device: torch.device | str, init_fn: InitFn | None = None, *,
                 shape: Sequence[int] | None = None) -> SampleQ:
    """The original ``get_sample_q(args, device)``: a :class:`SampleQ`, called as the original's
    ``sample_q(f, replay_buffer, y=None, n_steps=args.n_steps)``.

    Reads ``args.n_steps``, ``sgld_lr``, ``sgld_std``, ``reinit_freq``, ``batch_size``,
    ``n_classes``, ``uncond`` (and ``n_ch``/``im_sz`` if set, ``sgld_backend`` for the backend).
    ``shape=(n_ch, im_sz, im_sz)`` declares the image shape (needed only for an empty buffer
    ``[]``; checked against a tensor buffer). ``init_fn(args, bs)`` replaces U(-1, 1) for fresh
    chains (the script's own ``init_random``, or JEM++'s informative start); without it a
    device-resident buffer draws its fresh rows on the device. Samples come back on ``device``;
    the buffer stays where it is. Raises ValueError (one line) for a shape that cannot be known
    or that disagrees, here or at the first call, before any work.
    """
    return SampleQ(args, torch.device(device), init_fn, declared_shape(args, shape, "get_sample_q"))

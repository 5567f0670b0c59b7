"""The original JEM code's sampler interface, ``init_random`` and ``get_sample_q``, run by jemfast.

Semantics (those of ``get_sample_q`` in wgrathwohl/JEM ``train_wrn_ebm.py``):

- ``f(x, y=y)`` is a log-density (the original ``F``/``CCF``): SGLD climbs it,
  ``x <- x + sgld_lr * d f(x, y)/dx + sgld_std * N(0, I)``, for ``n_steps`` steps, with
  ``f.eval()`` while sampling and ``f.train()`` afterwards.
- ``replay_buffer`` is a plain tensor ``[N, n_ch, im_sz, im_sz]``. A batch draws ``batch_size``
  rows (``y.size(0)`` given labels ``y``: then row ``y[i] * (N // n_classes) + j``, the class's
  share), and each drawn row restarts, with probability ``reinit_freq``, from ``init_random``.
  The finished chains are written back into the same tensor, in place. An empty buffer (``[]``
  or a tensor with no rows) means fresh chains from ``init_random``, nothing written back.
- The random numbers are drawn in the original's order (row indices, fresh rows, re-init coin
  flips, then per step the gradient and the noise), on the buffer's device; so with a CPU buffer
  and the ``reference`` backend a seeded run draws the same numbers as the original code.
"""
from __future__ import annotations

import os
from argparse import Namespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..energy import LogDensity
from ..log import get_logger, log_once
from ..sgld import NAMES, SGLD

log = get_logger(__name__)
BACKEND_ENV = "JEMFAST_SGLD_BACKEND"
Buffer = torch.Tensor | Sequence  # a tensor of rows, or the original's empty list ``[]``


def image_shape(args: Namespace) -> tuple[int, int, int]:
    """``(n_ch, im_sz, im_sz)`` from ``args.n_ch`` and ``args.im_sz`` (the original's module
    constants; default 3 and 32, CIFAR's)."""
    im_sz = int(getattr(args, "im_sz", 32))
    return int(getattr(args, "n_ch", 3)), im_sz, im_sz


def init_random(args: Namespace, bs: int) -> torch.Tensor:
    """``Tensor[bs, n_ch, im_sz, im_sz]`` fp32 of U(-1, 1) on the CPU, as the original draws it."""
    return torch.empty(bs, *image_shape(args)).uniform_(-1, 1)


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


def get_sample_q(args: Namespace, device: torch.device | str,
                 init_fn: Callable[[Namespace, int], torch.Tensor] | None = None) -> Callable[..., torch.Tensor]:
    """The original ``sample_q(f, replay_buffer, y=None, n_steps=args.n_steps) -> Tensor[B, ...]``
    (module docstring), its chains run by :class:`jemfast.SGLD` on ``device``.

    Reads ``args.n_steps``, ``sgld_lr``, ``sgld_std``, ``reinit_freq``, ``batch_size``,
    ``n_classes``, ``uncond`` (and ``n_ch``/``im_sz`` for fresh rows, ``sgld_backend`` for the
    backend). ``init_fn(args, bs)`` replaces :func:`init_random` for fresh chains (JEM++'s
    informative start, say); without it a device-resident buffer draws its fresh rows on the
    device. Samples come back on ``device``; the buffer stays where it is.
    """
    device = torch.device(device)
    backend, source = sgld_backend(args)
    sampler = SGLD(n_steps=args.n_steps, step_size=args.sgld_lr, noise_std=args.sgld_std, backend=backend)
    adapters: dict[int, tuple[nn.Module, LogDensity]] = {}  # one per model: captured graphs key on it

    def fresh(bs: int, on: torch.device) -> torch.Tensor:
        if init_fn is not None:
            return init_fn(args, bs).to(on)
        if on.type == "cpu":
            return init_random(args, bs)
        return torch.empty(bs, *image_shape(args), device=on).uniform_(-1, 1)

    def sample_p_0(replay_buffer: Buffer, bs: int, y: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        if len(replay_buffer) == 0:
            return fresh(bs, torch.device("cpu") if isinstance(replay_buffer, Sequence) else replay_buffer.device), []
        on = replay_buffer.device
        share = len(replay_buffer)
        if y is not None:
            if getattr(args, "uncond", False):
                raise ValueError("sample_q: class-conditional samples (y given) need a class-conditional "
                                 "model; args.uncond is set")
            if share % args.n_classes:
                raise ValueError(f"sample_q: a class-conditional buffer needs a size divisible by "
                                 f"args.n_classes ({args.n_classes}), got {share} rows")
            share //= args.n_classes
        inds = torch.randint(0, share, (bs,), device=on)
        if y is not None:
            inds = y.to(on) * share + inds
        x = replay_buffer[inds]
        random_samples = fresh(bs, on)
        restart = torch.rand(bs, device=on) < args.reinit_freq
        return torch.where(restart.view(-1, *[1] * (x.dim() - 1)), random_samples, x), inds

    def energy_model(f: nn.Module) -> LogDensity:
        held = adapters.get(id(f))
        if held is None or held[0] is not f:
            adapters.clear()
            held = adapters[id(f)] = (f, LogDensity(f))
        return held[1]

    def sample_q(f: nn.Module, replay_buffer: Buffer, y: torch.Tensor | None = None,
                 n_steps: int | None = None) -> torch.Tensor:
        """``Tensor[B, n_ch, im_sz, im_sz]`` of samples on ``device`` (B: ``args.batch_size``, or
        ``y.size(0)``); ``replay_buffer`` is updated in place unless empty. ``n_steps`` None:
        ``args.n_steps`` as it is now (so ``jemfast.Guard(..., sampler=args)`` can scale it)."""
        f.eval()
        bs = args.batch_size if y is None else y.size(0)
        x0, inds = sample_p_0(replay_buffer, bs, y)
        x = sampler.run(energy_model(f), x0.to(device), y, n_steps=args.n_steps if n_steps is None else n_steps)
        log_once(log, ("compat", sampler.backend, device.type),
                 f"jemfast.compat sample_q: SGLD backend {sampler.backend} on {device.type} ({source})")
        f.train()
        if len(replay_buffer) > 0:
            replay_buffer[inds] = x.to(replay_buffer.device)  # a CPU buffer: the host copy, as the original
        return x

    sample_q.sampler = sampler  # type: ignore[attr-defined]  # the SGLD object (backend, n_steps)
    return sample_q

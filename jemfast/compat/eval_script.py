"""The original JEM evaluation script's two samplers, run by jemfast (wgrathwohl/JEM ``eval_wrn_ebm.py``).

That script has its own module-level ``sample_q(args, device, f, replay_buffer, y=None)``, used by
``uncond_samples`` and ``cond_samples`` (``--n_sample_steps`` calls of ``--n_steps`` SGLD steps
each), and, inside ``test_clf`` and ``logp_hist``, its own refinement ``sample(x, n_steps=args.n_steps)``.
Each swaps in with one line, placed after the original definition::

    sample_q = jemfast.compat.eval_sample_q              # after the module's `def sample_q`
    sample = jemfast.compat.eval_refine(f, args)         # after `def sample` in test_clf / logp_hist

Semantics, as the original's:

- ``eval_sample_q``: one PCD step (:func:`.pcd.pcd_step`: ``f.eval()``, rows drawn with
  re-initialisation at ``args.reinit_freq``, ``args.n_steps`` steps of
  ``x <- x + args.sgld_lr * df/dx + args.sgld_std * N(0, I)``, ``f.train()``, write-back in
  place; random numbers in the original's order). ``args`` is read at every call. Labels ``y``
  draw from class shares of ``N // n_classes`` rows, n_classes being ``args.n_classes`` if set,
  else the width of ``f.class_output`` (the original's module constant is 10). An empty buffer
  gives fresh chains, which jemfast puts on ``device`` (the original leaves them on the CPU).
  The image shape is the buffer's (:mod:`.shape`); for ``[]`` use
  ``get_eval_sample_q(shape=(C, H, W))`` or set ``args.n_ch``/``args.im_sz``.
- ``eval_refine(f, args)``: ``sample(x, n_steps)`` runs ``n_steps`` steps of
  ``x <- x + df/dx + 0.01 * N(0, I)`` (step and noise fixed, as the original; no labels) from a
  copy of ``x``, on ``x``'s device, and leaves ``f``'s train/eval mode alone (the original never
  sets it there, so a freshly loaded model refines and classifies in train mode).

The SGLD backend is ``args.sgld_backend``, else ``$JEMFAST_SGLD_BACKEND``, else ``auto``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Callable, Sequence

import torch
from torch import nn

from ..energy import LogDensity
from ..process.log import get_logger, log_once
from ..sgld import SGLD
from .pcd import Buffer, InitFn, LogDensities, pcd_step, sgld_backend
from .shape import declared_shape

log = get_logger(__name__)
EvalSampleQ = Callable[..., torch.Tensor]


def model_classes(args: Namespace, f: nn.Module) -> int | None:
    """The class count of a class-conditional draw: ``args.n_classes``, else ``f.class_output``'s
    output width (the original ``CCF``'s head); None when neither says."""
    if getattr(args, "n_classes", None):
        return int(args.n_classes)
    head = getattr(f, "class_output", None)
    return int(head.out_features) if isinstance(head, nn.Linear) else None


class _Samplers:
    """One :class:`jemfast.SGLD` per (backend, step size, noise) seen, kept across calls."""

    def __init__(self, mode: str = "eval") -> None:
        self.mode = mode
        self._held: dict[tuple[str, float, float], SGLD] = {}

    def __call__(self, backend: str, step_size: float, noise_std: float) -> SGLD:
        key = (backend, float(step_size), float(noise_std))
        if key not in self._held:
            self._held[key] = SGLD(n_steps=1, step_size=step_size, noise_std=noise_std, backend=backend,
                                   mode=self.mode)
        return self._held[key]


def get_eval_sample_q(shape: Sequence[int] | None = None, init_fn: InitFn | None = None) -> EvalSampleQ:
    """The evaluation script's ``sample_q(args, device, f, replay_buffer, y=None) -> Tensor[B, ...]``
    (module docstring). ``shape=(C, H, W)`` declares the image shape (for an empty buffer ``[]``;
    checked against a tensor buffer); ``init_fn(args, bs)`` draws fresh chains instead of
    U(-1, 1), as :func:`jemfast.compat.get_sample_q` takes them."""
    declared_shape(Namespace(), shape, "get_eval_sample_q")  # a bad shape fails here, not at the first call
    samplers, densities = _Samplers(), LogDensities()

    def sample_q(args: Namespace, device: torch.device | str, f: nn.Module, replay_buffer: Buffer,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """Samples ``Tensor[B, *shape]`` on ``device`` (B: ``args.batch_size``, or ``y.size(0)``);
        ``replay_buffer`` updated in place unless empty."""
        declared = declared_shape(args, shape, "sample_q")
        backend, source = sgld_backend(args)
        sampler = samplers(backend, args.sgld_lr, args.sgld_std)
        return pcd_step(args, torch.device(device), sampler, densities(f), f, replay_buffer, y, int(args.n_steps),
                        model_classes(args, f), declared, init_fn, "sample_q", source)

    return sample_q


eval_sample_q: EvalSampleQ = get_eval_sample_q()


def eval_refine(f: nn.Module, args: Namespace, step_size: float = 1.0,
                noise_std: float = 0.01) -> Callable[..., torch.Tensor]:
    """The refinement ``sample(x, n_steps=args.n_steps) -> Tensor[B, *shape]`` of ``test_clf`` and
    ``logp_hist`` (module docstring) for the model ``f``; ``n_steps`` defaults to
    ``args.n_steps`` as it is now, as the original binds it where ``sample`` is defined."""
    default_steps = int(args.n_steps)
    backend, source = sgld_backend(args)
    sampler = SGLD(n_steps=1, step_size=step_size, noise_std=noise_std, backend=backend, mode="keep")
    density = LogDensity(f)

    def sample(x: torch.Tensor, n_steps: int = default_steps) -> torch.Tensor:
        if n_steps <= 0:  # no step: a copy of x, as the original returns
            return x.detach().clone()
        out = sampler.run(density, x, None, n_steps=n_steps)
        log_once(log, ("compat-refine", sampler.backend, x.device.type),
                 f"jemfast.compat sample (refinement): SGLD backend {sampler.backend} on {x.device.type} ({source})")
        return out

    return sample

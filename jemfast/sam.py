"""Sharpness-aware minimisation (SAM, Foret et al. 2021; adaptive: ASAM, Kwon et al. 2021), as
SADA-JEM trains JEMs with it.

One SAM step, for weights w with the loss gradient g = dL/dw already in ``.grad``:

    e = rho * g / ||g||                      (plain)
    e = rho * w^2 * g / ||w * g||            (adaptive; elementwise products)
    w <- w + e;  g' = dL/dw at w + e (same batch);  w <- w - e;  optimizer step with g'

so the step follows the gradient at the worst nearby weights, which favours flat minima. It
costs a second forward and backward of the loss (the SGLD chains are not run again: the same
real and fake images enter both). ||.|| is the L2 norm over all parameters together.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .modes import batch_norm_statistics_frozen


@torch.no_grad()
def ascent_direction(params: list[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """The perturbation ``e`` of each parameter (the module docstring's formula) from its ``.grad``;
    parameters without a gradient get zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    scaled = [p.abs() * g for p, g in zip(params, grads)] if adaptive else grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
    factor = rho / (norm + 1e-12)
    return [(p * p * g if adaptive else g) * factor.to(g.dtype) for p, g in zip(params, grads)]


@contextlib.contextmanager
def perturbed(model: nn.Module, rho: float, adaptive: bool) -> Iterator[None]:
    """Inside: ``model``'s weights moved to w + e (from the gradients in ``.grad`` now) and its
    batch-norm statistics frozen; on exit the weights are w again (exactly: w is restored from a
    copy, not by subtracting e)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        e = ascent_direction(params, rho, adaptive)
        torch._foreach_add_(params, e)
    try:
        with batch_norm_statistics_frozen(model):
            yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)

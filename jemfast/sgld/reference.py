"""The SGLD loop, written once, and its plain-PyTorch pieces (the reference every backend matches).

One step, with E the model's energy and x the chain state (fp32)::

    x <- x - step_size * dE/dx + noise_std * N(0, I)      (then clamp to [-1, 1] if asked)

where dE/dx is first clamped elementwise to [-grad_clip, grad_clip] when ``spec.grad_clip`` is
set (as JEM++ clips its inner steps' input gradient), and is not computed at all when
``step_size`` is 0 (the chain is then noise alone).

:func:`sgld_chain` is that loop. The backends run the same loop and differ only in the update
they plug in or in how they run it: ``reference`` uses :func:`torch_update`; ``fused`` plugs in
the Triton kernel (:mod:`.fused`); ``graph`` captures this loop with the kernel update in a CUDA
graph (:mod:`.graph`); ``compile`` compiles one step built from :func:`energy_of` and
:func:`torch_update` (:mod:`.compiled`). Robustness refinement calls it with
``differentiable=True`` (:mod:`jemfast.eval.robustness`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..process.interrupt import raise_if_stopped
from .spec import ChainSpec

# update(x, grad, step_size, noise_std, clamp, grad_clip) -> next x; may update x in place and return it
UpdateFn = Callable[[torch.Tensor, torch.Tensor, float, float, bool, "float | None"], torch.Tensor]


class EnergyOf(nn.Module):
    """``forward(x, y) = energy(x, y) = model.energy(x, y)``, so that ``functional_call`` can
    evaluate the energy with parameters swapped. Traced code (``torch.compile``) must get it
    built outside the trace."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.model.energy(x, y)

    energy = forward


def energy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
              autocast_dtype: torch.dtype | None = None, params: dict[str, torch.Tensor] | None = None,
              cache: bool = True) -> torch.Tensor:
    """``Tensor[B]`` of energies E(x) (or E(x, y) with labels ``y: Tensor[B]``) of ``x: Tensor[B, *shape]``.

    ``autocast_dtype`` runs the network under autocast to that dtype (``cache`` is autocast's
    weight-cast cache). ``params`` maps parameter names of ``model`` to tensors used in their
    place (e.g. bf16 or channels-last copies made once per chain); the model is not modified.
    ``model`` may be an :class:`EnergyOf` wrapper (parameter names still those of the model).
    """
    ctx = (torch.autocast(x.device.type, dtype=autocast_dtype, cache_enabled=cache)
           if autocast_dtype is not None else contextlib.nullcontext())
    with ctx:
        if not params:
            return model.energy(x, y)
        module = model if isinstance(model, EnergyOf) else EnergyOf(model)
        swapped = {f"model.{name}": t for name, t in params.items()}
        return torch.func.functional_call(module, swapped, (x, y))


def torch_update(x: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor,
                 noise_std: float | torch.Tensor, clamp: bool = False, grad_clip: float | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """One SGLD update out of place: ``x - step_size * grad + noise_std * noise``, clamped to
    [-1, 1] if ``clamp`` (NaN stays NaN), with ``grad`` clamped elementwise to
    [-grad_clip, grad_clip] first if ``grad_clip`` is set. ``noise`` (standard normal, x's shape)
    is drawn here with ``torch.randn_like`` when None, unless ``noise_std`` is the number 0."""
    grad = grad.float() if grad_clip is None else grad.float().clamp(-grad_clip, grad_clip)
    x = x - step_size * grad
    if noise is None and not (isinstance(noise_std, (int, float)) and noise_std == 0):
        noise = torch.randn_like(x)
    if noise is not None:
        x = x + noise_std * noise
    return x.clamp(-1.0, 1.0) if clamp else x


def sgld_chain(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec,
               update: UpdateFn = torch_update, differentiable: bool = False,
               params: dict[str, torch.Tensor] | None = None, cache: bool = True) -> torch.Tensor:
    """Run ``spec.n_steps`` SGLD steps from ``x: Tensor[B, *shape]``; returns the last state.

    Only the input gradient is taken (``torch.autograd.grad`` w.r.t. x), so parameters' ``.grad``
    are never written. ``differentiable=True`` keeps every step's graph (``create_graph``) so the
    result can be differentiated w.r.t. the starting x (attacks through the chain); ``update``
    must then be out of place. ``params`` and ``cache`` go to :func:`energy_of`. A stop request
    (:mod:`jemfast.process.interrupt`, e.g. SIGTERM) raises ``StopRequested`` between steps.
    """
    for _ in range(spec.n_steps):
        raise_if_stopped()
        if spec.step_size == 0:  # noise alone: the gradient would be multiplied by 0 (NaN included)
            grad = torch.zeros_like(x)
        else:
            if not (differentiable and x.requires_grad):
                x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                energy = energy_of(model, x, y, spec.autocast_dtype, params, cache).sum()
                (grad,) = torch.autograd.grad(energy, x, create_graph=differentiable)
        with torch.set_grad_enabled(differentiable):
            x = update(x if differentiable else x.detach(), grad, spec.step_size, spec.noise_std, spec.clamp,
                       spec.grad_clip)
    return x


def reference_chain(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec) -> torch.Tensor:
    """The ``reference`` backend: :func:`sgld_chain` with :func:`torch_update` on a detached fp32
    copy of ``x``; returns a new fp32 tensor. Noise comes from torch's generator for x's device."""
    return sgld_chain(model, x.detach().float().clone(), y, spec)

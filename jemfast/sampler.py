"""Stochastic Gradient Langevin Dynamics over the JEM energy, and the PCD sampling step.

One SGLD step, with E the model's energy and x the chain state (fp32)::

    x <- x - step_size * dE/dx + noise_std * N(0, I)

The reference chain below is plain PyTorch and is what every fast backend (``fused``,
``graph``, ``compile``; see :mod:`jemfast.backends`) is tested against.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .buffer import ReplayBuffer

# chain(model, x, y, n_steps, step_size, noise_std, clamp, autocast_dtype) -> x
ChainFn = Callable[..., torch.Tensor]


def _energy(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
            autocast_dtype: torch.dtype | None) -> torch.Tensor:
    if autocast_dtype is None:
        return model.energy(x, y)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        return model.energy(x, y)


def reference_chain(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_steps: int,
                    step_size: float, noise_std: float, clamp: bool = False,
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run ``n_steps`` SGLD steps from ``x: Tensor[B, *shape]``; returns a new fp32 tensor.

    Only the input gradient is computed (``torch.autograd.grad`` w.r.t. x), so parameter
    ``.grad`` fields are untouched. Noise comes from torch's generator for x's device.
    """
    x = x.detach().float().clone()
    for _ in range(n_steps):
        x.requires_grad_(True)
        energy = _energy(model, x, y, autocast_dtype).sum()
        (grad,) = torch.autograd.grad(energy, x)
        with torch.no_grad():
            x = x - step_size * grad.float()
            if noise_std > 0:
                x = x + noise_std * torch.randn_like(x)
            if clamp:
                x = x.clamp_(-1.0, 1.0)
    return x.detach()


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for sampling (as the original code) and restore its mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


class SGLD:
    """SGLD sampler: ``run`` a chain from given starts, or ``sample`` a PCD batch from a buffer.

    ``backend`` is one of reference | fused | graph | compile | auto (see
    :mod:`jemfast.backends`; all but reference are resolved there, lazily, on first use).
    ``precision='bf16'`` evaluates the network under bf16 autocast; the chain stays fp32.
    """

    def __init__(self, n_steps: int = 20, step_size: float = 1.0, noise_std: float = 0.01,
                 backend: str = "reference", clamp: bool = False, precision: str = "fp32") -> None:
        if n_steps < 1:
            raise ValueError(f"sgld_steps: must be >= 1, got {n_steps}")
        if not (step_size > 0 and step_size < float("inf")):
            raise ValueError(f"sgld_step_size: must be a finite number > 0, got {step_size}")
        if not (noise_std >= 0 and noise_std < float("inf")):
            raise ValueError(f"sgld_noise: must be a finite number >= 0, got {noise_std}")
        self.n_steps = n_steps
        self.step_size = step_size
        self.noise_std = noise_std
        self.backend = backend
        self.clamp = clamp
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._chain: ChainFn | None = reference_chain if backend == "reference" else None

    def chain_fn(self, device: torch.device) -> ChainFn:
        """The chain function of this sampler's backend on ``device`` (resolved once)."""
        if self._chain is None:
            from .backends import make_chain

            self._chain, self.backend = make_chain(self.backend, device)
        return self._chain

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """SGLD from ``x: Tensor[B, *shape]`` (optionally conditioned on ``y: Tensor[B]``).

        The model's train/eval mode and its parameters' ``.grad`` are left as they were.
        """
        chain = self.chain_fn(x.device)
        with sampling_mode(model):
            return chain(model, x, y, self.n_steps, self.step_size, self.noise_std,
                         self.clamp, self.autocast_dtype)

    def sample(self, model: nn.Module, buffer: ReplayBuffer, batch_size: int,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """One PCD step: draw ``batch_size`` chains from ``buffer``, run them, write them back."""
        x0, idx = buffer.sample(batch_size, y)
        x = self.run(model, x0, y)
        buffer.update(idx, x)
        return x

"""The ``fused`` backend: the reference loop with the Triton update (noise drawn and the gradient
clipped in the kernel)."""
from __future__ import annotations

import torch
from torch import nn

from .reference import UpdateFn, sgld_chain
from .spec import ChainSpec


def chain_layout(x: torch.Tensor) -> torch.memory_format:
    """The memory layout a kernel-updated chain state keeps: channels-last for a channels-last
    4-D ``x`` (the layout cuDNN's tensor-core convolutions read), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def kernel_update(rng_state: torch.Tensor) -> UpdateFn:
    """The update of :func:`jemfast.kernels.sgld_update_`, in place on x, drawing its noise from
    the Philox state ``rng_state`` (int64 ``[2]`` on x's device, advanced on the device)."""
    from jemfast.kernels import sgld_update_

    def update(x: torch.Tensor, grad: torch.Tensor, step_size: float, noise_std: float,
               clamp: bool, grad_clip: float | None = None) -> torch.Tensor:
        return sgld_update_(x, grad, step_size, noise_std, rng_state, clamp, grad_clip)

    return update


class KernelNoise:
    """Owner of a chain's kernel Philox state ``rng_state`` (int64 ``[2] = (seed, offset)``).

    Made on first use from torch's generator for the device (:func:`jemfast.kernels.new_rng_state`).
    Once made, load states into it with :meth:`load_rng_state` (an in-place copy): a captured CUDA
    graph holds the tensor's address.
    """

    rng_state: torch.Tensor | None = None

    def rng(self, device: torch.device) -> torch.Tensor:
        """The state on ``device`` (made, or moved there once, on first use)."""
        if self.rng_state is None:
            from jemfast.kernels import new_rng_state

            self.rng_state = new_rng_state(None, device)
        elif self.rng_state.device != device:
            self.rng_state = self.rng_state.to(device)
        return self.rng_state

    def load_rng_state(self, state: torch.Tensor) -> None:
        """Continue the noise stream from ``state`` (a saved ``rng_state``)."""
        if self.rng_state is None:
            self.rng_state = state.detach().clone()
        else:
            self.rng_state.copy_(state)


class FusedChain(KernelNoise):
    """Autograd input gradient + the in-place fused Triton update. CUDA, or the CPU under
    ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec) -> torch.Tensor:
        update = kernel_update(self.rng(x.device))
        x = x.detach().float().clone(memory_format=chain_layout(x))  # our own state, updated in place
        return sgld_chain(model, x, y, spec, update)

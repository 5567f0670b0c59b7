"""Replay buffer for Persistent Contrastive Divergence, resident on the training device.

Indices, re-initialisation masks and uniform noise are all drawn on the device from torch's
generator for that device, so drawing a batch never synchronises with the host. On a CUDA
device with Triton the gather + re-init is one fused kernel (``jemfast.kernels.buffer``) whose
uniform noise comes from its own Philox state (saved in :meth:`ReplayBuffer.state_dict`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import check_value


class ReplayBuffer:
    """``capacity`` stored samples of ``shape``, initialised to U(-1, 1) or by ``init_fn``.

    With ``n_classes`` the buffer is split into ``n_classes`` equal shares of
    ``capacity // n_classes`` rows (class c owns rows ``[c * share, (c + 1) * share)``), so that
    ``sample(B, y)`` draws chains of class ``y[i]`` as the original JEM code's class-conditional
    sampler does.

    ``init_fn(n, y_or_None) -> Tensor[n, *shape]`` (optional) replaces U(-1, 1) for the initial
    rows, re-initialised chains and :meth:`reset` (for example
    :class:`jemfast.init_dist.ClassGaussians`); a class-conditional buffer passes each row's class.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], n_classes: int | None = None,
                 reinit_freq: float = 0.05, device: torch.device | str | None = None,
                 init_fn: Callable[[int, torch.Tensor | None], torch.Tensor] | None = None) -> None:
        # the bounds of the config fields these arguments mirror (ValueError naming the argument)
        capacity = check_value("sampler.buffer_size", capacity, "capacity")
        reinit_freq = check_value("sampler.reinit_freq", reinit_freq, "reinit_freq")
        if n_classes is not None and capacity < n_classes:
            raise ValueError(f"capacity: {capacity} rows cannot hold {n_classes} classes")
        self.capacity = capacity
        self.shape = tuple(shape)
        self.n_classes = n_classes
        self.reinit_freq = reinit_freq
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.init_fn = init_fn
        self.data = self.random_init(capacity, self._row_classes())
        # The fused CUDA kernel draws U(-1, 1) itself: with an init_fn the torch path runs instead.
        self._use_kernel = _kernel_usable(self.device) and init_fn is None
        self._kernel_rng: torch.Tensor | None = None  # Philox (seed, offset) of the gather kernel

    @property
    def per_class(self) -> int:
        """Rows owned by each class (the whole buffer when unconditional)."""
        return self.capacity // self.n_classes if self.n_classes else self.capacity

    def random_init(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[n, *shape]`` of fresh samples on the buffer's device: U(-1, 1), or
        ``init_fn(n, y)`` (``y: Tensor[n]`` classes or None) when the buffer has one."""
        if self.init_fn is not None:
            return self.init_fn(n, y).to(self.device, torch.float32).reshape(n, *self.shape)
        return torch.rand((n, *self.shape), device=self.device) * 2 - 1

    def _row_classes(self) -> torch.Tensor | None:
        """``Tensor[capacity]`` of the class owning each row (None when unconditional); rows
        past the last full share count as the last class."""
        if self.n_classes is None or self.init_fn is None:
            return None
        rows = torch.arange(self.capacity, device=self.device) // self.per_class
        return rows.clamp_max(self.n_classes - 1)

    def draw_indices(self, batch_size: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[B] int64`` of buffer rows: uniform, or within class ``y[i]``'s share."""
        if y is None:
            return torch.randint(0, self.capacity, (batch_size,), device=self.device)
        if self.n_classes is None:
            raise ValueError("class-conditional draw needs a buffer built with n_classes")
        offsets = torch.randint(0, self.per_class, (batch_size,), device=self.device)
        return offsets + y.to(self.device) * self.per_class

    def sample(self, batch_size: int, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` chains: ``(x: Tensor[B, *shape] fp32, idx: Tensor[B] int64)``.

        Each drawn row is replaced, independently with probability ``reinit_freq``, by a fresh
        U(-1, 1) sample. The buffer itself is not modified until :meth:`update`.
        """
        idx = self.draw_indices(batch_size, y)
        reinit = torch.rand(batch_size, device=self.device) < self.reinit_freq
        if self._use_kernel:
            from jemfast.kernels.buffer import gather_reinit

            return gather_reinit(self.data, idx, reinit, self._kernel_rng_state()), idx
        x = self.data[idx]
        fresh = self.random_init(batch_size, y)
        mask = reinit.view(-1, *([1] * len(self.shape)))
        return torch.where(mask, fresh, x), idx

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write finished chains ``x: Tensor[B, *shape]`` back to rows ``idx``."""
        self.data.index_copy_(0, idx, x.detach().to(self.data.dtype))

    def reset(self) -> None:
        """Re-initialise every row to U(-1, 1) or ``init_fn`` (a stability recovery action)."""
        self.data = self.random_init(self.capacity, self._row_classes())

    def _kernel_rng_state(self) -> torch.Tensor:
        if self._kernel_rng is None:
            from jemfast.kernels import new_rng_state

            self._kernel_rng = new_rng_state(None, self.device)
        elif self._kernel_rng.device != self.device:
            self._kernel_rng = self._kernel_rng.to(self.device)
        return self._kernel_rng

    def reseed(self, seed: int) -> None:
        """Restart the gather kernel's noise at ``(seed, 0)`` (no-op without the kernel: then the
        noise comes from torch's generator, which the caller seeds)."""
        if self._use_kernel:
            from jemfast.kernels import new_rng_state

            self._set_kernel_rng(new_rng_state(seed))

    def _set_kernel_rng(self, state: torch.Tensor) -> None:
        if self._kernel_rng is None:
            self._kernel_rng = state.detach().to(self.device).clone()
        else:
            self._kernel_rng.copy_(state)  # in place: a captured CUDA graph may hold its address

    def state_dict(self) -> dict:
        """``data``, ``reinit_freq``, ``n_classes`` (-1: unconditional) and, once the gather kernel
        has drawn, ``kernel_rng_state`` (int64 ``[2]``; absent from older checkpoints)."""
        state = {"data": self.data, "reinit_freq": self.reinit_freq,
                 "n_classes": -1 if self.n_classes is None else self.n_classes}
        if self._kernel_rng is not None:
            state["kernel_rng_state"] = self._kernel_rng.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        data = state["data"]
        if tuple(data.shape) != (self.capacity, *self.shape):
            raise ValueError(f"buffer: checkpoint holds shape {tuple(data.shape)}, "
                             f"expected {(self.capacity, *self.shape)}")
        self.data = data.to(self.device, torch.float32).clone()
        self.reinit_freq = float(state["reinit_freq"])
        if state.get("kernel_rng_state") is not None:
            self._set_kernel_rng(state["kernel_rng_state"])


def _kernel_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from jemfast.kernels import triton_available
    except ImportError:
        return False
    return triton_available(device)

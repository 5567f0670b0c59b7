"""Replay buffer for Persistent Contrastive Divergence, resident on the training device.

Indices, re-initialisation masks and uniform noise are all drawn on the device from torch's
generator for that device, so drawing a batch never synchronises with the host. On a CUDA
device with Triton the gather + re-init is one fused kernel (``jemfast.kernels.buffer``) whose
uniform noise comes from its own Philox state (saved in :meth:`ReplayBuffer.state_dict`).

A buffer also behaves as the tensor of its rows where scripts expect one (``len``, indexing,
``.shape``, ``.size()``, ``torch.save``/``torch.load``); ``buffer.data`` is that plain tensor.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .options.config import check_value, field_kind, field_rules
from .options.schema import check_field

InitFn = Callable[[int, "torch.Tensor | None"], torch.Tensor]


class ReplayBuffer:
    """``capacity`` stored samples of ``sample_shape``, initialised to U(-1, 1) or by ``init_fn``.

    With ``n_classes`` the buffer is split into ``n_classes`` equal shares of
    ``capacity // n_classes`` rows (class c owns rows ``[c * share, (c + 1) * share)``), so that
    ``sample(B, y)`` draws chains of class ``y[i]`` as the original JEM code's class-conditional
    sampler does; ``capacity`` must then be a multiple of ``n_classes``.

    ``init_fn(n, y_or_None) -> Tensor[n, *sample_shape]`` (optional) replaces U(-1, 1) for the
    initial rows, re-initialised chains (on every path, the fused CUDA kernel's included) and
    :meth:`reset` (for example :class:`jemfast.sgld.chain_init.ClassGaussians`); a class-conditional
    buffer passes each row's class.

    ``capacity`` 0 is an empty buffer, the original code's ``replay_buffer = []``: every draw is
    fresh chains from U(-1, 1) or ``init_fn`` and :meth:`update` keeps nothing (a library
    option; the training CLI's ``--buffer-size`` stays >= 1, its fresh chains are
    ``--sgld-init noise``).

    Tensor interop: ``len(buffer)`` is ``capacity``; ``buffer[i]``/``buffer[idx] = x`` index
    the rows; ``buffer.shape``/``buffer.size(dim)`` are ``(capacity, *sample_shape)``'s;
    ``buffer.data`` is the ``Tensor[capacity, *sample_shape]`` itself (save it, or save the
    buffer: ``torch.save(buffer, path)`` then ``torch.load(path)`` gives it back with its data,
    classes, ``reinit_freq`` and kernel noise state, not its ``init_fn``, which is code).
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], n_classes: int | None = None,
                 reinit_freq: float = 0.05, device: torch.device | str | None = None,
                 init_fn: InitFn | None = None) -> None:
        self._configure(capacity, shape, n_classes, reinit_freq, device, init_fn)
        self.data = self.random_init(self.capacity, self._row_classes())

    def _configure(self, capacity: int, shape: tuple[int, ...], n_classes: int | None, reinit_freq: float,
                   device: torch.device | str | None, init_fn: InitFn | None) -> None:
        # the bounds of the config fields these arguments mirror (ValueError naming the argument);
        # the library also takes an empty buffer, the CLI's --buffer-size does not
        rows = {**field_rules("sampler.buffer_size"), "lo": 0}
        capacity = check_field(rows, field_kind("sampler.buffer_size"), capacity, "capacity")
        reinit_freq = check_value("sampler.reinit_freq", reinit_freq, "reinit_freq")
        if n_classes is not None:
            n_classes = check_field({"lo": 1}, field_kind("sampler.buffer_size"), n_classes, "n_classes")
            if capacity % n_classes:
                fit = max(n_classes, capacity - capacity % n_classes)
                raise ValueError(f"capacity: a class-conditional buffer is split into {n_classes} equal "
                                 f"shares, so its capacity must be a multiple of {n_classes} (e.g. {fit}), "
                                 f"got {capacity}")
        self.capacity = capacity
        self.sample_shape = tuple(shape)
        self.n_classes = n_classes
        self.reinit_freq = reinit_freq
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.init_fn = init_fn
        # the fused gather kernel draws U(-1, 1) rows; an init_fn's rows replace them after it
        self._use_kernel = _kernel_usable(self.device)
        self._kernel_rng: torch.Tensor | None = None  # Philox (seed, offset) of the gather kernel

    @classmethod
    def from_tensor(cls, data: torch.Tensor, n_classes: int | None = None, reinit_freq: float = 0.05,
                    device: torch.device | str | None = None, init_fn: InitFn | None = None) -> "ReplayBuffer":
        """A buffer holding the rows of ``data: Tensor[N, *sample_shape]`` (e.g. an original JEM
        checkpoint's ``replay_buffer``), on ``device`` (default: ``data``'s). The rows are stored
        as contiguous fp32: when ``data`` already is that on ``device`` it is used as it is (the
        buffer's draws, updates, :meth:`reset` and :meth:`load_state_dict` then read and write
        ``data`` in place), else copied."""
        if not isinstance(data, torch.Tensor) or data.dim() < 1:
            raise ValueError(f"data: expected a Tensor[N, *sample_shape], got {type(data).__name__}")
        buf = cls.__new__(cls)
        buf._configure(data.shape[0], tuple(data.shape[1:]), n_classes, reinit_freq,
                       data.device if device is None else device, init_fn)
        buf.data = data.detach().to(buf.device, torch.float32).contiguous()
        return buf

    # ---- tensor interop -----------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(capacity, *sample_shape)``, as the stored tensor's."""
        return torch.Size((self.capacity, *self.sample_shape))

    def size(self, dim: int | None = None) -> torch.Size | int:
        """``Tensor.size`` of the stored rows."""
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.capacity

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.data[index]

    def __setitem__(self, index: Any, value: torch.Tensor | float) -> None:
        self.data[index] = value.to(self.device, self.data.dtype) if isinstance(value, torch.Tensor) else value

    def __repr__(self) -> str:
        classes = "" if self.n_classes is None else f", n_classes={self.n_classes}"
        return (f"ReplayBuffer({self.capacity}, {self.sample_shape}{classes}, reinit_freq={self.reinit_freq}, "
                f"device={str(self.device)!r})")

    def __reduce__(self) -> tuple:
        # torch.load(weights_only=True) calls only allow-listed functions: _rebuild_replay_buffer is
        # one (registered below); its arguments are tensors and numbers
        return (_rebuild_replay_buffer, (self.data, self.n_classes, self.reinit_freq, self._kernel_rng))

    def __deepcopy__(self, memo: dict) -> "ReplayBuffer":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():  # the init_fn is shared, not copied (it is code)
            setattr(new, key, value if key == "init_fn" else copy.deepcopy(value, memo))
        return new

    # ---- drawing and writing back ---------------------------------------------------------------
    @property
    def per_class(self) -> int:
        """Rows owned by each class (the whole buffer when unconditional)."""
        return self.capacity // self.n_classes if self.n_classes else self.capacity

    def random_init(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[n, *sample_shape]`` of fresh samples on the buffer's device: U(-1, 1), or
        ``init_fn(n, y)`` (``y: Tensor[n]`` classes or None) when the buffer has one."""
        if self.init_fn is not None:
            return self.init_fn(n, y).to(self.device, torch.float32).reshape(n, *self.sample_shape)
        return torch.rand((n, *self.sample_shape), device=self.device) * 2 - 1

    def _row_classes(self) -> torch.Tensor | None:
        """``Tensor[capacity]`` of the class owning each row (None when unconditional or when
        there is no ``init_fn`` to tell)."""
        if self.n_classes is None or self.init_fn is None:
            return None
        return torch.arange(self.capacity, device=self.device) // self.per_class

    def draw_indices(self, batch_size: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[B] int64`` of buffer rows: uniform, or within class ``y[i]``'s share."""
        if y is None:
            return torch.randint(0, self.capacity, (batch_size,), device=self.device)
        if self.n_classes is None:
            raise ValueError("class-conditional draw needs a buffer built with n_classes")
        offsets = torch.randint(0, self.per_class, (batch_size,), device=self.device)
        return offsets + y.to(self.device) * self.per_class

    def sample(self, batch_size: int, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` chains: ``(x: Tensor[B, *sample_shape] fp32, idx: Tensor[B] int64)``.

        Each drawn row is replaced, independently with probability ``reinit_freq``, by a fresh
        sample (U(-1, 1) or ``init_fn``). The buffer itself is not modified until :meth:`update`.
        An empty buffer returns ``B`` fresh samples and an empty ``idx``.
        """
        if self.capacity == 0:
            return self.random_init(batch_size, y), torch.empty(0, dtype=torch.int64, device=self.device)
        idx = self.draw_indices(batch_size, y)
        reinit = torch.rand(batch_size, device=self.device) < self.reinit_freq
        mask = reinit.view(-1, *([1] * len(self.sample_shape)))
        if self._use_kernel:
            from jemfast.kernels.buffer import gather_reinit

            x = gather_reinit(self.data, idx, reinit, self._kernel_rng_state())
            if self.init_fn is None:
                return x, idx
            return torch.where(mask, self.random_init(batch_size, y), x), idx
        return torch.where(mask, self.random_init(batch_size, y), self.data[idx]), idx

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write finished chains ``x: Tensor[B, *sample_shape]`` back to rows ``idx`` (an empty
        buffer keeps nothing)."""
        if self.capacity == 0:
            return
        self.data.index_copy_(0, idx, x.detach().to(self.data.dtype))

    def reset(self) -> None:
        """Re-initialise every row to U(-1, 1) or ``init_fn`` (a stability recovery action), in
        place."""
        self.data.copy_(self.random_init(self.capacity, self._row_classes()))

    # ---- noise state and checkpoints ------------------------------------------------------------
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
        """Restore :meth:`state_dict`'s output; only ``data`` is required (e.g.
        ``{"data": original_replay_buffer_tensor}``): a missing ``reinit_freq`` or
        ``kernel_rng_state`` keeps the buffer's own. ``data`` must have this buffer's shape."""
        data = state["data"]
        if tuple(data.shape) != tuple(self.shape):
            raise ValueError(f"buffer: checkpoint holds shape {tuple(data.shape)}, expected {tuple(self.shape)}")
        self.data.copy_(data)  # in place: a from_tensor buffer keeps sharing its tensor
        if state.get("reinit_freq") is not None:
            self.reinit_freq = check_value("sampler.reinit_freq", state["reinit_freq"], "reinit_freq")
        if state.get("kernel_rng_state") is not None:
            self._set_kernel_rng(state["kernel_rng_state"])


def _rebuild_replay_buffer(data: torch.Tensor, n_classes: int | None, reinit_freq: float,
                           kernel_rng: torch.Tensor | None) -> ReplayBuffer:
    """Unpickling a :class:`ReplayBuffer` (``torch.load``): on ``data``'s device, no ``init_fn``."""
    buf = ReplayBuffer.from_tensor(data, n_classes, reinit_freq)
    if kernel_rng is not None:
        buf._set_kernel_rng(kernel_rng)
    return buf


torch.serialization.add_safe_globals([_rebuild_replay_buffer])


def _kernel_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from jemfast.kernels import triton_available
    except ImportError:
        return False
    return triton_available(device)

"""The SGLD sampler: run a chain from given starts, or one PCD step from a replay buffer."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..config import check_value
from ..modes import module_mode, precision_dtype
from .backends import ChainFn, make_chain
from .reference import reference_chain
from .spec import ChainSpec


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (as the original code samples) and grad mode on; every mode restored after."""
    with module_mode(model, "eval"), torch.enable_grad():
        yield


class SGLD:
    """SGLD sampler: ``run`` a chain from given starts, or ``sample`` a PCD batch from a buffer.

    ``backend`` is one of reference | fused | graph | compile | auto (see
    :mod:`jemfast.sgld.backends`; all but reference are resolved there, lazily, on first use,
    after which ``backend`` holds the resolved name). ``precision='bf16'`` evaluates the network
    under bf16 autocast; the chain stays fp32. ``channels_last=True`` runs 4-D chains in NHWC
    memory layout (for a channels-last model); otherwise a chain keeps the layout of the x it is
    given. ``n_steps`` may be changed between calls.

    Checkpointing: :meth:`state_dict` holds ``n_steps`` and the kernel Philox state of the
    ``fused``/``graph`` backends (None for the others, whose noise comes from torch's generator);
    :meth:`reseed` restarts that kernel stream from a seed.
    """

    def __init__(self, n_steps: int = 20, step_size: float = 1.0, noise_std: float = 0.01,
                 backend: str = "reference", clamp: bool = False, precision: str = "fp32",
                 channels_last: bool = False) -> None:
        # the bounds of the config fields these arguments mirror (ValueError naming the argument)
        self.n_steps = check_value("sampler.n_steps", n_steps, "n_steps")
        self.step_size = check_value("sampler.step_size", step_size, "step_size")
        self.noise_std = check_value("sampler.noise_std", noise_std, "noise_std")
        self.backend = backend
        self.clamp = clamp
        self.precision = precision
        self.autocast_dtype = precision_dtype(precision)
        self.channels_last = channels_last
        self._chain: ChainFn | None = reference_chain if backend == "reference" else None
        self._pending_rng: torch.Tensor | int | None = None  # a kernel state (or seed) for a chain not made yet

    @property
    def spec(self) -> ChainSpec:
        """The chain this sampler runs now (``n_steps`` may have changed since the last call)."""
        return ChainSpec(int(self.n_steps), float(self.step_size), float(self.noise_std), bool(self.clamp),
                         self.autocast_dtype)

    def chain_fn(self, device: torch.device, model: nn.Module | None = None) -> ChainFn:
        """The chain function of this sampler's backend on ``device`` (resolved once; ``auto``
        uses ``model``'s parameter count when given)."""
        if self._chain is None:
            n_params = None if model is None else sum(p.numel() for p in model.parameters())
            self._chain, self.backend = make_chain(self.backend, device, n_params, self.precision)
            if self._pending_rng is not None and hasattr(self._chain, "load_rng_state"):
                self._chain.load_rng_state(_as_state(self._pending_rng))
                self._pending_rng = None
        return self._chain

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """SGLD from ``x: Tensor[B, *shape]`` (optionally conditioned on ``y: Tensor[B]``);
        returns a new fp32 tensor. The model's modes and its parameters' ``.grad`` are left as
        they were."""
        chain = self.chain_fn(x.device, model)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with sampling_mode(model):
            return chain(model, x, y, self.spec)

    def sample(self, model: nn.Module, buffer: ReplayBuffer, batch_size: int,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """One PCD step: draw ``batch_size`` chains from ``buffer``, run them, write them back."""
        x0, idx = buffer.sample(batch_size, y)
        x = self.run(model, x0, y)
        buffer.update(idx, x)
        return x

    def state_dict(self) -> dict:
        """``{"n_steps": int, "rng_state": int64 Tensor[2] (seed, offset) or None}``."""
        rng = getattr(self._chain, "rng_state", None)
        if rng is None and self._pending_rng is not None:
            rng = _as_state(self._pending_rng)
        return {"n_steps": int(self.n_steps), "rng_state": None if rng is None else rng.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (``rng_state`` may be missing or None)."""
        self.n_steps = int(state["n_steps"])
        if state.get("rng_state") is not None:
            self._load_rng(state["rng_state"])

    def reseed(self, seed: int) -> None:
        """Restart the kernel noise stream of ``fused``/``graph`` at ``(seed, 0)``; other backends
        draw from torch's generator, which the caller seeds."""
        self._load_rng(seed)

    def _load_rng(self, state: torch.Tensor | int) -> None:
        if self._chain is None:
            self._pending_rng = state.detach().clone() if isinstance(state, torch.Tensor) else int(state)
        elif hasattr(self._chain, "load_rng_state"):
            self._chain.load_rng_state(_as_state(state))


def _as_state(state: torch.Tensor | int) -> torch.Tensor:
    """A kernel RNG state tensor from a saved state or a seed."""
    if isinstance(state, torch.Tensor):
        return state
    from jemfast.kernels import new_rng_state

    return new_rng_state(state)

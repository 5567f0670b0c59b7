"""The SGLD sampler: run a chain from given starts, or one PCD step from a replay buffer."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..energy import EnergyFunction, as_energy_model
from ..modes import MODES, Mode, batch_norm_statistics_frozen, module_mode, precision_dtype
from ..options.config import check_value
from .backends import ChainFn, make_chain
from .reference import reference_chain
from .spec import ChainSpec


@contextlib.contextmanager
def sampling_mode(model: nn.Module, mode: Mode = "eval") -> Iterator[None]:
    """``mode`` (eval as the original code samples, train, or keep) and grad mode on; every
    submodule's mode restored after. In ``"train"`` batch norm normalises each chain batch with
    its own statistics but leaves the running ones to the training data
    (:func:`jemfast.modes.batch_norm_statistics_frozen`); ``"keep"`` touches nothing (the
    original evaluation script's refinement updates them, and jemfast.compat keeps that)."""
    frozen = batch_norm_statistics_frozen(model) if mode == "train" else contextlib.nullcontext()
    with module_mode(model, mode), torch.enable_grad(), frozen:
        yield


class SGLD:
    """SGLD sampler: ``run`` a chain from given starts, or ``sample`` a PCD batch from a buffer.

    What it samples (the first argument of ``run``/``sample``): a model with
    ``energy(x, y) -> Tensor[B]`` (a :class:`jemfast.JEM`, a :class:`jemfast.LogDensity`, your
    own), or a plain function ``energy_fn(x, y) -> Tensor[B]``; for a function, pass ``model=``
    (the module it evaluates) to have that module's modes set and restored and its parameters
    counted by ``auto`` (without it nothing's mode is touched).

    ``mode``: the train/eval mode the model samples in: ``"eval"`` (default, as the original
    JEM code), ``"train"`` (e.g. BatchNorm on batch statistics, as JEM++ samples; its running statistics
    stay the training data's) or ``"keep"``;
    every submodule's mode is restored afterwards. ``grad_clip``: clamp dE/dx elementwise to
    [-grad_clip, grad_clip] before each step (None: no clipping). ``step_size`` 0 makes the
    chain noise alone (the energy is not evaluated).

    ``backend`` is one of reference | fused | graph | compile | auto (see
    :mod:`jemfast.sgld.backends`; all but reference are resolved there, lazily, on first use,
    after which ``backend`` holds the resolved name). ``precision='bf16'`` evaluates the network
    under bf16 autocast; the chain stays fp32. ``channels_last=True`` runs 4-D chains in NHWC
    memory layout (for a channels-last model); otherwise a chain keeps the layout of the x it is
    given. ``n_steps`` may be changed between calls, or given per call (``run(..., n_steps=k)``).

    Checkpointing: :meth:`state_dict` holds ``n_steps`` and the kernel Philox state of the
    ``fused``/``graph`` backends (None for the others, whose noise comes from torch's generator);
    :meth:`reseed` restarts that kernel stream from a seed.
    """

    def __init__(self, n_steps: int = 20, step_size: float = 1.0, noise_std: float = 0.01,
                 backend: str = "reference", clamp: bool = False, precision: str = "fp32",
                 channels_last: bool = False, mode: Mode = "eval", grad_clip: float | None = None) -> None:
        # the bounds of the config fields these arguments mirror (ValueError naming the argument)
        self.n_steps = check_value("sampler.n_steps", n_steps, "n_steps")
        self.step_size = check_value("sampler.step_size", step_size, "step_size")
        self.noise_std = check_value("sampler.noise_std", noise_std, "noise_std")
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.grad_clip = _check_clip(grad_clip)
        self._wrapped: dict[tuple[int, int], tuple[Any, Any, nn.Module]] = {}  # see _model
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
        return self._spec(None)

    def _spec(self, n_steps: int | None) -> ChainSpec:
        steps = self.n_steps if n_steps is None else check_value("sampler.n_steps", n_steps, "n_steps")
        clip = None if self.grad_clip is None else float(self.grad_clip)
        return ChainSpec(int(steps), float(self.step_size), float(self.noise_std), bool(self.clamp),
                         self.autocast_dtype, clip)

    def _model(self, energy: Any, model: nn.Module | None) -> nn.Module:
        """The module the chain runs (:func:`jemfast.energy.as_energy_model`). A wrapper made for
        a function is kept and reused for the same (function, model) pair: the graph backend
        captures per module identity."""
        key = (id(energy), id(model))
        hit = self._wrapped.get(key)
        if hit is not None and hit[0] is energy and hit[1] is model:
            return hit[2]
        wrapped = as_energy_model(energy, model)
        if isinstance(wrapped, EnergyFunction):
            if len(self._wrapped) >= 8:
                self._wrapped.pop(next(iter(self._wrapped)))
            self._wrapped[key] = (energy, model, wrapped)
        return wrapped

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

    def run(self, energy: Any, x: torch.Tensor, y: torch.Tensor | None = None, *, n_steps: int | None = None,
            model: nn.Module | None = None) -> torch.Tensor:
        """SGLD on ``energy`` (see the class docstring) from ``x: Tensor[B, *shape]``, optionally
        conditioned on ``y: Tensor[B]``, for ``n_steps`` steps (default: the sampler's);
        returns a new fp32 tensor. Every submodule's mode and the parameters' ``.grad`` are left
        as they were."""
        net = self._model(energy, model)
        chain = self.chain_fn(x.device, net)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        mode = "keep" if isinstance(net, EnergyFunction) and net.owner is None else self.mode
        with sampling_mode(net, mode):
            return chain(net, x, y, self._spec(n_steps))

    def sample(self, energy: Any, buffer: ReplayBuffer, batch_size: int, y: torch.Tensor | None = None, *,
               n_steps: int | None = None, model: nn.Module | None = None) -> torch.Tensor:
        """One PCD step: draw ``batch_size`` chains from ``buffer``, run them (``run``'s
        arguments), write them back (an empty buffer gives fresh chains and keeps nothing)."""
        x0, idx = buffer.sample(batch_size, y)
        x = self.run(energy, x0, y, n_steps=n_steps, model=model)
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


def _check_clip(grad_clip: float | None) -> float | None:
    if grad_clip is None:
        return None
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real) or not 0 < grad_clip < math.inf:
        raise ValueError(f"grad_clip: must be a positive finite number or None, got {grad_clip!r}")
    return float(grad_clip)


def _as_state(state: torch.Tensor | int) -> torch.Tensor:
    """A kernel RNG state tensor from a saved state or a seed."""
    if isinstance(state, torch.Tensor):
        return state
    from jemfast.kernels import new_rng_state

    return new_rng_state(state)

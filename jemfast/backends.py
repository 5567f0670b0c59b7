"""Fast SGLD chain backends, each a drop-in for :func:`jemfast.sampler.reference_chain`.

``make_chain(backend, device) -> (chain, name)`` returns a function with the signature
``chain(model, x, y, n_steps, step_size, noise_std, clamp=False, autocast_dtype=None) -> x``
(a new fp32 ``Tensor[B, *shape]``) and the resolved backend name:

- ``reference``: :func:`jemfast.sampler.reference_chain` (plain PyTorch, the ground truth).
- ``fused``: input gradient by autograd, update by the Triton kernel
  :func:`jemfast.kernels.sgld_update_` (noise drawn in the kernel). CUDA, or the CPU under
  ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).
- ``graph``: the whole K-step chain (forward, input gradient, fused update) captured once per
  (model, batch shape, y given or not, n_steps, step size, noise, clamp, dtype) in a CUDA graph
  and replayed (:mod:`jemfast.backends_graph`). CUDA with Triton only.
- ``compile``: one SGLD step written with ``torch.func.grad`` and compiled by ``torch.compile``
  (``fullgraph=True``; ``mode="reduce-overhead"`` on CUDA, the default mode on CPU) and called
  ``n_steps`` times. On the CPU the chain runs channels-last with channels-last copies of the
  conv weights made once per chain (oneDNN's fast path) and noise drawn eagerly.
- ``auto``: chosen once per device by a fixed rule (:func:`resolve_backend`) and logged once.

Every backend leaves parameters' ``.grad`` and ``requires_grad`` untouched (only the input
gradient is computed), reads parameters live (optimizer updates are seen by the next call) and
does not synchronise with the host. The caller (``SGLD.run``) sets eval mode and grad mode.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

import torch
from torch import nn

from .errors import UserError
from .sampler import ChainFn, _energy, reference_chain

NAMES = ("reference", "fused", "graph", "compile")
_said: set = set()


def say_once(key: object, message: str) -> None:
    """Write ``message`` as one line on stderr, once per process for ``key``."""
    if key in _said:
        return
    _said.add(key)
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        sys.stderr.write(message + "\n")


def unavailable(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can. Cheap; never syncs."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend in ("fused", "graph"):
        try:
            from jemfast.kernels import HAS_TRITON, triton_available
        except ImportError as exc:  # pragma: no cover - kernels/ is part of the package
            return f"jemfast.kernels does not import ({exc})"
        if backend == "graph" and device.type != "cuda":
            return f"the graph backend captures CUDA graphs and needs a CUDA device, not {device.type}"
        if backend == "graph" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if not HAS_TRITON:
            return "triton is not installed"
        if not triton_available(device):
            return (f"the Triton kernel cannot run on {device.type} (needs CUDA, or TRITON_INTERPRET=1 "
                    "set before `import triton` for the CPU interpreter)")
        return None
    if backend == "compile":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device.type == "cpu" and not _have_cxx():
            return "torch.compile on the CPU needs a C++ compiler (none found on PATH or in $CXX)"
        if device.type not in ("cpu", "cuda"):
            return f"torch.compile is not set up for {device.type} here"
        return None
    return f"unknown backend {backend!r}; choose one of auto, {', '.join(NAMES)}"


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX")
    return bool(cxx and shutil.which(cxx)) or any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_backend(backend: str, device: torch.device | str) -> tuple[str, str]:
    """``(name, reason)``: the backend ``backend`` stands for on ``device`` (``auto`` resolved).

    The ``auto`` rule is fixed (no benchmarking at resolution time):
    CUDA -> ``graph`` if the Triton kernels run there, else ``compile``; CPU -> ``compile`` if a
    C++ compiler is present, else ``reference``. On the 2-core CPU measured (bench/RESULTS.md)
    ``compile`` was the fastest under load with 1 thread: median 1.3x the reference on the
    3x32x32 SmallCNN and WRN-10-2, on par (0.9-1.0x) on the 1x8x8 digits CNN, at a one-off
    compile cost of 5-30 s. On the idle machine with 2 threads it was only 1.0-1.16x side by
    side (bench/RESULTS.md), so on CPUs ``auto`` saves little; pass ``reference`` to skip compiling.
    ``fused`` on the CPU only exists for tests (Triton interpreter) and is never chosen by
    ``auto``.
    """
    device = torch.device(device)
    if backend != "auto":
        return backend, "requested"
    if device.type == "cuda":
        why_not = unavailable("graph", device)
        if why_not is None:
            return "graph", "CUDA graph of the whole chain with the fused Triton update"
        return "compile", f"graph unavailable: {why_not}"
    why_not = unavailable("compile", device)
    if why_not is None:
        return "compile", "torch.compile, channels-last: the fastest measured on the CPU"
    return "reference", f"compile unavailable: {why_not}"


def make_chain(backend: str, device: torch.device | str) -> tuple[ChainFn, str]:
    """The chain function of ``backend`` on ``device`` and the resolved backend name.

    ``auto`` is resolved by :func:`resolve_backend` and the choice is logged once (stderr).
    An explicitly requested backend that cannot run here raises :class:`UserError`.
    """
    device = torch.device(device)
    name, reason = resolve_backend(backend, device)
    if backend == "auto":
        say_once(("auto", device.type, name), f"jemfast: SGLD backend auto -> {name} on {device.type} ({reason})")
    why_not = unavailable(name, device)
    if why_not is not None:
        raise UserError(f"--backend {name}: {why_not}")
    if name == "reference":
        return reference_chain, name
    if name == "fused":
        return FusedChain(), name
    if name == "graph":
        from .backends_graph import GraphChain

        return GraphChain(device), name
    return CompiledChain(device), name


def new_device_rng(device: torch.device) -> torch.Tensor:
    """Kernel RNG state ``int64[2] = (seed, 0)`` on ``device``, seeded from torch's generator
    for that device on the device itself (no host sync; follows ``torch.manual_seed``)."""
    seed = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    return torch.cat([seed, torch.zeros_like(seed)])


class FusedChain:
    """Autograd input gradient + the in-place fused Triton SGLD update (noise in the kernel)."""

    def __init__(self) -> None:
        self.rng_state: torch.Tensor | None = None  # Philox (seed, offset), advanced on the device

    def _rng(self, device: torch.device) -> torch.Tensor:
        if self.rng_state is None or self.rng_state.device != device:
            self.rng_state = new_device_rng(device)
        return self.rng_state

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_steps: int,
                 step_size: float, noise_std: float, clamp: bool = False,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        from jemfast.kernels import sgld_update_

        rng = self._rng(x.device)
        x = x.detach().float().contiguous().clone()  # our own chain state, updated in place
        for _ in range(n_steps):
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_energy(model, xg, y, autocast_dtype).sum(), xg)
            sgld_update_(x, grad, step_size, noise_std, rng, clamp)
        return x


class _EnergyOf(nn.Module):
    """``forward(x, y) = model.energy(x, y)``, so ``functional_call`` can swap in re-laid-out
    parameters (the model itself is never modified)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.model.energy(x, y)


def _energy_sum(x: torch.Tensor, energy: nn.Module, params: dict[str, torch.Tensor], y: torch.Tensor | None,
                autocast_dtype: torch.dtype | None) -> torch.Tensor:
    ctx = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        e = torch.func.functional_call(energy, params, (x, y)) if params else energy(x, y)
    return e.sum()


_input_grad = torch.func.grad(_energy_sum)  # d(sum_i E(x_i)) / dx, functional (argnums=0)


def sgld_step(energy: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor | None,
              step_size: torch.Tensor | float, noise_std: torch.Tensor | float, noise: torch.Tensor | None,
              clamp: bool, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """One functional SGLD step (what the ``compile`` backend compiles); returns a new x.

    ``energy(x, y)`` is the model's energy (:class:`_EnergyOf`), evaluated with ``params``
    swapped in (``functional_call``) when given. ``noise`` is the standard-normal draw, or None
    to draw it here (``randn_like``, inside the compiled graph). Runs under ``no_grad``:
    ``torch.func.grad`` still differentiates x (a function transform ignores the outer grad
    mode), while the parameters get no autograd graph at all.
    """
    with torch.no_grad():
        if noise is None:
            noise = torch.randn_like(x)
        x = x - step_size * _input_grad(x, energy, params, y, autocast_dtype) + noise_std * noise
        if clamp:
            x = x.clamp(-1.0, 1.0)
    return x


class CompiledChain:
    """``torch.compile`` of :func:`sgld_step`, called ``n_steps`` times.

    The step, not the unrolled chain, is compiled: compile time stays that of one step (an
    unrolled 20-step chain took minutes to compile on the CPU and ran no faster), and it does
    not depend on ``n_steps``. Step size and noise level enter as device scalars, so changing
    them does not recompile. The first call per input shape is timed and logged once.

    CUDA (``mode="reduce-overhead"``: CUDA graphs via cudagraph trees): noise is drawn inside
    the graph, and each step's output is cloned, as gpt-fast does, since the next replay
    overwrites it. CPU (default mode): 4-D chains run channels-last, with the model's 4-D
    weights copied to channels-last once per chain call (parameters are constant during a
    chain; the copy is what makes oneDNN's fast path and avoids a per-step weight transpose in
    the compiled graph); the noise is drawn eagerly from torch's CPU generator in the reference
    chain's order (the compiled in-graph CPU randn was ~10x slower than ``torch.randn``), so for
    a given seed this backend follows the reference chain's noise stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mode = "reduce-overhead" if self.cuda else None
        self.step = torch.compile(sgld_step, fullgraph=True, mode=self.mode)
        self.compile_s: dict[tuple, float] = {}  # first-call seconds per (shape, y given, dtype)
        self._consts: dict[tuple, torch.Tensor] = {}

    def _const(self, value: float, device: torch.device, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A constant fp32 tensor on ``device``, made once (a fill kernel, no host copy). Step
        size and noise level as tensors are graph inputs, not constants baked into the graph."""
        key = (float(value), device, shape)
        if key not in self._consts:
            self._consts[key] = torch.full(shape, float(value), dtype=torch.float32, device=device)
        return self._consts[key]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_steps: int,
                 step_size: float, noise_std: float, clamp: bool = False,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        x = x.detach().float()
        energy, params = _EnergyOf(model), {}
        if not self.cuda and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            params = {f"model.{k}": p.detach().contiguous(memory_format=torch.channels_last)
                      for k, p in model.named_parameters() if p.dim() == 4}
        key = (tuple(x.shape), y is None, autocast_dtype, type(model).__name__)
        t0 = time.perf_counter() if key not in self.compile_s else None
        step_t, noise_t = self._const(step_size, x.device), self._const(noise_std, x.device)
        for i in range(n_steps):
            if self.cuda:
                noise = None
            elif noise_std > 0:
                noise = torch.randn(x.shape, device=x.device)  # the reference's draw, in its order
            else:
                noise = self._const(0.0, x.device, tuple(x.shape))
            x = self.step(energy, params, x, y, step_t, noise_t, noise, clamp, autocast_dtype)
            if self.cuda:
                x = x.clone()
            if t0 is not None and i == 0:
                self.compile_s[key] = dt = time.perf_counter() - t0
                say_once(("compile", self.device.type, key),
                         f"jemfast: compiled the SGLD step for {list(x.shape)} on {self.device.type} "
                         f"in {dt:.1f} s (first call; steady-state speed is measured apart)")
        return x.contiguous()

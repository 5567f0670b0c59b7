"""The ``compile`` backend: one SGLD step compiled by ``torch.compile`` and called ``n_steps`` times.

The step is the reference loop's body with the same pieces (:func:`energy_of`, :func:`torch_update`);
only the input gradient is taken with ``torch.func.grad`` instead of ``torch.autograd.grad``,
which dynamo cannot put in a full graph.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..modes import batch_norms_updating_statistics
from ..process.interrupt import raise_if_stopped
from ..process.log import get_logger, log_once
from .reference import EnergyOf, energy_of, sgld_chain, torch_update
from .spec import ChainSpec

log = get_logger(__name__)


def _energy_sum(x: torch.Tensor, model: nn.Module, params: dict[str, torch.Tensor], y: torch.Tensor | None,
                autocast_dtype: torch.dtype | None) -> torch.Tensor:
    return energy_of(model, x, y, autocast_dtype, params).sum()


_input_grad = torch.func.grad(_energy_sum)  # d(sum_i E(x_i)) / dx, functional (argnums=0)


def sgld_step(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor | None,
              step_size: torch.Tensor | float, noise_std: torch.Tensor | float, noise: torch.Tensor | None,
              clamp: bool, autocast_dtype: torch.dtype | None, grad_clip: float | None = None) -> torch.Tensor:
    """One functional SGLD step (what this backend compiles); returns a new x.

    ``model`` is an :class:`EnergyOf` (built outside the compiled code); ``params`` are
    parameter copies used in the model's place, by the model's parameter names (may be empty). ``noise`` is the
    standard-normal draw, or None to draw it inside the step. Runs under ``no_grad``:
    ``torch.func.grad`` still differentiates x (a function transform ignores the outer grad
    mode), while the parameters get no autograd graph at all.
    """
    with torch.no_grad():
        grad = _input_grad(x, model, params, y, autocast_dtype)
        return torch_update(x, grad, step_size, noise_std, clamp, grad_clip, noise)


def updates_running_stats(model: nn.Module) -> bool:
    """Whether a forward of ``model`` writes buffers in place: a BatchNorm in train mode that
    tracks running statistics (e.g. sampling with ``SGLD(mode="train")``)."""
    return bool(batch_norms_updating_statistics(model))


class CompiledChain:
    """``torch.compile`` of :func:`sgld_step` (``fullgraph=True``), called ``spec.n_steps`` times.

    The step, not the unrolled chain, is compiled: compile time stays that of one step and does
    not depend on ``n_steps``. Step size and noise level enter as device scalars, so changing
    them does not recompile. The first call per input shape is timed and logged once.

    CUDA (``mode="reduce-overhead"``: CUDA graphs via cudagraph trees): noise is drawn inside
    the graph, and each step's output is cloned, as gpt-fast does, since the next replay
    overwrites it. CPU (default mode): 4-D chains run channels-last, with the model's 4-D
    weights copied to channels-last once per chain call (parameters are constant during a
    chain; the copy is what makes oneDNN's fast path and avoids a per-step weight transpose in
    the compiled graph); the noise is drawn eagerly from torch's CPU generator in the reference
    chain's order (inductor's in-graph CPU randn is slower than ``torch.randn``), so for a given
    seed this backend follows the reference chain's noise stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mode = "reduce-overhead" if self.cuda else None
        # dynamic=False: each input shape gets its own static graph (a chain sees one or a few);
        # dynamo's automatic dynamic shapes after a second shape would give up static CUDA graphs
        self.step = torch.compile(sgld_step, fullgraph=True, mode=self.mode, dynamic=False)
        self.compile_s: dict[tuple, float] = {}  # first-call seconds per (shape, y given, dtype)
        self._consts: dict[tuple, torch.Tensor] = {}

    def _const(self, value: float, device: torch.device, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A constant fp32 tensor on ``device``, made once (a fill kernel, no host copy). Step
        size and noise level as tensors are graph inputs, not constants baked into the graph."""
        key = (float(value), device, shape)
        if key not in self._consts:
            self._consts[key] = torch.full(shape, float(value), dtype=torch.float32, device=device)
        return self._consts[key]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec) -> torch.Tensor:
        if spec.step_size == 0:  # noise alone, as the reference loop: nothing to compile
            return sgld_chain(model, x.detach().float().clone(), y, spec)
        if updates_running_stats(model):
            log_once(log, ("compile", "train-bn"), "SGLD backend compile: BatchNorm samples in train mode here and "
                     "updates its running statistics in place, which torch.func.grad cannot trace; these chains "
                     "run the reference loop")
            return sgld_chain(model, x.detach().float().clone(), y, spec)
        x = x.detach().float()
        params: dict[str, torch.Tensor] = {}
        if not self.cuda and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            params = {k: p.detach().contiguous(memory_format=torch.channels_last)
                      for k, p in model.named_parameters() if p.dim() == 4}
        energy = EnergyOf(model)
        key = (tuple(x.shape), y is None, spec.autocast_dtype, type(model).__name__)
        t0 = time.perf_counter() if key not in self.compile_s else None
        step_t, noise_t = self._const(spec.step_size, x.device), self._const(spec.noise_std, x.device)
        for i in range(spec.n_steps):
            raise_if_stopped()
            if self.cuda:
                noise = None
            elif spec.noise_std > 0:
                noise = torch.randn(x.shape, device=x.device)  # the reference's draw, in its order
            else:
                noise = self._const(0.0, x.device, tuple(x.shape))
            x = self.step(energy, params, x, y, step_t, noise_t, noise, spec.clamp, spec.autocast_dtype,
                          spec.grad_clip)
            if self.cuda:
                x = x.clone()
            if t0 is not None and i == 0:
                self.compile_s[key] = dt = time.perf_counter() - t0
                log_once(log, ("compile", self.device.type, key),
                         f"compiled the SGLD step for {list(x.shape)} on {self.device.type} in {dt:.1f} s "
                         "(first call; steady-state speed is measured apart)")
        return x.contiguous()

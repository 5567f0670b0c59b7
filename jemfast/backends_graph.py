"""The ``graph`` SGLD backend: the whole K-step chain captured in one CUDA graph and replayed.

One capture per key ``(model, batch shape, y given or not, n_steps, step size, noise, clamp,
autocast dtype, train/eval mode)``. Each holds static buffers: the chain state ``x`` (copied in
before a replay, updated in place by the captured steps, cloned out after) and the labels ``y``.
Inside the graph every step is: forward, ``torch.autograd.grad`` w.r.t. the input only, and the
fused Triton update :func:`jemfast.kernels.sgld_update_`, whose Philox noise offset lives in a
device tensor that the replay itself advances, so every replay draws fresh noise.

Parameters are read live: the graph reads their storage, so in-place optimizer updates (and
``load_state_dict``, which copies in place) are seen by the next replay. If a parameter's or
buffer's storage moves (``model.to(...)``, re-assigned ``.data``), the chain is captured again.
A replay does no host synchronisation; capture (first call per key) does, as CUDA requires.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .backends import new_device_rng, say_once


def _storage(model: nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def _run_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_steps: int, step_size: float,
               noise_std: float, clamp: bool, autocast_dtype: torch.dtype | None, rng: torch.Tensor) -> None:
    """``n_steps`` SGLD steps on ``x`` in place (fp32, contiguous): autograd grad + fused update."""
    from jemfast.kernels import sgld_update_

    for _ in range(n_steps):
        xg = x.detach().requires_grad_(True)
        if autocast_dtype is None:
            energy = model.energy(xg, y).sum()
        else:  # no autocast weight cache: casts must be recorded in the graph, not cached outside it
            with torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False):
                energy = model.energy(xg, y).sum()
        (grad,) = torch.autograd.grad(energy, xg)
        sgld_update_(x, grad, step_size, noise_std, rng, clamp)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, y: torch.Tensor | None,
                 storage: tuple[int, ...]) -> None:
        self.graph, self.x, self.y, self.storage = graph, x, y, storage


class GraphChain:
    """CUDA-graph SGLD chain; see the module docstring."""

    def __init__(self, device: torch.device, warmup_steps: int = 2) -> None:
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self.rng_state: torch.Tensor | None = None
        self.pool = None  # one memory pool shared by all captures of this chain
        self.graphs: dict[tuple, _Captured] = {}
        self.capture_s: dict[tuple, float] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_steps: int,
                 step_size: float, noise_std: float, clamp: bool = False,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (id(model), tuple(x.shape), None if y is None else (tuple(y.shape), y.dtype), int(n_steps),
               float(step_size), float(noise_std), bool(clamp), autocast_dtype, model.training)
        storage = _storage(model)
        cap = self.graphs.get(key)
        if cap is None or cap.storage != storage:
            cap = self.graphs[key] = self._capture(model, x, y, key, storage)
        cap.x.copy_(x)
        if cap.y is not None:
            cap.y.copy_(y)
        cap.graph.replay()
        return cap.x.clone()

    def _capture(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, key: tuple,
                 storage: tuple[int, ...]) -> _Captured:
        import time

        t0 = time.perf_counter()
        _, _, _, n_steps, step_size, noise_std, clamp, autocast_dtype, _ = key
        if self.rng_state is None:
            self.rng_state = new_device_rng(self.device)
        static_x = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        static_x.copy_(x)
        static_y = None if y is None else y.detach().to(self.device).clone(memory_format=torch.contiguous_format)
        # Warm-up on a side stream (cuBLAS/cuDNN handles, Triton JIT) with scratch state.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            _run_steps(model, static_x.clone(), static_y, self.warmup_steps, step_size, noise_std,
                       clamp, autocast_dtype, self.rng_state.clone())
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            _run_steps(model, static_x, static_y, n_steps, step_size, noise_std, clamp, autocast_dtype,
                       self.rng_state)
        self.capture_s[key] = dt = time.perf_counter() - t0
        say_once(("graph", key), f"jemfast: captured the {n_steps}-step SGLD chain for {list(x.shape)} "
                                 f"in a CUDA graph in {dt:.2f} s")
        return _Captured(graph, static_x, static_y, storage)

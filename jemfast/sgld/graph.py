"""The ``graph`` backend: the reference loop with the fused update, captured in one CUDA graph.

One capture per :func:`capture_key`: the model (identity and every submodule's train/eval mode), the batch shape
and layout (channels-last chains stay channels-last), whether labels are given, the :class:`ChainSpec`, the float settings that change which kernels
run (TF32 flags, float32 matmul precision, cuDNN benchmark/deterministic), and every parameter's
and buffer's dtype, shape and strides. Each capture holds static buffers: the chain state ``x``
(copied in before a replay, updated in place by the captured steps, cloned out after) and the
labels ``y``. Captures are kept in an LRU of ``max_graphs`` entries; :meth:`GraphChain.clear`
drops them all.

Inside the graph: under bf16 autocast, first bf16 copies of the conv and linear weights are made
(:func:`lowp_params`), once per replay, and every step evaluates the energy with them
(``functional_call``), instead of autocast re-casting every weight at every step; then the
``n_steps`` steps of :func:`jemfast.sgld.reference.sgld_chain` with the Triton update, whose
Philox offset lives in a device tensor that the replay itself advances (fresh noise each replay).

Parameters are read live: the graph reads their storage, so in-place optimizer updates (and
``load_state_dict``, which copies in place) are seen by the next replay. If a parameter's or
buffer's storage moves (``model.to(...)``, re-assigned ``.data``), the chain is captured again.
A replay does no host synchronisation; capture (first call per key) does, as CUDA requires.
All captures share one memory pool: only temporaries live in it (the static buffers are made
outside the captures), and captures never run concurrently, so any replay order is safe.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections import OrderedDict

import torch
from torch import nn

from ..process.log import get_logger, log_once
from .fused import KernelNoise, chain_layout, kernel_update
from .reference import sgld_chain
from .spec import ChainSpec

log = get_logger(__name__)
_LOWP_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)


def float_settings() -> tuple:
    """The process-wide float settings a capture freezes: TF32 flags, float32 matmul precision,
    reduced-precision reductions and cuDNN's algorithm choice."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (("matmul.allow_tf32", matmul.allow_tf32), ("cudnn.allow_tf32", cudnn.allow_tf32),
            ("float32_matmul_precision", torch.get_float32_matmul_precision()),
            ("matmul.fp32_precision", getattr(matmul, "fp32_precision", None)),
            ("cudnn.conv.fp32_precision", getattr(getattr(cudnn, "conv", None), "fp32_precision", None)),
            ("matmul.bf16_reduced", matmul.allow_bf16_reduced_precision_reduction),
            ("cudnn.benchmark", cudnn.benchmark), ("cudnn.deterministic", cudnn.deterministic))


def capture_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec) -> tuple:
    """What a captured chain depends on besides tensor values (pure; no CUDA needed)."""
    layout = tuple((t.dtype, tuple(t.shape), t.stride()) for t in itertools.chain(model.parameters(), model.buffers()))
    labels = None if y is None else (tuple(y.shape), y.dtype)
    modes = tuple(m.training for m in model.modules())  # a submodule may be in a mode of its own
    return (id(model), modes, tuple(x.shape), chain_layout(x), labels, spec, float_settings(), layout)


def lowp_params(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``dtype`` copies of the weights and biases of ``model``'s linear and conv layers (the
    tensors autocast casts on every use), by parameter name; parametrized layers are left out."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _LOWP_LAYERS) and not torch.nn.utils.parametrize.is_parametrized(module):
            for name, p in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = p.detach().to(dtype)
    return out


def _chain_in_place(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec,
                    rng_state: torch.Tensor) -> None:
    params = lowp_params(model, spec.autocast_dtype) if spec.autocast_dtype is not None else None
    # autocast's cast cache off: any cast left must be recorded in the graph, not cached beside it
    sgld_chain(model, x, y, spec, kernel_update(rng_state), params=params, cache=False)


def _storage(model: nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, y: torch.Tensor | None,
                 storage: tuple[int, ...]) -> None:
        self.graph, self.x, self.y, self.storage = graph, x, y, storage


class GraphChain(KernelNoise):
    """CUDA-graph SGLD chain; see the module docstring."""

    def __init__(self, device: torch.device, warmup_steps: int = 2, max_graphs: int = 8) -> None:
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.pool = None  # one memory pool shared by all captures of this chain
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()  # least recently used first
        self.capture_s: dict[tuple, float] = {}

    def clear(self) -> None:
        """Drop every captured graph (their memory returns to the pool)."""
        self.graphs.clear()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec) -> torch.Tensor:
        key, storage = capture_key(model, x, y, spec), _storage(model)
        cap = self.graphs.get(key)
        if cap is None or cap.storage != storage:
            cap = self.graphs[key] = self._capture(model, x, y, spec, key, storage)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        with torch.no_grad():
            cap.x.copy_(x)
            if cap.y is not None:
                cap.y.copy_(y)
        cap.graph.replay()
        return cap.x.clone()

    def _capture(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, spec: ChainSpec,
                 key: tuple, storage: tuple[int, ...]) -> _Captured:
        t0 = time.perf_counter()
        rng = self.rng(self.device)
        with torch.no_grad():
            static_x = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=chain_layout(x))
            static_x.copy_(x)
            static_y = None if y is None else y.detach().to(self.device).clone(memory_format=torch.contiguous_format)
        # Warm-up on a side stream (cuBLAS/cuDNN handles, Triton JIT) with scratch state.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm = dataclasses.replace(spec, n_steps=self.warmup_steps)
            _chain_in_place(model, static_x.clone(), static_y, warm, rng.clone())
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            _chain_in_place(model, static_x, static_y, spec, rng)
        self.capture_s[key] = dt = time.perf_counter() - t0
        log_once(log, ("graph", key), f"captured the {spec.n_steps}-step SGLD chain for {list(x.shape)} "
                                      f"in a CUDA graph in {dt:.2f} s")
        return _Captured(graph, static_x, static_y, storage)

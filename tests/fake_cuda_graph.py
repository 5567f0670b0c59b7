"""A CPU stand-in for ``torch.cuda.CUDAGraph`` with CUDA-graph semantics, for testing the graph
backend (jemfast/sgld/graph.py) without a GPU.

During capture every aten op and every (interpreted) Triton launch runs once and is recorded
with its argument and output tensors. ``replay()`` runs the recorded ops again in order on those
same tensors, copying each result into the output tensor recorded at capture: as on a GPU, a
replay reads and writes fixed memory (the static buffers, the parameters' storage, the kernel's
Philox state) and runs no Python code of the captured region. What a capture could not hold on a
GPU (a host read, a data-dependent shape) is not caught here: that is SyncRecorder's job.

``install(monkeypatch)`` replaces the ``torch.cuda`` names graph.py uses (CUDAGraph, graph,
graph_pool_handle, Stream, stream, current_stream) and returns the list of graphs created.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


class FakeCUDAGraph:
    created: list["FakeCUDAGraph"] | None = None  # set by install()

    def __init__(self) -> None:
        self.steps: list[tuple[str, Any, tuple, dict, Any]] = []
        self.replays = 0
        if FakeCUDAGraph.created is not None:
            FakeCUDAGraph.created.append(self)

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():  # a replay runs kernels, not autograd
            self._run()

    def _run(self) -> None:
        for kind, fn, args, kwargs, out in self.steps:
            if kind == "launch":
                with _disable_current_modes():
                    fn(*args, **kwargs)
                continue
            new = fn(*args, **kwargs)
            for old, fresh in zip(pytree.tree_leaves(out), pytree.tree_leaves(new)):
                if isinstance(old, torch.Tensor) and old is not fresh:
                    old.copy_(fresh)


class _Recording(TorchDispatchMode):
    def __init__(self, graph: FakeCUDAGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph.steps.append(("op", func, args, kwargs, out))
        return out


@contextlib.contextmanager
def _fake_graph(graph: FakeCUDAGraph, pool: Any = None, **_: Any) -> Iterator[None]:
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recorded_run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        graph.steps.append(("launch", lambda *a, **k: InterpretedFunction.run(fn, *a, **k), args, kwargs, None))
        with _disable_current_modes():
            return run(fn, *args, **kwargs)

    InterpretedFunction.run = recorded_run
    try:
        with _Recording(graph):
            yield
    finally:
        InterpretedFunction.run = run


class _FakeStream:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def wait_stream(self, _: Any) -> None:
        pass


def install(monkeypatch) -> list[FakeCUDAGraph]:
    """Patch ``torch.cuda``'s graph and stream API with the fakes; the list of graphs created."""
    created: list[FakeCUDAGraph] = []
    monkeypatch.setattr(FakeCUDAGraph, "created", created)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("fake-pool",))
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    return created

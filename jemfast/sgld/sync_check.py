"""Which ops of a region would synchronise with the host or break a CUDA-graph capture on a GPU.

:class:`SyncRecorder` is a ``TorchDispatchMode`` that runs every op as usual and records those
that on a CUDA device would read device memory on the host, copy between host and device, have
an output shape that depends on tensor values, or draw random numbers from a generator a capture
does not register. It works on any device, the CPU included, which is what makes it useful: the
CPU counterpart of ``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu.py) for the code
that the ``graph`` backend captures and for a training iteration between divergence checks.

Recorded (``SyncEvent.kind``):

- ``read``: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) and
  ``aten.equal``; ``Tensor.tolist()`` / ``.numpy()`` / ``.cpu()`` (these three are watched at the
  Python level: on a CPU tensor they dispatch no op);
- ``shape``: ops whose output shape depends on values: ``nonzero``, ``masked_select``, the
  ``unique`` family, ``bincount``, ``repeat_interleave`` without ``output_size``, and indexing
  with a boolean mask (``x[mask]``, ``x[mask] = v``);
- ``copy``: a host<->device copy: a copy between tensors on different devices, or between a
  tensor meant to live on the host (see below) and one meant for the device; ``torch.tensor(...)``
  / ``torch.as_tensor`` of Python data (``aten.lift_fresh``) is a host-to-device copy on a GPU;
- ``rng``: a random op given an explicit ``generator=`` (a capture registers only the device's
  default generator, unless told otherwise).

Host tensors: on a GPU some tensors are meant to stay on the host (e.g. Adam's ``step``
counters when not ``capturable``: reading them is no device sync). Pass them as
``host_tensors``; what is computed from host tensors alone is a host tensor too.

Triton kernels run under the CPU interpreter count as one launch each (``launches``): the
interpreter's own copies are how it emulates a launch, not ops of the region.
"""
from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

_READS = {aten._local_scalar_dense.default: ".item() / float() / bool() of a tensor",
          aten.equal.default: "torch.equal (returns a Python bool)"}
_SHAPES = {aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
           aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
           aten.bincount.default, aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_PY_READS = ("tolist", "numpy", "cpu")


@dataclass(frozen=True)
class SyncEvent:
    """One recorded op: ``kind`` (read | shape | copy | rng), the op's name, why it is recorded,
    and where (the innermost frame of the checkout's own code that called it, as its path in the
    checkout and line: ``jemfast/stability/monitor.py:146``)."""

    kind: str
    op: str
    why: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} ({self.why}) at {self.where}"


_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # the checkout: jemfast/, kernels/, tests/


def _caller() -> str:
    """``path/in/checkout.py:line`` of the innermost frame in the project's own code (not an
    installed package: a venv's path may contain "jemfast" too, or lie inside the checkout)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if name.startswith(_SOURCE_ROOT + os.sep) and "site-packages" not in name and not name.endswith("sync_check.py"):
            return f"{os.path.relpath(name, _SOURCE_ROOT)}:{frame.lineno}"
    return "?"


class SyncRecorder(TorchDispatchMode):
    """Records the ops of the module docstring into ``events``; ``launches`` counts interpreted
    Triton launches by kernel name. Use as a context manager around the region."""

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []
        self.launches: Counter[str] = Counter()
        self.ops = 0  # aten ops seen (to tell an empty region from a clean one)
        self._host: dict[int, weakref.ref] = {}  # id -> tensor (ids, not a WeakSet: no Tensor.__eq__)
        for t in host_tensors:
            self._mark_host(t)
        self._stack = contextlib.ExitStack()
        self._paused = False  # inside an interpreted Triton launch

    # ---- bookkeeping --------------------------------------------------------------------------
    def _mark_host(self, t: torch.Tensor) -> None:
        self._host[id(t)] = weakref.ref(t)

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _record(self, kind: str, op: str, why: str) -> None:
        self.events.append(SyncEvent(kind, op, why, _caller()))

    def kinds(self) -> Counter[str]:
        """How many events of each kind."""
        return Counter(e.kind for e in self.events)

    # ---- the mode -----------------------------------------------------------------------------
    def __enter__(self) -> "SyncRecorder":
        self._stack.__enter__()
        for name in _PY_READS:
            self._stack.enter_context(self._watch_method(name))
        self._stack.enter_context(self._interpreted_launches())
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stack.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [self._is_host(t) for t in tensors]
        all_host = bool(tensors) and all(host)
        name = str(func.overloadpacket.__name__)
        if func in _READS and not all_host:
            self._record("read", name, _READS[func])
        elif func in _SHAPES and kwargs.get("output_size") is None:  # repeat_interleave given it: static
            self._record("shape", name, "output shape depends on tensor values")
        elif func in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                       for i in pytree.tree_leaves(args[1:2])):
            self._record("shape", name, "indexing with a boolean mask")
        elif func in _FROM_HOST:
            self._record("copy", name, "tensor made from host data (a host-to-device copy on a GPU)")
        elif func in _COPIES and self._crosses(func, args, kwargs, tensors, host):
            self._record("copy", name, "host<->device copy")
        elif kwargs.get("generator") is not None and torch.Tag.nondeterministic_seeded in func.tags:
            self._record("rng", name, "random numbers from an explicit generator, not the device default")
        out = func(*args, **kwargs)
        if all_host:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
        return out

    @staticmethod
    def _crosses(func, args, kwargs, tensors, host) -> bool:
        devices = {t.device for t in tensors}
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            devices.add(torch.device(kwargs["device"]))
        return len(devices) > 1 or (len(tensors) > 1 and any(host) and not all(host))

    # ---- Python-level reads and interpreted kernels -------------------------------------------
    @contextlib.contextmanager
    def _watch_method(self, name: str) -> Iterator[None]:
        own = torch.Tensor.__dict__.get(name)  # None: inherited from torch._C.TensorBase
        original, recorder = getattr(torch.Tensor, name), self

        def watched(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not recorder._paused and not recorder._is_host(t):
                recorder._record("read", name, f"Tensor.{name}() copies to the host")
            return original(t, *args, **kwargs)

        setattr(torch.Tensor, name, watched)
        try:
            yield
        finally:
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)

    @contextlib.contextmanager
    def _interpreted_launches(self) -> Iterator[None]:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:
            yield
            return
        original, recorder = InterpretedFunction.run, self

        def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            recorder.launches[fn.__name__] += 1
            recorder._paused = True
            try:
                with _disable_current_modes():
                    return original(fn, *args, **kwargs)
            finally:
                recorder._paused = False

        InterpretedFunction.run = run
        try:
            yield
        finally:
            InterpretedFunction.run = original


def assert_sync_free(recorder: SyncRecorder, allowed: Counter[str] | None = None) -> None:
    """Raise ``AssertionError`` listing the events unless they are exactly ``allowed`` (op name ->
    count; default none)."""
    got = Counter(e.op for e in recorder.events)
    if got != (allowed or Counter()):
        raise AssertionError("ops that would sync with the host or break a CUDA-graph capture "
                             f"(expected {dict(allowed or {})}):\n  " + "\n  ".join(map(str, recorder.events)))

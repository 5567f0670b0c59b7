"""Choosing an SGLD backend: can it run here (:func:`unavailable`), what ``auto`` stands for
(:func:`resolve_backend`, rules in :mod:`.auto_rule`), and the chain function (:func:`make_chain`).

Every chain has the signature ``chain(model, x, y, spec) -> x`` (a new fp32 ``Tensor[B, *shape]``):

- ``reference``: :func:`.reference.reference_chain`, plain PyTorch, the ground truth.
- ``fused``: the same loop with the Triton update :func:`jemfast.kernels.sgld_update_`
  (:mod:`.fused`). CUDA, or the CPU under ``TRITON_INTERPRET=1`` (tests only).
- ``graph``: the same loop with the fused update, captured in a CUDA graph and replayed
  (:mod:`.graph`). CUDA with Triton only.
- ``compile``: one step compiled by ``torch.compile`` (:mod:`.compiled`). CPU (needs a C++
  compiler) or CUDA.

Every backend leaves parameters' ``.grad`` and ``requires_grad`` untouched (only the input
gradient is computed), reads parameters live (optimizer updates are seen by the next call) and
does not synchronise with the host. The caller (``SGLD.run``) sets the sampling mode (eval by
default) and grad mode.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable

import torch

from ..process.errors import UserError
from ..process.log import get_logger, log_once
from .auto_rule import pick, size_class
from .reference import reference_chain

log = get_logger(__name__)
NAMES = ("reference", "fused", "graph", "compile")
FALLBACK = {"graph": "compile", "compile": "reference", "fused": "reference"}  # when auto's pick cannot run

# chain(model, x, y, spec) -> x
ChainFn = Callable[..., torch.Tensor]


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


def resolve_backend(backend: str, device: torch.device | str, n_params: int | None = None,
                    precision: str = "fp32") -> tuple[str, str]:
    """``(name, reason)``: the backend ``backend`` stands for on ``device``.

    A named backend stands for itself. ``auto`` takes the first rule of
    :data:`.auto_rule.RULES` for the device type, the model's parameter count ``n_params`` and
    ``precision`` (no benchmarking at resolution time); if that backend cannot run here, it falls
    back along :data:`FALLBACK` (graph -> compile -> reference). ``fused`` on the CPU exists only
    for tests (the Triton interpreter) and is never chosen by ``auto``.
    """
    device = torch.device(device)
    if backend != "auto":
        return backend, "requested"
    rule = pick(device.type, n_params, precision)
    name, reason = rule.backend, f"rule {rule.name()}: {rule.evidence}"
    while (why_not := unavailable(name, device)) is not None:
        name, reason = FALLBACK[name], f"{reason}; {name} unavailable: {why_not}"
    return name, reason


def make_chain(backend: str, device: torch.device | str, n_params: int | None = None,
               precision: str = "fp32") -> tuple[ChainFn, str]:
    """The chain function of ``backend`` on ``device`` and the resolved backend name.

    ``auto`` is resolved by :func:`resolve_backend` and the choice and its reason are logged
    once per (device type, workload class, choice). An explicitly requested backend that cannot
    run here raises :class:`UserError`.
    """
    device = torch.device(device)
    name, reason = resolve_backend(backend, device, n_params, precision)
    if backend == "auto":
        log_once(log, ("auto", device.type, size_class(n_params), precision, name),
                 f"SGLD backend auto -> {name} on {device.type} ({reason})")
    why_not = unavailable(name, device)
    if why_not is not None:
        raise UserError(f"--backend {name}: {why_not}")
    if name == "reference":
        return reference_chain, name
    if name == "fused":
        from .fused import FusedChain

        return FusedChain(), name
    if name == "graph":
        from .graph import GraphChain

        return GraphChain(device), name
    from .compiled import CompiledChain

    return CompiledChain(device), name

"""Triton kernels of jemfast (imported as ``jemfast.kernels``).

Each module holds one op: the ``@triton.jit`` kernel, its launcher and the pure-PyTorch
reference it must match.

- :mod:`.sgld`   -- ``sgld_update_``: fused in-place SGLD step with in-kernel Philox noise.
- :mod:`.buffer` -- ``gather_reinit``: replay-buffer gather + U(-1, 1) re-init in one kernel.

Random numbers come from a device tensor ``rng_state = (seed, offset)`` made by
:func:`new_rng_state`; :mod:`._common` explains how it works with CUDA graphs and checkpoints.
Triton is optional: check :func:`triton_available` before calling a launcher; on the CPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first
``import triton`` of the process; see :mod:`._common`).
"""
from ._common import HAS_TRITON, interpret_mode, new_rng_state, triton_available
from .buffer import gather_reinit, gather_reinit_reference
from .sgld import sgld_update_, sgld_update_reference

__all__ = [
    "HAS_TRITON", "interpret_mode", "triton_available", "new_rng_state",
    "sgld_update_", "sgld_update_reference",
    "gather_reinit", "gather_reinit_reference",
]

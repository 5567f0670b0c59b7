"""Triton kernels of jemfast (imported as ``jemfast.kernels``).

Each module holds one op: the ``@triton.jit`` kernel, its launcher and the pure-PyTorch
reference it must match.

- :mod:`.sgld`   -- ``sgld_update_``: fused in-place SGLD step with in-kernel Philox noise.
- :mod:`.buffer` -- ``gather_reinit``: replay-buffer gather + U(-1, 1) re-init in one kernel;
  ``scatter_rows_``: write-back (``index_copy_``).

Random numbers come from a device tensor ``rng_state = (seed, offset)`` (:func:`new_rng_state`)
that the launchers advance on the device, so CUDA-graph replays draw fresh noise. Triton is
optional: check :func:`triton_available` before calling a launcher; on the CPU the kernels run
only under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before the first
``import triton`` of the process (``import torchvision`` imports it too).
"""
from ._common import HAS_TRITON, interpret_mode, new_rng_state, triton_available
from .buffer import gather_reinit, gather_reinit_reference, scatter_rows_
from .sgld import sgld_update_, sgld_update_reference

__all__ = [
    "HAS_TRITON", "interpret_mode", "triton_available", "new_rng_state",
    "sgld_update_", "sgld_update_reference",
    "gather_reinit", "gather_reinit_reference", "scatter_rows_",
]

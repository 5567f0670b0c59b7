"""Replay-buffer gather with in-kernel re-initialisation.

``gather_reinit`` is one Triton kernel: program ``(r, c)`` copies columns ``[c*BLOCK, (c+1)*BLOCK)``
of buffer row ``idx[r]`` into output row ``r`` as fp32, or, where ``reinit[r]`` is set, writes
U(-1, 1) noise drawn in the kernel with Philox (``tl.rand``) instead and skips the read. It
replaces ``buffer[idx]`` + ``torch.rand`` + ``torch.where`` (three full-size passes and a
temporary) with one read and one write, and never leaves the device.

Noise: element ``(r, j)`` of the ``[B, D]``-flattened output gets the Philox counter
``offset + r * D + j`` of ``rng_state``, and the offset then advances by ``B * D`` on the device
whether or not any row was re-initialised (the mask is never read on the host); see
:mod:`jemfast.kernels._common` for what this gives CUDA graphs and saved states.

The write-back needs no kernel of ours: ``buffer.index_copy_(0, idx, x)`` is already one fused,
sync-free, graph-capturable device kernel. :func:`gather_reinit_reference` is the plain PyTorch
definition the kernel must match.
"""
import math

import torch
from torch import Tensor

from ._common import TRITON_TYPES, HAS_TRITON, LaunchSpec, check_rng_state, require_triton, tl, triton

__all__ = ["gather_reinit", "gather_reinit_reference", "launch_specs"]

BLOCK_SIZE = 1024  # columns per program (one 3x32x32 image is 3 programs)
NUM_WARPS = 8  # 4 columns per thread: <= 32 registers (56 at 4 warps on sm_90), see kernels/sgld.py
MAX_REGISTERS = 40  # budget checked by tests/test_kernel_compile.py
MAX_STACK = 0
_BUFFER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if HAS_TRITON:

    @triton.jit
    def _gather_reinit_kernel(buf_ptr, idx_ptr, reinit_ptr, out_ptr, rng_ptr, row_size,
                              BLOCK: tl.constexpr):
        """out[r, j] = U(-1, 1) at counter offset + r*D + j if reinit[r] else buf[idx[r], j]."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_size
        src_row = tl.load(idx_ptr + row)
        keep = tl.load(reinit_ptr + row) == 0
        kept = tl.load(buf_ptr + src_row * row_size + cols, mask=mask & keep).to(tl.float32)
        seed = tl.load(rng_ptr)
        base = tl.load(rng_ptr + 1)
        noise = tl.rand(seed, base + row * row_size + cols) * 2.0 - 1.0
        tl.store(out_ptr + row * row_size + cols, tl.where(keep, kept, noise), mask=mask)


def _row_shape_check(buffer: Tensor, idx: Tensor, op: str) -> None:
    if not isinstance(buffer, Tensor) or not isinstance(idx, Tensor):
        raise ValueError(f"{op}: buffer and idx must be tensors")
    if buffer.dim() < 1:
        raise ValueError(f"{op}: buffer must have shape [N, *shape], got a 0-d tensor")
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: idx must be a 1-d int64 tensor [B], got {idx.dtype} {tuple(idx.shape)}")
    if idx.device != buffer.device:
        raise ValueError(f"{op}: idx is on {idx.device}, buffer on {buffer.device}")


def gather_reinit(buffer: Tensor, idx: Tensor, reinit: Tensor, rng_state: Tensor,
                  out: Tensor | None = None) -> Tensor:
    """Gather chains ``buffer[idx]`` as fp32, replacing rows with ``reinit`` set by U(-1, 1) noise.

    Args:
        buffer: ``[N, *shape]``, fp32/bf16/fp16, contiguous -- the replay buffer (values in
            [-1, 1] for images).
        idx: ``[B]`` int64 (int32 accepted) row indices, ``0 <= idx < N`` (not checked: that
            would need a host sync; negative indices are not supported). Duplicates are fine.
        reinit: ``[B]`` bool -- rows to re-initialise instead of reading.
        rng_state: int64 ``[2] = (seed, offset)`` on the buffer's device; its offset advances
            by ``B * prod(shape)`` on the device (see the module docstring).
        out: optional preallocated contiguous fp32 ``[B, *shape]`` tensor to write into (e.g.
            a static CUDA-graph input).

    Returns:
        ``[B, *shape]`` fp32: ``buffer[idx[r]]`` for rows without ``reinit``, values uniform in
        [-1, 1) for rows with it.

    Raises:
        ValueError: non-contiguous or non-float buffer, malformed idx/reinit/rng_state/out, or
            mismatched devices.
        RuntimeError: Triton cannot run on the buffer's device (see ``triton_available``).
    """
    op = "gather_reinit"
    _row_shape_check(buffer, idx, op)
    if buffer.dtype not in _BUFFER_DTYPES:
        raise ValueError(f"{op}: buffer must be float32, bfloat16 or float16, got {buffer.dtype}")
    if not buffer.is_contiguous():
        raise ValueError(f"{op}: buffer must be contiguous, got strides {buffer.stride()}")
    if (not isinstance(reinit, Tensor) or reinit.dtype != torch.bool
            or tuple(reinit.shape) != tuple(idx.shape)):
        raise ValueError(f"{op}: reinit must be a bool tensor of shape {tuple(idx.shape)}, got "
                         f"{getattr(reinit, 'dtype', type(reinit))} {tuple(getattr(reinit, 'shape', ()))}")
    if reinit.device != buffer.device:
        raise ValueError(f"{op}: reinit is on {reinit.device}, buffer on {buffer.device}")
    check_rng_state(rng_state, buffer.device, op)
    require_triton(buffer.device, op)
    batch, row_shape = idx.shape[0], tuple(buffer.shape[1:])
    row_size = math.prod(row_shape)
    if out is None:
        out = torch.empty((batch, *row_shape), dtype=torch.float32, device=buffer.device)
    elif (out.dtype != torch.float32 or tuple(out.shape) != (batch, *row_shape)
          or not out.is_contiguous() or out.device != buffer.device):
        raise ValueError(f"{op}: out must be a contiguous float32 tensor of shape "
                         f"{(batch, *row_shape)} on {buffer.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if batch == 0 or row_size == 0:
        return out
    idx = idx.to(torch.int64).contiguous()
    flags = reinit.contiguous().view(torch.uint8)  # bool -> bytes: a plain int8 load in the kernel
    grid = (batch, triton.cdiv(row_size, BLOCK_SIZE))
    _gather_reinit_kernel[grid](buffer, idx, flags, out, rng_state, row_size, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    rng_state[1:].add_(batch * row_size)
    return out


def launch_specs() -> list[LaunchSpec]:
    """Every specialisation :func:`gather_reinit` launches (buffer dtype x whether the row size
    is a multiple of 16), for the ahead-of-time compile check (:mod:`.aot`)."""
    specs = []
    for dtype in _BUFFER_DTYPES:
        for row16 in (False, True):
            sig = (("buf_ptr", "*" + TRITON_TYPES[dtype]), ("idx_ptr", "*i64"), ("reinit_ptr", "*u8"),
                   ("out_ptr", "*fp32"), ("rng_ptr", "*i64"), ("row_size", "i32"))
            div = ("buf_ptr", "idx_ptr", "reinit_ptr", "out_ptr", "rng_ptr") + (("row_size",) if row16 else ())
            specs.append(LaunchSpec(__name__, "_gather_reinit_kernel", sig, (("BLOCK", BLOCK_SIZE),), div, NUM_WARPS))
    return specs


def gather_reinit_reference(buffer: Tensor, idx: Tensor, reinit: Tensor,
                            uniform: Tensor | None = None) -> Tensor:
    """Plain PyTorch gather + re-init: ``where(reinit, uniform, buffer[idx].float())``.

    Args:
        buffer: ``[N, *shape]`` float; idx: ``[B]`` int64; reinit: ``[B]`` bool.
        uniform: fp32 ``[B, *shape]`` values in [-1, 1) for the re-initialised rows; ``None``
            draws them with ``torch.rand(...) * 2 - 1`` from torch's generator for the buffer's
            device (so the reference is usable on its own, e.g. as the CPU path).

    Returns:
        A new ``[B, *shape]`` fp32 tensor.
    """
    kept = buffer[idx].float()
    if uniform is None:
        uniform = torch.rand(kept.shape, device=kept.device) * 2 - 1
    mask = reinit.view(-1, *([1] * (kept.dim() - 1)))
    return torch.where(mask, uniform.float(), kept)

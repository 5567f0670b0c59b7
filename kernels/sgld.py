"""Fused SGLD update, in place: ``x <- x - step_size * grad + noise_std * N(0, I)``, optionally
with ``grad`` clipped elementwise to [-grad_clip, grad_clip] first and the result clamped to [-1, 1].

One elementwise Triton kernel reads ``x`` (fp32) and ``grad`` (fp32 or bf16), draws the Gaussian
noise itself with Philox (``tl.randn``) and writes ``x`` back: one read of each input and one
write, instead of the four passes of ``torch.randn`` + ``add_`` + ``add_`` + ``clamp_``.

Noise: element ``i`` (in memory order) gets the Philox counter ``offset + i`` of ``rng_state``, and the
offset then advances by ``x.numel()`` on the device (see :mod:`jemfast.kernels._common` for why
this makes CUDA-graph replays draw fresh noise and saved states reproducible). The clamp keeps
NaN as NaN, so a diverging chain stays visible to the divergence monitor.

:func:`sgld_update_reference` is the plain PyTorch definition that the kernel must match.
"""
import itertools

import torch
from torch import Tensor

from ._common import TRITON_TYPES, HAS_TRITON, LaunchSpec, check_rng_state, require_triton, tl, triton

__all__ = ["sgld_update_", "sgld_update_reference", "launch_specs"]

BLOCK_SIZE = 1024  # elements per program
# 8 warps: 4 elements per thread (16-byte fp32 loads), <= 32 registers on sm_80/90/100 and full
# occupancy; at 4 warps (8 per thread) it took 40-48 (tests/test_kernel_compile.py, bench/RESULTS.md)
NUM_WARPS = 8
MAX_REGISTERS = 40  # budget checked by tests/test_kernel_compile.py for every specialisation
# stack frame allowed: the 32 bytes are the never-taken Payne-Hanek path of tl.randn's precise cosf
# (its argument is in [0, 2pi)); reserving them costs no memory traffic
MAX_STACK = 32
_GRAD_DTYPES = (torch.float32, torch.bfloat16)

if HAS_TRITON:

    @triton.jit
    def _sgld_kernel(x_ptr, grad_ptr, rng_ptr, n_elements, step_size, noise_std, grad_clip,
                     HAS_NOISE: tl.constexpr, CLAMP: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
        """x[i] <- x[i] - step_size * grad[i] + noise_std * randn(seed, offset + i) for i < n."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if CLIP:  # as torch.clamp: NaN stays NaN
            g = tl.where(g != g, g, tl.minimum(tl.maximum(g, -grad_clip), grad_clip))
        x = x - step_size * g
        if HAS_NOISE:
            seed = tl.load(rng_ptr)
            base = tl.load(rng_ptr + 1)
            x = x + noise_std * tl.randn(seed, base + offs)
        if CLAMP:  # tl.minimum/maximum would turn NaN into -1: keep it NaN
            x = tl.where(x != x, x, tl.minimum(tl.maximum(x, -1.0), 1.0))
        tl.store(x_ptr + offs, x, mask=mask)


def sgld_update_(x: Tensor, grad: Tensor, step_size: float, noise_std: float, rng_state: Tensor,
                 clamp: bool = False, grad_clip: float | None = None) -> Tensor:
    """One SGLD step on the chain state ``x``, in place, with noise drawn in the kernel.

    Args:
        x: fp32, any shape ``[*]``, contiguous or (4-D) channels-last -- the chain state (e.g.
            images in [-1, 1]), overwritten with the result.
        grad: fp32 or bf16, same shape and device as ``x`` -- ``dE/dx``; copied to ``x``'s
            memory layout first if it has another one (the kernel walks both in memory order).
        step_size: ``alpha``, in units of ``x`` per unit of gradient (JEM: 1.0).
        noise_std: ``sigma``, standard deviation of the added Gaussian noise, in units of
            ``x`` (JEM: 0.01). ``0`` skips the Philox work (the offset still advances).
        rng_state: int64 ``[2] = (seed, offset)`` on ``x``'s device; its offset is advanced
            by ``x.numel()`` on the device (see the module docstring).
        clamp: clamp the result to [-1, 1] (NaN stays NaN).
        grad_clip: if not None, ``grad`` is clamped elementwise to [-grad_clip, grad_clip]
            (units of ``grad``; NaN stays NaN) before the step.

    Returns:
        ``x`` itself.

    Raises:
        ValueError: ``x`` not fp32 or neither contiguous nor channels-last; ``grad`` of another shape, device or an
            unsupported dtype; malformed ``rng_state``; ``grad_clip`` not positive.
        RuntimeError: Triton cannot run on ``x``'s device (see ``triton_available``).

    Never synchronises with the host, so it can be captured in a CUDA graph.
    """
    op = "sgld_update_"
    if not isinstance(x, Tensor) or not isinstance(grad, Tensor):
        raise ValueError(f"{op}: x and grad must be tensors")
    if x.dtype != torch.float32:
        raise ValueError(f"{op}: x must be float32 (the fp32 chain state), got {x.dtype}")
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not (x.is_contiguous() or channels_last):
        raise ValueError(f"{op}: x must be contiguous or channels-last (it is updated in place); "
                         "pass x.contiguous() and use the returned tensor")
    if grad.shape != x.shape:
        raise ValueError(f"{op}: grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    if grad.device != x.device:
        raise ValueError(f"{op}: grad is on {grad.device}, x on {x.device}")
    if grad.dtype not in _GRAD_DTYPES:
        raise ValueError(f"{op}: grad must be float32 or bfloat16, got {grad.dtype}")
    if grad_clip is not None and not 0 < float(grad_clip) < float("inf"):
        raise ValueError(f"{op}: grad_clip must be a positive finite number or None, got {grad_clip!r}")
    check_rng_state(rng_state, x.device, op)
    require_triton(x.device, "sgld_update")
    n = x.numel()
    if n == 0:
        return x
    grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    step_size, noise_std = float(step_size), float(noise_std)
    clip = 0.0 if grad_clip is None else float(grad_clip)
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _sgld_kernel[grid](x, grad, rng_state, n, step_size, noise_std, clip,
                       **_constexprs(noise_std != 0.0, bool(clamp), grad_clip is not None), num_warps=NUM_WARPS)
    rng_state[1:].add_(n)
    return x


def _constexprs(noise: bool, clamp: bool, clip: bool) -> dict:
    return {"HAS_NOISE": noise, "CLAMP": clamp, "CLIP": clip, "BLOCK": BLOCK_SIZE}


def launch_specs() -> list[LaunchSpec]:
    """Every specialisation :func:`sgld_update_` launches (grad dtype x noise x clamp x clip x
    whether ``n`` is a multiple of 16), for the ahead-of-time compile check (:mod:`.aot`)."""
    specs = []
    for gdt, noise, clamp, clip, n16 in itertools.product(_GRAD_DTYPES, *[(False, True)] * 4):
        sig = (("x_ptr", "*fp32"), ("grad_ptr", "*" + TRITON_TYPES[gdt]), ("rng_ptr", "*i64"), ("n_elements", "i32"),
               ("step_size", "fp32"), ("noise_std", "fp32"), ("grad_clip", "fp32"))
        div = ("x_ptr", "grad_ptr", "rng_ptr") + (("n_elements",) if n16 else ())
        specs.append(LaunchSpec(__name__, "_sgld_kernel", sig, tuple(_constexprs(noise, clamp, clip).items()),
                                div, NUM_WARPS))
    return specs


def sgld_update_reference(x: Tensor, grad: Tensor, step_size: float, noise_std: float,
                          noise: Tensor | None = None, clamp: bool = False,
                          grad_clip: float | None = None) -> Tensor:
    """Plain PyTorch SGLD step, out of place: ``x - step_size * grad + noise_std * noise``.

    Args:
        x: fp32 chain state, any shape.
        grad: fp32 or bf16 ``dE/dx``, same shape (computed in fp32).
        step_size, noise_std: as in :func:`sgld_update_`.
        noise: standard-normal fp32 tensor of ``x``'s shape to scale by ``noise_std``;
            ``None`` means zeros (no noise).
        clamp: clamp the result to [-1, 1] (``Tensor.clamp`` keeps NaN as NaN).
        grad_clip: as in :func:`sgld_update_`.

    Returns:
        A new fp32 tensor of ``x``'s shape.
    """
    grad = grad.float() if grad_clip is None else grad.float().clamp(-grad_clip, grad_clip)
    out = x.float() - step_size * grad
    if noise is not None:
        out = out + noise_std * noise.float()
    if clamp:
        out = out.clamp(-1.0, 1.0)
    return out

"""Shared helpers of ``jemfast.kernels``: is Triton usable here, and the device-side RNG state.

Triton is optional. Without it this package still imports and its pure-PyTorch references work;
the launchers raise ``RuntimeError`` and :func:`triton_available` returns ``False``.

CPU runs use Triton's interpreter, which is chosen by ``TRITON_INTERPRET=1``. That variable must
be in the environment **before the first** ``import triton`` in the process: Triton's own
library functions (``tl.randn``, ``tl.rand``, ...) are decorated once, when ``triton`` is
imported, and a kernel run by the interpreter cannot call library functions compiled for the
GPU ("Cannot call @triton.jit'd outside of the scope of a kernel"). Beware that
``import torchvision`` (through ``torch._dynamo``) imports ``triton``. :func:`interpret_mode`
therefore looks at what Triton actually did, not at the variable.

RNG state and CUDA graphs (the one place this is explained; the kernel modules refer here).
``rng_state`` is an int64 tensor ``[2] = (seed, offset)`` on the kernels' device, made by
:func:`new_rng_state`. A kernel loads both entries from device memory and gives element ``i`` of
its launch (flat, row-major) the Philox counter ``offset + i``; the launcher then advances the
offset by the number of counters the launch used, with a device-side ``rng_state[1:].add_(n)``,
whether or not the values were needed. Nothing is passed as a Python int, so:

- a launch captured in a CUDA graph reads the *current* offset on every replay and replays the
  add, so every replay draws fresh noise, with no host synchronisation;
- counters never overlap between launches: two launches over ``n`` elements draw exactly what
  one launch over ``2n`` would;
- restarting from a saved copy of ``rng_state`` reproduces the noise bit for bit (load it with
  ``copy_`` where a captured graph holds the tensor's address).
"""
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

try:  # Triton is optional: no wheel on some platforms, and the references need only torch.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpret_mode", "triton_available", "new_rng_state",
           "check_rng_state", "require_triton", "LaunchSpec", "launch_spec", "TRITON_TYPES"]

# torch dtype -> Triton's name of it in a kernel signature (pointers get a leading '*')
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}


@dataclass(frozen=True)
class LaunchSpec:
    """One specialisation of a Triton kernel as a launcher launches it: what Triton compiles a
    separate binary for. ``signature``: (argument name, Triton type) of the runtime arguments in
    order (``*fp32`` a pointer to fp32, ``i32``, ``fp32``); ``constexprs``: (name, value);
    ``divisible``: the arguments Triton specialises as multiples of 16 (pointers: 16-byte
    aligned; integers: ``% 16 == 0``); ``num_warps``: the launch's warps per program.
    ``kernel`` names the ``@triton.jit`` function in ``module`` (e.g. ``jemfast.kernels.sgld``).
    """

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]
    num_warps: int

    def label(self) -> str:
        """A short name: kernel, non-pointer types of pointers, constexprs, divisibility."""
        ptrs = ",".join(t[1:] for _, t in self.signature if t.startswith("*"))
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        ints = [n for n, t in self.signature if t[0] in "iu" and n in self.divisible]
        return f"{self.kernel}[{ptrs}; {flags}; w{self.num_warps}{'; ' + ','.join(ints) + '%16' if ints else ''}]"


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _divisible(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def launch_spec(kernel: Any, args: Sequence[Any], constexprs: dict[str, Any], num_warps: int) -> LaunchSpec:
    """The :class:`LaunchSpec` of launching ``kernel[grid](*args, **constexprs, num_warps=...)``
    with these runtime ``args`` (tensors, ints, floats), as Triton's launcher specialises it."""
    names = kernel.arg_names[:len(args)]
    return LaunchSpec(kernel.fn.__module__, kernel.fn.__name__, tuple(zip(names, map(_arg_type, args))),
                      tuple(constexprs.items()), tuple(n for n, a in zip(names, args) if _divisible(a)), num_warps)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    That is the case only if ``TRITON_INTERPRET=1`` was set when ``triton`` was first imported
    (see the module docstring); setting it later yields a half-interpreted state that cannot
    run ``tl.randn``/``tl.rand``, and this function reports ``False`` for it.
    """
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older/newer Triton layout
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(tl.randn, InterpretedFunction)


def triton_available(device: torch.device | str) -> bool:
    """Can the Triton kernels of this package run on ``device``?

    True if ``triton`` imports and either ``device`` is a CUDA device (and CUDA is available),
    or ``device`` is the CPU and Triton is in interpreter mode (``TRITON_INTERPRET=1`` set
    before ``import triton``). Never synchronises with a device.
    """
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return interpret_mode()
    return False


def require_triton(device: torch.device, op: str) -> None:
    """Raise a ``RuntimeError`` naming ``op`` if :func:`triton_available` is false for ``device``."""
    if not triton_available(device):
        why = ("triton is not installed" if not HAS_TRITON else
               f"device {device} needs CUDA, or TRITON_INTERPRET=1 set before `import triton` "
               "for the CPU interpreter")
        raise RuntimeError(f"{op}: Triton kernel unavailable ({why}); use {op}_reference instead")


def new_rng_state(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh kernel RNG state: int64 tensor ``[2] = (seed, 0)`` on ``device``.

    ``seed`` keys the Philox generator (``0 <= seed < 2**63``). ``None`` draws the seed from
    torch's generator for ``device`` on the device itself (no host sync; follows
    ``torch.manual_seed``). The second entry is the counter offset that every launch advances
    on the device. Save the tensor in checkpoints to resume the noise stream exactly; to load a
    saved state into a state a CUDA graph captured, ``copy_`` it in place.
    """
    if seed is None:
        drawn = torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
        return torch.cat([drawn, torch.zeros_like(drawn)])
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: must be in [0, 2**63), got {seed}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def check_rng_state(rng_state: torch.Tensor, device: torch.device, op: str) -> None:
    """Raise ``ValueError`` unless ``rng_state`` is a contiguous int64 ``[2]`` tensor on ``device``."""
    if not isinstance(rng_state, torch.Tensor):
        raise ValueError(f"{op}: rng_state must be a tensor (see new_rng_state), got {type(rng_state)}")
    if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,) or not rng_state.is_contiguous():
        raise ValueError(f"{op}: rng_state must be a contiguous int64 tensor of shape [2] = (seed, offset), "
                         f"got {rng_state.dtype} {tuple(rng_state.shape)}")
    if rng_state.device != device:
        raise ValueError(f"{op}: rng_state is on {rng_state.device}, expected {device} "
                         "(the device of the data)")

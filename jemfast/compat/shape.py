"""The image shape of an original-style script's chains, which its ``args`` do not hold.

The original code keeps ``n_ch`` and ``im_sz`` as module constants (``n_ch = 3; im_sz = 32`` at
the top of ``train_wrn_ebm.py``), read by its ``init_random``. jemfast.compat learns the shape
``(C, H, W)`` of one image from, in this order of authority:

1. the replay buffer: a tensor ``[N, C, H, W]`` (N may be 0) says it at every call;
2. what the caller declared: ``shape=(C, H, W)``, or ``args.n_ch`` and ``args.im_sz`` (both; they
   must agree with ``shape`` when both are given) -- checked against the buffer, not overridden;
3. the caller's own ``init_fn(args, bs)`` (e.g. the script's ``init_random``): its rows' shape.

Only the original's empty list ``[]`` says nothing; with none of 2-3 that is a one-line
ValueError naming what to pass, raised before any random number is drawn. Any disagreement
between sources is a one-line ValueError too.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Sequence

import torch

Shape = tuple[int, ...]
HOW_TO_SAY = ("pass shape=(n_ch, im_sz, im_sz) to jemfast.compat.get_sample_q (or get_eval_sample_q), "
              "e.g. shape=(1, 28, 28), or set args.n_ch and args.im_sz, or pass the script's own "
              "init_random as init_fn")


def _show(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_shape(shape: Any, what: str) -> Shape:
    ok = (isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape))
    if not ok:
        raise ValueError(f"{what}: the shape of one image, a tuple of positive ints such as (1, 28, 28); "
                         f"got {shape!r}")
    return tuple(int(s) for s in shape)


def declared_shape(args: Namespace, shape: Sequence[int] | None = None, where: str = "jemfast.compat") -> Shape | None:
    """The image shape the caller declared: ``shape``, or ``(args.n_ch, args.im_sz, args.im_sz)``;
    None when neither is given. Raises ValueError when only one of ``args.n_ch``/``args.im_sz``
    is set, a value is not a positive int, or ``shape`` and ``args`` disagree."""
    given = _check_shape(shape, f"{where} shape") if shape is not None else None
    n_ch, im_sz = getattr(args, "n_ch", None), getattr(args, "im_sz", None)
    if (n_ch is None) != (im_sz is None):
        missing = "args.im_sz" if im_sz is None else "args.n_ch"
        raise ValueError(f"{where}: {missing} is not set but {'args.n_ch' if im_sz is None else 'args.im_sz'} is; "
                         f"set both (the image is n_ch x im_sz x im_sz), or pass shape=(C, H, W)")
    from_args = None if n_ch is None else _check_shape((n_ch, im_sz, im_sz), "args.n_ch, args.im_sz")
    if given is not None and from_args is not None and given != from_args:
        raise ValueError(f"{where}: shape={given} disagrees with args.n_ch={n_ch}, args.im_sz={im_sz} "
                         f"({_show(from_args)}); give one, or make them agree")
    return given if given is not None else from_args


def buffer_shape(replay_buffer: Any, where: str = "sample_q") -> Shape | None:
    """``(C, H, W)`` of a replay-buffer tensor ``[N, C, H, W]`` (N may be 0); None for ``[]`` (or
    any empty sequence). Raises ValueError for a buffer that is neither."""
    if isinstance(replay_buffer, torch.Tensor):
        if replay_buffer.dim() >= 2:
            return tuple(replay_buffer.shape[1:])
        if replay_buffer.numel() == 0:
            return None
        raise ValueError(f"{where}: the replay buffer has shape {_show(replay_buffer.shape)}, not "
                         f"[rows, *image shape]")
    if isinstance(replay_buffer, Sequence) and len(replay_buffer) == 0:
        return None
    raise ValueError(f"{where}: the replay buffer must be a tensor [rows, n_ch, im_sz, im_sz] or the empty "
                     f"list [], got {type(replay_buffer).__name__}")


def chain_shape(replay_buffer: Any, declared: Shape | None, where: str = "sample_q") -> Shape | None:
    """The shape of one chain for this call: the buffer's, else ``declared``; None when neither
    says (the caller's ``init_fn`` must then). Raises ValueError when the buffer's and the
    declared shape disagree."""
    held = buffer_shape(replay_buffer, where)
    if held is not None and declared is not None and held != declared:
        raise ValueError(f"{where}: the replay buffer holds images of shape {_show(held)}, but {_show(declared)} "
                         f"was declared (shape= or args.n_ch/args.im_sz); make them agree")
    return held if held is not None else declared


def unknown_shape_error(where: str = "sample_q") -> ValueError:
    """The one-line error for an empty buffer ``[]`` with no declared shape and no ``init_fn``."""
    return ValueError(f"{where}: an empty replay buffer ([]) does not say the image shape; {HOW_TO_SAY}")


def check_fresh(x: torch.Tensor, bs: int, shape: Shape | None, where: str = "init_fn") -> torch.Tensor:
    """``x`` (rows from the caller's ``init_fn(args, bs)``) checked to be a float tensor
    ``[bs, *shape]`` (any ``[bs, ...]`` when ``shape`` is None)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{where}(args, {bs}) must return a float tensor [{bs}, n_ch, im_sz, im_sz], "
                         f"got {type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}")
    want = (bs, *shape) if shape is not None else None
    if (want is not None and tuple(x.shape) != want) or (want is None and (x.dim() < 2 or x.shape[0] != bs)):
        expected = _show(want) if want is not None else f"[{bs}, *image shape]"
        raise ValueError(f"{where}(args, {bs}) returned shape {_show(x.shape)}; the chains are {expected}")
    return x

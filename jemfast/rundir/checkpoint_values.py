"""Typed readers for the values inside a checkpoint (used by :mod:`jemfast.rundir.checkpoint_schema`).

Each ``read_*``/``_int``-style helper returns the value when it has the expected type and range
and raises :class:`Corrupt` with a short reason otherwise; :class:`_Tensors` counts the bytes
every tensor claims so that a small file cannot describe gigabytes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

MAX_INT = 2**63 - 1
MAX_STR = 10_000


class Corrupt(Exception):
    """A checkpoint's structure is wrong; the message is the reason (one short line)."""


def _kind(x: Any) -> str:
    name = "tensor" if isinstance(x, torch.Tensor) else type(x).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _name(value: Any) -> str:
    """A value from the file, printable on one line (control characters escaped), <= 60 chars."""
    return shorten(ascii(value), 60)


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, '...' marking a cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut) + "..."


def _int(x: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(x) is not int:
        raise Corrupt(f"{where} is {_kind(x)}, not an integer")
    if not lo <= x <= hi:
        raise Corrupt(f"{where} {_name(x)} is out of range [{lo}, {hi}]")
    return x


def _num(x: Any, where: str, lo: float = -math.inf, hi: float = math.inf, nan_ok: bool = False) -> float:
    if type(x) not in (int, float) or (type(x) is int and abs(x) > MAX_INT):
        raise Corrupt(f"{where} is {_kind(x)}, not a number in range")
    x = float(x)
    if math.isnan(x) and nan_ok:
        return x
    if not (math.isfinite(x) and lo <= x <= hi):
        raise Corrupt(f"{where} is {x!r}, not a finite number in [{lo}, {hi}]")
    return x


def _dict(x: Any, where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(x, dict):
        raise Corrupt(f"{where} is {_kind(x)}, not a dict")
    missing = [k for k in required if k not in x]
    if missing:
        raise Corrupt(f"{where} has no {', '.join(repr(k) for k in missing)}")
    return x


def _seq(x: Any, where: str, max_len: int) -> list | tuple:
    if not isinstance(x, (list, tuple)):
        raise Corrupt(f"{where} is {_kind(x)}, not a list")
    if len(x) > max_len:
        raise Corrupt(f"{where} has {len(x)} entries, at most {max_len} expected")
    return x


def _scalar(x: Any, where: str) -> Any:
    """None, bool, int, float or a short str: the values events and param groups may hold."""
    if x is None or type(x) in (bool, int, float) or (type(x) is str and len(x) <= MAX_STR):
        return x
    raise Corrupt(f"{where} is {_kind(x)}, not a plain value")


class _Tensors:
    """Checks tensors one by one against a budget: all of them together may not claim more bytes
    than the file holds (each occurrence counts: a later deep copy clones every one)."""

    def __init__(self, file_bytes: int) -> None:
        self.left = file_bytes

    def __call__(self, x: Any, where: str, shape: tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, floating: bool = False) -> torch.Tensor:
        if type(x) not in (torch.Tensor, nn.Parameter):
            raise Corrupt(f"{where} is {_kind(x)}, not a tensor")
        if x.layout != torch.strided or x.is_quantized or x.is_meta or x.is_nested:
            raise Corrupt(f"{where} is not a dense tensor")
        if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            raise Corrupt(f"{where} is an expanded or strided view, not a dense tensor")
        nbytes = x.numel() * x.element_size()
        if x.untyped_storage().nbytes() < x.storage_offset() * x.element_size() + nbytes:
            raise Corrupt(f"{where} claims more elements than its storage holds")
        self.left -= nbytes
        if self.left < 0:
            raise Corrupt(f"its tensors claim more bytes than the file holds (at {where})")
        if dtype is not None and x.dtype != dtype:
            raise Corrupt(f"{where} has dtype {x.dtype}, expected {dtype}")
        if floating and not x.is_floating_point():
            raise Corrupt(f"{where} has dtype {x.dtype}, expected floating point")
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise Corrupt(f"{where} has shape {list(x.shape)}, expected {list(shape)}")
        return x.detach()



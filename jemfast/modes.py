"""Temporary model modes and precision contexts, written once for the whole package.

:func:`module_mode` sets a model to eval or train mode (or keeps it) for the length of a
``with`` block and then restores the train/eval flag of *every* submodule as it was, not just
the top module's (a user's model may hold submodules in a mode of their own, e.g. frozen BN).
:func:`batch_norm_statistics_frozen` keeps batch norm's running statistics (what eval mode
normalises with) out of passes over inputs that are not training data.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import nn

Mode = Literal["eval", "train", "keep"]
MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: Mode = "eval") -> Iterator[nn.Module]:
    """``with module_mode(model, "eval"):`` ... then every submodule's mode is restored."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    if mode != "keep":
        model.train(mode == "train")
    try:
        yield model
    finally:
        for m, training in saved:
            m.training = training


def batch_norms_in_training(model: nn.Module) -> list[nn.Module]:
    """``model``'s batch-norm layers that normalise with batch statistics (training mode), whether
    or not they update their running ones now (inside :func:`batch_norm_statistics_frozen` they do not)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def batch_norms_updating_statistics(model: nn.Module) -> list[nn.Module]:
    """Those of :func:`batch_norms_in_training` that also update their running statistics now."""
    return [m for m in batch_norms_in_training(model) if m.track_running_stats]


@contextlib.contextmanager
def batch_norm_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Inside: batch norm in training mode still normalises with each batch's own statistics but
    leaves its running statistics (and batch count) as they are: for SGLD chains, samples, and
    SAM's second pass, so eval mode normalises with the statistics of training data alone."""
    bns = batch_norms_updating_statistics(model)  # nested: none left to freeze, the outer one restores
    for m in bns:
        m.track_running_stats = False  # training mode then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """Shorthand for ``module_mode(model, "eval")``."""
    return module_mode(model, "eval")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``--precision`` value: ``"bf16"`` -> bfloat16, ``"fp32"`` -> None."""
    return torch.bfloat16 if precision == "bf16" else None

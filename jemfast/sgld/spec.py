"""What one SGLD chain does, as a small frozen (hashable) value: the graph backend's cache key."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChainSpec:
    """``n_steps`` SGLD steps  x <- x - step_size * g + noise_std * N(0, I), then clamp, with
    g = dE/dx, or clamp(dE/dx, -grad_clip, grad_clip) elementwise when ``grad_clip`` is set.

    ``step_size`` (alpha, >= 0; 0: the chain is noise alone and the energy is not evaluated) is
    in units of x per unit of energy gradient; ``noise_std`` (sigma) and ``grad_clip`` in units
    of x and of energy per unit of x; ``clamp`` clamps every step's result to [-1, 1];
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) evaluates the network under autocast while the
    chain state stays fp32.
    """

    n_steps: int
    step_size: float
    noise_std: float
    clamp: bool = False
    autocast_dtype: torch.dtype | None = None
    grad_clip: float | None = None

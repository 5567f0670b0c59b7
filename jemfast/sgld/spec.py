"""What one SGLD chain does, as a small frozen (hashable) value: the graph backend's cache key."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChainSpec:
    """``n_steps`` SGLD steps  x <- x - step_size * dE/dx + noise_std * N(0, I), then clamp.

    ``step_size`` (alpha) is in units of x per unit of energy gradient; ``noise_std`` (sigma) in
    units of x; ``clamp`` clamps every step's result to [-1, 1]; ``autocast_dtype`` (e.g.
    ``torch.bfloat16``) evaluates the network under autocast while the chain state stays fp32.
    """

    n_steps: int
    step_size: float
    noise_std: float
    clamp: bool = False
    autocast_dtype: torch.dtype | None = None

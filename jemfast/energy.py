"""The energy view of a classifier (JEM): E(x) = -logsumexp_y f(x)[y], E(x, y) = -f(x)[y]."""
from __future__ import annotations

import torch
from torch import nn


class JEM(nn.Module):
    """Wrap any classifier ``f: Tensor[B, *shape] -> Tensor[B, C]`` as a joint energy model.

    ``forward(x)`` returns the logits unchanged, so a JEM is a drop-in classifier;
    ``energy(x)`` is the unnormalised negative log-density of x, ``energy(x, y)`` that of (x, y).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[B]`` of energies (float32 even under bf16 autocast)."""
        logits = self.classifier(x).float()
        return energy_from_logits(logits, y)


def energy_from_logits(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp(logits) or, with labels ``y: Tensor[B] int64``, E(x, y) = -logits[y]."""
    if y is None:
        return -torch.logsumexp(logits, dim=1)
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)

"""Testing aids: a divergence made on purpose (``--inject-divergence``, ``Guard(inject_divergence=)``,
the example script's ``--inject_divergence``), as a diverging JEM's logits blow up."""
from __future__ import annotations

from typing import Any

import torch


class InjectDivergence:
    """Testing aid, as a training hook: at iteration ``step`` (first pass only, never after a
    restart) blow up the model with :func:`inject_divergence`."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.done = False

    def __call__(self, trainer: Any) -> None:
        if not self.done and trainer.progress.step == self.step and not trainer.recovery.restarts:
            self.done = True
            inject_divergence(trainer.model)


def inject_divergence(model: torch.nn.Module) -> None:
    """Testing aid: blow up the classifier's output scale, as a diverging JEM's logits do.

    Multiplies every parameter of the last ``nn.Linear`` by 1e4, so energies and the
    energy gap leave any sane range within the iteration.
    """
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        for p in last.parameters():
            p.mul_(1e4)

"""Divergence detection on the device and the automatic recovery policy.

Detection: every iteration :meth:`DivergenceMonitor.observe` ORs a bit mask of failure causes
into a device tensor (no host sync); every ``check_every`` iterations (and before every
checkpoint) :meth:`DivergenceMonitor.check` reads it once.

Recovery policy (restart k = 1, 2, ...; effects persist across later restarts). Every restart
rolls back to the last good state (the last checkpoint, which is only written after a passing
check) and reseeds all RNGs with a new seed, as the JEM paper does by hand; then:

    k = 1: new seed only
    k = 2: learning rate x 0.5
    k = 3: SGLD steps x 2 (the paper's "40 steps instead of 20")
    k = 4: replay buffer re-initialised to U(-1, 1), and learning rate x 0.5
    k > 4: learning rate x 0.5

A divergence that recurs before any new good checkpoint was written rolls back one checkpoint
further in the on-disk ring each time (the newest one was already on its way out).

After ``max_restarts`` restarts a further divergence stops the run (exit code 3) with the last
good checkpoint intact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StabilityConfig

CAUSES = (
    "non-finite loss or energy",
    "non-finite gradient",
    "non-finite samples",
    "energy gap too large",
    "loss too large",
    "sample magnitude exploding",
)


class DivergenceMonitor:
    """Accumulates divergence flags on ``device``; ``check()`` is the only host sync."""

    def __init__(self, cfg: StabilityConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.flags = torch.zeros((), dtype=torch.int64, device=device)
        self._bits = 2 ** torch.arange(len(CAUSES), device=device)

    def observe(self, loss: torch.Tensor, e_real: torch.Tensor, e_fake: torch.Tensor,
                grad_norm: torch.Tensor, x_fake: torch.Tensor | None) -> None:
        """Record this iteration's failures (all arguments are device scalars except ``x_fake``)."""
        energies = torch.stack([loss, e_real, e_fake])
        if x_fake is not None:
            samples_bad = ~torch.isfinite(x_fake).all()
            too_big = x_fake.detach().abs().amax() > self.cfg.max_sample_abs
        else:
            samples_bad = too_big = torch.zeros((), dtype=torch.bool, device=loss.device)
        conds = torch.stack([
            ~torch.isfinite(energies).all(),
            ~torch.isfinite(grad_norm),
            samples_bad,
            (e_real - e_fake).abs() > self.cfg.max_energy_gap,
            loss.abs() > self.cfg.max_loss,
            too_big,
        ])
        self.flags.bitwise_or_((conds.long() * self._bits).sum())

    def check(self) -> str | None:
        """Read and clear the flags: ``None`` if healthy, else the causes joined by '; '."""
        value = int(self.flags.item())
        self.flags.zero_()
        if value == 0:
            return None
        return "; ".join(c for i, c in enumerate(CAUSES) if value & (1 << i))


@dataclass
class RecoveryAction:
    """What restart number ``k`` changes (multiplicative on the run's current values)."""

    restart: int
    new_seed: int
    lr_factor: float = 1.0
    sgld_steps_factor: int = 1
    reset_buffer: bool = False

    def describe(self) -> str:
        parts = [f"seed -> {self.new_seed}"]
        if self.lr_factor != 1.0:
            parts.append(f"lr x{self.lr_factor}")
        if self.sgld_steps_factor != 1:
            parts.append(f"sgld steps x{self.sgld_steps_factor}")
        if self.reset_buffer:
            parts.append("buffer re-initialised")
        return ", ".join(parts)


def recovery_action(k: int, base_seed: int) -> RecoveryAction:
    """The documented action for the ``k``-th restart (1-based)."""
    action = RecoveryAction(restart=k, new_seed=base_seed + 1000 * k)
    if k == 2 or k >= 5:
        action.lr_factor = 0.5
    elif k == 3:
        action.sgld_steps_factor = 2
    elif k == 4:
        action.reset_buffer = True
        action.lr_factor = 0.5
    return action


def inject_divergence(model: torch.nn.Module) -> None:
    """Testing aid: blow up the classifier's output scale, as a diverging JEM's logits do.

    Multiplies every parameter of the last ``nn.Linear`` by 1e4, so energies and the
    energy gap leave any sane range within the iteration.
    """
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        for p in last.parameters():
            p.mul_(1e4)

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
        # under torchrun: ORs the flags of every rank (jemfast.ddp_trainer), so all roll back together
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._bits = 2 ** torch.arange(len(CAUSES), device=device)

    def observe(self, metrics: dict[str, torch.Tensor], x_fake: torch.Tensor | None) -> None:
        """Record this iteration's failures from its device-scalar ``metrics`` (loss, e_real,
        e_fake, grad_norm) and samples ``x_fake: Tensor[B, *shape]`` (or None)."""
        loss, e_real, e_fake = metrics["loss"], metrics["e_real"], metrics["e_fake"]
        grad_norm = metrics["grad_norm"]
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
        value = int(self.flags.item() if self.reduce is None else self.reduce(self.flags))
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


@dataclass
class RecoveryState:
    """Everything the recovery policy remembers between iterations, in one place.

    ``snapshot`` is an in-memory copy of the newest good checkpoint (what a rollback restores
    first); ``last_good`` its file. ``saved_since_recovery`` is False from a rollback until the
    next good checkpoint: a divergence in that window rolls back ``depth`` checkpoints further
    in the on-disk ring. ``lr_scale`` and ``sgld_steps_factor`` are the cumulative effects of
    all restarts so far (they persist across rollbacks and are saved in checkpoints).
    """

    restarts: list[dict[str, Any]] = field(default_factory=list)
    lr_scale: float = 1.0
    sgld_steps_factor: int = 1
    snapshot: dict[str, Any] | None = None
    last_good: Path | None = None
    saved_since_recovery: bool = True
    depth: int = 0

    def checkpointed(self, state: dict[str, Any], path: Path) -> None:
        """A good checkpoint ``state`` was written to ``path``: it is the new rollback target."""
        self.snapshot, self.last_good = clone_state(state), path
        self.saved_since_recovery = True

    def next_action(self, base_seed: int) -> RecoveryAction:
        """The action of the next restart; moves one checkpoint further back if the last
        rollback has not been followed by a good checkpoint yet."""
        self.depth = 0 if self.saved_since_recovery else self.depth + 1
        self.saved_since_recovery = False
        return recovery_action(len(self.restarts) + 1, base_seed)

    def apply(self, action: RecoveryAction) -> None:
        """Make ``action``'s lr and SGLD-step changes cumulative with the earlier ones."""
        self.lr_scale *= action.lr_factor
        self.sgld_steps_factor *= action.sgld_steps_factor

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": list(self.restarts), "lr_scale": self.lr_scale,
                "sgld_steps_factor": self.sgld_steps_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.sgld_steps_factor = int(state["sgld_steps_factor"])


def clone_state(obj: Any) -> Any:
    """Deep copy of a checkpoint dict (tensors cloned), so later training does not alias it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


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

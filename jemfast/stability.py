"""Divergence detection on the device and the automatic recovery policy.

Detection: every iteration :meth:`DivergenceMonitor.observe` ORs a bit mask of failure causes
into a device tensor (no host sync); every ``check_every`` iterations (and before every
checkpoint) :meth:`DivergenceMonitor.check` reads it once. Two kinds of test:

- absolute limits (a backstop, the same for every run): non-finite values, ``|loss|``,
  ``|E(real) - E(fake)|``, the gradient norm and ``max |x_fake|`` above fixed limits;
- relative to the run's own recent history: ``log(1 + |E(real) - E(fake)|)`` and
  ``log(1 + grad norm)`` more than ``relative_z`` robust standard deviations above the median of
  the last ``relative_window`` iterations (robust std = 1.4826 x median absolute deviation,
  at least :data:`MIN_LOG_SCALE`), once ``relative_warmup`` iterations have been seen. The
  history is a ring buffer on the device; median and MAD are computed there each iteration.
  ``log(1 + v)`` is a log scale above 1 (energies are in nats) and flat below it, so a gap
  wandering between 0.001 and 0.5 nats early in training is not read as a thousandfold jump.

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

:func:`restart` carries out one restart; :class:`jemfast.train.Trainer` and
:class:`jemfast.guard.Guard` (the same policy inside a user's own loop) both call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .config import StabilityConfig
from .errors import one_line
from .log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

CAUSES = (
    "non-finite loss or energy",
    "non-finite gradient",
    "non-finite samples",
    "energy gap too large",
    "loss too large",
    "sample magnitude exploding",
    "gradient norm too large",
    "energy gap jumped far above its recent range",
    "gradient norm jumped far above its recent range",
)
# Floor of the robust scale of log(1 + v), so a near-constant history (MAD ~ 0) does not turn
# noise into alarms: with relative_z = 8 the smallest flagged rise is 8 x 0.25 = 2 in log(1 + v),
# i.e. 1 + v above e^2 = 7.4 times 1 + its recent median.
MIN_LOG_SCALE = 0.25
MAD_TO_STD = 1.4826  # std of a normal distribution = 1.4826 x its median absolute deviation


class DivergenceMonitor:
    """Accumulates divergence flags on ``device``; ``check()`` is the only host sync.

    ``history: Tensor[2, relative_window]`` holds log(1 + |energy gap|) and log(1 + grad norm)
    of the last iterations (a ring; ``seen`` counts the writes on the host, so indexing it needs
    no sync).
    """

    def __init__(self, cfg: StabilityConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.flags = torch.zeros((), dtype=torch.int64, device=device)
        # under torchrun: ORs the flags of every rank (jemfast.ddp_trainer), so all roll back together
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._bits = 2 ** torch.arange(len(CAUSES), device=device)
        self.history = torch.zeros(2, cfg.relative_window, device=device)
        self.seen = 0

    def observe(self, metrics: dict[str, torch.Tensor], x_fake: torch.Tensor | None) -> None:
        """Record this iteration's failures from its device-scalar ``metrics`` (loss, e_real,
        e_fake, grad_norm) and samples ``x_fake: Tensor[B, *shape]`` (or None)."""
        cfg = self.cfg
        loss, e_real, e_fake = metrics["loss"], metrics["e_real"], metrics["e_fake"]
        grad_norm = metrics["grad_norm"]
        gap = (e_real - e_fake).abs()
        energies = torch.stack([loss, e_real, e_fake])
        if x_fake is not None:
            samples_bad = ~torch.isfinite(x_fake).all()
            too_big = x_fake.detach().abs().amax() > cfg.max_sample_abs
        else:
            samples_bad = too_big = torch.zeros((), dtype=torch.bool, device=loss.device)
        jumped = self._jumped(torch.stack([gap, grad_norm]).float().log1p())
        conds = torch.stack([
            ~torch.isfinite(energies).all(),
            ~torch.isfinite(grad_norm),
            samples_bad,
            gap > cfg.max_energy_gap,
            loss.abs() > cfg.max_loss,
            too_big,
            grad_norm > cfg.max_grad_norm,
            jumped[0],
            jumped[1],
        ])
        self.flags.bitwise_or_((conds.long() * self._bits).sum())

    def _jumped(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats: Tensor[2]`` (log(1 + |gap|), log(1 + grad norm)) -> ``Tensor[2]`` of bool:
        each far above the history before it; then appends ``stats`` to the history."""
        cfg, window = self.cfg, self.cfg.relative_window
        if cfg.relative_z > 0 and self.seen >= cfg.relative_warmup:
            past = self.history[:, :min(self.seen, window)]
            median = past.median(dim=1).values
            mad = (past - median[:, None]).abs().median(dim=1).values
            scale = (MAD_TO_STD * mad).clamp_min(MIN_LOG_SCALE)
            jumped = stats - median > cfg.relative_z * scale
        else:
            jumped = torch.zeros(2, dtype=torch.bool, device=stats.device)
        self.history[:, self.seen % window] = stats
        self.seen += 1
        return jumped

    def check(self) -> str | None:
        """Read and clear the flags: ``None`` if healthy, else the causes joined by '; '.

        A divergence also clears the history: the run is about to roll back (or stop), and the
        diverged stretch is no baseline; relative tests resume after a new warm-up.
        """
        value = int(self.flags.item() if self.reduce is None else self.reduce(self.flags))
        self.flags.zero_()
        if value == 0:
            return None
        self.seen = 0
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

    def checkpointed(self, state: dict[str, Any], path: Path | None) -> None:
        """A good checkpoint ``state`` was written to ``path`` (None: kept in memory only): it
        is the new rollback target (copied into the previous snapshot's tensors where they fit)."""
        self.snapshot, self.last_good = clone_state(state, into=self.snapshot), path
        self.saved_since_recovery = True

    def exhausted(self, max_restarts: int) -> bool:
        """True when a divergence now must stop the run: restarts used up, or nothing to roll back to."""
        return len(self.restarts) >= max_restarts or self.snapshot is None

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


def restart(rec: RecoveryState, base_seed: int, diverged_at: int, cause: str,
            roll_back: Callable[[RecoveryAction], int], reseed: Callable[[int], None],
            sampler: Any | None, base_n_steps: int, reset_buffer: Callable[[], None]) -> dict[str, Any]:
    """Carry out the next restart of the policy; returns its event (also appended to ``rec.restarts``).

    ``roll_back(action)`` restores the state ``rec.depth`` good states back (the action's lr and
    SGLD-step factors are already in ``rec``) and returns the iteration that state was taken at;
    ``reseed(seed)`` reseeds every random stream of the run; the sampler then runs
    ``base_n_steps`` x ``rec.sgld_steps_factor`` steps; ``reset_buffer()`` re-initialises the
    replay buffer when the action says so. Logs one warning line.
    """
    action = rec.next_action(base_seed)
    rec.apply(action)
    rolled_back_to = roll_back(action)
    reseed(action.new_seed)
    if sampler is not None:
        sampler.n_steps = base_n_steps * rec.sgld_steps_factor
    if action.reset_buffer:
        reset_buffer()
    event = {"event": "restart", "restart": action.restart, "step": diverged_at, "rolled_back_to": rolled_back_to,
             "cause": cause, "action": action.describe()}
    rec.restarts.append(event)
    log.warning(f"divergence at iteration {diverged_at} ({cause}); restart {action.restart}: "
                f"rolled back to iteration {rolled_back_to}, {action.describe()}")
    return event


def gradient_norm(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Device scalar: the global L2 norm of ``model``'s parameter gradients now (0 if none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)


def read_older_good_state(ring: list[Path], depth: int, read: Callable[[Path], T],
                          unusable: tuple[type[BaseException], ...]) -> T | None:
    """The good state ``depth`` places back in ``ring`` (paths, newest first; the oldest when the
    ring is shorter) that ``read`` accepts: a file it refuses with one of the ``unusable`` errors
    is logged and the next older one tried. None when no file is left."""
    for path in ring[depth:] or ring[-1:]:
        try:
            return read(path)
        except unusable as exc:
            log.warning(f"good state {path} is unusable ({one_line(str(exc), 200)}); rolling back further")
    return None


def clone_state(obj: Any, into: Any = None) -> Any:
    """Deep copy of a checkpoint dict (tensors cloned), so later training does not alias it.

    ``into``: an earlier copy of the same structure; its tensors of the same shape, dtype and
    device are overwritten in place instead of newly allocated (a snapshot refreshed every few
    iterations then costs no second copy's memory).
    """
    if isinstance(obj, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into is not obj and into.shape == obj.shape
                and into.dtype == obj.dtype and into.device == obj.device):
            return into.copy_(obj.detach())
        return obj.detach().clone()
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: clone_state(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = into if type(into) is type(obj) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(clone_state(v, o) for v, o in zip(obj, old))
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

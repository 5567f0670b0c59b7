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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .collapse import DRIFT_FLOOR, IntervalStats, accuracy_collapsed, gap_drifting
from .collapse import onset as collapse_onset
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
    # judged on the host at a check, from the interval means (jemfast.collapse)
    "energy gap drifting away (E(real) and E(fake) separating)",
    "train accuracy fell to chance",
)
DRIFT_BIT, ACC_BIT = 1 << 9, 1 << 10
# A lagging sampler's remedy: on a network without normalisation the input gradient is ~1e-4 per
# pixel, and step size 1 leaves the chains where they start (measured on the natural-divergence
# benchmark: 20 steps of size 1 lower E(fake) by 0.001, of size 100 by 0.36 nats, past E(real)).
SGLD_STEP_SIZE_FACTOR = 10.0
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

    def __init__(self, cfg: StabilityConfig, device: torch.device, n_classes: int | None = None) -> None:
        self.cfg = cfg
        self.n_classes = n_classes  # for "train accuracy fell to chance"; None: that test is off
        self.flags = torch.zeros((), dtype=torch.int64, device=device)
        # under torchrun: ORs the flags of every rank (jemfast.ddp_trainer), so all roll back together,
        # and averages the interval means, so every rank dates a collapse alike
        self.reduce: Callable[[int], int] | None = None
        self.reduce_means: Callable[[list[float]], list[float]] | None = None
        self._bits = 2 ** torch.arange(len(CAUSES) - 2, device=device)
        self.history = torch.zeros(2, cfg.relative_window, device=device)
        self.seen = 0
        # sums over the current check interval: E(real) - E(fake), grad norm, train accuracy
        self.interval = torch.zeros(3, device=device)
        self.count = 0
        self.observed = 0  # iterations observed in all, never rewound
        self.has_acc = False
        self.series: list[IntervalStats] = []  # one entry per passing check, on the host
        self._states: dict[int, tuple[torch.Tensor, int, int]] = {}  # step -> (history, seen, len(series))

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
        acc = metrics.get("acc")
        self.has_acc = acc is not None
        self.interval += torch.stack([e_real - e_fake, grad_norm, acc if acc is not None else torch.zeros_like(loss)]
                                     ).detach().float()
        self.count += 1
        self.observed += 1
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

    def check(self, step: int | None = None) -> str | None:
        """Read and clear the flags and the interval means (one host sync), at iteration ``step``
        (default: the number of iterations observed): ``None`` if healthy, else the causes joined
        by '; '.

        The interval means join :attr:`series`, where the collapse tests of :mod:`jemfast.collapse`
        read them. A healthy check also records the monitor's state at ``step``, so that a
        rollback to that step (:meth:`rewind`) judges the restarted run against the history it had
        then: no new warm-up after a restart.
        """
        step = self.observed if step is None else step
        values = torch.cat([self.flags.double().view(1), self.interval.double()]).tolist()
        value = int(values[0])
        if self.count:
            means = [v / self.count for v in values[1:]]
            if self.reduce_means is not None:
                means = self.reduce_means(means)
            acc = means[2] if self.has_acc else math.nan
            self.series.append(IntervalStats(step, means[0], means[1], acc))
            if gap_drifting(self.series):
                value |= DRIFT_BIT
            if accuracy_collapsed(self.series, self.n_classes):
                value |= ACC_BIT
        if self.reduce is not None:
            value = self.reduce(value)
        self.flags.zero_()
        self.interval.zero_()
        self.count = 0
        if value == 0:
            self.mark_healthy(step)
            return None
        return "; ".join(c for i, c in enumerate(CAUSES) if value & (1 << i))

    def mark_healthy(self, step: int) -> None:
        """Record the monitor's state as that of a good state at iteration ``step``."""
        self._states[step] = (self.history.clone(), self.seen, len(self.series))

    def onset(self) -> int:
        """The iteration the divergence just detected began at (:func:`jemfast.collapse.onset`);
        when its growth reaches back past the intervals kept, the newest good state before them."""
        began = collapse_onset(self.series)
        if self.series and began < self.series[0].step:
            return max((s for s in self._states if s < self.series[0].step), default=0)
        return began

    def chains_lagging(self) -> bool:
        """True when the last interval's energy gap had run away below zero (E(real) under
        E(fake) by more than :data:`jemfast.collapse.DRIFT_FLOOR`): the samples could not follow."""
        return bool(self.series) and self.series[-1].gap < -DRIFT_FLOOR

    def rewind(self, step: int) -> None:
        """The run rolled back to iteration ``step``: forget what came after it. The relative
        tests' history becomes the one recorded at the newest healthy check at or before ``step``
        (none: they warm up again); the states recorded after ``step`` are dropped."""
        kept = [s for s in self._states if s <= step]
        if kept:
            history, self.seen, n = self._states[max(kept)]
            self.history.copy_(history)
            self.series = self.series[:n]
        else:
            self.history.zero_()
            self.seen, self.series = 0, []
        self._states = {s: v for s, v in self._states.items() if s <= step}
        self.flags.zero_()
        self.interval.zero_()
        self.count = 0

    def forget_before(self, step: int) -> None:
        """No rollback can reach before ``step`` any more: drop the states recorded earlier
        (the newest of them is kept, as the baseline of a rollback to ``step``)."""
        older = [s for s in self._states if s <= step]
        for s in sorted(older)[:-1]:
            del self._states[s]


@dataclass
class RecoveryAction:
    """What restart number ``k`` changes (multiplicative on the run's current values)."""

    restart: int
    new_seed: int
    lr_factor: float = 1.0
    sgld_steps_factor: int = 1
    sgld_step_size_factor: float = 1.0
    reset_buffer: bool = False
    rewarm: bool = False  # the learning-rate warm-up starts again at the iteration rolled back to

    def describe(self) -> str:
        parts = [f"seed -> {self.new_seed}"]
        if self.lr_factor != 1.0:
            parts.append(f"lr x{self.lr_factor}")
        if self.sgld_steps_factor != 1:
            parts.append(f"sgld steps x{self.sgld_steps_factor}")
        if self.sgld_step_size_factor != 1.0:
            parts.append(f"sgld step size x{self.sgld_step_size_factor:g}")
        if self.reset_buffer:
            parts.append("buffer re-initialised")
        if self.rewarm:
            parts.append("lr warm-up again")
        return ", ".join(parts)


def recovery_action(k: int, base_seed: int, chains_lagging: bool = False) -> RecoveryAction:
    """The documented action for the ``k``-th restart (1-based); ``chains_lagging``: the energy
    gap had run away with E(real) below E(fake), the samples unable to follow the model."""
    action = RecoveryAction(restart=k, new_seed=base_seed + 1000 * k, lr_factor=0.5, rewarm=True)
    if chains_lagging and k <= 2:
        action.sgld_step_size_factor = SGLD_STEP_SIZE_FACTOR
    if k == 2:
        action.sgld_steps_factor = 2
    elif k == 3:
        action.reset_buffer = True
    return action


@dataclass
class GoodState:
    """A rollback target: the state at iteration ``step``, in memory (``state``) or only on disk."""

    step: int
    state: dict[str, Any] | None = None
    path: Path | None = None


@dataclass
class RecoveryState:
    """Everything the recovery policy remembers between iterations, in one place.

    ``memory`` holds up to ``memory_ring`` in-memory good states, newest first, spaced more
    widely with age (:meth:`checkpointed`), so a rollback can reach back before a collapse that
    took tens of iterations to be detected;
    ``last_good`` is the newest good checkpoint file. ``last_target`` is the iteration of the last
    rollback until a healthy check follows it: a divergence in that window must roll back further.
    ``lr_scale`` and ``sgld_steps_factor`` are the cumulative effects of all restarts so far, and
    ``warmup_from`` the iteration the last re-warm-up started at (they persist across rollbacks
    and are saved in checkpoints).
    """

    restarts: list[dict[str, Any]] = field(default_factory=list)
    lr_scale: float = 1.0
    sgld_steps_factor: int = 1
    sgld_step_size_scale: float = 1.0
    warmup_from: int = 0
    memory: list[GoodState] = field(default_factory=list)
    memory_ring: int = 5
    last_good: Path | None = None
    last_target: int | None = None

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The newest good state in memory (None before the first)."""
        return self.memory[0].state if self.memory else None

    def checkpointed(self, state: dict[str, Any], path: Path | None, step: int) -> None:
        """A good state ``state`` of iteration ``step`` was taken (and written to ``path``, or
        kept in memory only: None). It becomes the newest rollback target. Past ``memory_ring``
        states, the one whose removal leaves the smallest gap relative to its age goes (its
        tensors are reused): the states kept thin out geometrically with age, dense just before
        now and reaching back to the oldest."""
        mem = self.memory
        if mem and mem[0].step == step:  # the same state again (a check, then its checkpoint)
            mem[0].state, mem[0].path = clone_state(state, into=mem[0].state), path or mem[0].path
        else:
            reuse = None
            if len(mem) >= self.memory_ring:
                if len(mem) < 3:
                    k = len(mem) - 1
                else:
                    k = min(range(1, len(mem) - 1),
                            key=lambda i: (mem[i - 1].step - mem[i + 1].step) / (step - mem[i].step))
                reuse = mem.pop(k).state
            mem.insert(0, GoodState(step, clone_state(state, into=reuse), path))
        if path is not None:
            self.last_good = path
        self.last_target = None

    def exhausted(self, max_restarts: int) -> bool:
        """True when a divergence now must stop the run: restarts used up, or nothing to roll back to."""
        return len(self.restarts) >= max_restarts or not self.memory

    def target_limit(self, onset: int) -> int:
        """The newest iteration a rollback may land on: the divergence's onset, and before the last
        rollback's target if no healthy check has followed it (that state led here again)."""
        return onset if self.last_target is None else min(onset, self.last_target - 1)

    def next_action(self, base_seed: int, chains_lagging: bool = False) -> RecoveryAction:
        """The action of the next restart."""
        return recovery_action(len(self.restarts) + 1, base_seed, chains_lagging)

    def apply(self, action: RecoveryAction) -> None:
        """Make ``action``'s lr and SGLD changes cumulative with the earlier ones."""
        self.lr_scale *= action.lr_factor
        self.sgld_steps_factor *= action.sgld_steps_factor
        self.sgld_step_size_scale *= action.sgld_step_size_factor

    def set_sampler(self, sampler: Any, base_n_steps: int, base_step_size: float | None) -> None:
        """Set ``sampler``'s steps and step size to the base values times the restarts' factors."""
        if sampler is None:
            return
        sampler.n_steps = base_n_steps * self.sgld_steps_factor
        if base_step_size is not None and hasattr(sampler, "step_size"):
            sampler.step_size = base_step_size * self.sgld_step_size_scale

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": list(self.restarts), "lr_scale": self.lr_scale,
                "sgld_steps_factor": self.sgld_steps_factor, "sgld_step_size_scale": self.sgld_step_size_scale,
                "warmup_from": self.warmup_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.sgld_steps_factor = int(state["sgld_steps_factor"])
        self.sgld_step_size_scale = float(state.get("sgld_step_size_scale", 1.0))
        self.warmup_from = int(state.get("warmup_from", 0))


def choose_target(memory: list[GoodState], ring: list[Path], limit: int, read: Callable[[Path], T],
                  unusable: tuple[type[BaseException], ...]) -> tuple[int, dict[str, Any] | T]:
    """The newest good state at or before iteration ``limit``, from ``memory`` or the on-disk
    ``ring`` (files named ``*-STEP.pt``), read with ``read``; a file it refuses with one of the
    ``unusable`` errors is logged and the next older state tried. When none is that old, the
    oldest kept (logged). Returns ``(step, state)``."""
    candidates = [(g.step, 1, g.state, None) for g in memory if g.state is not None]
    candidates += [(int(p.stem.rsplit("-", 1)[-1]), 0, None, p) for p in ring]
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)  # newest first; memory before disk
    eligible = [c for c in candidates if c[0] <= limit]
    if not eligible:
        log.warning(f"no good state is kept from before iteration {limit}, where the divergence began; "
                    f"rolling back to the oldest one kept")
        eligible = candidates[::-1]
    for step, _, state, path in eligible:
        if state is not None:
            return step, state
        try:
            return step, read(path)
        except unusable as exc:
            log.warning(f"good state {path} is unusable ({one_line(str(exc), 200)}); rolling back further")
    raise LookupError("no usable good state to roll back to")


def restart(rec: RecoveryState, base_seed: int, diverged_at: int, cause: str, monitor: DivergenceMonitor,
            roll_back: Callable[[int, RecoveryAction], int], reseed: Callable[[int], None],
            sampler: Any | None, base_n_steps: int, base_step_size: float | None,
            reset_buffer: Callable[[], None]) -> dict[str, Any]:
    """Carry out the next restart of the policy; returns its event (also appended to ``rec.restarts``).

    ``monitor`` dates the divergence (:meth:`DivergenceMonitor.onset`) and says whether the
    chains lagged; ``roll_back(limit, action)`` restores the newest good state at or before
    iteration ``limit`` (:meth:`RecoveryState.target_limit`; the action's factors are already in
    ``rec``) and returns the iteration it was taken at; ``reseed(seed)`` reseeds every random
    stream of the run; the sampler then runs ``base_n_steps`` and ``base_step_size`` times the
    restarts' factors; ``reset_buffer()`` re-initialises the replay buffer when the action says
    so. Logs one warning line.
    """
    onset = monitor.onset()
    action = rec.next_action(base_seed, monitor.chains_lagging())
    rec.apply(action)
    rolled_back_to = roll_back(rec.target_limit(onset), action)
    rec.memory = [g for g in rec.memory if g.step <= rolled_back_to]  # the rest is an abandoned future
    rec.last_target = rolled_back_to
    if action.rewarm:
        rec.warmup_from = rolled_back_to
    reseed(action.new_seed)
    rec.set_sampler(sampler, base_n_steps, base_step_size)
    if action.reset_buffer:
        reset_buffer()
    event = {"event": "restart", "restart": action.restart, "step": diverged_at, "onset": onset,
             "rolled_back_to": rolled_back_to, "cause": cause, "action": action.describe()}
    rec.restarts.append(event)
    log.warning(f"divergence at iteration {diverged_at} ({cause}; it began after iteration {onset}); "
                f"restart {action.restart}: rolled back to iteration {rolled_back_to}, {action.describe()}")
    return event


def gradient_norm(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Device scalar: the global L2 norm of ``model``'s parameter gradients now (0 if none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)


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

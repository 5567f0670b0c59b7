"""The automatic recovery policy: where a rollback lands and what each restart changes.

Recovery policy (restart k = 1, 2, ...; effects persist across later restarts). Every restart
rolls back to the newest good state at or before the divergence's onset
(:meth:`DivergenceMonitor.onset`; the states: :class:`RecoveryState`), restores the relative
tests' history of that state (:meth:`DivergenceMonitor.rewind`) and reseeds all RNGs with a new
seed, as the JEM paper does by hand. What else it changes depends on how the divergence came:

- sudden (it appeared within one check interval): k = 1 new seed only; k = 2 lr x 0.5; k = 3
  SGLD steps x 2 (the paper's "40 steps instead of 20"); k = 4 replay buffer re-initialised and
  lr x 0.5; k > 4 lr x 0.5;
- gradual (it built up over several checks, or a test of several intervals caught it
  (:meth:`DivergenceMonitor.gradual`): a natural collapse; a new seed from the same state
  retraces it, measured): every restart starts the lr warm-up again from the state rolled back
  to. When the chains lagged (E(real) ran below E(fake): the samples could not follow the model)
  and fresh chains still start from U(-1, 1), the restart switches them to JEM++'s informative
  init (per-class Gaussians, :mod:`jemfast.sgld.chain_init`) and re-initialises the replay buffer
  from it, the lr unchanged: the cause is the chains, and measured on the natural-divergence
  benchmark this alone turns a collapse into a run that learns. When that switch is made (or
  was never possible) the next remedy the diagnosis calls for comes instead, each once, the lr
  unchanged (:func:`candidate_remedies`): chains that lag behind augmented real images get the
  augmentation taken out of the p(x) term (``--px-augment false``; the chains cannot reach
  flipped and reflect-padded crops: measured on digits32 with ``--augment true``, where the
  informative init alone still collapsed at iteration 39 and without augmentation in p(x) did
  not), then an L2 penalty on the energies (``--energy-l2 0.1``, the original author's advice),
  which bounds the energies' run-away. Only when no remedy is left does each restart halve the
  lr; k = 1, 2 also multiply the SGLD step size by 10 if the chains lagged; k = 2 doubles the
  SGLD steps; k = 3 re-initialises the replay buffer.

A run without a generative term (``--clf-only``) gets only the lr (``sampling`` below).

A divergence that recurs before any later check passed rolls back further than the state it
returned to last time (that state led here again). A gradual divergence of a run whose train
accuracy has stayed at chance since the start (:meth:`DivergenceMonitor.never_learned`) rolls
back to the earliest good state kept instead, whatever the onset: nothing learned is lost, and
an early blow-up the tests did not flag can leave the weights and the optimizer's moments
unable to learn.

After ``max_restarts`` restarts a further divergence stops the run (exit code 3) with the last
good checkpoint intact.

:func:`restart` carries out one restart; :class:`jemfast.train.Trainer` and
:class:`jemfast.guard.Guard` (the same policy inside a user's own loop) both call it. Detection
is :mod:`jemfast.stability.monitor`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, TypeVar

import torch

from ..options.config import FLAGS_BY_KEY
from ..process.errors import one_line
from ..process.log import get_logger
from .monitor import DivergenceMonitor

log = get_logger(__name__)
T = TypeVar("T")

# A lagging sampler's remedy: on a network without normalisation the input gradient is ~1e-4 per
# pixel, and step size 1 leaves the chains where they start (measured on the natural-divergence
# benchmark: 20 steps of size 1 lower E(fake) by 0.001, of size 100 by 0.36 nats, past E(real)).
SGLD_STEP_SIZE_FACTOR = 10.0
ENERGY_L2_REMEDY = 0.1  # the original author's advice for divergence (wgrathwohl/JEM issue 4)


def candidate_remedies(cfg: Any, chains_lagging: bool, augments: bool,
                       applicable: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The config remedies a gradual collapse calls for, in order, as dotted overrides of the
    run's current (effective) config ``cfg``; one already in effect is not offered again.
    ``augments``: the run's training batches are flipped or cropped; ``applicable``: the keys
    the run can apply (None: all; :class:`jemfast.Guard`: those its loop has hooks for)."""
    remedies = []
    if chains_lagging and augments and cfg.loss.px_augment:
        remedies.append({"loss.px_augment": False})
    if cfg.loss.energy_l2 == 0:
        remedies.append({"loss.energy_l2": ENERGY_L2_REMEDY})
    return [r for r in remedies if applicable is None or set(r) <= set(applicable)]


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
    informative_init: bool = False  # fresh chains from now on from the per-class Gaussians (with reset_buffer)
    overrides: dict[str, Any] = field(default_factory=dict)  # config remedies from now on (dotted keys)

    def describe(self) -> str:
        parts = [f"seed -> {self.new_seed}"]
        if self.lr_factor != 1.0:
            parts.append(f"lr x{self.lr_factor}")
        if self.sgld_steps_factor != 1:
            parts.append(f"sgld steps x{self.sgld_steps_factor}")
        if self.sgld_step_size_factor != 1.0:
            parts.append(f"sgld step size x{self.sgld_step_size_factor:g}")
        if self.informative_init:
            parts.append("fresh chains from the informative init")
        parts += [f"{FLAGS_BY_KEY[k]} {str(v).lower() if isinstance(v, bool) else v}" for k, v in self.overrides.items()]
        if self.reset_buffer:
            parts.append("buffer re-initialised")
        if self.rewarm:
            parts.append("lr warm-up again")
        return ", ".join(parts)


def recovery_action(k: int, base_seed: int, gradual: bool = False, chains_lagging: bool = False,
                    can_inform: bool = False, remedies: list[dict[str, Any]] = (),
                    can_rewarm: bool = True, sampling: bool = True, classifier: bool = False) -> RecoveryAction:
    """The documented action for the ``k``-th restart (1-based). ``gradual``: the divergence built
    up over several checks (its onset is before the last check; a natural collapse), rather than
    appearing within one interval; ``chains_lagging``: the energy gap ran away with E(real) below
    E(fake), the samples unable to follow the model; ``can_inform``: fresh chains start from
    U(-1, 1) and the run can switch them to the informative init (it has labelled training data);
    ``remedies``: the config remedies still open to a gradual collapse (:func:`candidate_remedies`);
    ``can_rewarm``: the run can start its lr warm-up again (a Guard told its warm-up length);
    ``sampling``: the run has a generative term that SGLD samples for. Without one (``--clf-only``)
    only the classifier can diverge, and the lr is the only remedy that reaches it: every restart
    but a sudden blow-up's first halves it, and nothing touches chains, buffer or p(x) (measured:
    a plain classifier at lr 1e-2 spent its first restart on ``--energy-l2``, a no-op there);
    ``classifier``: the classifier collapsed first, the energy gap calm
    (:meth:`DivergenceMonitor.classifier_collapsed`): a gradual one gets the lr x0.5 at once, the
    remedy that reaches a classifier, not a p(x) remedy."""
    action = RecoveryAction(restart=k, new_seed=base_seed + 1000 * k)
    if not sampling:
        action.lr_factor = 1.0 if k == 1 and not gradual else 0.5
        action.rewarm = gradual and can_rewarm
        return action
    if not gradual:  # a sudden blow-up: first a new seed alone, as the paper does by hand
        action.lr_factor = 1.0 if k in (1, 3) else 0.5
        action.sgld_steps_factor = 2 if k == 3 else 1
        action.reset_buffer = k == 4
        return action
    action.rewarm = can_rewarm  # the run's settings led here: a new seed alone retraces it
    if chains_lagging and can_inform:  # once: RecoveryState passes can_inform until the switch is made
        action.informative_init = action.reset_buffer = True
        return action
    if classifier and not chains_lagging:
        action.lr_factor = 0.5
        return action
    if remedies:
        action.overrides = dict(remedies[0])
        return action
    action.lr_factor = 0.5
    if chains_lagging and k <= 2:
        action.sgld_step_size_factor = SGLD_STEP_SIZE_FACTOR
    action.sgld_steps_factor = 2 if k == 2 else 1
    action.reset_buffer = k == 3
    return action


@dataclass
class GoodState:
    """A rollback target: the state at iteration ``step``, in memory (``state``) or only on disk."""

    step: int
    state: dict[str, Any] | None = None
    path: Path | None = None


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


@dataclass
class RecoveryState:
    """Everything the recovery policy remembers between iterations, in one place.

    ``memory`` holds up to ``memory_ring`` in-memory good states, newest first, spaced more
    widely with age (:meth:`checkpointed`), so a rollback can reach back before a collapse that
    took tens of iterations to be detected;
    ``last_good`` is the newest good checkpoint file. ``last_target`` is the iteration of the last
    rollback until a healthy check follows it: a divergence in that window must roll back further.
    ``lr_scale`` and ``sgld_steps_factor`` are the cumulative effects of all restarts so far,
    ``informative_init`` whether one switched fresh chains to the informative init, and
    ``warmup_from`` the iteration the last re-warm-up started at (they persist across rollbacks
    and are saved in checkpoints).
    """

    restarts: list[dict[str, Any]] = field(default_factory=list)
    informative_init: bool = False  # a restart switched fresh chains to the informative init
    overrides: dict[str, Any] = field(default_factory=dict)  # config remedies of all restarts (dotted keys)
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

    def checkpointed(self, state: dict[str, Any], path: Path | None, step: int, checked: bool = True) -> None:
        """A good state ``state`` of iteration ``step`` was taken (and written to ``path``, or
        kept in memory only: None). It becomes the newest rollback target. Past ``memory_ring``
        states, the one whose removal leaves the smallest gap relative to its age goes (its
        tensors are reused): the states kept thin out geometrically with age, dense just before
        now and reaching back to the oldest. ``checked``: a passing check judged it (False: the
        restarted state a restart checkpoints at once, which must not clear :attr:`last_target`)."""
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
        if checked:
            self.last_target = None

    def reachable_steps(self, ring: Iterable[Path]) -> list[int]:
        """The iterations of every good state a rollback can still reach: those in memory and the
        on-disk ``ring`` (files named ``*-STEP.pt``)."""
        return [g.step for g in self.memory] + [state_step(p) for p in ring]

    def exhausted(self, max_restarts: int) -> bool:
        """True when a divergence now must stop the run: restarts used up, or nothing to roll back to."""
        return len(self.restarts) >= max_restarts or not self.memory

    def target_limit(self, onset: int) -> int:
        """The newest iteration a rollback may land on: the divergence's onset, and before the last
        rollback's target if no healthy check has followed it (that state led here again)."""
        return onset if self.last_target is None else min(onset, self.last_target - 1)

    def next_action(self, base_seed: int, gradual: bool = False, chains_lagging: bool = False,
                    can_inform: bool = False, remedies: list[dict[str, Any]] = (),
                    can_rewarm: bool = True, sampling: bool = True, classifier: bool = False) -> RecoveryAction:
        """The action of the next restart."""
        return recovery_action(len(self.restarts) + 1, base_seed, gradual, chains_lagging,
                               can_inform and not self.informative_init, remedies, can_rewarm, sampling, classifier)

    def effective(self, cfg: Any) -> Any:
        """``cfg`` (a :class:`jemfast.options.config.Config`) with the restarts' config remedies."""
        return cfg.with_overrides(self.overrides) if self.overrides else cfg

    def apply(self, action: RecoveryAction) -> None:
        """Make ``action``'s lr, SGLD and config changes cumulative with the earlier ones."""
        self.informative_init = self.informative_init or action.informative_init
        self.overrides.update(action.overrides)
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
                "warmup_from": self.warmup_from, "informative_init": self.informative_init,
                "overrides": dict(self.overrides)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.sgld_steps_factor = int(state["sgld_steps_factor"])
        self.sgld_step_size_scale = float(state.get("sgld_step_size_scale", 1.0))
        self.warmup_from = int(state.get("warmup_from", 0))
        self.informative_init = bool(state.get("informative_init", False))
        self.overrides = dict(state.get("overrides") or {})


def state_step(path: Path) -> int:
    """The iteration of a good-state file named ``*-STEP.pt`` (``good-000000040.pt``, ``guard-40.pt``)."""
    return int(path.stem.rsplit("-", 1)[-1])


def drop_states_after(ring: Iterable[Path], step: int) -> None:
    """Remove the good-state files of ``ring`` taken after iteration ``step``: after a rollback
    to ``step`` they belong to the abandoned run."""
    for path in ring:
        if state_step(path) > step:
            path.unlink(missing_ok=True)


def choose_target(memory: list[GoodState], ring: list[Path], limit: int, read: Callable[[Path], T],
                  unusable: tuple[type[BaseException], ...]) -> tuple[int, dict[str, Any] | T]:
    """The newest good state at or before iteration ``limit``, from ``memory`` or the on-disk
    ``ring`` (files named ``*-STEP.pt``), read with ``read``; a file it refuses with one of the
    ``unusable`` errors is logged and the next older state tried. When none that old is kept (or
    usable), the later ones, oldest first (logged). Returns ``(step, state)``."""
    candidates = [(g.step, 1, g.state, None) for g in memory if g.state is not None]
    candidates += [(state_step(p), 0, None, p) for p in ring]
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)  # newest first; memory before disk
    eligible = [c for c in candidates if c[0] <= limit]
    if not eligible and limit > 0:  # limit 0: the earliest state kept is what was asked for
        log.warning(f"no good state is kept from before iteration {limit}, where the divergence began; "
                    f"rolling back to the oldest one kept")
    # then, should none of them be usable, the later ones, oldest first
    for step, _, state, path in eligible + [c for c in candidates[::-1] if c[0] > limit]:
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
            reset_buffer: Callable[[], None], inform: Callable[[], None] | None = None,
            remedies: Callable[[bool], list[dict[str, Any]]] | None = None,
            can_rewarm: bool = True) -> dict[str, Any]:
    """Carry out the next restart of the policy; returns its event (also appended to ``rec.restarts``).

    ``monitor`` dates the divergence (:meth:`DivergenceMonitor.onset`) and says whether the
    chains lagged; ``roll_back(limit, action)`` restores the newest good state at or before
    iteration ``limit`` (:meth:`RecoveryState.target_limit`; the action's factors are already in
    ``rec``) and returns the iteration it was taken at; ``reseed(seed)`` reseeds every random
    stream of the run; the sampler then runs ``base_n_steps`` and ``base_step_size`` times the
    restarts' factors; ``reset_buffer()`` re-initialises the replay buffer when the action says
    so, after ``inform()`` (None: not possible) has switched fresh chains to the informative init
    when the action says so; ``remedies(chains_lagging)`` lists the config remedies still open
    to the run (:func:`candidate_remedies`; None: none can apply), which take effect through
    ``rec.overrides`` (:meth:`RecoveryState.effective`); ``can_rewarm``: the run starts its lr
    warm-up again from ``rec.warmup_from`` when the action says so. A run whose monitor sees no
    energies (:attr:`DivergenceMonitor.energies` False: ``--clf-only``) gets the actions of a run
    without sampling. Logs one warning line.
    """
    onset = monitor.onset()
    lagging, gradual = monitor.chains_lagging(onset), monitor.gradual(onset)
    classifier = monitor.classifier_collapsed(onset)
    action = rec.next_action(base_seed, gradual, lagging, inform is not None,
                             remedies(lagging) if remedies is not None else [], can_rewarm, monitor.energies,
                             classifier)
    rec.apply(action)
    # A classifier at chance since the start has nothing to lose by going back to the start, and
    # before a gradual collapse's onset it may have been damaged unflagged (measured: the jem recipe
    # on digits32 blew up at iteration 30, and rolled back to 78 it stayed at chance for 300 more).
    # A sudden blow-up is caught at once: its onset is the check before it, nothing was missed.
    fresh = gradual and monitor.never_learned()
    rolled_back_to = roll_back(0 if fresh else rec.target_limit(onset), action)
    rec.memory = [g for g in rec.memory if g.step <= rolled_back_to]  # the rest is an abandoned future
    rec.last_target = rolled_back_to
    if action.rewarm:
        rec.warmup_from = rolled_back_to
    reseed(action.new_seed)
    rec.set_sampler(sampler, base_n_steps, base_step_size)
    if action.informative_init:
        inform()
    if action.reset_buffer:
        reset_buffer()
    diagnosis = ("sudden blow-up" if not gradual else "chains lagging" if lagging
                 else "classifier collapsed" if classifier else "gradual collapse")
    event = {"event": "restart", "restart": action.restart, "step": diverged_at, "onset": onset,
             "rolled_back_to": rolled_back_to, "never_learned": fresh, "cause": cause, "diagnosis": diagnosis,
             "action": action.describe(), "overrides": action.overrides}
    rec.restarts.append(event)
    where = f"{rolled_back_to} (the earliest kept: the classifier never left chance)" if fresh else rolled_back_to
    log.warning(f"divergence at iteration {diverged_at} ({cause}; it began after iteration {onset}: {diagnosis}); "
                f"restart {action.restart}: rolled back to iteration {where}, {action.describe()}")
    return event

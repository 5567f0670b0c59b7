"""Divergence detection and rollback inside a training loop you wrote yourself: :class:`Guard`.

The detection is :class:`jemfast.stability.monitor.DivergenceMonitor` (flags kept on the device, read
every ``check_every`` iterations) and the recovery is :func:`jemfast.stability.recovery.restart`, the
policy ``jemfast.train`` follows; this module adds what a foreign loop needs: snapshots of any
model, optimizer and replay buffer (a jemfast ReplayBuffer or the original code's plain tensor),
a reservoir of the loop's labelled batches for the informative init
(:mod:`jemfast.sgld.reservoir`), and hooks through which the loop applies the config remedies.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import seed_all
from .options.config import Config, StabilityConfig, check_value
from .process.errors import DivergenceExhausted
from .process.log import get_logger
from .sgld.chain_init import ClassGaussians
from .sgld.reservoir import ClassReservoir
from .guard_files import FILE_FORMAT, GuardFiles
from .stability.inject import inject_divergence
from .stability.loop_inputs import OriginalInit, device_of, device_scalar, stability_config
from .stability.monitor import DivergenceMonitor
from .stability.recovery import (RecoveryAction, RecoveryState, candidate_remedies, choose_target, clone_state,
                                 drop_states_after, restart)
from .step import gradient_norm

log = get_logger(__name__)
RESERVOIR_PER_CLASS = 500  # images per class kept for the informative init (jemfast.sgld.reservoir)


class Guard:
    """Watch your own JEM training loop for divergence; recover as ``jemfast.train`` does.

    In your loop (docs/swap-in.md has the original script's lines and what each remedy needs)::

        guard = jemfast.Guard(model, optimizer, replay_buffer, sampler, n_classes=10, warmup_iters=20)
        # in the loop, after optimizer.step():
        if guard.step(loss, e_real=e_real, e_fake=e_fake, x_fake=x_fake, x=x_lab, y=y_lab, logits=logits):
            continue  # diverged: model, optimizer and buffer are back at a good state, the remedy applied

    Arguments:

    - ``model``: any ``nn.Module``; its whole ``state_dict`` (BatchNorm statistics too) rolls back.
    - ``optimizer``: any torch optimizer; its per-parameter state rolls back.
    - ``buffer``: a :class:`jemfast.ReplayBuffer`, a plain tensor ``[N, *shape]`` on the CPU or the
      device (the original JEM code's replay buffer; restored and re-initialised *in place*, so
      your references stay valid: keep writing into it in place, as that code does), or None.
    - ``sampler``: jemfast.compat's ``sample_q`` (the swap line's: steps, step size and fresh
      chains follow the policy), a :class:`jemfast.SGLD`, or any object with ``n_steps`` (and
      ``step_size``, ``init_fn``) attributes; a hand-written sampler reads :attr:`sgld_steps_factor`,
      :attr:`sgld_step_size_scale` and :attr:`init_fn` instead.
    - ``n_classes``: for the labelled batches (default: ``sampler.args.n_classes``);
      ``reservoir_per_class``: images a class the reservoir keeps (:meth:`add_data`);
      ``warmup_iters``: your lr warm-up's length, which a restart after a gradual collapse starts
      again (0: it does not).
    - ``config``: a :class:`~jemfast.options.config.StabilityConfig`, or a Config (its stability
      section, and its ``loss.energy_l2``/``loss.px_augment`` as the remedies' starting values);
      keyword overrides by field name, e.g. ``Guard(model, opt, check_every=20, max_restarts=2)``,
      checked as the CLI's flags are (ValueError naming the field). ``inject_divergence=N`` is the
      testing aid: it blows up the model's last Linear layer after the N-th :meth:`step`.
    - ``out``: a directory the guard owns (leftover ``guard-*.pt`` there are removed): each good
      state is also written there atomically as ``guard-ITERATION.pt``, the newest ``good_ring``
      kept, so a divergence that recurs before the next good state rolls back one state further
      each time, as ``jemfast.train`` does (a write per check). Without ``out`` good states are
      kept in memory only (``snapshot_ring`` of them).
    - ``seed``: restart k reseeds every RNG with ``seed + 1000 k`` (default: ``torch.initial_seed()``).

    :meth:`step` only records device flags (no host sync); every ``check_every``-th call it
    reads them once (:meth:`check`). Healthy: the current state becomes a good state. Diverged:
    the state is rolled back and the policy of :mod:`jemfast.stability.recovery` applied, as in
    ``jemfast.train``: a sudden blow-up gets a new seed, then the lr and SGLD ladder; a gradual
    collapse with lagging chains switches fresh chains to the informative init (fitted to the
    reservoir; needs labelled batches), then the remedies this loop has hooks for
    (:attr:`px_augment`, :meth:`energy_penalty`), then the ladder. One warning line is logged and
    the event appended to :attr:`restarts`; past ``max_restarts``
    :class:`~jemfast.process.errors.DivergenceExhausted` is raised, with the last good state restored.

    Learning rate: a restart multiplies the optimizer's *current* lr (every param group) by the
    action's factor, and during a warm-up it started again by the warm-up's share; the rest of
    each group's settings keep their live values. A constant lr and schedulers that scale the
    current lr (StepLR, MultiStepLR, ExponentialLR, ReduceLROnPlateau) carry the factor on. If
    your loop sets the lr itself each iteration, or your scheduler recomputes it from its base
    lrs (LambdaLR, OneCycleLR), multiply that lr by :attr:`lr_scale`.

    Iterations count :meth:`step` calls; a rollback does not rewind your loop (your data order
    and lr schedule go on), only the model, optimizer, buffer and RNG streams. One process only.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 buffer: Any | torch.Tensor | None = None, sampler: Any | None = None, *,
                 config: StabilityConfig | Config | None = None, out: str | Path | None = None,
                 seed: int | None = None, n_classes: int | None = None, warmup_iters: int = 0,
                 reservoir_per_class: int = RESERVOIR_PER_CLASS, **stability_overrides: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Guard: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Guard: optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        if not (buffer is None or isinstance(buffer, torch.Tensor)
                or all(hasattr(buffer, a) for a in ("state_dict", "load_state_dict", "reset"))):
            raise TypeError(f"Guard: buffer must be a jemfast ReplayBuffer, a tensor or None, "
                            f"got {type(buffer).__name__}")
        if sampler is not None and not hasattr(sampler, "n_steps"):
            raise TypeError(f"Guard: sampler must have an n_steps attribute (a jemfast SGLD), "
                            f"got {type(sampler).__name__}")
        self.cfg = stability_config(config, stability_overrides)
        self.base = copy.deepcopy(config) if isinstance(config, Config) else Config()  # its loss remedies' base values
        self.model, self.optimizer, self.buffer, self.sampler = model, optimizer, buffer, sampler
        self.seed = torch.initial_seed() % 2**32 if seed is None else check_value("run.seed", seed, "seed")
        self.base_n_steps = int(sampler.n_steps) if sampler is not None else 0
        self.base_step_size = float(sampler.step_size) if hasattr(sampler, "step_size") else None
        self.device = device_of(model, buffer)
        self.recovery = RecoveryState(memory_ring=self.cfg.snapshot_ring)
        if n_classes is None:  # the swapped sample_q's args, or args itself
            n_classes = getattr(getattr(sampler, "args", sampler), "n_classes", None)
        for name, value, lo in (("n_classes", n_classes, 1), ("reservoir_per_class", reservoir_per_class, 2),
                                ("warmup_iters", warmup_iters, 0)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < lo):
                raise ValueError(f"Guard: {name} must be an integer >= {lo}, got {value!r}")
        self.n_classes = None if n_classes is None else int(n_classes)
        self.monitor = DivergenceMonitor(self.cfg, self.device, self.n_classes)
        self.reservoir_per_class = int(reservoir_per_class)
        self.warmup_iters = int(warmup_iters)
        self._ramp: int | None = None  # iterations into a warm-up a restart started again (None: none running)
        self.reservoir: ClassReservoir | None = None
        self.gaussians: ClassGaussians | None = None  # the informative init, once a restart switched to it
        self.hooks: set[str] = set()  # the remedies this loop applies (it called energy_penalty, read px_augment)
        self.iteration = 0
        self.out = Path(out) if out is not None else None
        self.files = GuardFiles(self.out, self.cfg.good_ring) if self.out is not None else None
        self.mark_good()  # iteration 0: the first rollback target

    # ---- the loop --------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float, *, e_real: torch.Tensor | float | None = None,
             e_fake: torch.Tensor | float | None = None, x_fake: torch.Tensor | None = None,
             grad_norm: torch.Tensor | float | None = None, x: torch.Tensor | None = None,
             y: torch.Tensor | None = None, logits: torch.Tensor | None = None,
             acc: torch.Tensor | float | None = None) -> bool:
        """Record one iteration; every ``check_every``-th call check it. True: it rolled back.

        ``loss``, ``e_real``, ``e_fake`` (mean energies of the real and sampled batch, or mean
        log-densities: only finiteness and ``|e_real - e_fake|`` are tested; tensors of several
        values are averaged) are device scalars; ``x_fake: Tensor[B, *shape]`` the samples.
        ``grad_norm`` None: the L2 norm of the model's ``.grad`` now (call after backward and
        before zeroing the gradients); an fp16 GradScaler loop, whose skipped steps have
        non-finite gradients by design, passes its own (0.0 leaves the gradient test out).
        ``x: Tensor[B, *shape]`` with labels ``y: Tensor[B]``: a labelled batch of real images as the
        chains see them (as :meth:`add_data`). ``logits: Tensor[B, n_classes]``: the classifier's
        logits of that batch (the p(y|x) term's), or ``acc``: its train accuracy (a fraction, as
        ``jem_loss``'s ``terms["acc"]``): with it a check sees the classifier collapse, dates the
        collapse from the accuracy's fall, and a collapse with calm energies gets an lr cut rather
        than a p(x) remedy (as in ``jemfast.train``). No host sync except at a check.
        """
        if x is not None:
            self.add_data(x, y)
        dev = self.device
        metrics = {"loss": device_scalar(loss, dev), "e_real": device_scalar(e_real, dev),
                   "e_fake": device_scalar(e_fake, dev),
                   "grad_norm": gradient_norm(self.model, dev) if grad_norm is None else device_scalar(grad_norm, dev)}
        if logits is not None or acc is not None:
            if self.n_classes is None:
                raise ValueError("Guard: a train accuracy needs n_classes (its chance level)")
            if logits is not None and (y is None or acc is not None):
                raise ValueError("Guard: logits need the labels y (pass logits or acc, not both)")
            if logits is not None:
                acc = (logits.detach().argmax(1) == y.to(logits.device)).float().mean()
            metrics["acc"] = device_scalar(acc, dev)
        self.monitor.observe(metrics, None if x_fake is None else x_fake.detach().to(dev))
        self.iteration += 1
        if self._ramp is not None:  # the next iteration's lr
            before = self._ramp_factor()
            self._ramp += 1
            self._scale_lr(self._ramp_factor() / before)
            self._ramp = None if self._ramp_factor() >= 1.0 else self._ramp
        rolled_back = self.iteration % self.cfg.check_every == 0 and self.check()
        if self.iteration == self.cfg.inject_divergence and not self.recovery.restarts:
            inject_divergence(self.model)
        return rolled_back

    def check(self) -> bool:
        """Read the flags now (one host sync); True if that rolled back. Call it before saving
        your own checkpoint, so you never save a diverged state."""
        cause = self.monitor.check(self.iteration)
        if cause is None:
            self.mark_good()
            return False
        rec = self.recovery
        if rec.exhausted(self.cfg.max_restarts):
            good = self._restore(rec.snapshot, lr_factor=1.0)
            where = f"; also in {rec.last_good}" if rec.last_good is not None else ""
            raise DivergenceExhausted(
                f"training diverged at iteration {self.iteration} ({cause}) after {len(rec.restarts)} restart(s); "
                f"model, optimizer and buffer are back at the last good state (iteration {good}{where})")
        restart(rec, self.seed, self.iteration, cause, self.monitor, self._roll_back, self._reseed,
                self.sampler, self.base_n_steps, self.base_step_size, self._reset_buffer,
                self._inform if self._can_inform() else None, self._remedies, self.warmup_iters > 0)
        return True

    def mark_good(self) -> None:
        """Take the current state as the last good state, unchecked (the constructor and
        :meth:`load_state_dict` do; a healthy check does)."""
        state = {"format": FILE_FORMAT, "iteration": self.iteration, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "buffer": self._buffer_state()}
        path = self.files.write(state, self.iteration) if self.files is not None else None
        self.recovery.checkpointed(state, path, self.iteration)
        self.monitor.mark_healthy(self.iteration)
        self.monitor.keep_states(self.recovery.reachable_steps(self._ring()))

    # ---- what the remedies need from the loop ---------------------------------------------------
    def add_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer labelled real images ``x: Tensor[B, *shape]``, ``y: Tensor[B]`` (a batch each
        iteration, or a whole dataset once: any size) to the per-class reservoir the informative
        init is fitted from (:mod:`jemfast.sgld.reservoir`; at most ``reservoir_per_class`` images
        a class, on the model's device). No host sync. Ignored once the switch is made."""
        if self.gaussians is not None:
            return  # the reservoir is frozen at the switch: a resume refits the same Gaussians
        if y is None:
            raise ValueError("Guard: images x need their labels y")
        if self.reservoir is None:
            if self.n_classes is None:
                raise ValueError("Guard: labelled batches need the number of classes: Guard(..., n_classes=C), "
                                 "or a sampler whose args have n_classes")
            self.reservoir = ClassReservoir(self.n_classes, self.reservoir_per_class, self.device, self.seed)
        for start in range(0, x.shape[0], 4096):
            self.reservoir.add(x[start:start + 4096], y[start:start + 4096])

    def energy_penalty(self, e_real: torch.Tensor, e_fake: torch.Tensor) -> torch.Tensor:
        """``w * (mean e_real^2 + mean e_fake^2)``: add it to your loss (energies or log-densities
        per sample, ``Tensor[B]``). ``w`` is 0 (or the Config's ``loss.energy_l2``) until a restart
        applies the energy L2 remedy (0.1); calling it tells the Guard this loop can apply it."""
        self.hooks.add("loss.energy_l2")
        w = self.recovery.overrides.get("loss.energy_l2", self.base.loss.energy_l2)
        return w * (e_real.float().square().mean() + e_fake.float().square().mean())

    @property
    def px_augment(self) -> bool:
        """Whether the p(x) term should see augmented images (True until a restart takes the
        augmentation out, for chains that cannot follow flipped and cropped images). Reading it
        tells the Guard that this loop augments its p(x) batch and can switch that off."""
        self.hooks.add("loss.px_augment")
        return bool(self.recovery.overrides.get("loss.px_augment", self.base.loss.px_augment))

    @property
    def init_fn(self) -> ClassGaussians | None:
        """The informative init once a restart switched to it (``(n, y=None) -> Tensor[n, *shape]``
        on the device, per-class Gaussians fitted to the reservoir), else None (U(-1, 1)): what a
        hand-written sampler draws its fresh chains from."""
        return self.gaussians

    def _can_inform(self) -> bool:
        """Every class has >= 2 images in the reservoir (one host sync, at a restart only)."""
        return self.reservoir is not None and self.reservoir.min_count() >= 2

    def _inform(self) -> None:
        """Fresh chains from the per-class Gaussians of the reservoir from now on."""
        self.gaussians = ClassGaussians(self.reservoir.split(), self.n_classes)
        if hasattr(self.sampler, "init_fn"):  # jemfast.compat's sample_q: init_fn(args, bs)
            self.sampler.init_fn = OriginalInit(self.gaussians)
        if self.buffer is not None and not isinstance(self.buffer, torch.Tensor):
            self.buffer.init_fn = self.gaussians

    def _remedies(self, lagging: bool) -> list[dict[str, Any]]:
        """The policy's config remedies this loop can apply (:func:`candidate_remedies`)."""
        current = self.recovery.effective(self.base)
        return candidate_remedies(current, lagging, "loss.px_augment" in self.hooks, self.hooks)

    # ---- what the policy has done so far -----------------------------------------------------
    @property
    def restarts(self) -> list[dict[str, Any]]:
        """The restart events so far, as ``jemfast.train`` records them: ``{"event": "restart",
        "restart": k, "step": iteration detected, "rolled_back_to": iteration, "cause", "action"}``."""
        return self.recovery.restarts

    @property
    def lr_scale(self) -> float:
        """Cumulative lr factor of the restarts so far (1.0 before any), times the share of a
        warm-up a restart started again (``warmup_iters``) while it runs."""
        return self.recovery.lr_scale * self._ramp_factor()

    @property
    def sgld_step_size_scale(self) -> float:
        """Cumulative SGLD step-size factor of the restarts so far (1.0 before any): a restart after
        a collapse with lagging chains multiplies it by 10 (jemfast.stability.recovery)."""
        return self.recovery.sgld_step_size_scale

    @property
    def sgld_steps_factor(self) -> int:
        """Cumulative SGLD step-count factor of the restarts so far (1 before any)."""
        return self.recovery.sgld_steps_factor

    def state_dict(self) -> dict[str, Any]:
        """The policy's position (iteration, seed, restarts, lr and SGLD-step factors, remedies),
        the detection's history, the reservoir and the informative-init switch: put it in your
        own checkpoint (``torch.save``; tensors on the device, loadable with ``weights_only=True``)."""
        return {"format": FILE_FORMAT, "iteration": self.iteration, "seed": self.seed,
                "base_n_steps": self.base_n_steps, "base_step_size": self.base_step_size,
                "n_classes": self.n_classes, "hooks": sorted(self.hooks), "ramp": self._ramp,
                "monitor": self.monitor.state_dict(),
                "reservoir": None if self.reservoir is None else self.reservoir.state_dict(),
                **copy.deepcopy(self.recovery.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. Call it after restoring the model, optimizer
        and buffer: their current state becomes the last good state (the rollback targets before
        it are gone: save at a healthy :meth:`check`). Sets the sampler's steps and step size to
        their base values x the restored factors (the optimizer's lr already carries the lr
        scale) and, after the switch, its fresh chains to the Gaussians refitted from the reservoir
        (frozen at the switch: the same Gaussians)."""
        self.iteration, self.seed = int(state["iteration"]), int(state["seed"])
        self.base_n_steps = int(state["base_n_steps"])
        self.base_step_size = state.get("base_step_size", self.base_step_size)
        self.recovery.load_state_dict(state)
        self.recovery.restarts = copy.deepcopy(list(state["restarts"]))
        self.recovery.set_sampler(self.sampler, self.base_n_steps, self.base_step_size)
        if state.get("n_classes") is not None:
            self.n_classes = self.monitor.n_classes = int(state["n_classes"])
        self.hooks = set(state.get("hooks", ()))
        self._ramp = state.get("ramp")
        if state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        self.reservoir, self.gaussians = None, None
        if state.get("reservoir") is not None:
            self.reservoir = ClassReservoir(self.n_classes, int(state["reservoir"]["per_class"]), self.device, 0)
            self.reservoir.load_state_dict(state["reservoir"])
        if self.recovery.informative_init:
            self._inform()
        self.recovery.memory = []  # the constructor's state was the model before loading
        self.mark_good()

    # ---- rolling back --------------------------------------------------------------------------
    def _roll_back(self, limit: int, action: RecoveryAction) -> int:
        """Restore the newest good state at or before iteration ``limit`` (memory, or ``out``:
        any error reading a file there, a torn or foreign one, goes further back)."""
        step, state = choose_target(self.recovery.memory, self._ring(), limit, self._read, (Exception,))
        self._scale_lr(1.0 / self._ramp_factor())  # a warm-up under way ends: the lr it ramps to
        self._ramp = None
        self._restore(state, action.lr_factor)
        if action.rewarm:  # the lr warm-up again, from 1 / warmup_iters of the lr
            self._ramp = 0
            self._scale_lr(self._ramp_factor())
        self.monitor.rewind(step)
        drop_states_after(self._ring(), step)
        return step

    def _restore(self, state: dict[str, Any], lr_factor: float) -> int:
        """Load ``state`` into the live objects; the optimizer's group settings stay live, the lr
        times ``lr_factor``. Returns the state's iteration."""
        live = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(clone_state(state["optimizer"]))  # it would keep the snapshot's tensors
        for group, settings in zip(self.optimizer.param_groups, live):
            group.update(settings)
        self._scale_lr(lr_factor)
        if isinstance(self.buffer, torch.Tensor):
            with torch.no_grad():
                self.buffer.copy_(state["buffer"])
        elif self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
        return int(state["iteration"])

    def _scale_lr(self, factor: float) -> None:
        if factor == 1.0:
            return
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # in place: a compiled or captured step holds it
                group["lr"].mul_(factor)
            else:
                group["lr"] *= factor

    def _ramp_factor(self) -> float:
        """The re-warm-up's share of the lr now (1.0 when none is under way)."""
        return 1.0 if self._ramp is None else min(1.0, (self._ramp + 1) / self.warmup_iters)

    def _reseed(self, seed: int) -> None:
        seed_all(seed)
        for part in (self.sampler, self.buffer):
            if hasattr(part, "reseed"):  # the fused kernels' own noise streams
                part.reseed(seed)

    def _reset_buffer(self) -> None:
        """Fresh chains in every row: U(-1, 1) (the original's init_random) or, after the switch,
        the Gaussians; a tensor's row i of N gets class i // (N / C), the original's class-conditional
        layout (random classes if C does not divide N). In place."""
        if isinstance(self.buffer, torch.Tensor):
            with torch.no_grad():
                if self.gaussians is None:
                    self.buffer.uniform_(-1, 1)
                    return
                n, c = self.buffer.shape[0], self.n_classes
                y = (torch.arange(n, device=self.device) // (n // c)).clamp_(max=c - 1) if n % c == 0 else None
                self.buffer.copy_(self.gaussians(n, y).view_as(self.buffer))
        elif self.buffer is not None:
            self.buffer.reset()

    # ---- state pieces and files ----------------------------------------------------------------
    def _buffer_state(self) -> Any:
        if isinstance(self.buffer, torch.Tensor):
            return self.buffer.detach()
        return None if self.buffer is None else self.buffer.state_dict()

    def _ring(self) -> list[Path]:
        """The good-state files in ``out``, newest first (none without ``out``)."""
        return self.files.ring() if self.files is not None else []

    def _read(self, path: Path) -> dict[str, Any]:
        return GuardFiles.read(path, self.model.state_dict(), self._buffer_state())

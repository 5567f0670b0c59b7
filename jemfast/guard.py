"""Divergence detection and rollback inside a training loop you wrote yourself: :class:`Guard`.

The detection is :class:`jemfast.stability.monitor.DivergenceMonitor` (flags kept on the device, read
every ``check_every`` iterations) and the recovery is :func:`jemfast.stability.recovery.restart`, the
policy ``jemfast.train`` follows; this module adds what a foreign loop needs: snapshots of any
model, optimizer and replay buffer (a jemfast ReplayBuffer or the original code's plain tensor).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import seed_all
from .options.config import Config, StabilityConfig, check_value
from .process.errors import DivergenceExhausted
from .process.log import get_logger
from .rundir.checkpoint import atomic_save
from .stability.inject import inject_divergence
from .stability.monitor import DivergenceMonitor
from .stability.recovery import RecoveryAction, RecoveryState, choose_target, restart, state_step, clone_state
from .step import gradient_norm

log = get_logger(__name__)
FILE_FORMAT = 1  # of the guard-ITERATION.pt files and of Guard.state_dict()


class Guard:
    """Watch your own JEM training loop for divergence; roll it back as ``jemfast.train`` does.

    Three lines in your loop::

        guard = jemfast.Guard(model, optimizer, replay_buffer)
        # in the loop, after optimizer.step():
        if guard.step(loss, e_real=e_real, e_fake=e_fake, x_fake=x_fake):
            continue  # diverged: model, optimizer and buffer are back at the last good state

    Arguments:

    - ``model``: any ``nn.Module``; its whole ``state_dict`` (BatchNorm statistics too) rolls back.
    - ``optimizer``: any torch optimizer; its per-parameter state rolls back.
    - ``buffer``: a :class:`jemfast.ReplayBuffer`, a plain tensor ``[N, *shape]`` on the CPU or the
      device (the original JEM code's replay buffer; restored and re-initialised *in place*, so
      your references stay valid: keep writing into it in place, as that code does), or None.
    - ``sampler``: a :class:`jemfast.SGLD` (or any object with an ``n_steps`` attribute), whose
      step count the policy scales; a hand-written sampler multiplies its own step count by
      :attr:`sgld_steps_factor` instead.
    - ``config``: a :class:`~jemfast.options.config.StabilityConfig` (or a Config: its stability section);
      keyword overrides by field name, e.g. ``Guard(model, opt, check_every=20, max_restarts=2)``,
      checked as the CLI's flags are (ValueError naming the field). ``inject_divergence=N`` is the
      testing aid: it blows up the model's last Linear layer after the N-th :meth:`step`.
    - ``out``: a directory the guard owns (leftover ``guard-*.pt`` there are removed): each good
      state is also written there atomically as ``guard-ITERATION.pt``, the newest ``good_ring``
      kept, so a divergence that recurs before the next good state rolls back one state further
      each time, as ``jemfast.train`` does (a write per check: raise ``check_every`` for a big
      model). Without ``out`` only the newest good state is kept (in memory) and every rollback
      returns to it.
    - ``seed``: restart k reseeds every RNG with ``seed + 1000 k`` (default: ``torch.initial_seed()``).

    :meth:`step` only records device flags (no host sync); every ``check_every``-th call it
    reads them once (:meth:`check`). Healthy: the current state becomes the last good state
    (copied on the device; and written to ``out``). Diverged: the state is rolled back and the
    policy of :mod:`jemfast.stability.recovery` applied (a sudden blow-up: new seed; lr x0.5 on restarts
    2 and 5+; SGLD steps x2 on restart 3; buffer re-initialised to U(-1, 1), or its ``init_fn``, on
    restart 4; a gradual collapse: the module's other ladder, less its switch to the informative
    init, which needs the training data the Guard does not have), one
    warning line is logged and the event appended to :attr:`restarts`; past ``max_restarts``
    :class:`~jemfast.process.errors.DivergenceExhausted` is raised, with the last good state restored.

    Learning rate: a restart multiplies the optimizer's *current* lr (every param group) by the
    action's factor; the rest of each group's settings keep their live values, not the
    snapshot's. A constant lr and schedulers that scale the current lr (StepLR, MultiStepLR,
    ExponentialLR, ReduceLROnPlateau) therefore carry the factor on. If your loop sets the lr
    itself each iteration (``get_lr(it)``), or your scheduler recomputes it from its base lrs
    (LambdaLR, OneCycleLR), multiply that lr by :attr:`lr_scale`, the cumulative factor.

    Iterations count :meth:`step` calls; a rollback does not rewind your loop (your data order
    and lr schedule go on), only the model, optimizer, buffer and RNG streams. One process only.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 buffer: Any | torch.Tensor | None = None, sampler: Any | None = None, *,
                 config: StabilityConfig | Config | None = None, out: str | Path | None = None,
                 seed: int | None = None, **stability_overrides: Any) -> None:
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
        self.cfg = _stability_config(config, stability_overrides)
        self.model, self.optimizer, self.buffer, self.sampler = model, optimizer, buffer, sampler
        self.seed = torch.initial_seed() % 2**32 if seed is None else check_value("run.seed", seed, "seed")
        self.base_n_steps = int(sampler.n_steps) if sampler is not None else 0
        self.base_step_size = float(sampler.step_size) if hasattr(sampler, "step_size") else None
        self.device = _device_of(model, buffer)
        self.monitor = DivergenceMonitor(self.cfg, self.device)
        self.recovery = RecoveryState(memory_ring=self.cfg.snapshot_ring)
        self.iteration = 0
        self.out = Path(out) if out is not None else None
        if self.out is not None:
            self._clear_out()
        self.mark_good()  # iteration 0: the first rollback target

    # ---- the loop --------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float, *, e_real: torch.Tensor | float | None = None,
             e_fake: torch.Tensor | float | None = None, x_fake: torch.Tensor | None = None,
             grad_norm: torch.Tensor | float | None = None) -> bool:
        """Record one iteration; every ``check_every``-th call check it. True: it rolled back.

        ``loss``, ``e_real``, ``e_fake`` (mean energies of the real and sampled batch, or mean
        log-densities: only finiteness and ``|e_real - e_fake|`` are tested; tensors of several
        values are averaged) are device scalars; ``x_fake: Tensor[B, *shape]`` the samples.
        ``grad_norm`` None: the L2 norm of the model's ``.grad`` now (call after backward and
        before zeroing the gradients); an fp16 GradScaler loop, whose skipped steps have
        non-finite gradients by design, passes its own (0.0 leaves the gradient test out).
        No host sync except at a check.
        """
        dev = self.device
        metrics = {"loss": _scalar(loss, dev), "e_real": _scalar(e_real, dev), "e_fake": _scalar(e_fake, dev),
                   "grad_norm": gradient_norm(self.model, dev) if grad_norm is None else _scalar(grad_norm, dev)}
        self.monitor.observe(metrics, None if x_fake is None else x_fake.detach().to(dev))
        self.iteration += 1
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
                self.sampler, self.base_n_steps, self.base_step_size, self._reset_buffer)
        return True

    def mark_good(self) -> None:
        """Take the current state as the last good state, unchecked (the constructor and
        :meth:`load_state_dict` do; a healthy check does)."""
        state = {"format": FILE_FORMAT, "iteration": self.iteration, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "buffer": self._buffer_state()}
        path = self._write(state) if self.out is not None else None
        self.recovery.checkpointed(state, path, self.iteration)
        self.monitor.mark_healthy(self.iteration)
        self.monitor.keep_states(self.recovery.reachable_steps(self._ring() if self.out is not None else []))

    # ---- what the policy has done so far -----------------------------------------------------
    @property
    def restarts(self) -> list[dict[str, Any]]:
        """The restart events so far, as ``jemfast.train`` records them: ``{"event": "restart",
        "restart": k, "step": iteration detected, "rolled_back_to": iteration, "cause", "action"}``."""
        return self.recovery.restarts

    @property
    def lr_scale(self) -> float:
        """Cumulative lr factor of the restarts so far (1.0 before any)."""
        return self.recovery.lr_scale

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
        """The policy's position (iteration, seed, restarts, lr and SGLD-step factors), plain
        values only: put it in your own checkpoint."""
        return {"format": FILE_FORMAT, "iteration": self.iteration, "seed": self.seed,
                "base_n_steps": self.base_n_steps, "base_step_size": self.base_step_size,
                **copy.deepcopy(self.recovery.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. Call it after restoring the model, optimizer
        and buffer: their current state becomes the last good state. Sets the sampler's steps to
        its base count x the restored factor (the optimizer's lr already carries the lr scale)."""
        self.iteration, self.seed = int(state["iteration"]), int(state["seed"])
        self.base_n_steps = int(state["base_n_steps"])
        self.base_step_size = state.get("base_step_size", self.base_step_size)
        self.recovery.load_state_dict(state)
        self.recovery.restarts = copy.deepcopy(list(state["restarts"]))
        self.recovery.set_sampler(self.sampler, self.base_n_steps, self.base_step_size)
        self.mark_good()

    # ---- rolling back --------------------------------------------------------------------------
    def _roll_back(self, limit: int, action: RecoveryAction) -> int:
        """Restore the newest good state at or before iteration ``limit`` (memory, or ``out``:
        any error reading a file there, a torn or foreign one, goes further back)."""
        ring = self._ring() if self.out is not None else []
        step, state = choose_target(self.recovery.memory, ring, limit, self._read, (Exception,))
        self._restore(state, action.lr_factor)
        self.monitor.rewind(step)
        for path in ring:  # the states after it belong to the abandoned run
            if state_step(path) > step:
                path.unlink(missing_ok=True)
        return step

    def _restore(self, state: dict[str, Any], lr_factor: float) -> int:
        """Load ``state`` into the live objects; the optimizer's group settings stay live, the lr
        times ``lr_factor``. Returns the state's iteration."""
        live = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(clone_state(state["optimizer"]))  # it would keep the snapshot's tensors
        for group, settings in zip(self.optimizer.param_groups, live):
            group.update(settings)
            if isinstance(group["lr"], torch.Tensor):  # in place: a compiled or captured step holds it
                group["lr"].mul_(lr_factor)
            else:
                group["lr"] *= lr_factor
        if isinstance(self.buffer, torch.Tensor):
            with torch.no_grad():
                self.buffer.copy_(state["buffer"])
        elif self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
        return int(state["iteration"])

    def _reseed(self, seed: int) -> None:
        seed_all(seed)
        for part in (self.sampler, self.buffer):
            if hasattr(part, "reseed"):  # the fused kernels' own noise streams
                part.reseed(seed)

    def _reset_buffer(self) -> None:
        if isinstance(self.buffer, torch.Tensor):
            with torch.no_grad():
                self.buffer.uniform_(-1, 1)  # the original code's init_random
        elif self.buffer is not None:
            self.buffer.reset()

    # ---- state pieces and files ----------------------------------------------------------------
    def _buffer_state(self) -> Any:
        if isinstance(self.buffer, torch.Tensor):
            return self.buffer.detach()
        return None if self.buffer is None else self.buffer.state_dict()

    def _ring(self) -> list[Path]:
        """The good-state files in ``out``, newest first."""
        return sorted(self.out.glob("guard-*.pt"), reverse=True)

    def _write(self, state: dict[str, Any]) -> Path:
        path = self.out / f"guard-{self.iteration:09d}.pt"
        atomic_save(state, path)
        for old in self._ring()[self.cfg.good_ring:]:
            old.unlink(missing_ok=True)
        return path

    def _read(self, path: Path) -> dict[str, Any]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
            raise ValueError("not a good state of this jemfast Guard")
        live = self.model.state_dict()
        if {k: tuple(v.shape) for k, v in state["model"].items()} != {k: tuple(v.shape) for k, v in live.items()}:
            raise ValueError("its model does not match this model")
        saved = state["buffer"]["data"] if isinstance(state["buffer"], dict) else state["buffer"]
        current = self._buffer_state()
        current = current["data"] if isinstance(current, dict) else current
        if (saved is None) != (current is None) or (saved is not None and saved.shape != current.shape):
            raise ValueError("its buffer does not match this buffer")
        return state

    def _clear_out(self) -> None:
        """Remove what an earlier guard left in ``out`` (its states are not this run's)."""
        stale = list(self.out.glob("guard-*.pt")) + list(self.out.glob(".guard-*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info(f"removed {len(stale)} good state file(s) an earlier Guard left in {self.out}")


def _stability_config(config: StabilityConfig | Config | None, overrides: dict[str, Any]) -> StabilityConfig:
    """A checked copy of ``config`` (default: the defaults) with ``overrides`` by field name."""
    if config is None:
        cfg = StabilityConfig()
    elif isinstance(config, (StabilityConfig, Config)):
        cfg = copy.deepcopy(config.stability if isinstance(config, Config) else config)
    else:
        raise TypeError(f"Guard: config must be a StabilityConfig or a Config, got {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(StabilityConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"Guard: no stability setting {', '.join(unknown)} (the settings: {', '.join(names)})")
    for name in names:
        setattr(cfg, name, check_value(f"stability.{name}", overrides.get(name, getattr(cfg, name)), name))
    return cfg


def _device_of(model: nn.Module, buffer: Any) -> torch.device:
    """Where the flags live: the model's device (a CPU buffer of a GPU model does not decide)."""
    for p in model.parameters():
        return p.device
    if isinstance(buffer, torch.Tensor):
        return buffer.device
    return torch.device(getattr(buffer, "device", "cpu"))


def _scalar(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """A float device scalar: a tensor's mean (detached), a number, or 0 for None."""
    if value is None:
        return torch.zeros((), device=device)
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value if value.dim() == 0 else value.float().mean()).float().to(device)
    return torch.full((), float(value), device=device)  # a fill kernel: no host-to-device copy

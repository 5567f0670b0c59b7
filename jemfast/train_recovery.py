"""The recovery side of :class:`jemfast.train.Trainer`: a restart's rollback, reseeding and
informative-init switch, the policy of :mod:`jemfast.stability.recovery` applied to a run.

A mixin: it reads the Trainer's run state (``cfg``, ``run_cfg``, ``model``, ``optimizer``,
``buffer``, ``sampler``, ``data``, ``progress``, ``recovery``, ``monitor``, ``metrics``, ``out``,
``bar``) and calls its ``finish`` and ``save_checkpoint``; ``jemfast.distributed.trainer``
replaces ``_seed_all`` and ``_read_fitting_checkpoint`` per rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .build import apply_optimizer_settings, seed_all
from .distributed import ranks, shards
from .process.errors import DivergenceExhausted, UserError
from .process.log import get_logger
from .rundir.checkpoint import fits_run, read_checkpoint, restore_training_state
from .sgld.chain_init import make_init_fn
from .stability.recovery import (RecoveryAction, candidate_remedies, choose_target, drop_states_after, recovery_action,
                                 restart)

log = get_logger("jemfast.train")  # its lines read as the trainer's


class RecoveryMixin:
    """Restarts for :class:`jemfast.train.Trainer` (see the module docstring for what it reads)."""

    def _reapply_lost_restarts(self, lost: list[dict[str, Any]]) -> None:
        """Restarts logged after the checkpoint (the process was killed before the next one):
        apply their actions again, as the rollback they made had restored this very state."""
        rec = self.recovery
        for event in lost:
            action = recovery_action(int(event["restart"]), self.cfg.run.seed)
            action.overrides = dict(event.get("overrides") or {})
            rec.apply(action)
            if action.rewarm:
                rec.warmup_from = int(event.get("rolled_back_to", rec.warmup_from))
            self._reseed(action.new_seed)
            if action.reset_buffer:
                self.buffer.reset()
            rec.restarts.append(event)
            log.warning(f"re-applying restart {action.restart} (logged after the checkpoint): {action.describe()}")

    def recover(self, cause: str) -> None:
        """Roll back to a good state from before the divergence began and restart with the next
        action of the recovery policy (jemfast.stability.recovery), or stop with
        :class:`DivergenceExhausted` when the restarts are used up."""
        rec, p = self.recovery, self.progress
        if rec.exhausted(self.cfg.stability.max_restarts):
            self.metrics.write({"event": "diverged", "step": p.step, "cause": cause, "restarts": len(rec.restarts)})
            self.finish("diverged")
            raise DivergenceExhausted(
                f"training diverged at iteration {p.step} ({cause}) after "
                f"{len(rec.restarts)} restart(s); last good checkpoint: {rec.last_good}")
        can_inform = self.cfg.sampler.init_dist == "uniform" and bool(self.data.n_classes)
        event = restart(rec, self.cfg.run.seed, p.step, cause, self.monitor, self._roll_back, self._reseed,
                        self.sampler, self.cfg.sampler.n_steps, self.cfg.sampler.step_size, self.buffer.reset,
                        self._inform if can_inform else None,
                        lambda lagging: candidate_remedies(self.run_cfg, lagging, self.data.augments))
        self.run_cfg = rec.effective(self.cfg)
        self.save_checkpoint(restarted=True)  # the restarted state: what --resume continues if the process dies now
        self.metrics.write(event)
        self.bar.n = p.step

    def _inform(self) -> None:
        """Fresh chains from the informative init from now on (a restart's action, kept across
        rollbacks and resumes: RecoveryState.informative_init)."""
        self.buffer.init_fn = make_init_fn("informative", self._labelled_split(), self.data.n_classes)

    def _labelled_split(self):
        """The training images whose labels the run may use (semi-supervised: the labelled subset)."""
        return self.data.train if self.data.labelled is None else self.data.labelled

    def _roll_back(self, limit: int, action: RecoveryAction) -> int:
        """Restore the newest good state at or before iteration ``limit`` (the RNG streams are
        reseeded after, the recovery state is kept); the good checkpoints after it on disk belong
        to the abandoned run and are removed. Returns its iteration."""
        ring = sorted((self.out / "checkpoints").glob("good-*.pt"))
        step, state = choose_target(self.recovery.memory, ring, limit, self._read_good_checkpoint, (UserError,))
        restore_training_state(state, self.model, self.optimizer, self.buffer, self.sampler, self.progress,
                               recovery=None, restore_rng=False)
        apply_optimizer_settings(self.cfg, self.optimizer)  # the target may predate a resume that changed them
        self.monitor.rewind(step)
        if ranks.is_main():
            drop_states_after(ring, step)
        return step

    def _read_good_checkpoint(self, path: Path) -> dict[str, Any]:
        """A good checkpoint of this run's ring, read, checked to fit, and cut to this rank's shard."""
        ckpt = self._read_fitting_checkpoint(path)
        return shards.for_rank(ckpt, ranks.rank(), ranks.world_size(), self.buffer.capacity)

    def _read_fitting_checkpoint(self, path: Path) -> dict[str, Any]:  # jemfast.distributed.trainer: rank 0 reads
        ckpt = read_checkpoint(path, map_location=self.device)
        fits_run(ckpt, self.model, self.buffer, path, self.optimizer, buffer_rows=self.cfg.sampler.buffer_size)
        return ckpt

    def _reseed(self, seed: int) -> None:
        """A restart's new seed: the run's seed from now on, in every RNG and kernel noise stream."""
        self.progress.seed = seed
        self._seed_all(seed)
        self._reseed_kernels(seed)

    def _seed_all(self, seed: int) -> None:  # this and the next two: jemfast.distributed.trainer replaces them
        seed_all(seed)

    def _reseed_kernels(self, seed: int) -> None:
        """The kernels' own noise streams (fused/graph SGLD, buffer gather) follow a new seed too."""
        self.sampler.reseed(seed)
        self.buffer.reseed(seed)

"""``python -m jemfast.train``: train a JEM; ``train(cfg, report=None) -> dict`` for libraries.

The same function serves the CLI, Ray Tune (``report`` is called once per epoch with that
epoch's metrics and the path of its checkpoint) and the tests. Read :meth:`Trainer.run`,
then :meth:`Trainer._train` and :meth:`Trainer._iteration`: that is the whole training loop.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from .build import (apply_optimizer_settings, build_buffer, build_model, build_optimizer, build_sampler,
                    resolve_device)
from .data import load_data
from .distributed import ranks, shards
from .distributed.trainer import data_parallel
from .options.cli import config_from_args, run_cli
from .options.config import Config, validate
from .outputs.curves import CURVES_EVERY_S, save_training_curves
from .outputs.metrics import MetricsLog, MetricWindow, log_metrics
from .outputs.plots import save_buffer_grid, save_samples
from .outputs.summary import existing_summary, run_summary, write_failure_summary
from .process.errors import UserError
from .process.interrupt import StopRequested, stop_on_signals
from .process.log import get_logger, progress_safe_logging, setup_cli_logging
from .process.threads import configure_threads
from .rundir.checkpoint import Progress, restore_training_state, training_state
from .rundir.directory import (drop_previous, mark_best, prepare_out, remove_stale_temp_files,
                               restore_previous, save_good_checkpoint, set_aside_previous, write_json)
from .rundir.resume import read_resume_checkpoint
from .sgld.chain_init import make_init_fn
from .stability.inject import InjectDivergence
from .stability.monitor import DivergenceMonitor
from .stability.recovery import RecoveryState
from .step import accuracy, generative_weights, lr_at, set_lr, train_step
from .train_recovery import RecoveryMixin

log = get_logger(__name__)
NOT_LEARNED_EXIT = 4  # exit code of a run that finished at chance accuracy (2: bad input, 3: diverged)
Report = Callable[[dict[str, Any]], None]
Hook = Callable[["Trainer"], None]  # called at the start of every iteration


@dataclass
class Stop:
    """Why :meth:`Trainer._train` returned: ``finished``, ``interrupted`` or ``diverged`` (cause)."""

    status: str
    cause: str = ""


class Trainer(RecoveryMixin):
    """The live state of one run; :meth:`run` trains to the end and returns the summary."""

    def __init__(self, cfg: Config, report: Report | None = None, hooks: Iterable[Hook] = ()) -> None:
        """Build everything and check everything that can fail before touching ``--out``'s
        contents: a failing start never changes a saved run."""
        self.cfg, self.report = cfg, report
        self.device = resolve_device(cfg.run.device)
        configure_threads(cfg.run.threads)
        self.out, self.lock = prepare_out(cfg.run)
        try:
            self._build(cfg, hooks)
            remove_stale_temp_files(self.out)  # safe: we hold the lock
            self.resume_step = self._resume() if cfg.run.resume else None
        except BaseException:
            self.lock.release()
            raise

    def _build(self, cfg: Config, hooks: Iterable[Hook]) -> None:
        self._seed_all(cfg.run.seed)
        self.data = load_data(cfg.data, self.device)
        shape, n_classes = self.data.input_shape, self.data.n_classes
        self.per_epoch = self.data.train.n_batches(cfg.optim.batch_size, drop_last=True)
        if self.per_epoch == 0:
            raise UserError(f"--batch-size {cfg.optim.batch_size} is larger than the training set "
                            f"({len(self.data.train)})")
        self.model = self.loss_model = build_model(cfg, shape, n_classes, self.device)  # DDP wraps the latter
        self.optimizer = build_optimizer(cfg, self.model)
        self.buffer = build_buffer(cfg, shape, n_classes, self.device,
                                   make_init_fn(cfg.sampler.init_dist, self._labelled_split(), n_classes))
        self.sampler = build_sampler(cfg)
        self.sampler.chain_fn(self.device, self.model)  # an unusable --backend fails here, not mid-run
        self.monitor = DivergenceMonitor(cfg.stability, self.device, n_classes)
        self.monitor.energies = any(w > 0 for w in generative_weights(cfg.loss))
        self.progress = Progress(seed=cfg.run.seed)
        self.recovery = RecoveryState(memory_ring=cfg.stability.snapshot_ring)
        self.run_cfg = cfg  # what the iterations run: cfg with the restarts' config remedies (RecoveryState.effective)
        self.hooks = list(hooks)
        if cfg.stability.inject_divergence >= 0:
            self.hooks.append(InjectDivergence(cfg.stability.inject_divergence))
        self.stop_signal: int | None = None
        self.valid_acc = float("nan")
        self.lr = cfg.optim.lr
        self.t0 = time.perf_counter()

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the last epoch (rolling back on divergence); returns the summary."""
        o, p = self.cfg.optim, self.progress
        try:
            if p.epoch >= o.epochs:  # nothing to train: nothing is rewritten
                summary = existing_summary(self)
                if summary.get("status") != "finished":  # stopped early, already past --epochs
                    raise UserError(f"the checkpoint in {self.out} is at epoch {p.epoch} (iteration {p.step}), "
                                    f"past --epochs {o.epochs}; pass --epochs larger than {p.epoch} to train on")
                log.info(f"the run in {self.out} already finished its {p.epoch} epochs; "
                         f"pass a larger --epochs to train on")
                return summary
            self.t0 = time.perf_counter()
            self.bar = tqdm(total=self.per_epoch * o.epochs, initial=p.step, disable=not self.cfg.run.progress,
                            unit="it", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)
            try:
                with stop_on_signals(self._on_signal, ranks.active()), progress_safe_logging():
                    self._start_outputs()
                    while True:
                        stop = self._train()
                        if stop.status != "diverged":
                            return self.finish(stop.status)
                        self.recover(stop.cause)
            except OSError as exc:  # disk full, read-only file system, ...
                where = f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
                if self.recovery.last_good is None:
                    raise UserError(f"writing to --out {self.out} failed ({where}); nothing of an "
                                    f"earlier run there was changed") from None
                write_failure_summary(self)
                raise UserError(f"writing to --out {self.out} failed ({where}); "
                                f"last good checkpoint: {self.recovery.last_good}") from None
            finally:
                self.bar.close()
                if hasattr(self, "metrics"):
                    self.metrics.close()
        finally:
            self.lock.release()

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    def _start_outputs(self) -> None:
        """Open metrics.jsonl and write the first checkpoint. ``--overwrite`` sets the old run
        aside first and deletes it only once that checkpoint exists (put back on failure)."""
        overwrite = self.cfg.run.overwrite and self.resume_step is None
        if overwrite:
            set_aside_previous(self.out)
        try:
            self.metrics = MetricsLog(self.out, self.resume_step)
            if self.recovery.snapshot is None:
                self.save_checkpoint()  # iteration 0: the first rollback target
        except BaseException:
            if overwrite:
                if hasattr(self, "metrics"):
                    self.metrics.close()
                restore_previous(self.out)
            raise
        if overwrite:
            drop_previous(self.out)

    def _train(self) -> Stop:
        """Train from the current position to the last epoch, or until a stop."""
        o, p = self.cfg.optim, self.progress
        self.window = MetricWindow()
        self.t_window = time.perf_counter()
        while p.epoch < o.epochs:
            for x, y in self._batches(self._order_seed(), p.batch_in_epoch):
                if self._stopping():
                    cause = self.save_checkpoint()
                    return Stop("diverged", cause) if cause else Stop("interrupted")
                try:
                    out = self._iteration(x, y)
                except StopRequested:  # a signal inside the SGLD chain: drop the unfinished iteration
                    cause = self.save_checkpoint()
                    return Stop("diverged", cause) if cause else Stop("interrupted")
                cause = self._every_n_iterations(out.x_fake)
                if cause:
                    return Stop("diverged", cause)
            cause = self._end_epoch()
            if cause:
                return Stop("diverged", cause)
        return Stop("finished")

    def _order_seed(self) -> int:
        """The seed of this epoch's batch order (a resumed epoch replays the same order)."""
        return self.progress.seed * 100_003 + self.progress.epoch

    def _iteration(self, x: torch.Tensor, y: torch.Tensor):
        cfg, p = self.run_cfg, self.progress
        for hook in self.hooks:
            hook(self)
        self.lr = lr_at(cfg.optim, p.step, p.epoch, self.recovery.lr_scale, self.recovery.warmup_from)
        set_lr(self.optimizer, self.lr)
        x_px = None
        if self.data.labelled is not None:  # semi-supervised: (x, y) feeds p(x) only, labels unused
            x_px = self.data.prepare_train(x, augment=cfg.loss.px_augment)
            x, y = self._labelled_batch()
        elif not cfg.loss.px_augment and self.data.augments and not cfg.loss.clf_only:
            x_px = self.data.prepare_train(x, augment=False)  # the same images, un-augmented, for p(x)
        out = train_step(cfg, self.model, self.optimizer, self.sampler, self.buffer,
                         self.data.prepare_train(x), y, self.data.n_classes, x_px=x_px, loss_model=self.loss_model)
        self.monitor.observe(out.metrics, out.x_fake)
        self.window.add(out.metrics)
        p.step += 1
        p.batch_in_epoch += 1
        self.bar.update(1)
        return out

    def _every_n_iterations(self, x_fake: torch.Tensor | None) -> str | None:
        """Checks, logs, pictures and mid-epoch checkpoints that fall on this iteration;
        returns a divergence cause, or None."""
        r, step = self.cfg.run, self.progress.step
        if step % self.cfg.stability.check_every == 0:
            cause = self.monitor.check(step)
            if cause:
                return cause
            self.recovery.checkpointed(self.state(), None, step)  # a good state in memory
        if step % r.log_every == 0:
            log_metrics(self)
        if step % r.sample_every == 0 and x_fake is not None:
            save_samples(self, x_fake, f"step_{step:07d}.png")
        if r.ckpt_every and step % r.ckpt_every == 0:
            return self.save_checkpoint()
        return None

    def _end_epoch(self) -> str | None:
        cfg, p = self.cfg, self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        is_last = p.epoch == cfg.optim.epochs
        record: dict[str, Any] = {"event": "epoch", "step": p.step, "epoch": p.epoch,
                                  "time": time.perf_counter() - self.t0}
        is_best = False
        if p.epoch % cfg.run.eval_every == 0 or is_last:
            self.valid_acc = record["valid_acc"] = accuracy(self.model, self.data.valid, precision=cfg.run.precision)
            is_best = self.valid_acc > p.best_valid_acc
            p.best_valid_acc = max(p.best_valid_acc, self.valid_acc)
        cause = self.save_checkpoint()
        if cause:
            return cause
        if is_best:
            mark_best(self.recovery.last_good, self.out)
        save_buffer_grid(self, f"epoch_{p.epoch:04d}.png")
        self.metrics.write(record)
        save_training_curves(self, every_s=CURVES_EVERY_S)
        if self.report is not None:
            self.report({**record, "valid_acc": self.valid_acc, "restarts": len(self.recovery.restarts),
                         "checkpoint": str(self.out / "checkpoints" / "last.pt"), "done": is_last})
        return None

    # ---- checkpoints and recovery ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint dict of this run now (live tensors)."""
        return training_state(self.cfg, self.data.input_shape, self.data.n_classes, self.model, self.optimizer,
                              self.buffer, self.sampler, self.progress, self.recovery)

    def save_checkpoint(self, restarted: bool = False) -> str | None:
        """Check for divergence first: returns its cause and saves nothing, or saves a good
        checkpoint (the new rollback target) and returns None. ``restarted``: the state a restart
        just rolled back to (no iteration ran since, so no check has judged it again: a divergence
        before the next passing check must roll back further, RecoveryState.target_limit)."""
        cause = self.monitor.check(self.progress.step)
        if cause:
            return cause
        state = self.state()
        path = self._write_checkpoint(state)  # OSError: see run()
        self.recovery.checkpointed(state, path, self.progress.step, checked=not restarted)
        self.monitor.keep_states(self.recovery.reachable_steps((self.out / "checkpoints").glob("good-*.pt")))
        return None

    def _write_checkpoint(self, state: dict[str, Any]) -> Path:
        return save_good_checkpoint(state, self.out, self.progress.step, self.cfg.stability.good_ring)

    def _resume(self) -> int:
        ckpt, path, lost = read_resume_checkpoint(self.out, self.device, self.cfg, self.model, self.buffer)
        if (self.cfg.optim.optimizer == "sgd") != isinstance(self.optimizer, torch.optim.SGD):
            self.optimizer = build_optimizer(self.cfg, self.model)  # the checkpoint's kind continues (resume.KEEP)
        ckpt = shards.for_rank(ckpt, ranks.rank(), ranks.world_size(), self.buffer.capacity)
        restore_training_state(ckpt, self.model, self.optimizer, self.buffer, self.sampler, self.progress,
                               self.recovery, source=path)
        apply_optimizer_settings(self.cfg, self.optimizer)
        self.recovery.checkpointed(ckpt, path, self.progress.step)
        if self.recovery.informative_init and self.buffer.init_fn is None:
            self._inform()
        self._reapply_lost_restarts(lost)
        self.run_cfg = self.recovery.effective(self.cfg)
        self.recovery.set_sampler(self.sampler, self.cfg.sampler.n_steps, self.cfg.sampler.step_size)
        log.info(f"resuming from {path} (epoch {self.progress.epoch}, iteration {self.progress.step})")
        return self.progress.step

    def _batches(self, order_seed: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.data.train.batches(self.cfg.optim.batch_size, order_seed, start, drop_last=True)

    def _labelled_batch(self) -> tuple[torch.Tensor, torch.Tensor]:  # semi-supervised runs
        return self.data.labelled.cycled_batch(self.cfg.optim.batch_size, self._order_seed(), self.progress.batch_in_epoch)

    def _stopping(self) -> bool:
        return self.stop_signal is not None

    def finish(self, status: str) -> dict[str, Any]:
        finished = status == "finished"
        test_acc = accuracy(self.model, self.data.test, precision=self.cfg.run.precision) if finished else math.nan
        summary = run_summary(self, status, test_acc)
        write_json(summary, self.out / "summary.json")
        if finished:
            self.metrics.write({"event": "finished", "step": self.progress.step, "test_acc": test_acc})
        save_training_curves(self)
        return summary


def train(cfg: Config, report: Report | None = None, hooks: Iterable[Hook] = ()) -> dict[str, Any]:
    """Train a JEM as configured; returns the summary (also written to OUT/summary.json).

    ``hooks`` are called with the trainer at the start of every iteration. Raises ValueError
    for invalid configuration, UserError for unusable input (device, dataset, --out,
    checkpoints), DivergenceExhausted when restarts run out.
    """
    validate(cfg)
    with ranks.session(cfg.run.device):
        trainer_class = data_parallel(Trainer) if ranks.active() else Trainer
        return trainer_class(cfg, report, hooks).run()


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging("jemfast.train")

    def _run() -> int:
        summary = train(config_from_args(argv))
        if not ranks.env_is_main():  # under torchrun rank 0 reports for all
            return 128 + summary["stop_signal"] if summary["status"] == "interrupted" else 0
        if summary["status"] == "interrupted":
            print(f"interrupted: checkpoint saved in {summary['out']}/checkpoints; continue with --resume")
            return 128 + (summary["stop_signal"] or signal.SIGINT)
        print(f"test accuracy {summary['test_acc']:.4f}, valid {summary['valid_acc']:.4f}, "
              f"{summary['iterations']} iterations in {summary['wall_time_s']:.0f} s, "
              f"{len(summary['restarts'])} restart(s); outputs in {summary['out']}")
        if summary.get("learned") is False:
            sys.stderr.write(f"jemfast.train: the run finished but did not learn: test accuracy "
                             f"{summary['test_acc']:.4f} is at chance; see {summary['out']}/curves.png\n")
            return NOT_LEARNED_EXIT
        return 0

    try:
        return run_cli(_run, "jemfast.train")
    except KeyboardInterrupt:
        sys.stderr.write("jemfast.train: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m jemfast.train``: train a JEM; ``train(cfg, report=None) -> dict`` for libraries.

The same function serves the CLI, Ray Tune (``report`` is called once per epoch with that
epoch's metrics and the path of its checkpoint) and the tests. Read :meth:`Trainer.run`,
then :meth:`Trainer._train` and :meth:`Trainer._iteration`: that is the whole training loop.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from . import __version__
from .build import build_buffer, build_model, build_optimizer, build_sampler, resolve_device, seed_all
from .checkpoint import Progress, read_checkpoint, restore_training_state, training_state
from .cli import config_from_args, run_cli
from .config import Config, validate
from .data import load_data
from .errors import DivergenceExhausted, UserError
from .log import get_logger, progress_safe_logging, setup_cli_logging
from .metrics import MetricsLog, MetricWindow
from .plots import save_image_grid, save_toy2d_plot
from .rundir import checkpoint_candidates, clear_run, mark_best, prepare_out, save_good_checkpoint, write_json
from .stability import DivergenceMonitor, InjectDivergence, RecoveryState
from .step import accuracy, lr_at, set_lr, train_step
from .threads import configure_threads

log = get_logger(__name__)
Report = Callable[[dict[str, Any]], None]
Hook = Callable[["Trainer"], None]  # called at the start of every iteration
# Fields that must match between a checkpoint and the run resuming it.
IDENTITY = ("data.dataset", "model.name", "model.depth", "model.width", "model.norm",
            "model.hidden", "sampler.buffer_size", "sampler.class_cond")


@dataclass
class Stop:
    """Why :meth:`Trainer._train` returned: ``finished``, ``interrupted`` or ``diverged`` (cause)."""

    status: str
    cause: str = ""


class Trainer:
    """The live state of one run; :meth:`run` trains to the end and returns the summary."""

    def __init__(self, cfg: Config, report: Report | None = None, hooks: Iterable[Hook] = ()) -> None:
        self.cfg, self.report = cfg, report
        self.device = resolve_device(cfg.run.device)
        configure_threads(cfg.run.threads)
        self.out = prepare_out(cfg.run)
        seed_all(cfg.run.seed)
        self.data = load_data(cfg.data, self.device)
        shape, n_classes = self.data.input_shape, self.data.n_classes
        self.model = build_model(cfg, shape, n_classes, self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.buffer = build_buffer(cfg, shape, n_classes, self.device)
        self.sampler = build_sampler(cfg)
        self.monitor = DivergenceMonitor(cfg.stability, self.device)
        self.progress = Progress(seed=cfg.run.seed)
        self.recovery = RecoveryState()
        self.hooks = list(hooks)
        if cfg.stability.inject_divergence >= 0:
            self.hooks.append(InjectDivergence(cfg.stability.inject_divergence))
        self.stop_signal: int | None = None
        self.valid_acc = float("nan")
        self.lr = cfg.optim.lr
        resume_step = self._resume() if cfg.run.resume else None
        if not cfg.run.resume and cfg.run.overwrite:
            clear_run(self.out)
        self.metrics = MetricsLog(self.out, resume_step)

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.cfg.optim
        self.per_epoch = self.data.train.n_batches(o.batch_size, drop_last=True)
        if self.per_epoch == 0:
            raise UserError(f"--batch-size {o.batch_size} is larger than the training set ({len(self.data.train)})")
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.per_epoch * o.epochs, initial=self.progress.step, disable=not self.cfg.run.progress,
                        unit="it", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)
        old_handlers = self._install_signal_handlers()
        try:
            with progress_safe_logging():
                if self.recovery.snapshot is None:
                    self.save_checkpoint()  # iteration 0: the first rollback target
                while True:
                    stop = self._train()
                    if stop.status != "diverged":
                        return self.finish(stop.status)
                    self.recover(stop.cause)
        finally:
            self._restore_signal_handlers(old_handlers)
            self.bar.close()
            self.metrics.close()

    def _train(self) -> Stop:
        """Train from the current position to the last epoch, or until a stop."""
        o, p = self.cfg.optim, self.progress
        self.window = MetricWindow()
        self.t_window = time.perf_counter()
        while p.epoch < o.epochs:
            order_seed = p.seed * 100_003 + p.epoch  # a resumed epoch replays the same order
            for x, y in self.data.train.batches(o.batch_size, order_seed, p.batch_in_epoch, drop_last=True):
                if self.stop_signal is not None:
                    cause = self.save_checkpoint()
                    return Stop("diverged", cause) if cause else Stop("interrupted")
                out = self._iteration(x, y)
                cause = self._every_n_iterations(out.x_fake)
                if cause:
                    return Stop("diverged", cause)
            cause = self._end_epoch()
            if cause:
                return Stop("diverged", cause)
        return Stop("finished")

    def _iteration(self, x: torch.Tensor, y: torch.Tensor):
        cfg, p = self.cfg, self.progress
        for hook in self.hooks:
            hook(self)
        self.lr = lr_at(cfg.optim, p.step, p.epoch, self.recovery.lr_scale)
        set_lr(self.optimizer, self.lr)
        out = train_step(cfg, self.model, self.optimizer, self.sampler, self.buffer,
                         self.data.prepare_train(x), y, self.data.n_classes)
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
            cause = self.monitor.check()
            if cause:
                return cause
        if step % r.log_every == 0:
            self._log()
        if step % r.sample_every == 0 and x_fake is not None:
            self._save_samples(x_fake, f"step_{step:07d}.png")
        if r.ckpt_every and step % r.ckpt_every == 0:
            return self.save_checkpoint()
        return None

    def _end_epoch(self) -> str | None:
        cfg, p = self.cfg, self.progress
        p.epoch += 1
        p.batch_in_epoch = 0
        is_last = p.epoch == cfg.optim.epochs
        record: dict[str, Any] = {"event": "epoch", "step": p.step, "epoch": p.epoch}
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
        self._save_buffer_grid(f"epoch_{p.epoch:04d}.png")
        self.metrics.write(record)
        if self.report is not None:
            self.report({**record, "valid_acc": self.valid_acc, "restarts": len(self.recovery.restarts),
                         "checkpoint": str(self.out / "checkpoints" / "last.pt"), "done": is_last})
        return None

    # ---- checkpoints and recovery ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint dict of this run now (live tensors)."""
        return training_state(self.cfg, self.data.input_shape, self.data.n_classes, self.model, self.optimizer,
                              self.buffer, self.sampler, self.progress, self.recovery)

    def save_checkpoint(self) -> str | None:
        """Check for divergence first: returns its cause and saves nothing, or saves a good
        checkpoint (the new rollback target) and returns None."""
        cause = self.monitor.check()
        if cause:
            return cause
        state = self.state()
        path = save_good_checkpoint(state, self.out, self.progress.step, self.cfg.stability.good_ring)
        self.recovery.checkpointed(state, path)
        return None

    def _resume(self) -> int:
        errors = []
        for path in checkpoint_candidates(self.out):
            try:
                ckpt = read_checkpoint(path, map_location=self.device)
            except UserError as exc:
                errors.append(str(exc))
                log.warning(f"{exc}; trying an older checkpoint")
                continue
            self._check_identity(ckpt, path)
            restore_training_state(ckpt, self.model, self.optimizer, self.buffer, self.sampler, self.progress,
                                   self.recovery)
            self.recovery.checkpointed(ckpt, path)
            log.info(f"resuming from {path} (epoch {self.progress.epoch}, iteration {self.progress.step})")
            return self.progress.step
        raise UserError(f"--resume: no readable checkpoint in {self.out / 'checkpoints'} ({'; '.join(errors)})")

    def _check_identity(self, ckpt: dict[str, Any], path: Path) -> None:
        theirs, ours = Config.from_dict(ckpt["config"]), self.cfg
        for key in IDENTITY:
            section, name = key.split(".")
            a, b = getattr(getattr(theirs, section), name), getattr(getattr(ours, section), name)
            if a != b:
                raise UserError(f"checkpoint {path} is from another run: {key} is {a!r} there, {b!r} here")

    def recover(self, cause: str) -> None:
        """Roll back and restart with the next action of the recovery policy (jemfast.stability),
        or stop with :class:`DivergenceExhausted` when the restarts are used up."""
        rec, p = self.recovery, self.progress
        if len(rec.restarts) >= self.cfg.stability.max_restarts or rec.snapshot is None:
            self.metrics.write({"event": "diverged", "step": p.step, "cause": cause, "restarts": len(rec.restarts)})
            self.finish("diverged")
            raise DivergenceExhausted(
                f"training diverged at iteration {p.step} ({cause}) after "
                f"{len(rec.restarts)} restart(s); last good checkpoint: {rec.last_good}")
        diverged_at = p.step
        action = rec.next_action(self.cfg.run.seed)
        restore_training_state(self._rollback_target(rec.depth), self.model, self.optimizer, self.buffer,
                               self.sampler, p, recovery=None, restore_rng=False)
        rec.apply(action)
        p.seed = action.new_seed
        seed_all(p.seed)
        self.sampler.n_steps = self.cfg.sampler.n_steps * rec.sgld_steps_factor
        if action.reset_buffer:
            self.buffer.reset()
        event = {"event": "restart", "restart": action.restart, "step": diverged_at, "rolled_back_to": p.step,
                 "cause": cause, "action": action.describe()}
        rec.restarts.append(event)
        self.metrics.write(event)
        self.bar.n = p.step
        log.warning(f"divergence at iteration {diverged_at} ({cause}); restart {action.restart}: "
                    f"rolled back to iteration {p.step}, {action.describe()}")

    def _rollback_target(self, depth: int) -> dict[str, Any]:
        """The in-memory snapshot (depth 0) or the ``depth``-th older good checkpoint on disk."""
        ring = sorted((self.out / "checkpoints").glob("good-*.pt"), reverse=True)
        for path in (ring[depth:] or ring[-1:]) if depth > 0 else []:
            try:
                return read_checkpoint(path, map_location=self.device)
            except UserError:
                continue
        return self.recovery.snapshot

    # ---- outputs -----------------------------------------------------------------------
    def _log(self) -> None:
        means = self.window.mean()  # the one host sync of the log interval
        now, n = time.perf_counter(), self.cfg.run.log_every
        record = {"step": self.progress.step, "epoch": self.progress.epoch, **means, "lr": self.lr,
                  "images_per_s": n * self.cfg.optim.batch_size / max(now - self.t_window, 1e-9),
                  "time": now - self.t0}
        self.t_window = now
        self.metrics.write(record)
        self.bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['acc']:.3f}",
                             img_s=f"{record['images_per_s']:.0f}")

    def _save_samples(self, x: torch.Tensor, name: str) -> None:
        path = self.out / "samples" / name
        if len(self.data.input_shape) == 3:
            save_image_grid(x[:64], path)
        else:
            save_toy2d_plot(self.model, self.buffer.data[:2000], self.data.train.x[:2000], path)

    def _save_buffer_grid(self, name: str) -> None:
        """A grid of buffer rows spread over the whole buffer (no RNG used)."""
        rows = torch.linspace(0, self.buffer.capacity - 1, min(100, self.buffer.capacity)).long()
        self._save_samples(self.buffer.data[rows.to(self.device)], name)

    def finish(self, status: str) -> dict[str, Any]:
        p = self.progress
        finished = status == "finished"
        test_acc = accuracy(self.model, self.data.test, precision=self.cfg.run.precision) if finished else math.nan
        summary = {
            "status": status, "valid_acc": self.valid_acc, "best_valid_acc": p.best_valid_acc,
            "test_acc": test_acc, "epochs": p.epoch, "iterations": p.step,
            "wall_time_s": time.perf_counter() - self.t0, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "jemfast_version": __version__,
            "torch_threads": torch.get_num_threads(), "sgld_backend": self.sampler.backend, "restarts": self.recovery.restarts,
            "out": str(self.out), "stop_signal": self.stop_signal, "config": self.cfg.to_dict(),
        }
        write_json(summary, self.out / "summary.json")
        if finished:
            self.metrics.write({"event": "finished", "step": p.step, "test_acc": test_acc})
        return summary

    # ---- signals -----------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, _frame: Any) -> None:
            if self.stop_signal is not None:  # a second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self.stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, old: dict[int, Any]) -> None:
        for s, h in old.items():
            signal.signal(s, h)


def train(cfg: Config, report: Report | None = None, hooks: Iterable[Hook] = ()) -> dict[str, Any]:
    """Train a JEM as configured; returns the summary (also written to OUT/summary.json).

    ``hooks`` are called with the trainer at the start of every iteration. Raises ValueError
    for invalid configuration, UserError for unusable input (device, dataset, --out,
    checkpoints), DivergenceExhausted when restarts run out.
    """
    validate(cfg)
    return Trainer(cfg, report, hooks).run()


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging("jemfast.train")

    def _run() -> int:
        summary = train(config_from_args(argv))
        if summary["status"] == "interrupted":
            print(f"interrupted: checkpoint saved in {summary['out']}/checkpoints; continue with --resume")
            return 128 + (summary["stop_signal"] or signal.SIGINT)
        print(f"test accuracy {summary['test_acc']:.4f}, valid {summary['valid_acc']:.4f}, "
              f"{summary['iterations']} iterations in {summary['wall_time_s']:.0f} s, "
              f"{len(summary['restarts'])} restart(s); outputs in {summary['out']}")
        return 0

    return run_cli(_run, "jemfast.train")


if __name__ == "__main__":
    sys.exit(main())

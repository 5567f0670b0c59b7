"""``python -m jemfast.train``: train a JEM; ``train(cfg, report=None) -> dict`` for libraries.

The same function serves the CLI, Ray Tune (``report`` is called once per epoch with that
epoch's metrics and the path of its checkpoint) and the tests.
"""
from __future__ import annotations

import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .buffer import ReplayBuffer
from .checkpoint import FORMAT_VERSION, read_checkpoint, rng_state, set_rng_state
from .cli import config_from_args, run_cli
from .config import Config, validate
from .data import DataBundle, load_data
from .energy import JEM
from .errors import DivergenceExhausted, UserError
from .loop import accuracy, build_optimizer, lr_multiplier, train_step
from .models import build_classifier
from .plots import save_image_grid, save_toy2d_plot
from .rundir import MetricsLog, checkpoint_candidates, clear_run, mark_best, prepare_out, save_good_checkpoint, write_json
from .sgld import SGLD
from .stability import DivergenceMonitor, inject_divergence, recovery_action

Report = Callable[[dict[str, Any]], None]
# Fields that must match between a checkpoint and the run resuming it.
IDENTITY = ("data.dataset", "model.name", "model.depth", "model.width", "model.norm",
            "model.hidden", "sampler.buffer_size", "sampler.class_cond")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Diverged(Exception):
    pass


class _Interrupted(Exception):
    pass


class Trainer:
    """Holds the live training state; ``run()`` trains to the end and returns the summary."""

    def __init__(self, cfg: Config, report: Report | None) -> None:
        self.cfg = cfg
        self.report = report
        self.device = resolve_device(cfg.run.device)
        self.out = prepare_out(cfg.run)
        seed_all(cfg.run.seed)
        self.data: DataBundle = load_data(cfg.data, self.device)
        self.model = JEM(build_classifier(cfg.model, self.data.input_shape, self.data.n_classes)).to(self.device)
        if cfg.run.channels_last and len(self.data.input_shape) == 3:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model)
        s = cfg.sampler
        self.buffer = ReplayBuffer(s.buffer_size, self.data.input_shape,
                                   self.data.n_classes if s.class_cond else None, s.reinit_freq, self.device)
        self.sampler = SGLD(s.n_steps, s.step_size, s.noise_std, s.backend, precision=cfg.run.precision)
        self.monitor = DivergenceMonitor(cfg.stability, self.device)
        self.step = self.epoch = self.batch = 0
        self.best_valid = -1.0
        self.lr_scale = 1.0
        self.seed = cfg.run.seed
        self.restarts: list[dict[str, Any]] = []
        self.snapshot: dict[str, Any] | None = None
        self.last_good: Path | None = None
        self.injected = False
        self.saved_since_recovery = True
        self.rollback_depth = 0
        self.stop_signal: int | None = None
        self.valid_acc = float("nan")
        resume_step = self._resume() if cfg.run.resume else None
        if not cfg.run.resume and cfg.run.overwrite:
            clear_run(self.out)
        self.metrics = MetricsLog(self.out, resume_step)

    # ---- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "jemfast_version": __version__,
            "config": self.cfg.to_dict(), "input_shape": list(self.data.input_shape),
            "n_classes": self.data.n_classes, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": {"lr_scale": self.lr_scale},
            "sampler": {"n_steps": self.sampler.n_steps}, "buffer": self.buffer.state_dict(),
            "rng": rng_state(), "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch,
            "best_valid_acc": self.best_valid, "seed": self.seed, "restarts": list(self.restarts),
        }

    def load_state(self, ckpt: dict[str, Any], restore_rng: bool = True) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.buffer.load_state_dict(ckpt["buffer"])
        self.lr_scale = float(ckpt["scheduler"]["lr_scale"])
        self.sampler.n_steps = int(ckpt["sampler"]["n_steps"])
        self.step, self.epoch, self.batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        self.best_valid = float(ckpt["best_valid_acc"])
        self.seed = int(ckpt["seed"])
        if restore_rng:
            set_rng_state(ckpt["rng"])

    def save_checkpoint(self) -> None:
        """Check for divergence (raising _Diverged, nothing saved), then save a good checkpoint."""
        cause = self.monitor.check()
        if cause:
            raise _Diverged(cause)
        state = self.state()
        self.last_good = save_good_checkpoint(state, self.out, self.step, self.cfg.stability.good_ring)
        self.snapshot = _clone(state)
        self.saved_since_recovery = True

    def _resume(self) -> int:
        errors = []
        for path in checkpoint_candidates(self.out):
            try:
                ckpt = read_checkpoint(path, map_location=self.device)
            except UserError as exc:
                errors.append(str(exc))
                tqdm.write(f"jemfast: {exc}; trying an older checkpoint", file=sys.stderr)
                continue
            self._check_identity(ckpt, path)
            self.load_state(ckpt)
            self.restarts = list(ckpt["restarts"])
            self.snapshot, self.last_good = _clone(ckpt), path
            tqdm.write(f"jemfast: resuming from {path} (epoch {self.epoch}, iteration {self.step})", file=sys.stderr)
            return self.step
        raise UserError(f"--resume: no readable checkpoint in {self.out / 'checkpoints'} ({'; '.join(errors)})")

    def _check_identity(self, ckpt: dict[str, Any], path: Path) -> None:
        theirs, ours = Config.from_dict(ckpt["config"]), self.cfg
        for key in IDENTITY:
            section, name = key.split(".")
            a, b = getattr(getattr(theirs, section), name), getattr(getattr(ours, section), name)
            if a != b:
                raise UserError(f"checkpoint {path} is from another run: {key} is {a!r} there, {b!r} here")

    # ---- recovery ----------------------------------------------------------------------
    def recover(self, cause: str) -> None:
        k = len(self.restarts) + 1
        if k > self.cfg.stability.max_restarts or self.snapshot is None:
            self.metrics.write({"event": "diverged", "step": self.step, "cause": cause,
                                "restarts": len(self.restarts)})
            self.finish("diverged")
            raise DivergenceExhausted(
                f"training diverged at iteration {self.step} ({cause}) after "
                f"{len(self.restarts)} restart(s); last good checkpoint: {self.last_good}")
        action = recovery_action(k, self.cfg.run.seed)
        diverged_at, lr_scale, n_steps = self.step, self.lr_scale, self.sampler.n_steps
        # A divergence that recurs before any new good checkpoint means the newest one was
        # already on its way out: go one checkpoint further back in the ring each time.
        self.rollback_depth = 0 if self.saved_since_recovery else self.rollback_depth + 1
        self.load_state(self._rollback_target(self.rollback_depth), restore_rng=False)
        self.saved_since_recovery = False
        self.seed = action.new_seed
        seed_all(self.seed)
        self.lr_scale = lr_scale * action.lr_factor  # changes of earlier restarts persist
        self.sampler.n_steps = n_steps * action.sgld_steps_factor
        if action.reset_buffer:
            self.buffer.reset()
        event = {"event": "restart", "restart": k, "step": diverged_at, "rolled_back_to": self.step,
                 "cause": cause, "action": action.describe()}
        self.restarts.append(event)
        self.metrics.write(event)
        tqdm.write(f"jemfast: divergence at iteration {diverged_at} ({cause}); restart {k}: "
                   f"rolled back to iteration {self.step}, {action.describe()}", file=sys.stderr)

    def _rollback_target(self, depth: int) -> dict[str, Any]:
        """The in-memory snapshot (depth 0) or the ``depth``-th older good checkpoint on disk."""
        ring = sorted((self.out / "checkpoints").glob("good-*.pt"), reverse=True)
        for path in (ring[depth:] or ring[-1:]) if depth > 0 else []:
            try:
                return read_checkpoint(path, map_location=self.device)
            except UserError:
                continue
        return self.snapshot

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.t0 = time.perf_counter()
        o = self.cfg.optim
        per_epoch = self.data.train.n_batches(o.batch_size, drop_last=True)
        if per_epoch == 0:
            raise UserError(f"--batch-size {o.batch_size} is larger than the training set ({len(self.data.train)})")
        self.bar = tqdm(total=per_epoch * o.epochs, initial=self.step, disable=not self.cfg.run.progress,
                        unit="it", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)
        if self.snapshot is None:
            self.save_checkpoint()
        old_handlers = self._install_signal_handlers()
        try:
            while True:
                try:
                    self._epochs(per_epoch)
                    break
                except _Diverged as exc:
                    self.recover(str(exc))
                    self.bar.n = self.step
            return self.finish("finished")
        except _Interrupted:
            return self.finish("interrupted")
        finally:
            self._restore_signal_handlers(old_handlers)
            self.bar.close()
            self.metrics.close()

    def _epochs(self, per_epoch: int) -> None:
        cfg, o = self.cfg, self.cfg.optim
        window = torch.zeros(7, device=self.device)
        n_window, t_window = 0, time.perf_counter()
        while self.epoch < o.epochs:
            order_seed = self.seed * 100_003 + self.epoch
            for x, y in self.data.train.batches(o.batch_size, order_seed, self.batch, drop_last=True):
                if self.stop_signal is not None:
                    self.save_checkpoint()
                    raise _Interrupted()
                if self.step == cfg.stability.inject_divergence and not self.injected and not self.restarts:
                    self.injected = True
                    inject_divergence(self.model)
                lr = o.lr * self.lr_scale * lr_multiplier(cfg, self.step, self.epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x = self.data.augment(x)
                if cfg.data.noise_std > 0:
                    x = x + cfg.data.noise_std * torch.randn_like(x)
                out = train_step(cfg, self.model, self.optimizer, self.sampler, self.buffer, x, y, self.data.n_classes)
                self.monitor.observe(out.loss, out.e_real, out.e_fake, out.grad_norm, out.x_fake)
                window += torch.stack([out.loss, out.loss_ce, out.loss_px, out.e_real, out.e_fake,
                                       out.correct.float() / x.shape[0], out.grad_norm])
                self.step += 1
                self.batch += 1
                n_window += 1
                self.bar.update(1)
                if self.step % cfg.stability.check_every == 0:
                    cause = self.monitor.check()
                    if cause:
                        raise _Diverged(cause)
                if self.step % cfg.run.log_every == 0:
                    t_window = self._log(window, n_window, t_window, lr)
                    window.zero_()
                    n_window = 0
                if self.step % cfg.run.sample_every == 0 and out.x_fake is not None:
                    self._save_samples(out.x_fake, f"step_{self.step:07d}.png")
                if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0:
                    self.save_checkpoint()
            self._end_epoch(per_epoch)

    def _log(self, window: torch.Tensor, n: int, t_start: float, lr: float) -> float:
        vals = (window / max(n, 1)).tolist()  # the one host sync of the log interval
        now = time.perf_counter()
        keys = ("loss", "loss_ce", "loss_px", "e_real", "e_fake", "acc", "grad_norm")
        record = {"step": self.step, "epoch": self.epoch, **dict(zip(keys, vals)), "lr": lr,
                  "images_per_s": n * self.cfg.optim.batch_size / max(now - t_start, 1e-9),
                  "time": now - self.t0}
        self.metrics.write(record)
        self.bar.set_postfix(loss=f"{vals[0]:.3f}", acc=f"{vals[5]:.3f}", img_s=f"{record['images_per_s']:.0f}")
        return now

    def _end_epoch(self, per_epoch: int) -> None:
        self.epoch += 1
        self.batch = 0
        cfg = self.cfg
        is_last = self.epoch == cfg.optim.epochs
        record: dict[str, Any] = {"event": "epoch", "step": self.step, "epoch": self.epoch}
        is_best = False
        if self.epoch % cfg.run.eval_every == 0 or is_last:
            self.valid_acc = accuracy(self.model, self.data.valid, precision=cfg.run.precision)
            record["valid_acc"] = self.valid_acc
            is_best = self.valid_acc > self.best_valid
            self.best_valid = max(self.best_valid, self.valid_acc)
        self.save_checkpoint()
        if is_best:
            mark_best(self.last_good, self.out)
        self._save_final_samples(f"epoch_{self.epoch:04d}.png")
        self.metrics.write(record)
        if self.report is not None:
            self.report({**record, "valid_acc": self.valid_acc, "restarts": len(self.restarts),
                         "checkpoint": str(self.out / "checkpoints" / "last.pt"), "done": is_last})

    # ---- outputs -----------------------------------------------------------------------
    def _save_samples(self, x: torch.Tensor, name: str) -> None:
        path = self.out / "samples" / name
        if len(self.data.input_shape) == 3:
            save_image_grid(x[:64], path)
        else:
            save_toy2d_plot(self.model, self.buffer.data[:2000], self.data.train.x[:2000], path)

    def _save_final_samples(self, name: str) -> None:
        """A grid of buffer rows spread over the whole buffer (no RNG used)."""
        rows = torch.linspace(0, self.buffer.capacity - 1, min(100, self.buffer.capacity)).long()
        self._save_samples(self.buffer.data[rows.to(self.device)], name)

    def finish(self, status: str) -> dict[str, Any]:
        test_acc = accuracy(self.model, self.data.test, precision=self.cfg.run.precision) if status == "finished" else float("nan")
        summary = {
            "status": status, "valid_acc": self.valid_acc, "best_valid_acc": self.best_valid,
            "test_acc": test_acc, "epochs": self.epoch, "iterations": self.step,
            "wall_time_s": time.perf_counter() - self.t0, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "jemfast_version": __version__,
            "sgld_backend": self.sampler.backend, "restarts": self.restarts,
            "out": str(self.out), "stop_signal": self.stop_signal, "config": self.cfg.to_dict(),
        }
        write_json(summary, self.out / "summary.json")
        if status == "finished":
            self.metrics.write({"event": "finished", "step": self.step, "test_acc": test_acc})
        return summary

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


def _clone(obj: Any) -> Any:
    """Deep copy of a checkpoint dict (tensors cloned), so later training does not alias it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def train(cfg: Config, report: Report | None = None) -> dict[str, Any]:
    """Train a JEM as configured; returns the summary (also written to OUT/summary.json).

    Raises ValueError for invalid configuration, UserError for unusable input (device,
    dataset, --out, checkpoints), DivergenceExhausted when restarts run out.
    """
    validate(cfg)
    return Trainer(cfg, report).run()


def main(argv: list[str] | None = None) -> int:
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

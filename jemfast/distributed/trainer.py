"""The trainer of a data-parallel run under ``torchrun`` (``WORLD_SIZE`` > 1).

Each rank trains on its slice of every global batch (the same seeded permutation on every
rank, cut into ``world`` slices of ``--batch-size``; semi-supervised runs cut the global
labelled batch the same way, from the labelled subset every rank holds whole), keeps its own
replay-buffer shard of ``buffer_size // world`` rows on its own device and runs its own chains
(seed ``seed + rank``).
The loss forward goes through :class:`~torch.nn.parallel.DistributedDataParallel` (gradients
all-reduced, so every rank holds the same model and optimizer); SGLD uses the bare model.

Collective decisions: every divergence check ORs the ranks' flags and takes the largest pending
signal number (:meth:`_reduce_flags`), so all ranks roll back, or stop and checkpoint, at the
same iteration. Rank 0 alone takes the run lock, logs, and writes metrics, pictures, summary
and checkpoints; a checkpoint gathers every rank's buffer shard and RNG states
(:mod:`jemfast.distributed.shards`). Reading checkpoints is rank 0's too, which broadcasts them, so the
other nodes of a multi-node run need no shared file system.

:func:`data_parallel` builds the class from :class:`jemfast.train.Trainer` (passed in, so this
module does not import jemfast.train).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from ..buffer import ReplayBuffer
from ..options.config import SECTIONS, Config
from ..process.errors import UserError
from ..rundir.directory import prepare_out, remove_stale_temp_files
from ..stability.inject import InjectDivergence
from ..stability.monitor import CAUSES
from . import ranks
from .shards import merge_shards

# Testing aid: with --inject-divergence, blow up the model on this rank only.
INJECT_RANK_ENV = "JEMFAST_TEST_INJECT_RANK"


class _NoLock:
    def release(self) -> None:
        pass


class _NoMetrics:
    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def param_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of every parameter (equal on ranks that hold the same model)."""
    with torch.no_grad():
        return float(sum((p.double().sum() + p.double().abs().sum() * 1e-3).cpu() for p in model.parameters()))


def data_parallel(base: type) -> type:
    """The data-parallel subclass of the trainer class ``base``."""

    class DistributedTrainer(base):  # type: ignore[valid-type, misc]
        def __init__(self, cfg: Config, report: Any = None, hooks: Iterable[Any] = ()) -> None:
            self.rank, self.world = ranks.rank(), ranks.world_size()
            self.cfg, self.report = cfg, report if self.rank == 0 else None
            if self.rank:
                cfg.run.progress = False
            self.stop_agreed = False
            self.device = ranks.agree(lambda: ranks.rank_device(cfg.run.device))
            self.out, self.lock = Path(cfg.run.out), _NoLock()

            def take_out() -> None:
                self.out, self.lock = prepare_out(cfg.run)

            ranks.on_main(take_out)
            try:
                ranks.agree(lambda: self._build(cfg, hooks))
                if self.rank == 0:
                    remove_stale_temp_files(self.out)
                self.resume_step = ranks.agree(self._resume) if cfg.run.resume else None
            except BaseException:
                self.lock.release()
                raise

        def _build(self, cfg: Config, hooks: Iterable[Any]) -> None:
            super()._build(cfg, hooks)
            b, w, s = cfg.optim.batch_size, self.world, cfg.sampler
            self.per_epoch = self.data.train.n_batches(b * w, drop_last=True)
            if self.per_epoch == 0:
                raise UserError(f"the global batch (--batch-size {b} x {w} processes) is larger than the "
                                f"training set ({len(self.data.train)})")
            n_classes = self.data.n_classes if s.class_cond else None
            if s.buffer_size // w < (n_classes or 1):
                raise UserError(f"--buffer-size {s.buffer_size}: each of the {w} processes keeps "
                                f"buffer_size // {w} rows, too few")
            if n_classes and (s.buffer_size // w) % n_classes:
                raise UserError(f"--buffer-size {s.buffer_size} with --class-cond: each of the {w} processes keeps "
                                f"buffer_size // {w} rows, which must be a multiple of the {n_classes} classes "
                                f"(use a multiple of {w * n_classes})")
            self.buffer = ReplayBuffer(s.buffer_size // w, self.data.input_shape, n_classes, s.reinit_freq,
                                       self.device, init_fn=self.buffer.init_fn)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_model = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's weights
            self.monitor.reduce = self._reduce_flags
            self.monitor.reduce_means = ranks.all_mean
            inject_rank = os.environ.get(INJECT_RANK_ENV)
            if inject_rank not in (None, "") and int(inject_rank) != self.rank:
                self.hooks = [h for h in self.hooks if not isinstance(h, InjectDivergence)]

        def run(self) -> dict[str, Any]:
            try:
                return super().run()
            except RuntimeError as exc:
                if not ranks.lost_peer(exc):
                    raise
                raise ranks.peer_lost(exc, f"last good checkpoint: {self.recovery.last_good}; "
                                                 f"continue with --resume") from None
            finally:  # the DDP wrapper goes before the process group (ranks.session says why)
                self.loss_model = self.model

        # ---- collective decisions ------------------------------------------------------
        def _reduce_flags(self, value: int) -> int:
            """The OR of every rank's divergence flags (one tiny all-reduce); a signal pending on
            any rank becomes every rank's stop decision."""
            bits = [(value >> i) & 1 for i in range(len(CAUSES))]
            *bits, signum = ranks.all_max(bits + [self.stop_signal or 0])
            if signum:
                self.stop_agreed, self.stop_signal = True, signum
            return sum(b << i for i, b in enumerate(bits))

        def _stopping(self) -> bool:
            return self.stop_agreed

        def _seed_all(self, seed: int) -> None:
            super()._seed_all(seed + self.rank)

        def _batches(self, order_seed: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            b, r = self.cfg.optim.batch_size, self.rank
            for x, y in self.data.train.batches(b * self.world, order_seed, start, drop_last=True):
                yield x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]

        def _labelled_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
            """This rank's slice of the global labelled batch: every rank holds the same labelled
            subset (jemfast.data chooses it from no seed and no rank), so the ranks' slices are
            together exactly a single process's batch of ``--batch-size x world`` images."""
            b, r = self.cfg.optim.batch_size, self.rank
            x, y = self.data.labelled.cycled_batch(b * self.world, self._order_seed(), self.progress.batch_in_epoch)
            return x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]

        # ---- files: rank 0 writes and reads, the others send and receive -----------------
        def _start_outputs(self) -> None:
            if self.rank == 0:
                return super()._start_outputs()
            self.metrics = _NoMetrics()
            if self.recovery.snapshot is None:
                self.save_checkpoint()

        def _write_checkpoint(self, state: dict[str, Any]) -> Path:
            mine = {"buffer": state["buffer"]["data"].detach().cpu(), "rng": _to_cpu(state["rng"]),
                    "checksum": param_checksum(self.model)}
            gathered = ranks.gather_objects(mine)

            def write() -> str:
                merged = merge_shards([g["buffer"] for g in gathered], self.buffer.n_classes,
                                      self.cfg.sampler.buffer_size)
                file_state = {**state, "buffer": {**state["buffer"], "data": merged},
                              "world": {"size": self.world, "rng": [g["rng"] for g in gathered],
                                        "param_checksums": [g["checksum"] for g in gathered]}}
                return str(super(DistributedTrainer, self)._write_checkpoint(file_state))

            return Path(ranks.on_main(write))

        def _read_resume_checkpoint(self) -> tuple[dict[str, Any], Path, list[dict[str, Any]]]:
            def read() -> tuple[Any, ...]:
                ckpt, path, lost = super(DistributedTrainer, self)._read_resume_checkpoint()
                return _to_cpu(ckpt), str(path), lost, self.cfg.to_dict()

            ckpt, path, lost, cfg = ranks.on_main(read)
            if self.rank:  # the flags --resume kept from the checkpoint (jemfast.rundir.resume)
                agreed = Config.from_dict(cfg)
                for section in SECTIONS:
                    setattr(self.cfg, section, getattr(agreed, section))
                self.cfg.run.progress = False
            return ckpt, Path(path), lost

        def _read_fitting_checkpoint(self, path: Path) -> dict[str, Any]:
            return ranks.on_main(lambda: _to_cpu(super(DistributedTrainer, self)._read_fitting_checkpoint(path)))

        def finish(self, status: str) -> dict[str, Any]:
            if self.rank == 0:
                return super().finish(status)
            return {"status": status, "stop_signal": self.stop_signal, "out": str(self.out),
                    "restarts": self.recovery.restarts}

    return DistributedTrainer

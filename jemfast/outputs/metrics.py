"""Training metrics: averaged on the device by name, written to ``OUT/metrics.jsonl``.

:class:`MetricWindow` sums each iteration's device scalars (no host sync) and hands back their
means once per log interval (one sync). :class:`MetricsLog` appends one JSON object per line;
:func:`log_metrics` writes a training run's line (under torchrun only rank 0 writes).
After an automatic restart the run continues from an earlier iteration, so iteration numbers
(``step``) repeat in metrics.jsonl after each ``{"event": "restart"}`` line.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import ranks


class MetricWindow:
    """Running sums of named device scalars over the iterations since the last :meth:`mean`."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        if self.sums is None:
            self.names = list(metrics)
            self.sums = torch.zeros(len(self.names), device=next(iter(metrics.values())).device)
        self.sums += torch.stack([metrics[n].float() for n in self.names])
        self.count += 1

    def mean(self) -> dict[str, float]:
        """Means since the last call, as Python floats (the interval's one host sync); resets."""
        if self.sums is None or self.count == 0:
            return {}
        values = (self.sums / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, values))


class MetricsLog:
    """Append-only JSONL writer for ``OUT/metrics.jsonl`` (flushed per line)."""

    def __init__(self, out: Path, resume_step: int | None = None) -> None:
        """A new run starts an empty log; a resumed one keeps the lines up to ``resume_step``."""
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._f = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """Drop the iteration lines a killed run wrote after the checkpoint we resume from;
        restart events are kept (the resumed run re-applies them, jemfast.rundir.resume)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(record, dict) and (record.get("step", 0) <= step or record.get("event") == "restart"):
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def log_metrics(trainer: Any) -> None:
    """One metrics.jsonl line: the means since the last one (one host sync), the learning rate,
    images per second (all ranks' images: the global batch) and elapsed seconds."""
    means = trainer.window.mean()
    if not ranks.is_main():
        return
    now, n = time.perf_counter(), trainer.cfg.run.log_every
    global_batch = trainer.cfg.optim.batch_size * ranks.world_size()
    record = {"step": trainer.progress.step, "epoch": trainer.progress.epoch, **means, "lr": trainer.lr,
              "images_per_s": n * global_batch / max(now - trainer.t_window, 1e-9),
              "time": now - trainer.t0}
    trainer.t_window = now
    trainer.metrics.write(record)
    trainer.bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['acc']:.3f}",
                            img_s=f"{record['images_per_s']:.0f}")

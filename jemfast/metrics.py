"""Training metrics: averaged on the device by name, written to ``OUT/metrics.jsonl``.

:class:`MetricWindow` sums each iteration's device scalars (no host sync) and hands back their
means once per log interval (one sync). :class:`MetricsLog` appends one JSON object per line.
After an automatic restart the run continues from an earlier iteration, so iteration numbers
(``step``) repeat in metrics.jsonl after each ``{"event": "restart"}`` line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


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
        restart events are kept (the resumed run re-applies them, jemfast.resume)."""
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

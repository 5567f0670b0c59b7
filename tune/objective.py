"""The stability objective that ``python -m jemfast.tune`` maximises.

Definition (all inputs are produced by ``jemfast.train`` itself; no external weights)::

    score = valid_acc + w_q * quality - w_r * restarts - w_d * diverged

    quality = 1 / (1 + |mean(g)| + std(g))       in (0, 1];  0 if diverged or no data
    g       = E(x_real) - E(x_fake) of every metrics.jsonl line of the last completed epoch

- ``valid_acc``: the latest validation accuracy (fraction in [0, 1]; NaN counts as 0).
- ``g``: each metrics.jsonl line holds ``e_real`` and ``e_fake``, the mean energies of the real
  batch and of the SGLD batch averaged over ``log_every`` iterations; ``g`` is their difference,
  which is exactly the generative term of the JEM loss. Lines that a rollback undid (those after
  a ``{"event": "restart"}`` line's ``rolled_back_to`` step and written before it) are dropped,
  so the window is the trajectory the run actually kept. ``std`` is the population std (ddof 0).
- ``restarts``: automatic divergence restarts the run needed so far (jemfast.stability.recovery).
- ``diverged``: 1 if the run exhausted its restarts (the trial's status is ``diverged``), else 0.
- Defaults: ``w_q = 0.1``, ``w_r = 0.05``, ``w_d = 0.2`` (``--quality-weight``,
  ``--restart-penalty``, ``--diverged-penalty``).

Why the energy gap: a sample-quality signal must be available on any machine without external
weights, which rules out Inception Score / FID. In persistent contrastive divergence the model
pushes E(real) down and E(fake) up while SGLD pulls the buffer towards low energy; when the
sampler keeps up with the model, the buffer is indistinguishable from data *to the model* and the
gap stays near zero and steady. The failure modes that precede JEM divergence (the paper restarts
them by hand) show up in exactly this quantity: the gap drifts away from zero (samples stuck in
regions the model already rejects) or oscillates with growing amplitude (the chains and the model
chasing each other). Mean and spread over the last epoch are both penalised; the form
``1 / (1 + x)`` keeps the term bounded, so accuracy stays the primary criterion and quality
breaks ties between similarly accurate settings. It is a stability signal, not a fidelity
measure: a model with a flat energy would also have a small gap, which is why it is only a tie
breaker and never replaces accuracy. It costs nothing: the numbers are already in metrics.jsonl.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class ScoreWeights:
    quality: float = 0.1
    restart: float = 0.05
    diverged: float = 0.2


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics.jsonl (torn or non-JSON lines are skipped; missing file: [])."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def kept_iteration_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Iteration lines (those with e_real/e_fake, no "event") that survived every rollback."""
    kept: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("event") == "restart":
            back = rec.get("rolled_back_to", 0)
            kept = [r for r in kept if r.get("step", 0) <= back]
        elif "event" not in rec and "e_real" in rec and "e_fake" in rec:
            kept.append(rec)
    return kept


def last_epoch_gaps(records: Iterable[dict[str, Any]], epochs_done: int | None = None) -> list[float]:
    """E(real) - E(fake) of the kept lines logged during the last completed epoch.

    ``epochs_done`` is the number of completed epochs (the ``epoch`` a report carries); lines of
    the epoch with 0-based index ``epochs_done - 1`` are used. Without it, the highest epoch
    index present is used.
    """
    kept = kept_iteration_records(records)
    if not kept:
        return []
    target = max(r.get("epoch", 0) for r in kept) if epochs_done is None else epochs_done - 1
    return [float(r["e_real"]) - float(r["e_fake"]) for r in kept if r.get("epoch", 0) == target]


def gap_stats(gaps: list[float]) -> tuple[float, float]:
    """(mean, population std) of ``gaps``; (nan, nan) when empty."""
    if not gaps:
        return math.nan, math.nan
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    return mean, math.sqrt(var)


def quality(gaps: list[float], diverged: bool = False) -> float:
    """1 / (1 + |mean gap| + std gap); 0.0 when diverged, empty, or non-finite."""
    if diverged or not gaps:
        return 0.0
    mean, std = gap_stats(gaps)
    if not (math.isfinite(mean) and math.isfinite(std)):
        return 0.0
    return 1.0 / (1.0 + abs(mean) + std)


def score(valid_acc: float, quality_value: float, restarts: int, diverged: bool,
          weights: ScoreWeights = ScoreWeights()) -> float:
    """``valid_acc + w_q * quality - w_r * restarts - w_d * diverged`` (NaN accuracy counts as 0)."""
    acc = valid_acc if valid_acc is not None and math.isfinite(valid_acc) else 0.0
    q = quality_value if math.isfinite(quality_value) else 0.0
    return acc + weights.quality * q - weights.restart * restarts - weights.diverged * float(bool(diverged))


def evaluate(metrics_path: str | Path, valid_acc: float, restarts: int, diverged: bool,
             epochs_done: int | None, weights: ScoreWeights = ScoreWeights()) -> dict[str, float]:
    """All objective figures of a run directory's metrics.jsonl, as reported to Tune."""
    gaps = last_epoch_gaps(read_records(metrics_path), epochs_done)
    mean, std = gap_stats(gaps)
    q = quality(gaps, diverged)
    return {"score": score(valid_acc, q, restarts, diverged, weights), "quality": q,
            "gap_mean": mean, "gap_std": std}

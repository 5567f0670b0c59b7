"""How a natural JEM divergence shows in the per-check means, and when it began.

Measured on the natural-divergence benchmark (``python -m jemfast.natural_divergence``: a
Wide-ResNet without normalisation on 3x32x32 digits; docs/stability.md): the collapse
is the model pushing E(real) down while the SGLD chains cannot follow, so the energy gap
``E(real) - E(fake)`` keeps one sign and its magnitude grows by a large factor every check
interval (x3 to x100 per 10 iterations), the gradient norm with it; the absolute limits are met
only tens of iterations later, when the run is long lost. A healthy run's gap wanders around a
level with both signs. So, on the means over each check interval (:class:`IntervalStats`):

- **gap drift**: the last :data:`DRIFT_STEPS` intervals each grew ``|gap|`` by at least
  :data:`DRIFT_GROWTH` with the same sign, and ``|gap|`` is now above :data:`DRIFT_FLOOR` nats;
- **accuracy collapse**: train accuracy once reached :data:`LEARNED_ACC` (and 3x chance) and
  has fallen to at most 1.5x chance in the last two intervals;
- **steady runaway**: ``|gap|`` grew in each of the last :data:`RUNAWAY_STEPS` intervals with the
  same sign, is above :data:`RUNAWAY_FLOOR` nats, and train accuracy stayed at most
  :data:`RUNAWAY_ACC` x chance through them. Measured on the batch-norm setting of the natural-divergence benchmark: the gap
  runs away linearly, -2 nats per 10 iterations to -110 by iteration 460, too slowly to double
  per interval, while the classifier never leaves chance (21.9 % test after 12 epochs, undetected
  before this test); healthy runs of the benchmark's other 8 settings kept ``|gap|`` under 1.8 nats.

:func:`onset` dates the collapse: the start of the run of abnormal intervals that ends at the
detection (``|gap|`` or the gradient norm more than doubling per interval, or ``|gap|`` above a
nat). A rollback target counts as good only if it was taken at or before that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DRIFT_STEPS = 2
DRIFT_GROWTH = 2.0
DRIFT_FLOOR = 1.0  # nats
ONSET_GROWTH = 2.0  # per check interval: healthy learning does not double the gap or grad norm that fast
ONSET_GAP_FLOOR = 0.05  # nats: a gap wandering near 0 doubles by chance
LEARNED_ACC = 0.5
RUNAWAY_STEPS = 3
RUNAWAY_FLOOR = 5.0  # nats
# One batch of 32 at chance (10 %) scores above 20 % about one time in 28 (7 of 32 right or more),
# and the epoch-end check leaves a 1-iteration interval after it: on the jem recipe (digits32,
# seed 2) the rule did not fire though every 10-iteration mean logged was at most 17.2 %.
LEARNED_SPAN = 10  # iterations
RUNAWAY_ACC = 2.0  # x chance: the batch-norm runs' train accuracy wandered 9-19 % while the gap ran away
ACC_FALL = 0.75  # x the learned best: a 320-image interval of a healthy run does not fall that far
SUDDEN_GROWTH = 1000.0  # per interval: beyond what a natural collapse does (x3 to x100, measured)


@dataclass(frozen=True)
class IntervalStats:
    """Means over one check interval ending at iteration ``step`` (``acc`` NaN when not logged)."""

    step: int
    gap: float  # E(real) - E(fake), nats
    grad_norm: float
    acc: float = math.nan


def gap_drifting(series: list[IntervalStats]) -> bool:
    """True when ``|gap|`` grew by :data:`DRIFT_GROWTH` in each of the last :data:`DRIFT_STEPS`
    intervals, kept its sign, and is above :data:`DRIFT_FLOOR`."""
    if len(series) < DRIFT_STEPS + 1:
        return False
    gaps = [s.gap for s in series[-(DRIFT_STEPS + 1):]]
    if not all(math.isfinite(g) for g in gaps) or abs(gaps[-1]) < DRIFT_FLOOR:
        return False
    same_sign = all(g > 0 for g in gaps[1:]) or all(g < 0 for g in gaps[1:])
    return same_sign and all(abs(b) >= DRIFT_GROWTH * abs(a) for a, b in zip(gaps, gaps[1:]))


def accuracy_collapsed(series: list[IntervalStats], n_classes: int | None) -> bool:
    """True when train accuracy had been learned (at least :data:`LEARNED_ACC` and 3x chance)
    and the last two intervals are at most 1.5x chance."""
    if not n_classes or len(series) < 3:
        return False
    chance = 1.0 / n_classes
    accs = [s.acc for s in series if math.isfinite(s.acc)]
    if len(accs) < 3 or max(accs[:-2]) < max(LEARNED_ACC, 3 * chance):
        return False
    return all(a <= 1.5 * chance for a in accs[-2:])


def gap_running_away(series: list[IntervalStats], n_classes: int | None) -> bool:
    """True when ``|gap|`` grew in each of the last :data:`RUNAWAY_STEPS` intervals keeping its
    sign, is above :data:`RUNAWAY_FLOOR`, and train accuracy (logged, ``n_classes`` known) stayed
    at most :data:`RUNAWAY_ACC` x chance in all of them: the energies separate while nothing is learned."""
    if not n_classes or len(series) < RUNAWAY_STEPS + 1:
        return False
    last = series[-(RUNAWAY_STEPS + 1):]
    gaps = [s.gap for s in last]
    if not all(math.isfinite(g) for g in gaps) or abs(gaps[-1]) < RUNAWAY_FLOOR:
        return False
    same_sign = all(g > 0 for g in gaps[1:]) or all(g < 0 for g in gaps[1:])
    growing = all(abs(b) > abs(a) for a, b in zip(gaps, gaps[1:]))
    at_chance = all(math.isfinite(s.acc) and s.acc <= RUNAWAY_ACC / n_classes for s in last[1:])
    return same_sign and growing and at_chance


def never_learned(series: list[IntervalStats], n_classes: int | None) -> bool:
    """True when train accuracy (logged, ``n_classes`` known) stayed at most :data:`RUNAWAY_ACC` x
    chance throughout ``series`` (the whole run so far): the classifier never left chance. Judged
    over spans of at least :data:`LEARNED_SPAN` iterations (consecutive intervals pooled, weighted
    by their lengths), as a short interval at an epoch's end is one batch."""
    if not n_classes:
        return False
    spans, total, length, prev = [], 0.0, 0, 0
    for s in series:
        n, prev = s.step - prev, s.step
        if n <= 0 or not math.isfinite(s.acc):
            continue
        total, length = total + s.acc * n, length + n
        if length >= LEARNED_SPAN:
            spans.append(total / length)
            total, length = 0.0, 0
    if length and not spans:
        spans.append(total / length)
    return bool(spans) and max(spans) <= RUNAWAY_ACC / n_classes


def _long_accs(series: list[IntervalStats]) -> list[float]:
    """Per interval: its train accuracy if it is at least :data:`LEARNED_SPAN` iterations long
    (or the first), else NaN: an epoch end's 1-batch interval can be lucky."""
    return [s.acc if prev is None or s.step - prev.step >= LEARNED_SPAN else math.nan
            for prev, s in zip([None] + series[:-1], series)]


def _learned_floor(n_classes: int | None) -> float:
    return max(LEARNED_ACC, 3.0 / n_classes) if n_classes else math.inf


def learned_level(series: list[IntervalStats], n_classes: int | None) -> float:
    """The best train accuracy of the long intervals of ``series`` (:func:`_long_accs`) if the
    classifier learned (at least :data:`LEARNED_ACC` and 3x chance), else NaN (also without
    accuracy or ``n_classes``)."""
    best = max((a for a in _long_accs(series) if math.isfinite(a)), default=math.nan)
    return best if best >= _learned_floor(n_classes) else math.nan


def accuracy_fell(series: list[IntervalStats], n_classes: int | None) -> list[bool]:
    """Per interval of ``series``: its train accuracy is below :data:`ACC_FALL` x the learned
    level of the intervals before it (:func:`learned_level`), in one pass."""
    fell, best, floor = [], math.nan, _learned_floor(n_classes)
    for s, long_acc in zip(series, _long_accs(series)):
        fell.append(best >= floor and math.isfinite(s.acc) and s.acc < ACC_FALL * best)
        if math.isfinite(long_acc):
            best = long_acc if math.isnan(best) else max(best, long_acc)
    return fell


def onset(series: list[IntervalStats], n_classes: int | None = None) -> int:
    """The iteration the collapse detected in the last interval of ``series`` began at: the end
    of the last interval before the run of abnormal intervals that leads up to the detection (the
    detecting interval is in the run whatever its values: a NaN loss need not show in the gap).
    An interval is abnormal when ``|gap|`` (above :data:`ONSET_GAP_FLOOR`) or the gradient norm
    more than doubled over the one before it, or ``|gap|`` is above :data:`DRIFT_FLOOR`: deep in
    a collapse the values stop growing steadily and swing (measured), but a healthy gap stays
    under a nat; or (``n_classes`` given) train accuracy is below :data:`ACC_FALL` x its learned
    best before it (:func:`accuracy_fell`): a classifier that collapses after learning does so
    before the energies move (measured on the late-lr setting, seed 1: 67 %, 37 %, 25 %, 9 % at
    iterations 120-150 with the gap near 0.3 nats and no test flagging until 156, where the state
    rolled back to had already collapsed). Whichever signal's run starts first dates the collapse. -1 when the run reaches
    back to the first interval kept (the first is judged by its ``|gap|`` alone), or there is no
    interval before the detecting one."""
    def gap_abnormal(before: IntervalStats | None, after: IntervalStats) -> bool:
        return abs(after.gap) >= DRIFT_FLOOR or (before is not None and
                                                  _grew(abs(before.gap), abs(after.gap), ONSET_GAP_FLOOR))

    def grad_abnormal(before: IntervalStats | None, after: IntervalStats) -> bool:
        return before is not None and _grew(before.grad_norm, after.grad_norm, 0.0)

    fell = accuracy_fell(series, n_classes)
    starts = []
    for abnormal in (lambda j: gap_abnormal(series[j - 1] if j else None, series[j]),
                     lambda j: grad_abnormal(series[j - 1] if j else None, series[j]), fell.__getitem__):
        j = len(series) - 2  # the interval before the detecting one
        while j >= 0 and abnormal(j):
            j -= 1
        starts.append(j)
    first = min(starts)
    return series[first].step if first >= 0 else -1


def _grew(before: float, after: float, floor: float) -> bool:
    if not math.isfinite(after) or not math.isfinite(before):
        return True
    return after > max(ONSET_GROWTH * before, floor)

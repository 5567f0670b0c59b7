"""Divergence detection on the device and the automatic recovery policy.

Detection: every iteration :meth:`DivergenceMonitor.observe` ORs a bit mask of failure causes
into a device tensor (no host sync); every ``check_every`` iterations (and before every
checkpoint) :meth:`DivergenceMonitor.check` reads it once. Two kinds of test:

- absolute limits (a backstop, the same for every run): non-finite values, ``|loss|``,
  ``|E(real) - E(fake)|``, the gradient norm and ``max |x_fake|`` above fixed limits;
- relative to the run's own recent history: ``log(1 + |E(real) - E(fake)|)`` and
  ``log(1 + grad norm)`` more than ``relative_z`` robust standard deviations above the median of
  the last ``relative_window`` iterations (robust std = 1.4826 x median absolute deviation,
  at least :data:`MIN_LOG_SCALE`: 0.25 for the gap, 0.45 for the gradient norm), once
  ``relative_warmup`` iterations have been seen. The history is a ring buffer on the device;
  median and MAD are computed there each iteration.
  ``log(1 + v)`` is a log scale above 1 (energies are in nats) and flat below it, so a gap
  wandering between 0.001 and 0.5 nats early in training is not read as a thousandfold jump.

The collapse tests of :mod:`jemfast.stability.collapse` (energy gap drifting away, train accuracy to
chance) run on the host at each check, on the interval means read in the same sync.

The recovery policy that answers a detection is in :mod:`jemfast.stability.recovery`.
"""
from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from typing import Any, Callable, Iterable

import torch

from ..options.config import StabilityConfig
from ..process.log import get_logger
from .collapse import (DRIFT_FLOOR, SUDDEN_GROWTH, IntervalStats, accuracy_collapsed, accuracy_fell, gap_drifting,
                       gap_running_away, never_learned, onset as collapse_onset)

log = get_logger(__name__)

CAUSES = (
    "non-finite loss or energy",
    "non-finite gradient",
    "non-finite samples",
    "energy gap too large",
    "loss too large",
    "sample magnitude exploding",
    "gradient norm too large",
    "energy gap jumped far above its recent range",
    "gradient norm jumped far above its recent range",
    # judged on the host at a check, from the interval means (jemfast.stability.collapse)
    "energy gap drifting away (E(real) and E(fake) separating)",
    "train accuracy fell to chance",
    "energy gap running away steadily while the classifier stays at chance",
)
DRIFT_BIT, ACC_BIT, RUNAWAY_BIT = 1 << 9, 1 << 10, 1 << 11
HOST_CAUSES = 3  # the last CAUSES, judged on the host
# Floors of the robust scale of log(1 + v), energy gap and gradient norm, so a near-constant history
# (MAD ~ 0) does not turn noise into alarms: with relative_z = 8 the smallest flagged rise is 8 x 0.25
# = 2 in log(1 + gap), i.e. 1 + gap above e^2 = 7.4 times 1 + its recent median, and 8 x 0.45 = 3.6
# in log(1 + grad norm), 1 + grad norm above e^3.6 = 37 times its median. The gradient norm's floor
# is higher because a network without normalisation that starts to learn lifts it 20-40x within a
# few tens of iterations from a flat start (measured on digits32: 0.3 to 13, a healthy run);
# a blow-up lifts it 100x and more.
MIN_LOG_SCALE = (0.25, 0.45)
MAD_TO_STD = 1.4826  # std of a normal distribution = 1.4826 x its median absolute deviation


class DivergenceMonitor:
    """Accumulates divergence flags on ``device``; ``check()`` is the only host sync.

    ``history: Tensor[2, relative_window]`` holds log(1 + |energy gap|) and log(1 + grad norm)
    of the last iterations (a ring; ``seen`` counts the writes on the host, so indexing it needs
    no sync).
    """

    def __init__(self, cfg: StabilityConfig, device: torch.device, n_classes: int | None = None) -> None:
        self.cfg = cfg
        self.n_classes = n_classes  # for "train accuracy fell to chance"; None: that test is off
        self.flags = torch.zeros((), dtype=torch.int64, device=device)
        # under torchrun: ORs the flags of every rank (jemfast.distributed.trainer), so all roll back together,
        # and averages the interval means, so every rank dates a collapse alike
        self.reduce: Callable[[int], int] | None = None
        self.reduce_means: Callable[[list[float]], list[float]] | None = None
        self._bits = 2 ** torch.arange(len(CAUSES) - HOST_CAUSES, device=device)
        self.history = torch.zeros(2, cfg.relative_window, device=device)
        self._min_scale = torch.tensor(MIN_LOG_SCALE, device=device)
        self.seen = 0
        # sums over the current check interval: E(real) - E(fake), grad norm, train accuracy
        self.interval = torch.zeros(3, device=device)
        self.count = 0
        self.observed = 0  # iterations observed in all, never rewound
        self.has_acc = False
        self.series: list[IntervalStats] = []  # one entry per passing check, on the host
        self.trend = False  # the last check failed a test that reads several intervals (drift, runaway)
        # False for a run without a generative term (--clf-only): its "gap" is E(real) alone, which
        # grows as the classifier learns, so it must not date a collapse (measured on late-lr: every
        # plain classifier's restart rolled back to iteration 0)
        self.energies = True
        self._states: dict[int, tuple[torch.Tensor, int, int]] = {}  # step -> (history, seen, len(series))

    def observe(self, metrics: dict[str, torch.Tensor], x_fake: torch.Tensor | None) -> None:
        """Record this iteration's failures from its device-scalar ``metrics`` (loss, e_real,
        e_fake, grad_norm) and samples ``x_fake: Tensor[B, *shape]`` (or None)."""
        cfg = self.cfg
        loss, e_real, e_fake = metrics["loss"], metrics["e_real"], metrics["e_fake"]
        grad_norm = metrics["grad_norm"]
        gap = (e_real - e_fake).abs()
        energies = torch.stack([loss, e_real, e_fake])
        if x_fake is not None:
            samples_bad = ~torch.isfinite(x_fake).all()
            too_big = x_fake.detach().abs().amax() > cfg.max_sample_abs
        else:
            samples_bad = too_big = torch.zeros((), dtype=torch.bool, device=loss.device)
        jumped = self._jumped(torch.stack([gap, grad_norm]).float().log1p())
        acc = metrics.get("acc")
        self.has_acc = acc is not None
        self.interval += torch.stack([e_real - e_fake, grad_norm, acc if acc is not None else torch.zeros_like(loss)]
                                     ).detach().float()
        self.count += 1
        self.observed += 1
        conds = torch.stack([
            ~torch.isfinite(energies).all(),
            ~torch.isfinite(grad_norm),
            samples_bad,
            gap > cfg.max_energy_gap,
            loss.abs() > cfg.max_loss,
            too_big,
            grad_norm > cfg.max_grad_norm,
            jumped[0],
            jumped[1],
        ])
        self.flags.bitwise_or_((conds.long() * self._bits).sum())

    def _jumped(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats: Tensor[2]`` (log(1 + |gap|), log(1 + grad norm)) -> ``Tensor[2]`` of bool:
        each far above the history before it; then appends ``stats`` to the history."""
        cfg, window = self.cfg, self.cfg.relative_window
        if cfg.relative_z > 0 and self.seen >= cfg.relative_warmup:
            past = self.history[:, :min(self.seen, window)]
            median = past.median(dim=1).values
            mad = (past - median[:, None]).abs().median(dim=1).values
            scale = torch.maximum(MAD_TO_STD * mad, self._min_scale)
            jumped = stats - median > cfg.relative_z * scale
        else:
            jumped = torch.zeros(2, dtype=torch.bool, device=stats.device)
        self.history[:, self.seen % window] = stats
        self.seen += 1
        return jumped

    def check(self, step: int | None = None) -> str | None:
        """Read and clear the flags and the interval means (one host sync), at iteration ``step``
        (default: the number of iterations observed): ``None`` if healthy, else the causes joined
        by '; '.

        The interval means join :attr:`series`, where the collapse tests of :mod:`jemfast.stability.collapse`
        read them. A healthy check also records the monitor's state at ``step``, so that a
        rollback to that step (:meth:`rewind`) judges the restarted run against the history it had
        then: no new warm-up after a restart.
        """
        step = self.observed if step is None else step
        values = torch.cat([self.flags.double().view(1), self.interval.double()]).tolist()
        value = int(values[0])
        if self.count:
            means = [v / self.count for v in values[1:]]
            if self.reduce_means is not None:
                means = self.reduce_means(means)
            acc = means[2] if self.has_acc else math.nan
            self.series.append(IntervalStats(step, means[0], means[1], acc))
            if gap_drifting(self.series):
                value |= DRIFT_BIT
            if accuracy_collapsed(self.series, self.n_classes):
                value |= ACC_BIT
            if gap_running_away(self.series, self.n_classes):
                value |= RUNAWAY_BIT
        if self.reduce is not None:
            value = self.reduce(value)
        self.trend = bool(value & (DRIFT_BIT | RUNAWAY_BIT))
        self.flags.zero_()
        self.interval.zero_()
        self.count = 0
        if value == 0:
            self.mark_healthy(step)
            return None
        return "; ".join(c for i, c in enumerate(CAUSES) if value & (1 << i))

    def mark_healthy(self, step: int) -> None:
        """Record the monitor's state as that of a good state at iteration ``step``."""
        self._states[step] = (self.history.clone(), self.seen, len(self.series))

    def keep_states(self, steps: Iterable[int]) -> None:
        """Forget the histories recorded at healthy checks except the newest one and, for each
        of ``steps`` (the good states a rollback can still reach), the newest at or before it:
        without this they pile up with every check (2 x 200 floats each, for the whole run)."""
        have = sorted(self._states)
        keep = set(have[-1:])
        for step in steps:
            k = bisect_right(have, step)
            if k:
                keep.add(have[k - 1])
        self._states = {s: self._states[s] for s in keep}

    def state_dict(self) -> dict[str, Any]:
        """Everything the tests have seen (history, interval sums, series, the good states'
        histories): a monitor loaded from it judges the following iterations as this one would."""
        return {"flags": self.flags.clone(), "interval": self.interval.clone(), "count": self.count,
                "observed": self.observed, "has_acc": self.has_acc, "history": self.history.clone(),
                "seen": self.seen, "series": [dataclasses.astuple(s) for s in self.series],
                "states": {step: (h.clone(), seen, n) for step, (h, seen, n) in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.flags.device
        self.flags.copy_(state["flags"].to(dev))
        self.interval.copy_(state["interval"].to(dev))
        self.history.copy_(state["history"].to(dev))
        self.count, self.observed, self.seen = int(state["count"]), int(state["observed"]), int(state["seen"])
        self.has_acc = bool(state["has_acc"])
        self.series = [IntervalStats(int(s[0]), *map(float, s[1:])) for s in state["series"]]
        self._states = {int(step): (h.to(dev).clone(), int(seen), int(n)) for step, (h, seen, n) in state["states"].items()}

    def onset(self) -> int:
        """The iteration the divergence just detected began at (:func:`jemfast.stability.collapse.onset`);
        when its growth reaches back past the intervals kept, the newest good state before them."""
        series = self.series if self.energies else [dataclasses.replace(s, gap=0.0) for s in self.series]
        began = collapse_onset(series, self.n_classes)
        if self.series and began < self.series[0].step:
            return max((s for s in self._states if s < self.series[0].step), default=0)
        return began

    def never_learned(self) -> bool:
        """True when the classifier has been at chance since the start of the run
        (:func:`jemfast.stability.collapse.never_learned` over :attr:`series`, which a rollback rewinds)."""
        return never_learned(self.series, self.n_classes)

    def gradual(self, onset: int) -> bool:
        """True when the divergence dated to ``onset`` built up over more than the last interval
        and did not end in a jump of :data:`jemfast.stability.collapse.SUDDEN_GROWTH` or more (or to NaN):
        a natural collapse grows x3 to x100 per interval; a blow-up out of nowhere, as
        ``--inject-divergence`` makes, x1e4 in one. A divergence the drift or runaway test caught
        is gradual whatever its onset (those tests read several intervals): right after a rollback
        a collapse that resumes is caught in its first interval, and a new seed with the lr halved
        (a blow-up's answer) would leave the cause in place (measured: original-layout seed 2
        took that path on restarts 2 and 3, its chains lagging on augmented batches). So is a
        classifier that fell for intervals before the end (:meth:`classifier_collapsed`), even if
        the energies blow up in the detecting interval (measured: late-lr seed 1, a new seed alone
        from iteration 120 collapsed again)."""
        if len(self.series) < 2:
            return False
        before, last = self.series[-2], self.series[-1]
        if onset < before.step and self.classifier_collapsed(onset):
            return True
        if any(not math.isfinite(b) or b > SUDDEN_GROWTH * max(a, 1e-12)
               for a, b in ((abs(before.gap), abs(last.gap)), (before.grad_norm, last.grad_norm))):
            return False
        return self.trend or onset < before.step

    def classifier_collapsed(self, onset: int) -> bool:
        """True when, after ``onset``, train accuracy fell from its learned level
        (:func:`jemfast.stability.collapse.accuracy_fell`) while ``|gap|`` stayed under
        :data:`jemfast.stability.collapse.DRIFT_FLOOR` until the detecting interval: the classifier
        went first, not the chains or the energies (measured on the late-lr setting: accuracy 67 %
        to 9 % in three checks with the gap near 0.3 nats, at an lr of 7e-3 the plain classifier
        collapses at too)."""
        after = [(s, f) for s, f in zip(self.series, accuracy_fell(self.series, self.n_classes)) if s.step > onset]
        return any(f for _, f in after) and all(abs(s.gap) < DRIFT_FLOOR for s, _ in after[:-1])

    def chains_lagging(self, onset: int = -1) -> bool:
        """True when, in an interval after ``onset``, the energy gap had run away below zero (E(real)
        under E(fake) by more than :data:`jemfast.stability.collapse.DRIFT_FLOOR`): the samples could not
        follow. Not only the last interval: deep in a collapse the gap can swing to the other sign
        (measured on digits32: -1.9 nats at iteration 20, +24 at 30). Never without :attr:`energies`:
        a plain classifier's "gap" is E(real) against a 0 placeholder."""
        return self.energies and any(s.gap < -DRIFT_FLOOR for s in self.series if s.step > onset)

    def rewind(self, step: int) -> None:
        """The run rolled back to iteration ``step``: forget what came after it. The relative
        tests' history becomes the one recorded at the newest healthy check at or before ``step``
        (none: they warm up again); the states recorded after ``step`` are dropped."""
        kept = [s for s in self._states if s <= step]
        if kept:
            history, self.seen, n = self._states[max(kept)]
            self.history.copy_(history)
            self.series = self.series[:n]
        else:
            self.history.zero_()
            self.seen, self.series = 0, []
        self._states = {s: v for s, v in self._states.items() if s <= step}
        self.flags.zero_()
        self.interval.zero_()
        self.count = 0

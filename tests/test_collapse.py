"""The collapse tests on per-check means (jemfast.stability.collapse) and the in-memory good states they
roll back to (jemfast.stability.recovery.RecoveryState)."""
from __future__ import annotations

import math

import torch

from jemfast.stability.collapse import IntervalStats, accuracy_collapsed, gap_drifting, gap_running_away, onset
from jemfast.stability.recovery import GoodState, RecoveryState, choose_target, recovery_action

# Measured (10-iteration means of E(real) - E(fake) and the grad norm) on the natural-divergence
# benchmark's setting at lr 1e-4 (WRN-10-2 without normalisation, digits32, 5 SGLD steps): the
# relative tests flagged it at iteration 70.
NATURAL = [(10, -0.006, 0.35), (20, -0.010, 0.38), (30, -0.06, 0.53), (40, -0.18, 0.90), (50, -0.55, 2.2),
           (60, -1.9, 7.0), (70, -4.0, 15.5)]


def series(rows):
    return [IntervalStats(step, gap, grad) for step, gap, grad in rows]


def test_the_measured_collapse_is_flagged_a_check_early_and_dated_to_its_start():
    flagged = [step for k, (step, _, _) in enumerate(NATURAL) if gap_drifting(series(NATURAL[:k + 1]))]
    assert flagged[0] == 60  # |gap| above 1 nat after two intervals of at least doubling
    # the gap had been doubling since after iteration 20 (0.006 -> 0.010 is below the 0.05-nat floor)
    assert onset(series(NATURAL[:6])) == 20


# Measured on seed 3 of the benchmark (lr 1e-3): the gap swings in sign and stops growing steadily
# once the collapse is deep (the first detection, by the absolute limits, came at iteration 50)
SEED3 = [(10, -0.027, 0.42), (20, -2.93, 8.9), (30, 4.37, 913.0), (39, 33.9, 1440.0), (50, -637.0, 11800.0)]


def test_a_swinging_collapse_is_dated_to_where_it_left_the_healthy_level():
    assert onset(series(SEED3)) == 10


def test_a_healthy_gap_that_wanders_or_changes_sign_does_not_drift():
    wandering = [(10 * i, g, 1.0) for i, g in enumerate([0.3, -0.5, 1.2, -2.6, 0.4, 1.1, -2.3, 0.2], 1)]
    assert not any(gap_drifting(series(wandering[:k + 1])) for k in range(len(wandering)))
    small = [(10 * i, -0.1 * 2 ** i, 1.0) for i in range(1, 4)]  # doubling, but still under 1 nat
    assert not gap_drifting(series(small))


def test_onset_of_a_sudden_blow_up_is_the_last_check_and_nan_counts_as_growth():
    rows = [(10, 0.3, 1.0), (20, 0.2, 1.1), (30, 0.25, 0.9), (40, math.nan, math.nan)]
    assert onset(series(rows)) == 30
    assert onset(series(rows[-1:])) == -1  # nothing kept before it


def test_accuracy_falling_to_chance_after_learning():
    accs = [0.1, 0.4, 0.7, 0.8, 0.12, 0.1]
    rows = [IntervalStats(10 * i, 0.0, 1.0, a) for i, a in enumerate(accs, 1)]
    assert [accuracy_collapsed(rows[:k + 1], 10) for k in range(len(rows))] == [False] * 5 + [True]
    assert not accuracy_collapsed(rows, None)
    never = [IntervalStats(10 * i, 0.0, 1.0, a) for i, a in enumerate([0.1, 0.12, 0.3, 0.1, 0.1], 1)]
    assert not accuracy_collapsed(never, 10)  # never learned: nothing fell


# Measured on the natural-divergence benchmark's batch-norm setting (seed 7, 10-iteration log means
# of E(real) - E(fake) and train accuracy): the gap grows by ~2 nats per interval, never doubling,
# while the classifier stays near chance (21.9 % test after 12 epochs, undetected before)
BATCH_NORM = [(10, -0.76, 0.109), (20, -2.43, 0.112), (30, -4.0, 0.138), (40, -5.82, 0.144), (50, -7.73, 0.172),
              (60, -9.73, 0.153)]


def test_a_steady_runaway_at_chance_is_flagged_once_the_gap_passes_the_floor():
    rows = [IntervalStats(step, gap, 5.0, acc) for step, gap, acc in BATCH_NORM]
    assert not any(gap_drifting(rows[:k + 1]) for k in range(len(rows)))  # too slow for the drift test
    assert [gap_running_away(rows[:k + 1], 10) for k in range(len(rows))] == [False] * 3 + [True] * 3
    assert not gap_running_away(rows, None)  # accuracy unknown: no judgement
    learning = [IntervalStats(s.step, s.gap, 5.0, 0.1 + 0.1 * k) for k, s in enumerate(rows)]
    assert not gap_running_away(learning, 10)  # the classifier leaves chance: energies may separate
    swinging = [IntervalStats(s.step, s.gap * (-1) ** k, 5.0, s.acc) for k, s in enumerate(rows)]
    assert not gap_running_away(swinging, 10)
    shrinking = rows[:4] + [IntervalStats(50, -5.5, 5.0, 0.15)]
    assert not gap_running_away(shrinking, 10)


def state(step: int) -> dict:
    return {"w": torch.full((3,), float(step))}


def test_the_memory_ring_thins_with_age_and_keeps_the_first_state():
    rec = RecoveryState(memory_ring=5)
    for step in range(0, 1001, 10):
        rec.checkpointed(state(step), None, step)
    steps = [g.step for g in rec.memory]
    assert steps[0] == 1000 and steps[-1] == 0 and len(steps) == 5
    gaps = [a - b for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps), steps  # older states further apart
    assert all(torch.equal(g.state["w"], torch.full((3,), float(g.step))) for g in rec.memory)


def test_choose_target_takes_the_newest_state_at_or_before_the_limit(tmp_path):
    ring = []
    for step in (15, 35):
        path = tmp_path / f"good-{step:09d}.pt"
        torch.save(state(step), path)
        ring.append(path)
    memory = [GoodState(40, state(40)), GoodState(30, state(30)), GoodState(0, state(0))]
    read = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    assert choose_target(memory, ring, 38, read, (OSError,))[0] == 35  # the file is newer than memory's 30
    assert choose_target(memory, ring, 30, read, (OSError,))[0] == 30
    assert choose_target(memory, ring, 12, read, (OSError,))[0] == 0
    (tmp_path / "good-000000035.pt").write_bytes(b"torn")
    assert choose_target(memory, ring, 38, read, (Exception,))[0] == 30  # unusable: the next older
    assert choose_target(memory[:2], [], -1, read, (OSError,))[0] == 30  # none that old: the oldest kept


def test_chains_lagging_looks_at_every_interval_since_the_onset():
    # measured on digits32 (seeds 6 and 7, recovery off): the gap ran to -1.9 nats by iteration 20,
    # then swung to +24 by 30; the collapse still began with the chains unable to follow
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor

    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"))
    mon.series = [IntervalStats(10, -0.02, 0.4), IntervalStats(20, -1.88, 6.4), IntervalStats(30, 23.9, 791.0)]
    assert mon.chains_lagging(10)
    assert not mon.chains_lagging(20)  # after iteration 20 the gap was positive only
    mon.series = [IntervalStats(10, -0.02, 0.4), IntervalStats(20, 1.5, 6.4), IntervalStats(30, 23.9, 791.0)]
    assert not mon.chains_lagging(10)


def test_never_learned_reads_the_whole_run_and_needs_accuracy():
    from jemfast.stability.collapse import never_learned
    at_chance = [IntervalStats(step, gap, 5.0, acc) for step, gap, acc in BATCH_NORM]
    assert never_learned(at_chance, 10)  # 10.9-17.2 %: at most 2x chance throughout
    learned_once = at_chance[:2] + [IntervalStats(30, -4.0, 5.0, 0.45)] + at_chance[3:]
    assert not never_learned(learned_once, 10)  # left chance once, even if it fell back
    assert not never_learned(at_chance, None) and not never_learned([], 10)
    assert not never_learned([IntervalStats(10, 0.1, 1.0)], 10)  # accuracy not logged: no judgement


def _restart_with(series_rows, energies=True, **kw):
    """restart() over good states at 10..80 and a monitor holding ``series_rows`` (``energies``: the
    monitor's; ``kw``: more of restart's arguments); returns the limit it asked roll_back for and the event."""
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor
    from jemfast.stability.recovery import restart

    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"), n_classes=10)
    mon.series = [IntervalStats(*row) for row in series_rows]
    mon.energies = energies
    rec = RecoveryState(memory_ring=10)
    for step in range(10, 81, 10):
        rec.checkpointed(state(step), None, step)
    asked = []

    def roll_back(limit, action):
        asked.append(limit)
        return choose_target(rec.memory, [], limit, lambda p: None, (OSError,))[0]

    event = restart(rec, 1, 130, "test", mon, roll_back, lambda seed: None, None, 20, 1.0, lambda: None, **kw)
    return asked[0], event


# Measured on the jem recipe on digits32 (seed 1): a blow-up at iteration 30 that no test flagged
# (too early for the relative tests), then a steady runaway detected at 130 with its onset at 80;
# rolled back to 78 the run stayed at chance for 340 more iterations (29 % test).
JEM_DIGITS32 = [(10, 0.03, 0.4, 0.109), (20, -2.7, 8.1, 0.109), (30, 3.2, 342.0, 0.103), (40, 19.0, 198.0, 0.125),
                (50, -4.0, 67.0, 0.122), (60, 0.6, 36.0, 0.116), (70, -1.3, 17.9, 0.106), (80, 1.0, 24.6, 0.166),
                (90, -1.5, 21.5, 0.156), (100, -1.1, 18.6, 0.131), (110, -1.6, 17.7, 0.141), (120, -3.5, 29.9, 0.112),
                (130, -8.0, 30.0, 0.11)]


def test_a_run_at_chance_since_the_start_rolls_back_to_the_earliest_state():
    limit, event = _restart_with(JEM_DIGITS32)
    assert limit == 0 and event["rolled_back_to"] == 10 and event["never_learned"]
    learned = [row[:3] + (0.6,) if row[0] == 60 else row for row in JEM_DIGITS32]
    limit, event = _restart_with(learned)  # it learned once: back to the onset, as before
    assert limit == event["onset"] and limit > 10 and event["rolled_back_to"] == limit
    assert not event["never_learned"]
    sudden = JEM_DIGITS32[:7] + [(80, 1e4, 24.6, 0.166)]  # a blow-up within one interval, at chance
    limit, event = _restart_with(sudden)  # caught at once: back to the check before it
    assert limit == event["onset"] == event["rolled_back_to"] > 10 and not event["never_learned"]


def test_never_learned_pools_a_one_batch_interval_with_its_neighbour():
    from jemfast.stability.collapse import never_learned
    # the epoch-end check at 39 leaves a 1-iteration interval at 40: one lucky batch (25 %)
    rows = [IntervalStats(10, 0.1, 1.0, 0.10), IntervalStats(20, 0.1, 1.0, 0.09), IntervalStats(30, 0.1, 1.0, 0.11),
            IntervalStats(39, 0.1, 1.0, 0.12), IntervalStats(40, 0.1, 1.0, 0.25), IntervalStats(50, 0.1, 1.0, 0.15)]
    assert never_learned(rows, 10)  # pooled with the 9 iterations before: (9 x 12 % + 25 %) / 10 = 13 %
    rows[-1] = IntervalStats(50, 0.1, 1.0, 0.30)
    assert not never_learned(rows, 10)  # ten iterations at 30 % is learning


# Measured: --clf-only at lr 1e-2 warmed up over 200 iterations (digits32, seed 7): its E(real)
# (E(fake) is a 0 placeholder without p(x)) ran from -3.7 to -11.8 nats as the classifier
# collapsed (valid 56 % -> 13 %) and the monitor caught it at 160.
CLF_ONLY_LR = [(100, -3.72, 4.7, 0.53), (110, -5.03, 6.8, 0.60), (120, -5.9, 5.0, 0.69), (130, -6.16, 5.9, 0.74),
               (140, -8.18, 13.6, 0.67), (150, -11.8, 24.3, 0.56)]


def test_a_classifier_without_p_x_gets_the_lr_and_nothing_for_chains_it_does_not_have():
    inform = []
    remedies = lambda lagging: [{"loss.energy_l2": 0.1}]  # noqa: E731
    _, jem = _restart_with(CLF_ONLY_LR, inform=lambda: inform.append(1), remedies=remedies)
    assert inform == [1] and "informative init" in jem["action"]  # a JEM with that gap: its chains lag
    _, clf = _restart_with(CLF_ONLY_LR, inform=lambda: inform.append(2), remedies=remedies, energies=False)
    assert clf["action"] == "seed -> 1001, lr x0.5, lr warm-up again" and clf["overrides"] == {}
    assert 2 not in inform
    sudden = [recovery_action(k, 7, sampling=False) for k in (1, 2, 3, 4)]
    assert [a.lr_factor for a in sudden] == [1.0, 0.5, 0.5, 0.5]  # a blow-up: first a new seed, as the paper
    assert all(a.sgld_steps_factor == 1 and not a.reset_buffer and not a.informative_init for a in sudden)


def test_a_collapse_the_drift_test_caught_is_gradual_even_in_its_first_interval_after_a_rollback():
    """Measured on original-layout seed 2: rolled back to 20, the resumed collapse was caught by the
    drift test at 30, dated to 20 (the last check), read as a sudden blow-up and answered twice with
    the blow-up ladder (lr x0.5, then SGLD steps x2) instead of the lagging chains' remedy."""
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor

    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"), n_classes=10)
    mon.series = series(NATURAL[:5])  # the history up to iteration 50, as after a rollback to 50
    mon.interval, mon.count = torch.tensor([-1.9, 7.0, 0.0]), 1  # iteration 60's interval: the drift
    assert "drifting away" in mon.check(60) and mon.trend
    assert mon.gradual(50)  # dated to the last check, but a test of several intervals caught it
    mon.trend = False
    assert not mon.gradual(50)  # a limit or jump test dated to the last check: sudden, as before
    mon.trend = True
    mon.series[-1] = IntervalStats(60, -1.9e4, 7.0)  # a x1e4 jump in one interval stays sudden
    assert not mon.gradual(50)
    assert mon.check(70) is None and not mon.trend  # an empty healthy check clears it


# Measured on the late-lr setting (digits32, informative init, lr warmed up to 1e-2), seed 1 with the
# defaults: 10-iteration means (step, E(real) - E(fake), grad norm, train accuracy); the epoch ends
# at 117 and 156 (the detection) cut short intervals. The classifier fell from 67 % to 9 % over
# iterations 120-150 with the gap near 0.3 nats; no test fired before 156.
LATE_LR = [(60, -0.1, 2.0, 0.144), (70, 0.09, 9.6, 0.237), (80, 0.08, 6.1, 0.319), (90, 0.1, 6.0, 0.45),
           (100, 0.19, 7.1, 0.534), (110, 0.18, 7.8, 0.447), (117, 0.2, 6.0, 0.95), (120, 0.3, 4.5, 0.669),
           (130, 0.28, 15.7, 0.366), (140, 0.28, 17.6, 0.253), (150, 0.24, 33.8, 0.094), (156, 0.3, 60.0, 0.05)]


def test_a_classifier_that_falls_after_learning_dates_the_collapse_where_it_began_to_fall():
    late = [IntervalStats(*row) for row in LATE_LR]
    assert onset(late, n_classes=10) == 120  # the last interval before accuracy fell under 0.75 x 53.4 %
    assert onset(late) == 150  # without accuracy (n_classes unknown): the gap and grad signals alone
    # the 7-iteration interval at 117 (95 %, one lucky stretch) does not set the learned level
    from jemfast.stability.collapse import learned_level
    assert learned_level(late[:8], 10) == 0.534  # 120 is 3 iterations after 117: short too
    at_chance = [IntervalStats(s, g, n, 0.1 + 0.02 * (s % 20 == 0)) for s, g, n, _ in LATE_LR]
    assert onset(at_chance, 10) == 150  # never learned: accuracy cannot date anything


def test_a_classifier_collapse_with_a_calm_gap_gets_the_lr_not_a_p_x_remedy():
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor

    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"), n_classes=10)
    mon.series = [IntervalStats(*row) for row in LATE_LR]
    assert mon.onset() == 120 and mon.classifier_collapsed(120)
    drifting = [IntervalStats(s, -g * 2 ** (s // 10 - 11) if s > 120 else g, n, a) for s, g, n, a in LATE_LR]
    mon.series = drifting  # the same fall with the gap past a nat: not the classifier alone
    assert not mon.classifier_collapsed(120)
    mon.series = series(NATURAL)  # no accuracy logged
    assert not mon.classifier_collapsed(20)
    remedies = [{"loss.energy_l2": 0.1}]
    first = recovery_action(1, 7, gradual=True, remedies=remedies, classifier=True)
    assert (first.lr_factor, first.overrides, first.rewarm) == (0.5, {}, True)
    assert recovery_action(1, 7, gradual=True, remedies=remedies).overrides == remedies[0]  # as before
    lagging = recovery_action(1, 7, gradual=True, chains_lagging=True, can_inform=True, classifier=True)
    assert lagging.informative_init  # lagging chains come first
    _, event = _restart_with(LATE_LR, remedies=lambda lagging: remedies)  # through restart(), as the Trainer
    assert (event["diagnosis"], event["onset"], event["overrides"]) == ("classifier collapsed", 120, {})
    assert event["action"] == "seed -> 1001, lr x0.5, lr warm-up again"


def test_a_classifier_collapse_that_ends_in_a_blow_up_is_still_gradual():
    """Measured on late-lr seed 1: the energies blew up in the detecting interval after three
    intervals of falling accuracy; read as sudden, the restart changed only the seed and the run
    collapsed again from the same lr."""
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor

    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"), n_classes=10)
    mon.series = [IntervalStats(*row) for row in LATE_LR[:-1]] + [IntervalStats(156, 900.0, 5e4, 0.05)]
    assert mon.onset() == 120 and mon.gradual(120)
    learned_then_blew_up = [IntervalStats(s, g, n, 0.9) for s, g, n, _ in LATE_LR[:-1]] + [IntervalStats(156, 900.0, 5e4, 0.05)]
    mon.series = learned_then_blew_up  # accuracy steady until the blow-up: out of nowhere, sudden
    assert not mon.gradual(mon.onset())


def test_a_plain_classifiers_growing_e_real_does_not_date_its_collapse():
    """Measured on late-lr's --clf-only runs: E(real) (the gap with E(fake) = 0) grew as the
    classifier learned, the gap signal dated every collapse to iteration 0 and all 5 seeds' restarts
    went back to the start."""
    from jemfast.options.config import StabilityConfig
    from jemfast.stability.monitor import DivergenceMonitor

    rows = [(10 * k, -2.3 * 1.3 ** k, 5.0, min(0.1 + 0.1 * k, 0.8)) for k in range(1, 13)]
    rows[-2:] = [(110, -40.0, 30.0, 0.3), (120, -60.0, 80.0, 0.1)]  # accuracy falls at 110
    mon = DivergenceMonitor(StabilityConfig(), torch.device("cpu"), n_classes=10)
    mon.series = [IntervalStats(*r) for r in rows]
    assert mon.onset() == 0  # read as energies: |E(real)| above a nat dates it to the start
    mon.energies = False
    assert mon.onset() == 100  # the classifier's fall alone dates it

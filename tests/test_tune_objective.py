"""jemfast.tune.objective: the score against hand-computed values (no Ray needed)."""
import json
import math

import pytest

from jemfast.tune.objective import (ScoreWeights, evaluate, gap_stats, kept_iteration_records,
                                    last_epoch_gaps, quality, read_records, score)


def it(step, epoch, e_real, e_fake):
    return {"step": step, "epoch": epoch, "loss": 1.0, "e_real": e_real, "e_fake": e_fake}


def test_quality_hand_computed():
    # gaps 0.1, -0.1, 0.3: mean 0.1; deviations 0, -0.2, 0.2 -> population var 0.08/3
    gaps = [0.1, -0.1, 0.3]
    mean, std = gap_stats(gaps)
    assert mean == pytest.approx(0.1)
    assert std == pytest.approx(math.sqrt(0.08 / 3))  # 0.163299...
    assert quality(gaps) == pytest.approx(1 / (1 + 0.1 + 0.16329931618554522))  # 0.791578...
    assert quality([0.0, 0.0]) == 1.0
    assert quality([-2.0]) == pytest.approx(1 / 3)  # one line: std 0, |mean| 2


def test_quality_degenerate_cases_are_zero():
    assert quality([]) == 0.0
    assert quality([0.1, float("nan")]) == 0.0
    assert quality([0.1, float("inf")]) == 0.0
    assert quality([0.0], diverged=True) == 0.0


def test_score_hand_computed():
    q = 1 / (1 + 0.1 + math.sqrt(0.08 / 3))
    # 0.8 + 0.1 * 0.791578 - 0.05 * 1 = 0.8291578
    assert score(0.8, q, restarts=1, diverged=False) == pytest.approx(0.8291578, abs=1e-6)
    # diverged after 4 restarts: 0.5 + 0 - 0.05 * 4 - 0.2 = 0.1
    assert score(0.5, 0.0, restarts=4, diverged=True) == pytest.approx(0.1)
    # no validation yet (NaN) counts as 0 accuracy
    assert score(float("nan"), 1.0, restarts=0, diverged=False) == pytest.approx(0.1)
    # custom weights: 0.9 + 0.5 * 0.5 - 0.1 * 2 - 1 = -0.05
    w = ScoreWeights(quality=0.5, restart=0.1, diverged=1.0)
    assert score(0.9, 0.5, 2, True, w) == pytest.approx(-0.05)


def test_rolled_back_lines_are_dropped():
    records = [
        it(5, 0, -1.0, -1.0), it(10, 0, -1.0, -1.1),
        {"event": "epoch", "step": 19, "epoch": 1, "valid_acc": 0.3},
        it(20, 1, -1.0, -5.0), it(25, 1, 50.0, -50.0),  # the diverging segment
        {"event": "restart", "restart": 1, "step": 27, "rolled_back_to": 19, "cause": "x", "action": "y"},
        it(20, 1, -1.0, -1.2), it(25, 1, -1.0, -0.9),
        {"event": "epoch", "step": 38, "epoch": 2, "valid_acc": 0.4},
    ]
    kept = kept_iteration_records(records)
    assert [r["step"] for r in kept] == [5, 10, 20, 25]
    assert last_epoch_gaps(records, epochs_done=2) == pytest.approx([0.2, -0.1])
    assert last_epoch_gaps(records, epochs_done=1) == pytest.approx([0.0, 0.1])
    assert last_epoch_gaps(records) == pytest.approx([0.2, -0.1])  # highest epoch present
    assert last_epoch_gaps(records, epochs_done=3) == []


def test_evaluate_reads_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [it(5, 0, -2.0, -2.5), it(10, 0, -2.0, -1.5),
             {"event": "epoch", "step": 19, "epoch": 1, "valid_acc": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn": ')  # a line torn by a kill
    assert len(read_records(path)) == 3
    # gaps 0.5 and -0.5: mean 0, std 0.5 -> quality 1 / 1.5
    out = evaluate(path, valid_acc=0.7, restarts=0, diverged=False, epochs_done=1)
    assert out["gap_mean"] == pytest.approx(0.0)
    assert out["gap_std"] == pytest.approx(0.5)
    assert out["quality"] == pytest.approx(2 / 3)
    assert out["score"] == pytest.approx(0.7 + 0.1 * 2 / 3)
    missing = evaluate(tmp_path / "none.jsonl", 0.5, 1, False, 1)
    assert missing["quality"] == 0.0 and math.isnan(missing["gap_mean"])
    assert missing["score"] == pytest.approx(0.45)

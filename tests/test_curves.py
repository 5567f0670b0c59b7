"""OUT/curves.png (jemfast.outputs.curves): drawn from metrics.jsonl, restarts split the run into passes."""
from __future__ import annotations

import json
import warnings

from jemfast.outputs.curves import read_passes, save_curves
from jemfast.train import train
from tests.conftest import tiny_digits_config


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{torn", encoding="utf-8")


def test_a_restart_starts_a_new_pass_from_the_iteration_rolled_back_to(tmp_path):
    line = lambda step, v: {"step": step, "epoch": 0, "loss": v, "loss_ce": v, "e_real": -v, "e_fake": v,  # noqa: E731
                            "acc": 0.5, "grad_norm": v, "lr": 1e-3}
    log = tmp_path / "metrics.jsonl"
    write_log(log, [line(10, 1.0), line(20, 2.0), {"event": "epoch", "step": 20, "epoch": 1, "valid_acc": 0.4},
                    line(30, 1e4), {"event": "restart", "restart": 1, "step": 30, "rolled_back_to": 10},
                    line(20, 1.5), line(30, 1.2)])
    passes, restarts = read_passes(log)
    assert [p["loss"] for p in passes] == [[(10, 1.0), (20, 2.0), (30, 1e4)], [(20, 1.5), (30, 1.2)]]
    assert passes[0]["valid_acc"] == [(20, 0.4)] and restarts[0]["rolled_back_to"] == 10
    png = save_curves(log, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    epoch_only = tmp_path / "epoch_only.jsonl"  # valid accuracy only: the other panels stay empty, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_log(epoch_only, [{"event": "epoch", "step": 20, "epoch": 1, "valid_acc": 0.4}])
        assert save_curves(epoch_only, tmp_path / "epoch_only.png") is not None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert save_curves(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_curves_are_drawn_at_the_first_epoch_end_then_at_most_every_30_s_and_at_the_end(tmp_path):
    out = tmp_path / "run"
    png = out / "curves.png"
    drawn = []  # curves.png's modification time as each epoch reports
    train(tiny_digits_config(out, optim__epochs=3), report=lambda r: drawn.append(png.stat().st_mtime_ns))
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the tiny run's epochs take a few seconds: not redrawn after epochs 2 and 3 (CURVES_EVERY_S), but at the end
    assert drawn[0] == drawn[1] == drawn[2] < png.stat().st_mtime_ns

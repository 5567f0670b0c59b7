"""The natural-divergence matrix in its reduced CI form: two settings (the digits32 preset and the
CIFAR code path's augmentation), one seed, one epoch (WRN-10-2 without normalisation,
docs/stability.md), no injected fault."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_one_seed_diverges_by_itself_and_the_defaults_roll_back_before_the_onset(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "jemfast.natural_divergence", "--settings", "digits32,cifar-path",
                           "--seeds", "1", "--modes", "off,defaults,clf-only", "--epochs", "1", "--jobs", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["setting"], r["mode"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert len(rows) == 6
    off, defaults = rows["digits32", "off"], rows["digits32", "defaults"]
    config = json.loads((out / "digits32" / "seed-1-off" / "summary.json").read_text())["config"]
    assert config["stability"]["inject_divergence"] == -1 and config["model"]["norm"] == "none"
    assert config["run"]["threads"] == 1  # two jobs on this 2-CPU machine: one thread each
    cifar = json.loads((out / "cifar-path" / "seed-1-clf-only" / "summary.json").read_text())["config"]
    assert (cifar["data"]["augment"], cifar["data"]["upscale"], cifar["loss"]["clf_only"]) == (True, "nearest", True)
    assert off["status"] == "diverged" and off["detected_at"] < 39, off  # within the one epoch
    assert defaults["restarts"] >= 1, defaults
    events = [json.loads(line) for line in (out / "digits32" / "seed-1-defaults" / "metrics.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e.get("event") == "restart"]
    for e in restarts:  # each rollback lands at or before the iteration the collapse began at
        assert e["rolled_back_to"] <= max(e["onset"], 0) < e["step"], e
    assert "lr warm-up again" in restarts[0]["action"]
    if "E(real) and E(fake) separating" in restarts[0]["cause"]:  # the chains lagged: start them near the data
        assert "fresh chains from the informative init, buffer re-initialised" in restarts[0]["action"]
        assert "lr x" not in restarts[0]["action"]
    # the rescue holds: no second collapse within the epoch, and the run finishes
    assert defaults["status"] == "finished" and defaults["restarts"] == 1, defaults
    assert all(rows[s, "defaults"]["status"] == "finished" for s in ("digits32", "cifar-path"))
    assert all(rows[s, "clf-only"]["restarts"] == 0 for s in ("digits32", "cifar-path"))
    # sample quality beside accuracy: the digits FID of each finished JEM run's buffer
    assert all(rows[s, "defaults"]["digits_fid"] > 0 for s in ("digits32", "cifar-path"))
    table = (out / "table.md").read_text()
    assert table.splitlines()[2].startswith("| digits32 | 1/1 |") or table.splitlines()[3].startswith("| digits32 | 1/1 |")
    assert "| 1 | off | diverged" in table and "minus clf-only" in table
    for name in ("table.md", "natural_divergence.png", "digits32/seed-1-defaults/curves.png",
                 "digits32/seed-1-off/curves.png"):
        assert (out / name).stat().st_size > 200, name


def _row(seed, mode, acc, status="finished", restarts=None):
    restarts = (1 if mode == "defaults" else 0) if restarts is None else restarts
    return {"setting": "s", "seed": seed, "mode": mode, "status": status, "test_acc": acc, "restarts": restarts,
            "exit": 0, "diverged": False, "detected_at": None, "stopped_at": None, "cause": "", "remedies": {},
            "wall_s": 1.0}


def test_the_report_says_whether_a_shortfall_is_the_jems_own_or_the_recoverys(tmp_path):
    from jemfast.outputs.divergence_matrix import summary_lines, why_short, write_table

    def runs(*rows):
        return {(r["seed"], r["mode"]): r for r in rows}

    clf = [_row(1, "clf-only", 0.92), _row(2, "clf-only", 0.90)]
    within = runs(*clf, _row(1, "defaults", 0.90), _row(2, "defaults", 0.86))  # -2 and -4 points
    assert why_short(within) == "—"
    short = [_row(1, "defaults", 0.75), _row(2, "defaults", 0.88)]  # seed 1 short by 17 points
    assert why_short(runs(*clf, *short)).startswith("not measured")
    own = why_short(runs(*clf, *short, _row(1, "reference", 0.77), _row(2, "reference", 0.60)))
    assert own.startswith("the JEM itself") and "1/1 seeds" in own and "-15.0 to -15.0" in own, own
    assert own.endswith("the defaults -2.0 from it)"), own  # 75 % against the reference's 77 %
    assert why_short(runs(*clf, *short, _row(1, "reference", 0.89))).startswith("the recovery")
    both_short = [_row(1, "defaults", 0.75), _row(2, "defaults", 0.70)]  # seed 2 has no reference run
    partial = why_short(runs(*clf, *both_short, _row(1, "reference", 0.77)))
    assert partial == ("the JEM itself: stable from the start it is short too (1/1 seeds, -15.0 to -15.0 points; "
                       "the defaults -2.0 from it; seed(s) 2 short too, no reference run)"), partial
    # batch-norm seed 4 (measured): no divergence, no restart, 91.7 % against the classifier's 99.7 %
    calm = why_short(runs(*clf, _row(1, "defaults", 0.84, restarts=0), _row(2, "defaults", 0.80)))
    assert calm == ("the JEM itself: stable from the start it is short too (1/1 seeds, -8.0 to -8.0 points; "
                    "the defaults +0.0 from it; seed(s) 2 short too, no reference run; seed(s) 1 never "
                    "restarted: the run is its own reference)"), calm
    stopped = why_short(runs(*clf, _row(1, "defaults", 0.0, "diverged"), _row(1, "reference", 0.5, "diverged")))
    assert stopped.startswith("the JEM itself") and "-92.0" in stopped  # a stopped run counts as 0
    rows = [*clf, *short, _row(1, "reference", 0.77)]
    assert summary_lines(rows)[2].endswith("| the JEM itself: stable from the start it is short too "
                                           "(1/1 seeds, -15.0 to -15.0 points; the defaults -2.0 from it) |")
    write_table(rows, tmp_path / "table.md")
    assert "| 1 | reference | stable |  |  | 77.0 % | -15.0 |" in (tmp_path / "table.md").read_text()


def test_the_reference_of_an_augmented_setting_keeps_augmentation_out_of_px():
    from jemfast.natural_divergence import reference_overrides, run_config

    cfg = run_config({}, "cifar-path", 3, "reference", Path("unused"), False)
    assert (cfg.sampler.init_dist, cfg.loss.px_augment, cfg.data.augment) == ("informative", False, True)
    assert reference_overrides("digits32") == {"sampler.init_dist": "informative"}


def test_the_report_keeps_earlier_invocations_rows_and_a_reruns_row_replaces_its_first(tmp_path):
    from jemfast.natural_divergence import earlier_rows, table_order
    from jemfast.process.errors import UserError

    results = tmp_path / "results.jsonl"
    assert earlier_rows(results) == []
    first, other, rerun = _row(1, "defaults", 0.5), _row(2, "defaults", 0.9), _row(1, "defaults", 0.8)
    results.write_text("".join(json.dumps(r) + "\n" for r in (first, other, rerun)))
    assert sorted((r["seed"], r["test_acc"]) for r in earlier_rows(results)) == [(1, 0.8), (2, 0.9)]
    rows = [{**_row(2, "clf-only", 0.9), "setting": "batch-norm"}, {**_row(1, "defaults", 0.9), "setting": "digits32"},
            {**_row(1, "off", 0.0), "setting": "batch-norm"}, {**_row(1, "defaults", 0.9), "setting": "batch-norm"}]
    assert [(r["setting"], r["seed"], r["mode"]) for r in sorted(rows, key=table_order)] == [
        ("digits32", 1, "defaults"), ("batch-norm", 1, "off"), ("batch-norm", 1, "defaults"), ("batch-norm", 2, "clf-only")]
    results.write_text(json.dumps(first) + "\n{not json\n")
    with pytest.raises(UserError, match="results.jsonl:2 is not a result row"):
        earlier_rows(results)


def test_report_only_rewrites_the_table_from_results_jsonl(tmp_path, capsys):
    from jemfast.natural_divergence import main

    assert main(["--report", "--out", str(tmp_path)]) == 2
    assert "results.jsonl: no such file" in capsys.readouterr().err
    rows = [{**_row(1, "defaults", 0.75), "setting": "cifar-path"}, {**_row(1, "clf-only", 0.92), "setting": "cifar-path"},
            {**_row(1, "reference", 0.77), "setting": "cifar-path"}, {**_row(1, "defaults", 0.95), "setting": "digits32"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--report", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[2].startswith("| digits32 |") and table[3].startswith("| cifar-path |")
    assert "the JEM itself" in table[3] and (tmp_path / "natural_divergence.png").stat().st_size > 1000
    assert not (tmp_path / "digits32").exists()  # nothing trained


def test_a_divergence_after_the_run_learned_is_reported_as_late():
    """valid_before comes from the epochs before the first restart or stop (the W1 probe's shape:
    valid 14 %, 29 %, 54 %, then the divergence); the table counts and names the late ones."""
    from jemfast.natural_divergence import valid_before_divergence
    from jemfast.outputs.divergence_matrix import outcome, summary_lines

    epoch = lambda step, acc: {"event": "epoch", "step": step, "valid_acc": acc}  # noqa: E731
    learned = [epoch(39, 0.144), {"step": 40, "loss": 2.2}, epoch(78, 0.289), epoch(156, 0.539),
               {"event": "diverged", "step": 180}]
    assert valid_before_divergence(learned) == 0.539
    restarted = [epoch(39, 0.30), {"event": "restart", "step": 60}, epoch(78, 0.95)]
    assert valid_before_divergence(restarted) == 0.30  # the epochs after the restart do not count
    assert math.isnan(valid_before_divergence([{"event": "diverged", "step": 30}]))  # before any epoch
    assert math.isnan(valid_before_divergence([epoch(39, 0.9)]))  # it never diverged

    late_off = {**_row(1, "off", math.nan, "diverged"), "diverged": True, "stopped_at": 180, "valid_before": 0.539}
    early_off = {**_row(2, "off", math.nan, "diverged"), "diverged": True, "stopped_at": 30, "valid_before": math.nan}
    old_row = {**_row(3, "off", math.nan, "diverged"), "diverged": True, "stopped_at": 30}  # before valid_before
    assert outcome(late_off) == "diverged (stopped at iteration 180, after 53.9 % valid)"
    assert outcome(early_off) == outcome(old_row) == "diverged (stopped at iteration 30)"
    recovered = {**_row(1, "defaults", 0.9), "restarts": 2, "detected_at": 180, "valid_before": 0.539}
    assert outcome(recovered) == "recovered (2 restart(s), first at 180, after 53.9 % valid)"
    assert summary_lines([late_off, early_off, old_row])[2].startswith("| s | 3/3 (1 after learning) |")
    assert summary_lines([early_off])[2].startswith("| s | 1/1 |")


def test_overwrite_trains_its_runs_again_and_keeps_every_other_row(tmp_path, monkeypatch):
    """--overwrite once deleted results.jsonl, every earlier invocation's seeds and settings with it."""
    import jemfast.natural_divergence as nd

    monkeypatch.setattr(nd, "run_one", lambda cfg, setting, seed, mode: {
        **_row(seed, mode, 0.93), "setting": setting, "overwrite": cfg.run.overwrite})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps({**_row(s, "off", 0.5), "setting": name}) + "\n"
                                                    for name, s in (("digits32", 1), ("cifar-path", 7))))
    opts = nd.BenchOptions(settings=("digits32",), seeds=(1,), modes=("off",), out=str(tmp_path), overwrite=True)
    [row] = nd.run_benchmark(opts, {})
    assert row["overwrite"]  # the run directory may be replaced
    kept = {nd.run_key(r): r for r in nd.earlier_rows(tmp_path / "results.jsonl")}
    assert kept[("digits32", 1, "off")]["test_acc"] == 0.93  # the rerun's row replaced its first
    assert kept[("cifar-path", 7, "off")]["test_acc"] == 0.5  # another invocation's row stays

"""The natural-divergence matrix in its reduced CI form: two settings (the digits32 preset and the
CIFAR code path's augmentation), one seed, one epoch (WRN-10-2 without normalisation,
docs/stability.md), no injected fault."""
from __future__ import annotations

import json
import subprocess
import sys

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

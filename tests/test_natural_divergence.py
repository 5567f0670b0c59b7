"""The natural-divergence benchmark in its reduced CI form: one seed, one epoch of the digits32
preset (WRN-10-2 without normalisation, docs/stability.md), no injected fault."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_one_seed_diverges_by_itself_and_the_defaults_roll_back_before_the_onset(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "jemfast.natural_divergence", "--seeds", "1", "--modes",
                           "off,defaults", "--epochs", "1", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    off, defaults = rows["off"], rows["defaults"]
    config = json.loads((out / "seed-1-off" / "summary.json").read_text())["config"]
    assert config["stability"]["inject_divergence"] == -1 and config["model"]["norm"] == "none"
    assert off["status"] == "diverged" and off["detected_at"] < 39, off  # within the one epoch
    assert defaults["restarts"] >= 1, defaults
    events = [json.loads(line) for line in (out / "seed-1-defaults" / "metrics.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e.get("event") == "restart"]
    for e in restarts:  # each rollback lands at or before the iteration the collapse began at
        assert e["rolled_back_to"] <= max(e["onset"], 0) < e["step"], e
    assert "lr warm-up again" in restarts[0]["action"]
    if "E(real) and E(fake) separating" in restarts[0]["cause"]:  # the chains lagged: start them near the data
        assert "fresh chains from the informative init, buffer re-initialised" in restarts[0]["action"]
        assert "lr x" not in restarts[0]["action"]
    # the rescue holds: no second collapse within the epoch, and the run finishes
    assert defaults["status"] == "finished" and defaults["restarts"] == 1, defaults
    for name in ("table.md", "natural_divergence.png", "seed-1-defaults/curves.png", "seed-1-off/curves.png"):
        assert (out / name).stat().st_size > 200, name
    assert "| 1 | off | diverged" in (out / "table.md").read_text()

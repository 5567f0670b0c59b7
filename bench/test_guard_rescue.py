"""CI's reduced form of bench/guard_rescue.py: one seed, two epochs of the original-style example
on digits32 (the swap-in user's natural collapse), unguarded and with the README's Guard lines,
side by side (~1.5 min on 2 cores). The full form (5 seeds, 12 epochs, the plain classifier
beside them) and its figures: docs/swap-in.md.
"""
from __future__ import annotations

import json

import pytest

import guard_rescue

pytestmark = pytest.mark.slow


def test_the_guard_rescues_the_collapse_that_stops_the_unguarded_script(tmp_path):
    guard_rescue.main(["--seeds", "1", "--modes", "unguarded,guarded", "--jobs", "2", "--out", str(tmp_path),
                       "--n_epochs", "2"])
    rows = {r["mode"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    unguarded, guarded = rows["unguarded"], rows["guarded"]
    assert unguarded["exit"] != 0 and unguarded["stopped_at"] is not None, unguarded  # |L| > 1e8: the script stops
    assert guarded["exit"] == 0 and guarded["epochs"] == 2, guarded
    # the collapse is caught long before the script's own stop, and the remedy is the chains' init
    assert "fresh chains from the informative init" in guarded["restarts"][0], guarded
    assert "guarded within 5 points" in (tmp_path / "table.md").read_text()

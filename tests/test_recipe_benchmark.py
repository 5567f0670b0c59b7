"""python -m jemfast.recipe_benchmark, reduced (CI): two recipes, one seed, one epoch of digits.
The full benchmark's figures are in docs/recipes.md."""
from __future__ import annotations

import json
import math

import pytest

from jemfast.recipe_benchmark import main

pytestmark = pytest.mark.slow


def test_the_recipes_run_side_by_side_and_are_scored(tmp_path, capsys):
    assert main(["--datasets", "digits", "--recipes", "jem,mjem", "--seeds", "1", "--epochs", "1",
                 "--out", str(tmp_path), "--gen-n", "200"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["status"]) for r in rows] == [("jem", "finished"), ("mjem", "finished")]
    for r in rows:
        assert math.isfinite(r["digits_fid"]) and 1.0 <= r["digits_is"] <= 10.0 and len(r["curve"]) == 1
        cfg = json.loads((tmp_path / "digits" / r["recipe"] / "seed-1" / "summary.json").read_text())["config"]
        assert cfg["run"]["recipe"] == r["recipe"]
    mjem = json.loads((tmp_path / "digits" / "mjem" / "seed-1" / "summary.json").read_text())["config"]
    assert (mjem["loss"]["energy_l2"], mjem["sampler"]["n_steps"], mjem["optim"]["optimizer"]) == (0.5, 5, "sgd")
    table = (tmp_path / "table.md").read_text()
    assert "| jem | 1 | 1 |" in table and "| mjem | 1 | 1 |" in table and "time to target" in table
    assert (tmp_path / "recipes.png").stat().st_size > 10_000
    assert "digits FID" in capsys.readouterr().out

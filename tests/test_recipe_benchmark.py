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


def test_a_jem_run_at_chance_sets_no_target_and_report_rebuilds_the_table(tmp_path, capsys):
    def row(recipe, seed, valid, wall, curve, learned=None):
        run = tmp_path / "digits32" / recipe / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"learned": learned}))
        return {"dataset": "digits32", "recipe": recipe, "seed": seed, "status": "finished", "restarts": 0,
                "test_acc": valid, "valid_acc": valid, "wall_s": wall, "curve": curve, "out": str(run),
                "digits_fid": 20.0, "digits_is": 5.0}

    rows = [row("jem", 1, 0.12, 500.0, [(250.0, 0.1), (500.0, 0.12)], learned=False),
            row("jem", 2, 0.80, 400.0, [(200.0, 0.5), (400.0, 0.8)], learned=True),
            row("mjem", 1, 0.85, 150.0, [(60.0, 0.7), (120.0, 0.82), (150.0, 0.85)], learned=True)]
    assert main(["--report", "--out", str(tmp_path)]) == 2  # no results.jsonl yet: one line
    assert "results.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    assert main(["--report", "--out", str(tmp_path)]) == 2
    assert "results.jsonl:2 is not a result row" in capsys.readouterr().err
    # rows as an older version wrote them, without "learned": --report reads it from each summary.json
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--report", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "final validation accuracy, 80.0 %" in table and "wall time 400 s" in table  # seed 1 at chance: out
    assert "| jem | 2 | 2 | 1 |" in table and "| jem | 1 | finished (at chance: did not learn) |" in table
    assert "| mjem | 1 | 1 | 1 | 0 | 85.0 |" in table and "| 1/1 | 120 | 0.30 | yes |" in table  # 120 s / 400 s
    assert "Met by: `mjem`." in table and "| mjem | 1 | finished | 0 | 85.0 | 20.0 | 150 | 120 |" in table
    rows[2]["digits_fid"] = 20.5  # worse samples than jem's: the speed alone does not meet the bar
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--report", "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "| 1/1 | 120 | 0.30 | no |" in table and "Met by: none." in table
    assert (tmp_path / "recipes.png").is_file() and "digits FID" in capsys.readouterr().out
    rows[1]["learned"] = False
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--report", "--out", str(tmp_path)])
    assert "No target: no `jem` run finished above chance" in (tmp_path / "table.md").read_text()

"""The tune report's stability map (tune/stability_map.py) and ``--report`` on an existing experiment."""
from __future__ import annotations

import json

import pytest

from jemfast.tune.cli import main
from jemfast.tune.plan import PLAN_FILE, TuneOptions, make_plan
from jemfast.tune.results import row_from_result
from jemfast.tune.run import write_outputs
from jemfast.tune.stability_map import map_axes, outcome

BASE = {"data.dataset": "digits"}


def rows_of(plan: dict) -> list[dict]:
    """Six trials over the searched step size and noise: two stable, two recovered, one diverged,
    one that failed."""
    m = {"score": 0.7, "valid_acc": 0.6, "quality": 0.5, "restarts": 0, "epoch": 3, "status": "finished"}
    out = []
    for i, (restarts, status, error) in enumerate([(0, "finished", None), (0, "running", None),
                                                  (2, "finished", None), (1, "running", None),
                                                  (4, "diverged", None), (0, "finished", RuntimeError("x"))]):
        cfg = {"sgld_step_size": 0.5 + i, "sgld_noise": 0.005 * (i + 1), "buffer_size": 1000, "reinit_freq": 0.05}
        out.append(row_from_result({**m, "restarts": restarts, "status": status, "valid_acc": 0.1 * i},
                                   cfg, f"/x/t{i}", error))
    return out


def test_outcomes_and_the_axes():
    rows = rows_of({})
    assert [outcome(r) for r in rows] == ["stable", "stable", "recovered", "recovered", "diverged", "unknown"]
    plan = make_plan(TuneOptions(), BASE)
    from jemfast.tune.space import space_from_json

    space = space_from_json(plan["space"])
    assert map_axes(space) == [n for n, r in space.items() if r.searched][:2]
    assert map_axes(space, ("sgld_noise", "sgld_step_size")) == ["sgld_noise", "sgld_step_size"]
    with pytest.raises(ValueError, match="--map-axes: 'lr' is not a searched parameter"):
        map_axes(space, ("lr", "sgld_noise"))


def test_the_search_writes_the_map_and_report_redraws_it(tmp_path, capsys):
    exp = tmp_path / "tune" / "digits"
    exp.mkdir(parents=True)
    plan = make_plan(TuneOptions(), BASE)
    (exp / PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    out = write_outputs(exp, plan, rows_of(plan), ("sgld_step_size", "sgld_noise"))
    png = exp / "stability_map.png"
    assert out["stability_map"] == png and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    png.unlink()
    (exp / "search.png").unlink()
    assert main(["--report", "--storage-path", str(tmp_path / "tune"), "--name", "digits",
                 "--map-axes", "sgld_noise,sgld_step_size"]) == 0
    assert png.stat().st_size > 10_000 and (exp / "search.png").is_file()
    assert "stability map: " in capsys.readouterr().out
    assert main(["--report", "--storage-path", str(tmp_path / "tune"), "--name", "missing"]) == 2
    assert "--report: no finished jemfast.tune experiment" in capsys.readouterr().err


def test_a_categorical_axis_places_each_choice_at_its_index_and_spreads_its_trials():
    from jemfast.tune.space import Range
    from jemfast.tune.stability_map import axis_positions

    rng = Range("choice", ("uniform", "informative"))
    pos, labels = axis_positions(["informative", "uniform", "informative", "informative"], rng)
    assert labels == ["uniform", "informative"]  # the choice's order, whichever came first
    assert pos[1] == 0.0 and sorted(pos[i] for i in (0, 2, 3)) == pytest.approx([0.7, 1.0, 1.3])
    assert axis_positions([0.5, 2], Range("loguniform", (0.1, 3))) == ([0.5, 2.0], [])


def test_the_map_draws_over_a_categorical_and_a_numeric_axis(tmp_path):
    from jemfast.tune.space import Range
    from jemfast.tune.stability_map import plot_stability_map

    rows = rows_of({})
    for i, r in enumerate(rows):
        r["init"] = ("uniform", "informative")[i % 2]
    space = {"init": Range("choice", ("uniform", "informative")), "sgld_step_size": Range("loguniform", (0.1, 10))}
    path = plot_stability_map(rows, space, tmp_path / "map.png", ("init", "sgld_step_size"))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_search_plot_takes_a_categorical_parameter(tmp_path):
    from jemfast.tune.results import plot_search
    from jemfast.tune.space import Range

    rows = rows_of({})
    for i, r in enumerate(rows):
        r["init"] = ("uniform", "informative")[i % 2]
    space = {"init": Range("choice", ("uniform", "informative")), "sgld_step_size": Range("loguniform", (0.1, 10))}
    path = plot_search(rows, space, tmp_path / "search.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000

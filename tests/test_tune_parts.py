"""jemfast.tune pieces that need no running Ray: search-space parsing, checkpoint restore and
buffer resizing, the results table and best command, and the command line's one-line errors."""
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch

from jemfast.cli import config_from_args
from jemfast.config import Config, apply_preset
from jemfast.tune.restore import resize_buffer, restore_checkpoint, trial_config
from jemfast.tune.results import best_command, best_row, row_from_result, sort_rows, write_table
from jemfast.tune.space import build_specs, clamp, default_specs, flag_for, parse_spec, read_space_file



def digits_cfg() -> Config:
    cfg = Config()
    cfg.data.dataset = "digits"
    return apply_preset(cfg)


# ---- search space ---------------------------------------------------------------------------
def test_parse_spec_forms():
    assert parse_spec("buffer_size", "choice:500,1000").values == (500, 1000)
    assert parse_spec("buffer_size", [500, 1000]).kind == "choice"
    sp = parse_spec("sgld_step_size", {"type": "loguniform", "low": 0.1, "high": 3})
    assert (sp.kind, sp.values, sp.log) == ("loguniform", (0.1, 3.0), True)
    assert parse_spec("reinit_freq", "uniform:0.01,0.1").values == (0.01, 0.1)
    assert parse_spec("lr", 1e-3).kind == "fixed"
    assert parse_spec("sgld_noise", "0.01").values == (0.01,)
    assert parse_spec("sgld_steps", {"grid": [10, 20]}).kind == "grid"


@pytest.mark.parametrize("name,raw,msg", [
    ("foo", "1", "unknown parameter"),
    ("buffer_size", "choice:1.5", "integer"),
    ("lr", "loguniform:0,1", "low > 0"),
    ("lr", "uniform:1,0.5", "low < high"),
    ("lr", "normal:0,1", "not one of"),
    ("lr", "choice:", "at least one value"),
])
def test_parse_spec_errors_name_the_parameter(name, raw, msg):
    with pytest.raises(ValueError, match=msg):
        parse_spec(name, raw)


def test_default_specs_follow_the_preset():
    specs = default_specs(digits_cfg())  # digits: buffer 2000, step 1, noise 0.01
    assert specs["buffer_size"].values == (500, 1000, 2000, 4000)
    assert specs["sgld_step_size"].values == (0.25, 4.0)
    assert specs["sgld_noise"].values == pytest.approx((0.0025, 0.04))
    toy = Config()
    toy.data.dataset = "toy2d"
    apply_preset(toy)  # toy2d: step 0.005, noise 0.1
    assert default_specs(toy)["sgld_step_size"].values == pytest.approx((0.00125, 0.02))


def test_build_specs_flags_fix_and_validation():
    base = digits_cfg()
    specs = build_specs(base, {"lr": "loguniform:1e-4,1e-2"}, fixed_by_flag={"buffer_size"})
    assert "buffer_size" not in specs and set(specs) == {"reinit_freq", "sgld_step_size", "sgld_noise", "lr"}
    with pytest.raises(ValueError, match="reinit_freq"):
        build_specs(base, {"reinit_freq": "uniform:0.5,2"}, set())


def test_space_file_yaml_and_json(tmp_path):
    y = tmp_path / "space.yaml"
    y.write_text("buffer_size: [1000, 2000]\nsgld_step_size: {type: loguniform, low: 0.1, high: 2}\n")
    j = tmp_path / "space.json"
    j.write_text(json.dumps({"reinit_freq": "uniform:0.01,0.1"}))
    assert read_space_file(y)["buffer_size"] == [1000, 2000]
    assert read_space_file(j) == {"reinit_freq": "uniform:0.01,0.1"}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    from jemfast.errors import UserError
    with pytest.raises(UserError, match="not valid json"):
        read_space_file(bad)


def test_clamp_keeps_perturbed_values_in_range():
    specs = {"reinit_freq": parse_spec("reinit_freq", "uniform:0.01,0.1").to_json(),
             "buffer_size": parse_spec("buffer_size", "choice:500,1000").to_json()}
    out = clamp(specs, {"reinit_freq": 0.12, "buffer_size": 800})
    assert out == {"reinit_freq": 0.1, "buffer_size": 800}


# ---- restore: checkpoint adapted to the trial's hyperparameters -----------------------------
def test_resize_buffer_shrink_grow_and_class_shares():
    data = torch.arange(10.0).view(10, 1)
    small = resize_buffer(data, 4, None, seed=0)
    assert small.shape == (4, 1) and set(small.view(-1).tolist()) <= set(range(10))
    big = resize_buffer(data, 13, None, seed=0)
    assert torch.equal(big[:10], data) and big[10:].abs().max() <= 1
    # 2 classes x 5 rows -> 2 x 3 rows (+1 unused row); each share keeps its own class's rows
    cond = resize_buffer(data, 7, 2, seed=0)
    assert cond.shape == (7, 1)
    assert set(cond[:3].view(-1).tolist()) <= {0, 1, 2, 3, 4}
    assert set(cond[3:6].view(-1).tolist()) <= {5, 6, 7, 8, 9}
    assert resize_buffer(data, 10, None) is data


def test_restore_checkpoint_resizes_and_applies_new_values(tmp_path):
    from jemfast.train import Trainer

    cfg = digits_cfg()
    cfg.model.hidden, cfg.optim.epochs, cfg.sampler.buffer_size = 8, 1, 200
    cfg.run.device, cfg.run.progress, cfg.run.out = "cpu", False, str(tmp_path / "donor")
    tr = Trainer(cfg, None)
    tr.save_checkpoint()
    ckpt_dir = tmp_path / "tune_ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.pt").write_bytes((tmp_path / "donor" / "checkpoints" / "last.pt").read_bytes())
    (ckpt_dir / "tune_state.json").write_text(json.dumps({"epoch": 0, "step": 0}))
    new = trial_config(cfg.to_dict(), {"buffer_size": 300, "reinit_freq": 0.2, "sgld_step_size": 0.5}, {})
    run_dir = tmp_path / "trial" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "good-000000099.pt").write_text("stale")
    state = restore_checkpoint(ckpt_dir, run_dir, new)
    assert state == {"epoch": 0, "step": 0}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]
    new.run.out, new.run.resume = str(run_dir), True
    resumed = Trainer(new, None)  # identity check passes with the new buffer size
    assert resumed.buffer.capacity == 300 and resumed.buffer.data.shape[0] == 300
    assert resumed.buffer.reinit_freq == 0.2
    assert torch.equal(resumed.buffer.data[:200], tr.buffer.data)


# ---- results table and best command ---------------------------------------------------------
def test_rows_statuses_sorting_and_table(tmp_path):
    cfg = {"buffer_size": 500, "sgld_step_size": 1.5, "inject_divergence": -1}
    m = {"score": 0.7, "valid_acc": 0.65, "quality": 0.5, "restarts": 0, "epoch": 3, "status": "finished"}
    rows = [
        row_from_result({**m, "score": 0.5, "status": "running"}, cfg, "/x/t1", None),
        row_from_result({**m, "status": "diverged", "score": -0.1, "restarts": 4}, cfg, "/x/t2", None),
        row_from_result(None, cfg, "/x/t3", RuntimeError("boom\nmore")),
        row_from_result(m, cfg, "/x/t4", None),
        row_from_result({}, cfg, "/x/t5", None),
    ]
    assert [r["status"] for r in rows] == ["stopped", "diverged", "error", "finished", "pending"]
    rows = sort_rows(rows)
    assert [r["trial_id"] for r in rows][:3] == ["t4", "t1", "t2"]
    assert math.isnan(rows[-1]["score"])
    assert best_row(rows)["trial_id"] == "t4"
    csv_path, json_path = write_table(rows, tmp_path, {"experiment": "x"})
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("rank,trial_id,status,score") and lines[1].startswith("1,t4,finished,0.7")
    data = json.loads(json_path.read_text())
    assert data["trials"][0]["trial_id"] == "t4" and data["trials"][-1]["score"] is None
    assert data["trials"][2]["error"] == "" and any(t["error"] == "boom" for t in data["trials"])


def test_best_command_replaces_searched_flags_and_parses():
    pairs = [["--dataset", "digits"], ["--hidden", "16"], ["--buffer-size", "250"], ["--epochs", "9"],
             ["--inject-divergence", "12"], ["--compile", None]]
    row = {"buffer_size": 1000, "sgld_step_size": 0.123456789, "inject_divergence": 12, "score": 1.0}
    cmd = best_command(row, pairs, epochs=3, out="/tmp/best dir")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "jemfast.train"]
    assert "--inject-divergence" not in argv and argv.count("--buffer-size") == 1
    assert argv[argv.index("--buffer-size") + 1] == "1000"
    assert argv[argv.index("--sgld-step-size") + 1] == "0.123457"
    assert argv[-4:] == ["--epochs", "3", "--out", "/tmp/best dir"]
    cfg = config_from_args(argv[3:])
    assert (cfg.sampler.buffer_size, cfg.model.hidden, cfg.optim.epochs, cfg.run.compile) == (1000, 16, 3, True)
    assert flag_for("sampler.noise_std") == "--sgld-noise"


# ---- command line: one-line errors, exit code 2 ---------------------------------------------
def run_cli(args, tmp_path, prelude=""):
    code = (f"import runpy, sys\n{prelude}\nsys.argv = ['python -m jemfast.tune'] + {args!r}\n"
            "runpy.run_module('jemfast.tune', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_without_ray_one_line_and_exit_2(tmp_path):
    """Simulates a machine without the tune extra: ``import ray`` raises ImportError."""
    res = run_cli(["--smoke-test", "--storage-path", str(tmp_path)], tmp_path,
                  prelude="sys.modules['ray'] = None; sys.modules['ray.tune'] = None")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "pip install 'jemfast[tune]'" in lines[0] and "Ray Tune is not installed" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args,msg", [
    (["--space", "buffer_size"], "NAME=SPEC"),
    (["--space", "sgld_noise=loguniform:-1,1"], "sgld_noise"),
    (["--lr", "abc"], "--lr"),
    (["--scheduler", "bohb"], "--scheduler"),
    (["--dataset", "digits", "--sgld-steps", "0"], "--sgld-steps (sampler.n_steps): must be >= 1, got 0"),
    (["--dataset", "digits", "--num-samples", "0"], "--num-samples"),
    (["--dataset", "digits", "--storage-path", "s3://bucket/x"], "--storage-path"),
    (["--resume", "--name", "nothing-here"], "--resume"),
])
def test_user_errors_one_line_exit_2(tmp_path, capsys, args, msg):
    """In-process: every one of these fails before Ray is started."""
    pytest.importorskip("ray")
    from jemfast.tune.cli import main

    if "--storage-path" not in args:
        args = args + ["--storage-path", str(tmp_path)]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], err


def test_existing_experiment_needs_resume_or_overwrite(tmp_path, capsys):
    pytest.importorskip("ray")
    from jemfast.tune.cli import main

    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "results.json").write_text("{}")
    assert main(["--smoke-test", "--storage-path", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err

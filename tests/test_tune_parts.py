"""jemfast.tune pieces that need no running Ray: search-space parsing, checkpoint restore and
buffer resizing, the results table and best command, and the command line's one-line errors."""
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch

from jemfast.options.cli import config_from_args
from jemfast.options.config import Config, apply_preset
from jemfast.tune.restore import resize_buffer, restore_checkpoint, trial_config
from jemfast.tune.results import best_command, best_row, row_from_result, sort_rows, write_table
from jemfast.tune.space import Range, build_space, default_space, parse_range, read_space_file, trial_overrides
from tests.conftest import REPO


def digits_cfg() -> Config:
    cfg = Config()
    cfg.data.dataset = "digits"
    return apply_preset(cfg)


# ---- search space: Ray's objects, our bounds -------------------------------------------------
def test_parse_range_forms():
    assert parse_range("buffer_size", "choice:500,1e3") == Range("choice", (500, 1000))
    assert parse_range("buffer_size", [500, 1000]).kind == "choice"
    r = parse_range("sgld_step_size", {"type": "loguniform", "low": 0.1, "high": 3})
    assert r == Range("loguniform", (0.1, 3.0)) and r.log
    assert parse_range("reinit_freq", "uniform:0.01,0.1").values == (0.01, 0.1)
    assert parse_range("lr", 1e-3) == Range("fixed", (1e-3,))
    assert parse_range("sgld_noise", "0.01").values == (0.01,)
    assert parse_range("sgld_steps", {"grid": [10, 20]}).kind == "grid"
    # any training flag is a parameter, by its name or its config field; ranges are Ray's own
    assert parse_range("--hidden", "lograndint:8,64") == Range("lograndint", (8, 64))
    assert parse_range("sampler.n_steps", "randint:5,41") == Range("randint", (5, 41))
    assert parse_range("model", "choice:cnn,mlp").values == ("cnn", "mlp")
    assert parse_range("class_cond", "choice:true,false").values == (True, False)


def test_ranges_become_ray_search_spaces():
    pytest.importorskip("ray")
    from ray.tune.search.sample import Categorical, Float, Integer

    lo = parse_range("lr", "loguniform:1e-4,1e-2").to_tune()
    assert isinstance(lo, Float) and (lo.lower, lo.upper) == (1e-4, 1e-2)
    assert type(lo.get_sampler()).__name__ == "_LogUniform"
    ri = parse_range("sgld_steps", "randint:5,41").to_tune()
    assert isinstance(ri, Integer) and (ri.lower, ri.upper) == (5, 41)
    assert all(5 <= ri.sample() < 41 for _ in range(50))
    assert isinstance(parse_range("buffer_size", "choice:500,1000").to_tune(), Categorical)
    assert parse_range("sgld_steps", "grid:10,20").to_tune() == {"grid_search": [10, 20]}
    assert parse_range("lr", "0.001").to_tune() == 0.001


@pytest.mark.parametrize("name,raw,msg", [
    ("foo", "1", "--space 'foo': unknown parameter"),
    ("buffer_size", "choice:1.5", "--space buffer_size: must be an integer, got 1.5 (--buffer-size)"),
    ("lr", "loguniform:0,1", "--space lr: must be > 0, got 0.0 (--lr)"),
    ("lr", "uniform:1,0.5", "--space lr: uniform needs low < high"),
    ("lr", "normal:0,1", "--space lr: kind 'normal' is not one of"),
    ("lr", "choice:", "--space lr: choice needs at least one value"),
    ("lr", "choice:abc", "--space lr: cannot read 'choice:abc'"),
    ("model", "uniform:1,2", "--space model: uniform needs a numeric parameter"),
    # issue 13.13: values no trial could use are refused here, in one line, not in Ray or an allocator
    ("buffer_size", "choice:1e400", "--space buffer_size: must be a finite integer, got inf (--buffer-size)"),
    ("sgld_steps", "randint:1,1e30", "--space sgld_steps: must be <= 100000, got 1e+30 (--sgld-steps)"),
    ("buffer_size", "lograndint:100,1000000000000", "must be <= 10000000"),
    ("reinit_freq", "uniform:0.5,2", "--space reinit_freq: must be <= 1, got 2.0 (--reinit-freq)"),
    ("seed", "randint:0,4294967297", "--space seed: must be <= 4294967295"),
])
def test_parse_range_errors_name_the_parameter_and_the_bound(name, raw, msg):
    with pytest.raises(ValueError) as info:
        parse_range(name, raw, digits_cfg())
    assert msg in str(info.value) and "\n" not in str(info.value)


def test_randint_high_is_exclusive_as_in_ray():
    assert parse_range("seed", "randint:0,4294967296").values == (0, 4294967296)  # largest value 2**32 - 1
    assert parse_range("buffer_size", "randint:1,10000001").values == (1, 10000001)


def test_default_space_follows_the_preset():
    space = default_space(digits_cfg())  # digits: buffer 2000, step 1, noise 0.01
    assert space["sampler.buffer_size"].values == (500, 1000, 2000, 4000)
    assert space["sampler.step_size"].values == (0.25, 4.0)
    assert space["sampler.noise_std"].values == pytest.approx((0.0025, 0.04))
    toy = Config()
    toy.data.dataset = "toy2d"
    apply_preset(toy)  # toy2d: step 0.005, noise 0.1
    assert default_space(toy)["sampler.step_size"].values == pytest.approx((0.00125, 0.02))


def test_build_space_flags_fix_and_validation():
    base = digits_cfg()
    space = build_space(base, {"lr": "loguniform:1e-4,1e-2"}, fixed_by_flag={"sampler.buffer_size"})
    assert set(space) == {"reinit_freq", "sgld_step_size", "sgld_noise", "lr"}
    with pytest.raises(ValueError, match="reinit_freq"):
        build_space(base, {"reinit_freq": "uniform:0.5,2"}, set())
    assert set(build_space(base, {"sampler.n_steps": "grid:5,10"}, set())) >= {"sgld_steps"}


def test_every_stability_remedy_is_a_search_parameter():
    base = digits_cfg()
    space = build_space(base, {"energy_l2": "choice:0,0.1,0.5", "sgld_grad_clip": "loguniform:0.01,1",
                               "sam_rho": "choice:0,0.05,2", "sam_adaptive": "choice:false,true",
                               "px_augment": "choice:true,false"}, set())
    assert space["energy_l2"].values == (0.0, 0.1, 0.5) and space["sgld_grad_clip"].values == (0.01, 1.0)
    assert space["sam_adaptive"].values == (False, True) and space["px_augment"].values == (True, False)
    with pytest.raises(ValueError, match="energy_l2|energy-l2"):
        build_space(base, {"energy_l2": "uniform:-1,1"}, set())  # the field's bound (>= 0)


def test_space_file_yaml_and_json(tmp_path):
    y = tmp_path / "space.yaml"
    y.write_text("buffer_size: [1000, 2000]\nsgld_step_size: {type: loguniform, low: 0.1, high: 2}\n")
    j = tmp_path / "space.json"
    j.write_text(json.dumps({"reinit_freq": "uniform:0.01,0.1"}))
    assert read_space_file(y)["buffer_size"] == [1000, 2000]
    assert read_space_file(j) == {"reinit_freq": "uniform:0.01,0.1"}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    from jemfast.process.errors import UserError
    with pytest.raises(UserError, match="not valid json"):
        read_space_file(bad)


def test_trial_overrides_clamp_round_and_map_to_fields():
    space = {"reinit_freq": parse_range("reinit_freq", "uniform:0.01,0.1"),
             "buffer_size": parse_range("buffer_size", "choice:500,1000"),
             "sgld_steps": parse_range("sgld_steps", "randint:5,41")}
    out = trial_overrides(space, {"reinit_freq": 0.12, "buffer_size": 800, "sgld_steps": 48.6})
    assert out == {"sampler.reinit_freq": 0.1, "sampler.buffer_size": 800, "sampler.n_steps": 40}
    assert trial_overrides(space, {"sgld_steps": 7.4})["sampler.n_steps"] == 7


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
    assert (new.sampler.buffer_size, new.sampler.reinit_freq, new.sampler.step_size) == (300, 0.2, 0.5)
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
        row_from_result(m, cfg, "/x/t4", None, "checkpoint_000002"),
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
    # the checkpoint --resume continues each trial from: t4's, none for the others
    assert [t["checkpoint"] for t in data["trials"]] == ["checkpoint_000002", "", "", "", ""]
    assert lines[0].split(",")[-3:] == ["path", "checkpoint", "error"] and ",/x/t4,checkpoint_000002," in lines[1]


def test_best_command_replaces_searched_flags_and_parses():
    overrides = {"data.dataset": "digits", "model.hidden": 16, "sampler.buffer_size": 250, "optim.epochs": 9,
                 "stability.inject_divergence": 12, "run.compile": True, "optim.decay_epochs": [4, 6]}
    row = {"buffer_size": 1000.0, "sgld_step_size": 0.123456789, "inject_divergence": 12, "score": 1.0}
    cmd = best_command(row, overrides, epochs=3, out="/tmp/best dir")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "jemfast.train"]
    assert "--inject-divergence" not in argv and argv.count("--buffer-size") == 1
    assert argv[argv.index("--buffer-size") + 1] == "1000"
    assert argv[argv.index("--sgld-step-size") + 1] == "0.123457"
    assert argv[-4:] == ["--epochs", "3", "--out", "/tmp/best dir"]
    cfg = config_from_args(argv[3:])
    assert (cfg.sampler.buffer_size, cfg.model.hidden, cfg.optim.epochs, cfg.run.compile) == (1000, 16, 3, True)
    assert cfg.optim.decay_epochs == (4, 6) and cfg.sampler.step_size == 0.123457


# ---- command line: one-line errors, exit code 2 ---------------------------------------------
def run_cli(args, tmp_path, prelude=""):
    """``python -m jemfast.tune ARGS`` in a fresh interpreter, in ``tmp_path``, on this source tree."""
    code = (f"import runpy, sys\n{prelude}\nsys.argv = ['python -m jemfast.tune'] + {args!r}\n"
            "runpy.run_module('jemfast.tune', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)


def test_without_ray_one_line_and_exit_2(tmp_path):
    """Simulates a machine without the tune extra: ``import ray`` raises ImportError."""
    res = run_cli(["--smoke-test", "--storage-path", str(tmp_path)], tmp_path,
                  prelude="sys.modules['ray'] = None; sys.modules['ray.tune'] = None")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "pip install 'jemfast[tune]'" in lines[0] and "Ray Tune is not installed" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def tune_main(args, tmp_path=None):
    """jemfast.tune's main() in-process: its return code, or argparse's exit code."""
    pytest.importorskip("ray")
    from jemfast.tune.cli import main

    if tmp_path is not None and "--storage-path" not in args:
        args = args + ["--storage-path", str(tmp_path)]
    try:
        return main(args)
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.mark.parametrize("args,msg", [
    (["--space", "buffer_size"], "NAME=SPEC"),
    (["--space", "sgld_noise=loguniform:-1,1"], "sgld_noise"),
    (["--space", "buffer_size=choice:1e400"], "--space buffer_size: must be a finite integer, got inf"),
    (["--space", "sgld_steps=randint:1,1e30"], "--space sgld_steps: must be <= 100000, got 1e+30"),
    (["--lr", "abc"], "--lr"),
    (["--scheduler", "bohb"], "--scheduler: must be one of asha, pbt, fifo; got 'bohb'"),
    (["--dataset", "digits", "--sgld-steps", "0"], "--sgld-steps (sampler.n_steps): must be >= 1, got 0"),
    (["--dataset", "digits", "--seed", "1000000000000000"], "--seed (run.seed): must be <= 4294967295"),
    (["--dataset", "digits", "--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial: above 1 it must be a whole number"),
    (["--scheduler", "pbt", "--space", "reinit_freq=0.1", "--space", "buffer_size=500", "--space",
      "sgld_step_size=1", "--space", "sgld_noise=0.01"], "--scheduler pbt: nothing to perturb"),
    (["--dataset", "digits", "--storage-path", "s3://bucket/x"], "--storage-path"),
    (["--resume", "--name", "nothing-here"], "--resume"),
    (["--name", "/some/folder"], "--name '/some/folder': must be a plain directory name inside --storage-path"),
    (["--name", "../escape"], "--name '../escape': must be a plain directory name"),
    (["--name", "a/b"], "must be a plain directory name"),
])
def test_user_errors_one_line_exit_2(tmp_path, capsys, args, msg):
    """In-process: every one of these fails before Ray is started and writes nothing."""
    store = tmp_path / "store"
    store.mkdir()
    assert tune_main(args, store) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], err
    assert not list(store.iterdir())


@pytest.mark.parametrize("space", ["buffer_size=choice:1e400", "sgld_steps=randint:1,1e30"])
def test_space_out_of_bounds_in_a_fresh_process(tmp_path, space):
    """Issue 13.13: one line and exit 2; no traceback, OverflowError or Ray object repr."""
    res = run_cli(["--dataset", "digits", "--storage-path", str(tmp_path), "--space", space], tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jemfast.tune: error: --space "), res.stderr
    assert "Traceback" not in res.stderr and "Overflow" not in res.stderr and "<ray" not in res.stderr


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def users_files(root):
    """A directory holding a user's files (not a jemfast.tune experiment)."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.pt").write_bytes(b"weights")
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_never_touches_a_directory_it_did_not_make(tmp_path, capsys, overwrite):
    """Issue 13.1: STORAGE/NAME holding a training run or a user's files is refused (also with
    --overwrite), before Ray starts; every file stays byte for byte, nothing is added."""
    runs = tmp_path / "runs"
    users_files(runs / "digits")  # e.g. the default training directory of --dataset digits
    users_files(tmp_path / "folder")
    before = digest(tmp_path)
    extra = ["--overwrite"] if overwrite else []
    assert tune_main(["--smoke-test", "--storage-path", str(runs), *extra]) == 2
    assert "is not a jemfast.tune experiment" in capsys.readouterr().err
    assert tune_main(["--smoke-test", "--storage-path", str(runs), "--name", str(tmp_path / "folder"), *extra]) == 2
    assert tune_main(["--smoke-test", "--storage-path", str(runs), "--name", "../folder", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--name" in line for line in err), err
    assert digest(tmp_path) == before and sorted(p.name for p in runs.iterdir()) == ["digits"]


def test_storage_path_on_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert tune_main(["--smoke-test", "--storage-path", str(blocker)]) == 2
    assert tune_main(["--smoke-test", "--storage-path", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not a directory" in err[0] and "cannot be created" in err[1], err
    assert blocker.read_text() == "x"


def test_existing_experiment_needs_resume_or_overwrite(tmp_path, capsys):
    from jemfast.tune.plan import PLAN_FILE

    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / PLAN_FILE).write_text("{}")
    (tmp_path / "digits" / "results.json").write_text("{}")
    assert tune_main(["--smoke-test"], tmp_path) == 2
    assert "--resume" in capsys.readouterr().err


def test_claim_experiment_dir(tmp_path):
    from jemfast.process.errors import UserError
    from jemfast.tune.plan import PLAN_FILE, claim_experiment_dir

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / PLAN_FILE).write_text("{}")
    (ours / "trial_0").mkdir()
    claim_experiment_dir(ours, overwrite=True)  # ours: replaced
    assert ours.is_dir() and not list(ours.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_experiment_dir(empty, overwrite=False)  # nothing to lose: used as it is
    claim_experiment_dir(tmp_path / "new" / "exp", overwrite=False)
    assert (tmp_path / "new" / "exp").is_dir()
    theirs = users_files(tmp_path / "theirs")
    before = digest(theirs)
    with pytest.raises(UserError, match="not a jemfast.tune experiment"):
        claim_experiment_dir(theirs, overwrite=True)
    assert digest(theirs) == before
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UserError, match="not a directory"):
        claim_experiment_dir(tmp_path / "link", overwrite=True)


def test_plan_is_built_from_overrides_not_cli_text(tmp_path):
    """The base config comes from build_config(dotted overrides); JSON round trip keeps it."""
    from jemfast.options.config import build_config
    from jemfast.tune.cli import build_parser
    from jemfast.tune.plan import make_plan, read_options

    opts, overrides = read_options(build_parser().parse_args(
        ["--smoke-test", "--lr", "0.002", "--decay-epochs", "2,3", "--space", "hidden=choice:8,16"]))
    assert overrides["optim.lr"] == 0.002 and overrides["data.dataset"] == "digits"
    plan = json.loads(json.dumps(make_plan(opts, overrides)))
    base = Config.from_dict(plan["base"])
    assert base == build_config({**overrides, "run.progress": False, "optim.epochs": 3,
                                 "data.data_dir": base.data.data_dir})
    assert plan["space"]["hidden"] == ["choice", [8, 16]] and plan["space"]["inject_divergence"][0] == "grid"
    cfg = trial_config(plan["base"], {"hidden": 16, "buffer_size": 250}, plan["settings"]["space"])
    assert (cfg.model.hidden, cfg.sampler.buffer_size, cfg.optim.decay_epochs) == (16, 250, (2, 3))

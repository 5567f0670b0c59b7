"""The bad-input table of docs/reliability.md: each row gives one clear line, a non-zero exit, and leaves a
previously saved run in --out byte-for-byte unchanged."""
import hashlib
from pathlib import Path

import pytest
import torch

from jemfast.train import main, train
from tests.conftest import REPO, run_module, tiny_digits_config

BASE = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "200", "--sgld-steps", "5", "--no-progress"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    train(tiny_digits_config(out))
    return out


def digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def exit_code(argv: list[str]) -> int:
    """main()'s return code, or the code argparse exits with for a malformed flag."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


ROWS = [
    ("unknown dataset", ["--dataset", "mnist"], "--dataset (data.dataset): must be one of cifar10"),
    ("zero epochs", ["--epochs", "0"], "--epochs (optim.epochs): must be >= 1, got 0"),
    ("negative batch size", ["--batch-size", "-4"], "--batch-size (optim.batch_size): must be >= 1, got -4"),
    ("zero SGLD steps", ["--sgld-steps", "0"], "--sgld-steps (sampler.n_steps): must be >= 1, got 0"),
    ("NaN step size", ["--sgld-step-size", "nan"], "--sgld-step-size (sampler.step_size): must be a finite number"),
    ("negative noise", ["--sgld-noise", "-0.1"], "--sgld-noise (sampler.noise_std): must be >= 0, got -0.1"),
    ("reinit out of range", ["--reinit-freq", "1.5"], "--reinit-freq (sampler.reinit_freq): must be <= 1, got 1.5"),
    ("zero buffer", ["--buffer-size", "0"], "--buffer-size (sampler.buffer_size): must be >= 1"),
    ("inf lr", ["--lr", "inf"], "--lr (optim.lr): must be a finite number"),
    ("non-number lr", ["--lr", "fast"], "argument --lr: invalid float value"),
    ("unknown model", ["--model", "resnet"], "--model (model.name): must be one of wrn, cnn, mlp"),
    ("bad WRN depth", ["--model", "wrn", "--depth", "27"], "--depth (model.depth): WRN depth must be 6n+4"),
    ("unknown flag", ["--sgld-stepsize", "1"], "unrecognized arguments"),
    ("bad precision", ["--precision", "fp8"], "--precision (run.precision): must be one of"),
    # sizes and seeds that would fail later, in an allocator or an RNG (issue 13.13), with --overwrite:
    # refused before anything in --out is touched
    ("seed beyond 2**32", ["--overwrite", "--seed", "1000000000000000"],
     "--seed (run.seed): must be <= 4294967295, got 1000000000000000"),
    ("huge hidden", ["--overwrite", "--hidden", "1000000000000"], "--hidden (model.hidden): must be <= 65536"),
    ("huge buffer", ["--overwrite", "--buffer-size", "1000000000000"],
     "--buffer-size (sampler.buffer_size): must be <= 10000000"),
    ("huge width", ["--overwrite", "--model", "wrn", "--width", "100000"], "--width (model.width): must be <= 64"),
    ("huge batch", ["--overwrite", "--batch-size", "1000000000"], "--batch-size (optim.batch_size): must be <= 65536"),
    ("huge epochs", ["--overwrite", "--epochs", "1000000000000"], "--epochs (optim.epochs): must be <= 100000"),
    ("huge SGLD steps", ["--overwrite", "--sgld-steps", "1000000000"],
     "--sgld-steps (sampler.n_steps): must be <= 100000"),
    ("class-conditional buffer that does not split", ["--overwrite", "--class-cond", "true", "--buffer-size", "205"],
     "--buffer-size (sampler.buffer_size) 205 with --class-cond: must be a multiple of the 10 classes"),
    ("bad decay epoch", ["--decay-epochs", "5,0"],
     "--decay-epochs (optim.decay_epochs): each item must be >= 1, got 0"),
    ("not a boolean", ["--augment", "maybe"], "argument --augment: expected true/false"),
    ("escape codes in a value", ["--dataset", "x\x1b[31mred"], "got 'x\\x1b[31mred'"),
    ("empty out", ["--out", ""], "--out (run.out): must be a directory path"),
    ("out holds another run", [], "holds another run; pass --resume"),
    ("checkpoint from another model", ["--resume", "--hidden", "16"], "is from another run: model.hidden"),
    ("checkpoint from another dataset", ["--resume", "--dataset", "toy2d", "--model", "mlp"],
     "is from another run: data.dataset"),
    ("dataset not downloadable", ["--overwrite", "--dataset", "cifar10", "--data-dir", "FILE"],
     "could not load cifar10 into --data-dir"),
]


@pytest.mark.parametrize("name,args,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(saved_run, tmp_path, capsys, name, args, message):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = [str(blocker) if a == "FILE" else a for a in args]
    before = digest(saved_run)
    code = exit_code([*BASE, "--out", str(saved_run), *args])
    err = capsys.readouterr().err
    assert "\x1b" not in err  # no raw terminal escape codes
    err = err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert digest(saved_run) == before


EVAL_ROWS = [
    ("out is a file", ["--out", "FILE"], "is not a directory"),
    ("out under a file", ["--out", "FILE/eval"], "cannot be created"),
    ("out not writable", ["--out", "/sys/jemfast-eval"], "is not writable"),
    ("seed beyond 2**32", ["--seed", str(2**40)], "--seed: must be <= 4294967295"),
    ("zero batch", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("unknown part", ["--what", "accuracy,bogus"], "--what: each item must be one of"),
]


@pytest.mark.parametrize("name,args,message", EVAL_ROWS, ids=[r[0] for r in EVAL_ROWS])
def test_eval_bad_input_row(saved_run, tmp_path, capsys, name, args, message):
    """jemfast.eval: one line, exit 2, before any work; the run it evaluates is unchanged."""
    from jemfast.eval.__main__ import main as eval_main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = [a.replace("FILE", str(blocker)) for a in args]
    before = digest(saved_run)
    try:
        code = eval_main(["--checkpoint", str(saved_run / "checkpoints" / "last.pt"), "--device", "cpu", *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert digest(saved_run) == before and blocker.read_text() == "x"


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert main([*BASE, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_unwritable_out(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main([*BASE, "--out", str(tmp_path / "f" / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_in_a_fresh_process(tmp_path):
    proc = run_module(["jemfast.train", *BASE, "--device", "cuda", "--out", str(tmp_path / "r")], cwd=REPO)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0]
    assert "Traceback" not in proc.stderr

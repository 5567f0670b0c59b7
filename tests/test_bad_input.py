"""The README's bad-input table: each row gives one clear line, a non-zero exit, and leaves a
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
    ("unknown dataset", ["--dataset", "mnist"], "dataset: must be one of"),
    ("zero epochs", ["--epochs", "0"], "epochs: must be >= 1"),
    ("negative batch size", ["--batch-size", "-4"], "batch_size: must be >= 1"),
    ("zero SGLD steps", ["--sgld-steps", "0"], "sgld_steps: must be >= 1"),
    ("NaN step size", ["--sgld-step-size", "nan"], "sgld_step_size: must be a finite number"),
    ("negative noise", ["--sgld-noise", "-0.1"], "sgld_noise: must be >= 0"),
    ("reinit out of range", ["--reinit-freq", "1.5"], "reinit_freq: must be in [0, 1]"),
    ("zero buffer", ["--buffer-size", "0"], "buffer_size: must be >= 1"),
    ("inf lr", ["--lr", "inf"], "lr: must be a finite number"),
    ("non-number lr", ["--lr", "fast"], "argument --lr: invalid float value"),
    ("unknown model", ["--model", "resnet"], "model: must be one of"),
    ("bad WRN depth", ["--model", "wrn", "--depth", "27"], "model.depth"),
    ("unknown flag", ["--sgld-stepsize", "1"], "unrecognized arguments"),
    ("bad precision", ["--precision", "fp8"], "precision: must be one of"),
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
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert digest(saved_run) == before


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

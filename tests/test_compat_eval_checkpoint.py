"""``python -m jemfast.eval --checkpoint ORIGINAL.pt [model flags]``: an original JEM checkpoint
evaluated directly, its model built as ``python -m jemfast.compat convert`` builds it.

The checkpoint is the one examples/jem_original_style.py's ``checkpoint()`` writes (its CCF on
digits, briefly trained here); the reference is that model's own accuracy on the same test split
(the example splits digits as jemfast does) and its own logits.
"""
from __future__ import annotations

import json

import pytest
import torch

from jemfast.compat.loading import load_any_checkpoint
from jemfast.eval.__main__ import main as eval_main
from jemfast.process.errors import UserError
from tests.compat_example import example, original_checkpoint

FLAGS = ["--dataset", "digits", "--hidden", "8"]
QUICK = ["--device", "cpu", "--no-progress", "--sample-steps", "3", "--per-class", "2", "--attack-n", "20",
         "--pgd-steps", "2", "--refine-steps", "0,1", "--eps-linf", "0,0.1", "--eps-l2", "",
         "--ood", "noise,constant", "--ood-n", "50"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """``(path of an original-format checkpoint, its model, its buffer)``."""
    path = tmp_path_factory.mktemp("original") / "last_ckpt.pt"
    f = original_checkpoint(path, hidden=8, rows=100)
    return path, f, torch.load(path, weights_only=True)["replay_buffer"]


def test_an_original_checkpoint_evaluates_end_to_end(original, tmp_path, capsys):
    path, f, buffer = original
    out = tmp_path / "eval"
    rc = eval_main(["--checkpoint", str(path), *FLAGS, "--out", str(out), *QUICK,
                    "--what", "accuracy,calibration,ood,samples,robustness"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "eval.json").read_text())
    _, _, (x_test, y_test) = example().get_data(None, torch.device("cpu"))
    own = example().eval_classification(f, x_test, y_test)  # the example's own evaluation of its model
    assert own > 0.3
    assert results["accuracy"]["test"]["n"] == len(y_test) == 360
    assert results["accuracy"]["test"]["accuracy"] == pytest.approx(own, abs=1e-6)
    assert results["format"] == "original" and results["model"] == "cnn" and results["step"] is None
    assert 0 <= results["calibration"]["ece"] <= 1
    assert set(results["ood"]["auroc"]) == {"noise", "constant"}
    assert results["samples"]["buffer"]["capacity"] == 100  # the file's buffer, its rows
    assert "0.1" in {str(k) for k in results["robustness"]["accuracy"]["linf"]}
    assert "original JEM format" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "wrote eval.json" in printed


def test_the_loaded_model_and_buffer_are_the_originals(original):
    path, f, buffer = original
    ck = load_any_checkpoint(path, "cpu", {"data.dataset": "digits", "model.hidden": 8})
    x = torch.rand(9, 1, 8, 8) * 2 - 1
    f.eval()
    assert not ck["model"].training
    torch.testing.assert_close(ck["model"](x), f.classify(x), rtol=0, atol=0)
    assert torch.equal(ck["buffer"].data, buffer) and ck["format"] == "original"


def test_an_empty_original_buffer_loads(tmp_path, caplog):
    path = tmp_path / "nobuf.pt"
    original_checkpoint(path, hidden=8, rows=0, train_steps=0)
    with caplog.at_level("INFO"):
        ck = load_any_checkpoint(path, "cpu", {"data.dataset": "digits", "model.hidden": 8})
    assert ck["buffer"].capacity == 2000  # the digits preset's fresh buffer
    assert "it holds no replay buffer" in caplog.text


def test_wrong_or_missing_flags_and_foreign_files_fail_in_one_line(original, tmp_path, capsys):
    path, _, _ = original
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    jemfast_ckpt = tmp_path / "run"
    from jemfast.compat.__main__ import main as compat_main
    assert compat_main(["convert", str(path), "--out", str(jemfast_ckpt), *FLAGS]) == 0
    capsys.readouterr()
    cases = [
        ([str(path)], "holds images of shape [1, 8, 8], --dataset cifar10 has [3, 32, 32]"),  # the original's defaults
        ([str(path), "--dataset", "digits", "--hidden", "16"], "f.features.0.weight has shape [8, 1, 3, 3]"),
        ([str(tmp_path / "foreign.pt")], "is neither a jemfast checkpoint"),
        ([str(jemfast_ckpt / "checkpoints" / "last.pt"), "--hidden", "8"],
         "--hidden apply only to an original checkpoint being evaluated"),
    ]
    for argv, message in cases:
        rc = eval_main(["--checkpoint", *argv, "--out", str(tmp_path / "ev"), "--device", "cpu", "--what", "accuracy"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
        if argv[0] == str(path):
            assert "give the model flags it was trained with" in err[0]
    with pytest.raises(UserError, match="does not exist"):
        load_any_checkpoint(tmp_path / "missing.pt")

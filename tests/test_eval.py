"""python -m jemfast.eval on a briefly trained digits checkpoint, and its CLI errors."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from jemfast.eval.__main__ import main as eval_main
from jemfast.eval.options import options_from_args
from jemfast.eval.runner import run_eval
from jemfast.train import train
from tests.conftest import tiny_digits_config

PNGS = ("reliability.png", "ood_hist.png", "samples_short_run.png", "samples_buffer.png",
        "likely_real.png", "robustness.png")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A digits JEM trained for 3 short epochs (~55-70 % test accuracy; log p(x) already tells
    digits from noise and constant images)."""
    cfg = tiny_digits_config(tmp_path_factory.mktemp("evalrun"), model__hidden=16, optim__epochs=3,
                             optim__warmup_iters=20, optim__decay_epochs=(), sampler__buffer_size=500,
                             sampler__n_steps=10, run__overwrite=True)
    summary = train(cfg)
    assert summary["status"] == "finished"
    return f"{cfg.run.out}/checkpoints/last.pt"


@pytest.fixture(scope="module")
def full_eval(digits_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    hub = tmp_path_factory.mktemp("hub")  # an empty torch hub: no Inception weights to find
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        opts = options_from_args([
            "--checkpoint", digits_ckpt, "--out", str(out), "--device", "cpu", "--no-progress",
            "--ood", "noise,constant,interp,inverted,svhn", "--ood-n", "300",
            "--sample-steps", "10", "--per-class", "4",
            "--attack-n", "40", "--pgd-steps", "5", "--refine-steps", "0,1",
            "--eps-linf", "0,0.1,0.3", "--eps-l2", "0,1,3"])
        results = run_eval(opts)
    finally:
        torch.hub.set_dir(old)
    return out, results


def test_writes_json_report_and_every_png(full_eval):
    out, results = full_eval
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["dataset"] == "digits" and set(on_disk["what"]) == {
        "accuracy", "calibration", "ood", "samples", "robustness", "generation"}
    report = (out / "report.md").read_text()
    for png in PNGS:
        assert (out / png).stat().st_size > 5000, png
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) == set(PNGS)
    assert "| noise |" in report and "| L-inf | 0.3 |" in report
    assert 0.3 < results["accuracy"]["test"]["accuracy"] <= 1.0  # chance is 0.1
    assert 0.0 <= results["calibration"]["ece"] <= 1.0


def test_log_px_detects_noise_and_constant_images(full_eval):
    _, results = full_eval
    table = results["ood"]["auroc"]
    assert table["noise"]["log_px"] > 0.9
    assert table["constant"]["log_px"] > 0.9
    assert all(0.0 <= v <= 1.0 for row in table.values() for k, v in row.items() if k != "n")
    # a 3x32x32 dataset cannot be fed to a 1x8x8 model: skipped with one line, no crash
    assert "svhn" not in table and "\n" not in results["ood"]["skipped_sets"]["svhn"]


def test_pgd_lowers_accuracy_as_epsilon_grows(full_eval):
    _, results = full_eval
    for norm, rows in results["robustness"]["accuracy"].items():
        for k in ("0", "1"):
            acc = [rows[e][k] for e in sorted(rows, key=float)]
            assert acc[-1] < acc[0], (norm, k, acc)
            assert all(b <= a + 1e-9 for a, b in zip(acc, acc[1:])), (norm, k, acc)


def test_generation_on_digits_without_inception_weights_gives_the_digits_metrics(full_eval):
    out, results = full_eval
    g = results["generation"]
    line = g["inception"]["skipped"]  # the standard FID network's part: no weights, no download
    assert "Inception" in line and "\n" not in line
    assert g["digits_fid"] > 0 and 1.0 <= g["digits_is"] <= 10.0  # IS is at most the number of classes
    assert "digits FID" in (out / "report.md").read_text()


def test_cli_end_to_end(digits_ckpt, tmp_path, capsys):
    rc = eval_main(["--checkpoint", digits_ckpt, "--what", "accuracy,calibration",
                    "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "ECE" in capsys.readouterr().out
    assert (tmp_path / "ev" / "reliability.png").is_file() and (tmp_path / "ev" / "report.md").is_file()


def test_cli_bad_what_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jemfast.eval", "--checkpoint", str(tmp_path / "x.pt"),
                           "--what", "accuracy,bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0], proc.stderr


def test_sigint_is_one_line_and_exit_130(digits_ckpt, tmp_path):
    """Ctrl-C while the evaluation runs: no traceback, one line, exit code 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jemfast.eval", "--checkpoint", digits_ckpt, "--what", "robustness",
         "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress", "--attack-n", "100",
         "--pgd-steps", "200", "--refine-steps", "0,10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stderr:  # the first log line: the checkpoint is loaded, the work begins
            lines.append(line)
            if "writing to" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "jemfast.eval: stopped by SIGINT", err
    assert not (tmp_path / "ev" / "eval.json").exists()


def _exit_code(argv):
    try:
        return eval_main(argv)
    except SystemExit as exc:  # argparse errors exit from inside the parser
        return exc.code


@pytest.mark.parametrize("args, needle", [
    (["--eps-linf", "0,-0.1"], "--eps-linf"),
    (["--eps-l2", "0,abc"], "--eps-l2"),
    (["--ood", "noise,mnist"], "mnist"),
    (["--pgd-steps", "0"], "--pgd-steps"),
    (["--device", "tpu"], "--device"),
    ([], "does not exist"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    assert _exit_code(["--checkpoint", str(tmp_path / "missing.pt"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert _exit_code(["--checkpoint", str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0], err


@pytest.mark.slow
def test_generation_pipeline_with_random_fid_inception_weights(digits_ckpt, tmp_path):
    """IS/FID run end to end through the FID Inception network given a weights file (random
    weights of that architecture: the real ones cannot be downloaded in CI)."""
    from tests.test_generation_metrics import random_fid_inception_weights

    weights = random_fid_inception_weights(tmp_path / "inception.pth")
    results = run_eval(options_from_args([
        "--checkpoint", digits_ckpt, "--what", "generation", "--out", str(tmp_path / "ev"),
        "--device", "cpu", "--no-progress", "--inception-weights", str(weights),
        "--gen-n", "12", "--batch-size", "12"]))
    g = results["generation"]
    assert g["n_fake"] == 12 and g["n_real"] == 12
    assert g["inception_score"] >= 1.0 - 1e-9 and g["fid"] > 0.0
    assert "not meaningful" in g["note"]
    assert "Inception Score" in (tmp_path / "ev" / "report.md").read_text()

"""Nothing saved is lost: --overwrite order, one process per --out, disk full and read-only
directories, orphaned temp files, restart events across a kill, per-flag resume, finished runs,
and signals (issue: data-loss paths)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jemfast.rundir.checkpoint import read_checkpoint
from jemfast.rundir.lock import RunLock
from jemfast.train import Trainer, main, train
from tests.conftest import REPO, start_train, stop_after, tiny_digits_config, wait_until

TINY = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "100", "--sgld-steps", "2", "--no-progress"]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.mark.parametrize("bad", [["--batch-size", "5000"], ["--backend", "graph", "--device", "cpu"]])
def test_failing_overwrite_leaves_the_saved_run(saved_run, tmp_path, capsys, bad):
    out = copy_run(saved_run, tmp_path / "run")
    before = tree_hashes(out)
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--overwrite", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert tree_hashes(out) == before


def test_overwrite_failing_at_the_first_checkpoint_puts_the_old_run_back(saved_run, tmp_path, monkeypatch):
    out = copy_run(saved_run, tmp_path / "run")
    before = tree_hashes(out)
    import jemfast.train as train_mod

    def no_space(*a, **k):
        raise OSError(28, "No space left on device", str(out / "checkpoints" / "good-000000000.pt"))

    monkeypatch.setattr(train_mod, "save_good_checkpoint", no_space)
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
    assert tree_hashes(out) == before
    assert not (out / ".previous-run").exists()


def test_second_process_on_the_same_out_is_refused(saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path / "run")
    before = tree_hashes(out)
    with RunLock(out):  # stands for a live training process
        for extra in (["--overwrite"], ["--resume", "--epochs", "2"]):
            assert main([*TINY, "--epochs", "1", "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert f"in use by another jemfast process (pid {os.getpid()})" in err
    assert tree_hashes(out) == before


def test_disk_full_mid_run_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "run"

        def fill_disk(trainer):  # after the epoch-1 checkpoint, use up the space
            if trainer.progress.step == 25 and not (mnt / "filler").exists():
                with open(mnt / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                    except OSError:
                        pass

        cfg = tiny_digits_config(out, optim__epochs=3, sampler__buffer_size=100, sampler__n_steps=2)
        from jemfast.process.errors import UserError

        with pytest.raises(UserError, match="No space left on device") as exc:
            train(cfg, hooks=[fill_disk])
        assert "last good checkpoint" in str(exc.value) and "\n" not in str(exc.value)
        good = read_checkpoint(out / "checkpoints" / "last.pt")
        assert good["epoch"] == 1
        assert not list((out / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_read_only_checkpoints_dir_fails_before_training(saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path / "run")
    ck = out / "checkpoints"
    if subprocess.run(["mount", "--bind", str(ck), str(ck)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ck)], check=True)
        before = tree_hashes(out)
        for extra in (["--resume", "--epochs", "2"], ["--overwrite"]):
            assert main([*TINY, "--epochs", "1", "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "not writable" in err[0], err
            assert tree_hashes(out) == before
    finally:
        subprocess.run(["umount", "-l", str(ck)])


def test_orphaned_temp_checkpoints_are_removed_on_resume(saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path / "run")
    orphan = out / "checkpoints" / ".good-000000019.pt.abc123.tmp"
    orphan.write_bytes((out / "checkpoints" / "last.pt").read_bytes())
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert not orphan.exists()


def test_resume_reports_each_changed_flag_and_records_what_was_used(saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path / "run")
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--resume", "--lr", "0.002",
                 "--batch-size", "32", "--seed", "5", "--sgld-steps", "3", "--weight-decay", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "--weight-decay: 0.0 in the checkpoint, 0.01 from iteration 19 on" in err
    groups = read_checkpoint(out / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01]  # not the restored optimizer state's 0.0
    assert "--lr: 0.001 in the checkpoint, 0.002 from iteration 19 on" in err
    assert "--sgld-steps: 2 in the checkpoint, 3 from iteration 19 on" in err
    assert "--batch-size: continuing with the checkpoint's 64, not 32" in err
    assert "--seed: continuing with the checkpoint's 1, not 5" in err
    summary = json.loads((out / "summary.json").read_text())
    used = summary["config"]
    assert used["optim"]["lr"] == 0.002 and used["sampler"]["n_steps"] == 3
    assert used["optim"]["batch_size"] == 64 and used["run"]["seed"] == 1
    assert summary["iterations"] == 2 * (1257 // 64)  # the epoch was not re-cut into batches of 32


def test_failed_first_start_is_no_dead_end(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')  # what a crashed start leaves
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--resume"]) == 2
    assert "start it without --resume" in capsys.readouterr().err
    assert main([*TINY, "--epochs", "1", "--out", str(out)]) == 0


def test_resuming_a_finished_run_changes_nothing(saved_run, tmp_path, capsys):
    out = copy_run(saved_run, tmp_path / "run")
    before = tree_hashes(out)
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert tree_hashes(out) == before


def test_resuming_a_stopped_run_past_its_epochs_is_one_line_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = Trainer(tiny_digits_config(out, optim__epochs=3, sampler__buffer_size=100, sampler__n_steps=2), None)
    stop_after(trainer, 2 * (1257 // 64) + 3)  # interrupted in its third epoch
    assert trainer.run()["status"] == "interrupted"
    before = tree_hashes(out)
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("is at epoch 2 (iteration 41), past --epochs 2; pass --epochs larger than 2 to train on")
    assert tree_hashes(out) == before


KILL_AFTER_RESTART = """
import os, signal, sys
from jemfast.train import train
from tests.conftest import tiny_digits_config
cfg = tiny_digits_config(sys.argv[1], optim__epochs=2, sampler__buffer_size=100, sampler__n_steps=2,
                         stability__inject_divergence=25, stability__check_every=2)
def kill_after_restart(trainer):
    if trainer.recovery.restarts and trainer.progress.step == trainer.recovery.restarts[0]["rolled_back_to"] + 2:
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, hooks=[kill_after_restart])
"""


def test_restart_event_survives_kill_and_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_RESTART, str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the restarted state was checkpointed at once: a kill after it loses neither it nor its seed
    killed = read_checkpoint(out / "checkpoints" / "last.pt")
    assert [e["restart"] for e in killed["recovery"]["restarts"]] == [1] and killed["seed"] == 1 + 1000
    assert killed["step"] == killed["recovery"]["restarts"][0]["rolled_back_to"]
    assert main([*TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e.get("event") == "restart"]
    assert len(restarts) == 1 and restarts[0]["step"] >= 25
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["restarts"]) == 1
    final = read_checkpoint(out / "checkpoints" / "last.pt")
    assert final["recovery"]["restarts"] == restarts and final["seed"] == 1 + 1000


def start(out: Path, *extra: str, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    return start_train([*TINY, "--out", str(out), *extra], open(log, "w") if log else subprocess.PIPE, env)


def wait_for(pred, timeout=300.0) -> bool:
    return wait_until(pred, timeout)


@pytest.mark.slow
def test_sigterm_stops_inside_a_long_sgld_chain_and_second_signal_is_quiet(tmp_path):
    out = tmp_path / "run"
    # 10**5 SGLD steps (the largest allowed): one iteration takes minutes, so the checkpoint at
    # iteration 0 below shows the run stopped inside the first chain
    proc = start(out, "--epochs", "1", "--sgld-steps", "100000")
    assert wait_for(lambda: (out / "checkpoints" / "last.pt").exists())
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 0

    log = tmp_path / "stderr.txt"
    # the checkpoint write after the first signal pauses 20 s, so the second one lands inside it
    proc = start(out, "--epochs", "1", "--sgld-steps", "100000", "--resume", log=log,
                 env={"JEMFAST_TEST_SAVE_DELAY": "20"})
    assert wait_for(lambda: "resuming from" in log.read_text())
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "second signal" in err
    assert read_checkpoint(out / "checkpoints" / "last.pt")["step"] == 0  # the old one, intact


def test_sigint_during_start_up_is_quiet(tmp_path):
    proc = start(tmp_path / "run", "--epochs", "1")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1


def test_eval_into_a_directory_in_use_is_refused(saved_run, tmp_path, capsys):
    from jemfast.eval.__main__ import main as eval_main

    out = tmp_path / "eval"
    with RunLock(out):
        rc = eval_main(["--checkpoint", str(saved_run / "checkpoints" / "last.pt"), "--what", "accuracy", "--out", str(out),
                        "--device", "cpu"])
    assert rc == 2
    assert f"in use by another jemfast process (pid {os.getpid()})" in capsys.readouterr().err
    assert not (out / "eval.json").exists()

"""Data-parallel training under torchrun: 2 processes, gloo on the CPU, digits, tiny settings.

Some tests start the two worker processes themselves with the environment torchrun gives them
(MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK), to read each rank's own exit code.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from jemfast.train import train
from tests.conftest import REPO, tiny_digits_config
from tests.ddp_helpers import PER_EPOCH, TINY, children, env, free_port, last, torchrun, torchrun_cmd, wait_for, wait_gone

pytestmark = pytest.mark.slow


def start_ranks(args: list[str], **extra: str) -> list[subprocess.Popen]:
    """The two worker processes torchrun would start, started here (their exit codes are ours to read)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2", **extra)
        procs.append(subprocess.Popen([sys.executable, "-m", "jemfast.train", *TINY, *args], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_ranks_train_one_model_and_resume_after_kill(tmp_path):
    # kill -9 of the whole group after the first epoch's checkpoint (--epochs 300: a fast machine
    # cannot finish before the kill), then --resume finishes the epoch it was in
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(["--epochs", "300", "--out", str(killed)]), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(killed / "checkpoints" / f"good-{PER_EPOCH:09d}.pt")
    workers = children(proc.pid)  # torchrun starts its workers in sessions of their own
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_gone(workers)
    epochs = max(3, last(killed)["step"] // PER_EPOCH + 1)
    r = torchrun(["--epochs", str(epochs), "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]

    straight = tmp_path / "straight"
    r = torchrun(["--epochs", str(epochs), "--out", str(straight)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test accuracy") == 1  # rank 0 reports for both
    ckpt = last(straight)
    w = ckpt["world"]
    assert w["size"] == 2 and len(w["rng"]) == 2
    assert w["param_checksums"][0] == w["param_checksums"][1]  # one model on both ranks
    shard0, shard1 = ckpt["buffer"]["data"][:100], ckpt["buffer"]["data"][100:]
    assert not torch.equal(shard0, shard1)  # each rank ran its own chains
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 128
    assert summary["iterations"] == epochs * PER_EPOCH
    lrs = {json.loads(line).get("lr") for line in (straight / "metrics.jsonl").read_text().splitlines()}
    assert lrs - {None} == {1e-3}  # the digits preset's --lr, not scaled by the world size

    a, b = last(straight), last(killed)
    assert a["step"] == b["step"] == epochs * PER_EPOCH
    for k in a["model"]:  # same world size: the resumed run continues exactly
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])

    # one process with the same global batch learns about as well
    single = train(tiny_digits_config(tmp_path / "single", optim__epochs=epochs, optim__batch_size=128,
                                      sampler__n_steps=2, optim__warmup_iters=0, run__seed=3, run__device="cpu"))
    assert single["iterations"] == summary["iterations"]
    assert abs(single["test_acc"] - summary["test_acc"]) < 0.1, (single["test_acc"], summary["test_acc"])


def test_sigterm_one_checkpoint_every_rank_exits_143_then_resume(tmp_path):
    out = tmp_path / "run"
    procs = start_ranks(["--epochs", "300", "--out", str(out), "--check-every", "2"])
    wait_for(out / "checkpoints" / f"good-{PER_EPOCH:09d}.pt")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    outputs = [p.communicate() for p in procs]
    assert codes == [143, 143], outputs
    assert "interrupted" in outputs[0][0] and outputs[1] == ("", "")  # rank 1 says nothing
    ckpt = last(out)
    assert ckpt["world"]["param_checksums"][0] == ckpt["world"]["param_checksums"][1]
    stopped_at = ckpt["step"]
    assert stopped_at > PER_EPOCH
    epochs = stopped_at // PER_EPOCH + 1  # a fast machine may be many epochs in: finish the current one
    procs = start_ranks(["--epochs", str(epochs), "--out", str(out), "--resume"])
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.communicate() for p in procs]
    assert last(out)["step"] == epochs * PER_EPOCH


def test_divergence_on_one_rank_rolls_both_back(tmp_path):
    out = tmp_path / "run"
    procs = start_ranks(["--epochs", "2", "--out", str(out), "--check-every", "2", "--inject-divergence", "12"],
                        JEMFAST_TEST_INJECT_RANK="1")
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [p.communicate() for p in procs]
    assert codes == [0, 0], outputs
    ckpt = last(out)
    restarts = ckpt["recovery"]["restarts"]
    # both ranks land on the in-memory state of the last check before the blow-up (iteration 12)
    assert len(restarts) == 1 and restarts[0]["rolled_back_to"] == restarts[0]["onset"] == 12, restarts
    assert ckpt["world"]["param_checksums"][0] == ckpt["world"]["param_checksums"][1]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["restart"] for e in events if e.get("event") == "restart"] == [1]
    assert "divergence at iteration" in outputs[0][1] and outputs[1][1] == ""


def test_start_failure_is_one_line_from_rank_zero(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")  # another run lives there
    procs = start_ranks(["--out", str(tmp_path / "run")])
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [p.communicate() for p in procs]
    assert codes == [2, 2], outputs
    assert outputs[0][1].strip().count("\n") == 0 and "holds another run" in outputs[0][1]
    assert outputs[1][1] == ""


def test_resume_on_another_world_size_reshards(tmp_path, caplog):
    out = tmp_path / "run"
    procs = start_ranks(["--epochs", "1", "--out", str(out)])
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.communicate() for p in procs]
    cfg = tiny_digits_config(out, optim__epochs=2, sampler__n_steps=2, optim__warmup_iters=0, run__seed=3,
                             run__device="cpu", run__resume=True)
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["world_size"] == 1
    assert "re-sharded" in caplog.text
    assert last(out)["buffer"]["data"].shape[0] == 200

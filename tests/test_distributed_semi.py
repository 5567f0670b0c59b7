"""Semi-supervised training (``--labels-per-class``) under torchrun: every rank holds the same
labelled subset and takes its slice of each global labelled batch, so the ranks' slices are
exactly a single process's batch; the unlabelled p(x) batches are sharded the same way; a
mid-epoch kill -9 of one rank and ``--resume`` continue exactly."""
from __future__ import annotations

import os
import signal

import pytest
import torch

import jemfast.step as step
from jemfast.data import load_data
from jemfast.train import train
from tests.conftest import tiny_digits_config
from tests.ddp_helpers import (PER_EPOCH, end_group, last, rank_output, start_torchrun, torchrun, wait_for,
                               worker_pids)

pytestmark = pytest.mark.slow
SEMI = ["--labels-per-class", "10", "--data-noise", "0", "--ckpt-every", "4", "--epochs", "2"]
HOLD_AT = 6  # the killed run waits before its 7th iteration: its last checkpoint is iteration 4's


def _key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


def _single_process_calls(out, monkeypatch) -> list[dict]:
    """Every loss_terms call of one process with the same seed and the global batch (2 x 64)."""
    seen, real = [], step.loss_terms

    def wrapper(model, x, x_fake, y, *args, **kwargs):
        seen.append({"x": x.detach().clone(), "y": y.clone(), "x_px": kwargs["x_px"].detach().clone()})
        return real(model, x, x_fake, y, *args, **kwargs)

    monkeypatch.setattr(step, "loss_terms", wrapper)
    cfg = tiny_digits_config(out, data__labels_per_class=10, data__noise_std=0.0, optim__batch_size=128,
                             optim__epochs=2, sampler__n_steps=2, optim__warmup_iters=0, run__seed=3, run__device="cpu")
    assert train(cfg)["iterations"] == 2 * PER_EPOCH
    return seen


def test_semi_supervised_ranks_share_the_labelled_subset_and_resume_exactly(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    straight = tmp_path / "straight"
    r = torchrun([*SEMI, "--out", str(straight)], module="tests.ddp_probe", JEMFAST_TEST_PROBE=str(probe))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(probe / f"rank{k}.pt") for k in range(2)]
    assert len(ranks[0]["x"]) == len(ranks[1]["x"]) == 2 * PER_EPOCH

    # exactly the 100 labelled images, with their labels, reach the cross-entropy term
    data = load_data(tiny_digits_config(tmp_path, data__labels_per_class=10).data, torch.device("cpu"))
    label_of = {_key(x): int(y) for x, y in zip(data.train.x[data.labelled_idx], data.train.y[data.labelled_idx])}
    assert len(label_of) == 100
    seen = {}
    for rank in ranks:
        for xb, yb in zip(rank["x"], rank["y"]):
            seen.update((_key(x), int(y)) for x, y in zip(xb, yb))
    assert seen == label_of

    # the ranks' slices are a single process's global batch: labelled and p(x) batches alike
    single = _single_process_calls(tmp_path / "single", monkeypatch)
    for t, call in enumerate(single):
        a, b = ranks[0], ranks[1]
        assert not torch.equal(a["x"][t], b["x"][t])  # each rank its own labelled slice
        assert torch.equal(torch.cat([a["x"][t], b["x"][t]]), call["x"]), t
        assert torch.equal(torch.cat([a["y"][t], b["y"][t]]), call["y"]), t
        assert torch.equal(torch.cat([a["x_px"][t], b["x_px"][t]]), call["x_px"]), t
    ckpt = last(straight)
    assert ckpt["world"]["param_checksums"][0] == ckpt["world"]["param_checksums"][1]

    # kill -9 of rank 0 mid-epoch (held after iteration 4's checkpoint), then --resume
    killed, logs, hold = tmp_path / "killed", tmp_path / "logs", tmp_path / "hold"
    hold.mkdir()
    proc = start_torchrun([*SEMI, "--out", str(killed)], logs, module="tests.ddp_probe",
                          JEMFAST_TEST_PROBE=str(hold), JEMFAST_TEST_HOLD_AT=str(HOLD_AT))
    try:
        for k in range(2):
            wait_for(hold / f"held-{k}", proc=proc)
        os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
        (hold / "go").touch()
        agent_output, _ = proc.communicate(timeout=180)
    finally:
        end_group(proc)
    assert proc.returncode != 0, agent_output[-3000:]
    assert len(rank_output(logs, 1).strip().splitlines()) <= 1  # the survivor: no traceback
    assert last(killed)["step"] == 4  # mid-epoch
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    r = torchrun([*SEMI, "--out", str(killed), "--resume"], module="tests.ddp_probe", JEMFAST_TEST_PROBE=str(resumed))
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(2):  # the same labelled batches as the straight run from iteration 4 on
        after = torch.load(resumed / f"rank{k}.pt")
        assert len(after["x"]) == 2 * PER_EPOCH - 4
        assert all(torch.equal(u, v) for u, v in zip(after["x"], ranks[k]["x"][4:]))
        assert all(torch.equal(u, v) for u, v in zip(after["y"], ranks[k]["y"][4:]))
    a, b = last(straight), last(killed)
    assert a["step"] == b["step"] == 2 * PER_EPOCH
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    assert b["world"]["param_checksums"][0] == b["world"]["param_checksums"][1]

"""End-to-end training runs on digits: outputs, bit-for-bit resume, library API."""
import json
from pathlib import Path

import torch

from jemfast import load_checkpoint
from jemfast.rundir.checkpoint import FORMAT_VERSION, read_checkpoint
from jemfast.train import Trainer, train
from tests.conftest import stop_after, tiny_digits_config


def test_tiny_run_writes_all_outputs(tiny_cfg):
    reports = []
    cfg = tiny_cfg(optim__epochs=2, run__sample_every=10)
    summary = train(cfg, report=reports.append)
    out = cfg.run.out
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["iterations"] == 2 * (1257 // 64)
    lines = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    steps = [l for l in lines if "loss" in l]
    assert steps and {"step", "epoch", "loss", "loss_ce", "loss_px", "e_real", "e_fake", "acc", "lr",
                      "images_per_s"} <= set(steps[0])
    assert [l["epoch"] for l in lines if l.get("event") == "epoch"] == [1, 2]
    on_disk = json.load(open(f"{out}/summary.json"))
    assert on_disk["config"]["data"]["dataset"] == "digits" and on_disk["torch_version"] == torch.__version__
    for name in ("last.pt", "best.pt"):
        assert read_checkpoint(f"{out}/checkpoints/{name}")["format_version"] == FORMAT_VERSION
    pngs = sorted(p.name for p in (Path(out) / "samples").glob("*.png"))
    assert "step_0000010.png" in pngs and "epoch_0002.png" in pngs
    assert [r["epoch"] for r in reports] == [1, 2] and reports[-1]["done"]


def test_two_epochs_equal_one_plus_resume(tmp_path):
    straight = tiny_digits_config(tmp_path / "a", optim__epochs=2)
    train(straight)
    first = tiny_digits_config(tmp_path / "b", optim__epochs=1)
    train(first)
    resumed = tiny_digits_config(tmp_path / "b", optim__epochs=2, run__resume=True)
    train(resumed)
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * (1257 // 64)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_mid_epoch_resume_is_bit_exact(tmp_path):
    train(tiny_digits_config(tmp_path / "a", optim__epochs=1))
    # stop after 7 iterations by making the run believe a signal arrived, then resume

    trainer = Trainer(tiny_digits_config(tmp_path / "b", optim__epochs=1), None)
    stop_after(trainer, 7)
    assert trainer.run()["status"] == "interrupted"
    assert read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["batch_in_epoch"] == 7
    train(tiny_digits_config(tmp_path / "b", optim__epochs=1, run__resume=True))
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["buffer"]["data"], b["buffer"]["data"])


def test_load_checkpoint_for_library_users(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg)
    loaded = load_checkpoint(f"{cfg.run.out}/checkpoints/last.pt")
    model, buf = loaded["model"], loaded["buffer"]
    assert not model.training and loaded["config"].data.dataset == "digits"
    x = buf.data[:4]
    assert model.energy(x).shape == (4,) and model(x).shape == (4, 10)


def test_fused_backend_resume_is_bit_exact(tmp_path):
    """The fused Triton SGLD (CPU interpreter here) keeps its Philox state in checkpoints."""
    from jemfast.kernels import triton_available

    if not triton_available("cpu"):
        import pytest

        pytest.skip("Triton interpreter unavailable (TRITON_INTERPRET=1 must be set before triton is imported)")
    kw = dict(sampler__backend="fused", sampler__n_steps=2, sampler__buffer_size=100, run__ckpt_every=0)
    train(tiny_digits_config(tmp_path / "a", optim__epochs=2, **kw))
    train(tiny_digits_config(tmp_path / "b", optim__epochs=1, **kw))
    train(tiny_digits_config(tmp_path / "b", optim__epochs=2, run__resume=True, **kw))
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["sampler"]["rng_state"] is not None

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{prefix}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}[{i}]")

    ta, tb = dict(tensors({k: a[k] for k in ("model", "optimizer", "buffer", "sampler", "rng")})), \
        dict(tensors({k: b[k] for k in ("model", "optimizer", "buffer", "sampler", "rng")}))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_a_run_that_ends_at_chance_says_it_did_not_learn_and_exits_4(tmp_path, capsys):
    from jemfast.train import NOT_LEARNED_EXIT, main

    base = ["--dataset", "digits", "--hidden", "8", "--buffer-size", "100", "--sgld-steps", "2", "--no-progress",
            "--epochs", "6", "--warmup-iters", "0"]  # 114 iterations: judged (100 or more)
    assert main([*base, "--lr", "1e-9", "--out", str(tmp_path / "still")]) == NOT_LEARNED_EXIT == 4
    assert "did not learn" in capsys.readouterr().err.strip().splitlines()[-1]
    still = json.loads((tmp_path / "still" / "summary.json").read_text())
    assert still["status"] == "finished" and still["learned"] is False and still["test_acc"] <= 0.15
    assert main([*base, "--lr", "3e-3", "--out", str(tmp_path / "learns")]) == 0
    assert json.loads((tmp_path / "learns" / "summary.json").read_text())["learned"] is True
    short = tiny_digits_config(tmp_path / "short", optim__lr=1e-9)  # 19 iterations: not judged
    assert train(short)["learned"] is None

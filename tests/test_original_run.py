"""jemfast.compat.original_run and the recipe benchmark's --original rows, on a stand-in for the
original script (the real one is fetched by users, never part of the project): the anchors it
patches, the digits in CIFAR-10's on-disk format read through torchvision's own CIFAR10 class,
the hard-coded seed replaced, the log read into a row, the saved buffer scored."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from jemfast.compat.original_run import LINES, patched, run_original
from jemfast.process.errors import UserError
from jemfast.recipe_benchmark import main

# The original's lines the harness anchors to, in a script that prints what train_wrn_ebm.py
# prints (its formats: "P(y|x) {epoch}:{i} loss=..., acc=...", "Epoch {e}: Valid Loss {l}, Valid Acc {a}")
STAND_IN = textwrap.dedent('''
    import argparse, os, time
    import torch as t
    import torchvision as tv
    seed = 1


    def get_sample_q(args, device):
        return None


    def main(args):
        device = "cpu"
        sample_q = get_sample_q(args, device)
        print("sampler", type(sample_q).__name__)
        train = tv.datasets.CIFAR10(root=args.data_root, train=True, download=False)
        test = tv.datasets.CIFAR10(root=args.data_root, train=False, download=False)
        print("sizes", len(train), len(test), train[0][0].size, "seed", seed)
        for epoch in range(args.n_epochs):
            print(f"P(y|x) {epoch}:{40 * epoch + 20} loss=   2.0, acc=   0.5")
            print(f"Epoch {epoch}: Valid Loss 1.0, Valid Acc {min(0.9, 0.3 + 0.2 * epoch)}")
            print(f"Epoch {epoch}: Test Loss 1.0, Test Acc {min(0.85, 0.25 + 0.2 * epoch)}")
            time.sleep(0.3 if args.n_epochs < 5 else 0)
        t.manual_seed(seed)
        os.makedirs(args.save_dir, exist_ok=True)
        t.save({"model_state_dict": {}, "replay_buffer": t.rand(200, 3, 32, 32) * 2 - 1},
               os.path.join(args.save_dir, "last_ckpt.pt"))


    if __name__ == "__main__":
        p = argparse.ArgumentParser()
        p.add_argument("--data_root"); p.add_argument("--save_dir"); p.add_argument("--n_epochs", type=int)
        p.add_argument("--n_steps", type=int); p.add_argument("--batch_size", type=int)
        args = p.parse_known_args()[0]
        args.sgld_lr, args.sgld_std, args.reinit_freq, args.n_classes, args.uncond = 1.0, 0.01, 0.05, 10, False
        main(args)
''')


@pytest.fixture
def original(tmp_path):
    d = tmp_path / "JEM"
    d.mkdir()
    (d / "train_wrn_ebm.py").write_text(STAND_IN)
    return d


def test_the_patch_needs_each_anchor_once_and_sets_the_seed():
    loop = ("    best_valid_acc = 0.0\n                L += args.p_x_weight * l_p_x\n"
            "            optim.step()\n            cur_iter += 1\n")  # the original's lines, indented as there
    guarded = patched(STAND_IN + loop, "guarded", seed=7)
    assert "jemfast.compat.get_sample_q(args, device)" in guarded and "seed = 7\n" in guarded
    assert "x=x_lab, y=y_lab" in guarded and "guard.energy_penalty(fp_all, fq_all)" in guarded
    with pytest.raises(UserError, match="occurs 0 times"):
        patched(STAND_IN, "guarded")  # the stand-in has no training loop to guard
    with pytest.raises(UserError, match="occurs 2 times"):
        patched(STAND_IN + "seed = 1\n", "unguarded", seed=2)
    assert set(LINES) == {"unguarded", "guarded-before", "guarded"}


def test_run_original_writes_cifar_format_digits_and_reads_the_log(original, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # a user's shell: pipes are block-buffered
    row = run_original(original, tmp_path / "run", "unguarded", seed=5, threads=1, extra=["--n_epochs", "2"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "sampler SampleQ" in log  # the swap line: jemfast.compat's sampler
    assert "sizes 1437 360 (32, 32) seed 5" in log  # jemfast's train+valid / test split, through torchvision
    assert (row["exit"], row["status"], row["iterations"], row["restarts"]) == (0, "finished", 60, 0)
    assert [a for _, a in row["curve"]] == [0.3, 0.5] and row["test_acc"] == pytest.approx(0.45)
    # timed as printed (not when a buffered pipe is flushed at exit): the epochs are 0.3 s apart
    assert row["curve"][1][0] - row["curve"][0][0] >= 0.25 and row["curve"][1][0] <= row["wall_s"]
    with pytest.raises(UserError, match="no train_wrn_ebm.py"):
        run_original(tmp_path, tmp_path / "other")


def test_the_benchmark_adds_original_rows_to_an_earlier_report(original, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    earlier = {"dataset": "digits32", "recipe": "jem", "seed": 1, "status": "finished", "restarts": 0,
               "test_acc": 0.5, "valid_acc": 0.5, "learned": True, "wall_s": 100.0, "curve": [[100.0, 0.5]],
               "out": str(out / "x"), "digits_fid": 30.0, "digits_is": 5.0}
    (out / "results.jsonl").write_text(json.dumps(earlier) + "\n")
    assert main(["--recipes", "", "--original", str(original), "--original-modes", "unguarded", "--seeds", "1",
                 "--out", str(out), "--gen-n", "100", "--epochs", "1"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["recipe"] for r in rows] == ["jem", "original (unguarded)"]
    mine = rows[1]
    # 12 epochs of the digits32 settings (benchmark training flags do not reach the original)
    assert (mine["status"], mine["learned"], len(mine["curve"])) == ("finished", True, 12)
    assert math.isfinite(mine["digits_fid"]) and mine["digits_fid"] > 30  # uniform noise is far from digits
    table = (out / "table.md").read_text()
    assert "| original (unguarded) | 1 | 1 | 1 |" in table and "| jem | 1 | 1 | 1 |" in table
    assert mine["curve"][1][1] == 0.5 and f"| 1/1 | {mine['curve'][1][0]:.0f} |" in table  # jem's 50 %: epoch 1
    assert main(["--recipes", "", "--original", str(original), "--original-modes", "unguarded", "--seeds", "5",
                 "--original-seeds", "1", "--out", str(out)]) == 2  # seed 1's directory is taken: nothing overwritten
    assert "not empty" in capsys.readouterr().err
    assert torch.load(out / "digits32" / "original" / "unguarded-seed-1" / "save" / "last_ckpt.pt",
                      weights_only=True)["replay_buffer"].shape == (200, 3, 32, 32)

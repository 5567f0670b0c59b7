"""The original JEM checkpoint format: reading (validated), writing, key mapping, conversion both ways.

``OriginalWRN`` restates the original code's ``wideresnet.Wide_ResNet`` (wgrathwohl/JEM): the
conversion must give a jemfast ``WideResNet(layout="original")`` that computes the same logits.
"""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
import torch.nn.functional as tnf
from torch import nn

from jemfast import load_checkpoint
from jemfast.build import build_model
from jemfast.compat import keymap
from jemfast.compat.__main__ import main as compat_main
from jemfast.compat.original_format import read_original, write_original
from jemfast.options.config import build_config
from jemfast.process.errors import UserError
from tests.compat_example import example


# ---- the original Wide_ResNet, restated ---------------------------------------------------------
def original_norm(kind, c):
    return {None: nn.Identity, "batch": lambda n: nn.BatchNorm2d(n, momentum=0.9),
            "layer": lambda n: nn.GroupNorm(1, n)}[kind](c)


class OriginalBlock(nn.Module):
    """norm-lrelu-conv (full resolution) -> norm-lrelu-conv (strided) + 1x1 shortcut when shapes change."""

    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.bn1, self.conv1 = original_norm(norm, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn2, self.conv2 = original_norm(norm, c_out), nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride))

    def forward(self, x):
        h = self.conv1(tnf.leaky_relu(self.bn1(x), 0.2))
        return self.conv2(tnf.leaky_relu(self.bn2(h), 0.2)) + self.shortcut(x)


class OriginalWRN(nn.Module):
    def __init__(self, depth, k, norm):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        c = 16
        for g, stride in ((1, 1), (2, 2), (3, 2)):
            blocks = [OriginalBlock(c if j == 0 else widths[g], widths[g], stride if j == 0 else 1, norm) for j in range(n)]
            setattr(self, f"layer{g}", nn.Sequential(*blocks))
            c = widths[g]
        self.bn1, self.last_dim = original_norm(norm, c), c
        self.linear = nn.Linear(c, 10)  # built and never used, as in the original

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return tnf.avg_pool2d(tnf.leaky_relu(self.bn1(h), 0.2), 8).flatten(1)


class OriginalCCF(nn.Module):
    def __init__(self, depth=10, k=2, norm=None, n_classes=10):
        super().__init__()
        self.f = OriginalWRN(depth, k, norm)
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, n_classes)

    def classify(self, x):
        return self.class_output(self.f(x))


def wrn_config(norm, layout="original"):
    return build_config({"model.name": "wrn", "model.depth": 10, "model.width": 2, "model.norm": norm,
                         "model.wrn_layout": layout})


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_original_wrn_converts_to_the_same_function(norm):
    torch.manual_seed(0)
    orig = OriginalCCF(norm=norm)
    cfg = wrn_config(norm or "none")
    model = build_model(cfg, (3, 32, 32), 10, torch.device("cpu"))
    model.load_state_dict(keymap.to_jemfast(orig.state_dict(), cfg, (3, 32, 32), 10))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    if norm == "batch":  # train-mode passes update the running statistics alike (momentum 0.9)
        orig.classify(x)
        model(x)
    orig.eval(), model.eval()
    torch.testing.assert_close(model(x), orig.classify(x), rtol=1e-5, atol=1e-5)
    back = keymap.to_original(model.state_dict(), cfg)
    assert set(back) == set(orig.state_dict())
    assert all(torch.equal(back[k], v) for k, v in orig.state_dict().items() if not k.startswith(keymap.UNUSED))


def test_jemfast_wrn_layout_is_another_function_and_refused():
    torch.manual_seed(0)
    orig = OriginalCCF()
    state = keymap.to_jemfast(orig.state_dict(), wrn_config("none"), (3, 32, 32), 10)
    other = build_model(wrn_config("none", "jemfast"), (3, 32, 32), 10, torch.device("cpu"))
    other.load_state_dict(state)  # same names and shapes ...
    x = torch.rand(2, 3, 32, 32)
    assert (other(x) - orig.classify(x)).abs().max() > 1e-3  # ... another function
    with pytest.raises(UserError, match="convert with --wrn-layout original"):
        keymap.to_jemfast(orig.state_dict(), wrn_config("none", "jemfast"), (3, 32, 32), 10)


def test_mismatches_name_the_first_tensor():
    ex = example()
    cfg = build_config({"data.dataset": "digits", "model.hidden": 16})
    state = ex.CCF(8, 10).state_dict()
    with pytest.raises(UserError, match=r"original tensor f\.features\.0\.weight has shape \[8, 1, 3, 3\]; "
                                        r"jemfast's cnn \(--hidden 16\) expects \[16, 1, 3, 3\]"):
        keymap.to_jemfast(state, cfg, (1, 8, 8), 10)
    good = ex.CCF(16, 10).state_dict()
    with pytest.raises(UserError, match=r"original tensor f\.extra\.weight has no counterpart"):
        keymap.to_jemfast({**good, "f.extra.weight": torch.zeros(1)}, cfg, (1, 8, 8), 10)
    del good["class_output.bias"]
    with pytest.raises(UserError, match=r"has no class_output\.bias, which jemfast's cnn"):
        keymap.to_jemfast(good, cfg, (1, 8, 8), 10)
    with pytest.raises(UserError, match="--model mlp has no counterpart"):
        keymap.prefix_pairs(build_config({"data.dataset": "toy2d"}))


def test_read_refuses_foreign_corrupt_and_pickled_files(tmp_path):
    ok = tmp_path / "ok.pt"
    write_original(ok, {"f.w": torch.ones(2)}, torch.zeros(5, 1, 8, 8))
    got = read_original(ok)
    assert torch.equal(got["model_state_dict"]["f.w"], torch.ones(2)) and got["replay_buffer"].shape == (5, 1, 8, 8)
    write_original(tmp_path / "empty.pt", {"f.w": torch.ones(2)}, [])
    assert read_original(tmp_path / "empty.pt")["replay_buffer"] == []
    cases = {
        "foreign": ({"weights": torch.ones(1)}, "is not an original JEM checkpoint"),
        "jemfast": ({"format_version": 2}, "is a jemfast checkpoint"),
        "intbuf": ({"model_state_dict": {"w": torch.ones(1)}, "replay_buffer": torch.zeros(3, 2, dtype=torch.long)},
                   "replay_buffer has dtype torch.int64, expected floating point"),
        "notensor": ({"model_state_dict": {"w": 3}, "replay_buffer": []}, "model tensor 'w' is an int, not a tensor"),
        "expanded": ({"model_state_dict": {"w": torch.ones(1).expand(1000)}, "replay_buffer": []},
                     "expanded or strided view"),
        "pickled": ({"model_state_dict": {"w": torch.ones(1)}, "replay_buffer": Namespace(a=1)}, "was refused"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(UserError, match=message):
            read_original(tmp_path / f"{name}.pt")
    (tmp_path / "torn.pt").write_bytes(ok.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_original(tmp_path / "torn.pt")


def test_convert_round_trip_through_a_jemfast_run(tmp_path, capsys):
    ex = example()
    torch.manual_seed(0)
    f = ex.CCF(16, 10)
    buffer = torch.rand(100, 1, 8, 8) * 2 - 1
    src = tmp_path / "original.pt"
    torch.save({"model_state_dict": f.state_dict(), "replay_buffer": buffer}, src)  # as the example's checkpoint()
    run = tmp_path / "run"
    assert compat_main(["convert", str(src), "--out", str(run), "--dataset", "digits", "--hidden", "16"]) == 0
    printed = capsys.readouterr().out
    assert "python -m jemfast.train --resume" in printed and "--buffer-size 100" in printed
    loaded = load_checkpoint(run / "checkpoints" / "last.pt")
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    f.eval()
    torch.testing.assert_close(loaded["model"](x), f.classify(x), rtol=0, atol=0)
    assert torch.equal(loaded["buffer"].data, buffer) and loaded["step"] == 0

    back = tmp_path / "back.pt"
    assert compat_main(["convert", str(run / "checkpoints" / "last.pt"), "--out", str(back)]) == 0
    args = ex.parse_args(["--hidden", "16", "--load_path", str(back), "--device", "cpu"])
    g, g_buffer = ex.get_model_and_buffer(args, torch.device("cpu"))  # strict load_state_dict
    g.eval()
    assert torch.equal(g.classify(x), f.classify(x)) and torch.equal(g_buffer, buffer)

    assert compat_main(["convert", str(src), "--out", str(run), "--dataset", "digits", "--hidden", "16"]) == 2
    assert "holds a run" in capsys.readouterr().err
    for argv, message in [
        (["--dataset", "cifar10"], "holds images of shape [1, 8, 8], --dataset cifar10 has [3, 32, 32]"),
        (["--dataset", "digits", "--hidden", "16", "--buffer-size", "50"], "the original replay buffer has 100 rows"),
        (["--dataset", "digits", "--hidden", "8"], "f.features.0.weight has shape [16, 1, 3, 3]"),
    ]:
        assert compat_main(["convert", str(src), "--out", str(tmp_path / "new"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("*.pt"))
    assert compat_main(["convert", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "y.pt"),
                        "--hidden", "16"]) == 2
    assert "--hidden apply only to an original checkpoint" in capsys.readouterr().err


def test_cli_refuses_a_foreign_file_in_one_line(tmp_path, capsys):
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name, message in (("foreign", "is not an original JEM checkpoint"), ("garbage", "corrupt or truncated")):
        assert compat_main(["convert", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("jemfast.compat: error:")
    assert not (tmp_path / "run").exists()

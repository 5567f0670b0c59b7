"""The README's quickstart, as written there: >= 95 % test accuracy and no divergence alarm.

Its speed is a benchmark, not a test (bench/test_quickstart_speed.py): a test must not fail
because the machine is busy.
"""
import json
import re
import shlex

import pytest

from tests.conftest import REPO, run_module


def readme_quickstart() -> list[str]:
    """The training command of the README's first code block (the part after the installs)."""
    block = re.search(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S).group(1)
    train_cmd = block.split("&&")[-1].strip()
    args = shlex.split(train_cmd)
    assert args[:3] == ["python", "-m", "jemfast.train"], train_cmd
    return args[2:]


@pytest.mark.slow
def test_readme_quickstart_trains_digits(tmp_path):
    args = readme_quickstart()
    # the timeout only guards against a hang: minutes on an idle CPU, far longer on a shared one
    proc = run_module([*args, "--out", str(tmp_path / "qs"), "--no-progress"], cwd=REPO, timeout=6 * 3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    print(f"quickstart: {summary['wall_time_s']:.0f} s, test accuracy {summary['test_acc']:.4f}")
    assert summary["test_acc"] >= 0.95
    assert summary["restarts"] == []  # a healthy run: the divergence tests must stay quiet
    assert (tmp_path / "qs" / "samples" / "epoch_0030.png").exists()

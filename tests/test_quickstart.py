"""The README's quickstart, as written there: under 5 minutes on the CPU and >= 95 % test accuracy."""
import json
import re
import shlex
import time

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
    t0 = time.time()
    proc = run_module([*args, "--out", str(tmp_path / "qs"), "--no-progress"], cwd=REPO, timeout=600)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    print(f"quickstart: {wall:.0f} s, test accuracy {summary['test_acc']:.4f}")
    assert summary["test_acc"] >= 0.95
    assert wall < 300
    assert (tmp_path / "qs" / "samples" / "epoch_0030.png").exists()

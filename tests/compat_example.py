"""Helpers for the tests of jemfast.compat: examples/jem_original_style.py imported as a module,
and run as the script it is."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "jem_original_style.py"
# Small enough for CI on 2 cores (~4 s an epoch), large enough to learn digits in 4 epochs.
QUICK = ["--hidden", "32", "--n_steps", "10", "--warmup_iters", "20"]


@lru_cache(maxsize=1)
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("jem_original_style", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python examples/jem_original_style.py ARGS`` in a fresh interpreter, importing this
    checkout's jemfast."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def example_args(save_dir: Path, *extra: str):
    return example().parse_args(["--save_dir", str(save_dir), "--device", "cpu", *QUICK, *extra])

"""Helpers for the tests of jemfast.compat: examples/jem_original_style.py (training) and
examples/jem_original_eval.py (evaluation) imported as modules and run as the scripts they are,
and a small original-format checkpoint of the former's model."""
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
EVAL_EXAMPLE = REPO / "examples" / "jem_original_eval.py"
# Small enough for CI on 2 cores (~4 s an epoch), large enough to learn digits in 4 epochs.
QUICK = ["--hidden", "32", "--n_steps", "10", "--warmup_iters", "20"]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def example() -> ModuleType:
    return _load("jem_original_style", EXAMPLE)


@lru_cache(maxsize=1)
def eval_example() -> ModuleType:
    """examples/jem_original_eval.py as a module (never call its ``main`` in-process: it rebinds
    the module's ``sample_q`` for ``--sampler jemfast``, as the script's swap line does)."""
    return _load("jem_original_eval", EVAL_EXAMPLE)


def run_example(args: list[str], timeout: float = 600, script: Path = EXAMPLE) -> subprocess.CompletedProcess:
    """``python examples/jem_original_style.py ARGS`` (or another ``script``) in a fresh
    interpreter, importing this checkout's jemfast, on one CPU thread: the tests compare two
    such runs bit for bit, and a multi-threaded convolution's reduction order follows the
    machine's load (measured: the same eval differed in 57 % of a buffer's values beside a busy run)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def original_checkpoint(path: Path, hidden: int = 8, rows: int = 100, train_steps: int = 20):
    """Write ``{"model_state_dict", "replay_buffer"}`` of the example's ``CCF(hidden)`` as its
    ``checkpoint()`` does, after ``train_steps`` Adam steps of cross-entropy on batches of 64
    digits (so that it classifies well above chance), with a buffer of ``rows`` U(-1, 1) rows
    (``rows`` 0: ``[]``). Returns the model (train mode, CPU)."""
    import torch

    ex = example()
    torch.manual_seed(0)
    f = ex.CCF(hidden, 10)
    (x, y), _, _ = ex.get_data(None, torch.device("cpu"))
    opt = torch.optim.Adam(f.parameters(), lr=2e-2)
    for _ in range(train_steps):
        i = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(f.classify(x[i]), y[i]).backward()
        opt.step()
    buffer = ex.init_random(None, rows) if rows else []
    torch.save({"model_state_dict": f.state_dict(), "replay_buffer": buffer}, path)
    return f

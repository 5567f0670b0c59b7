"""CUDA only: a whole training iteration between divergence checks runs under
``torch.cuda.set_sync_debug_mode("error")`` (the GPU twin of tests/test_sync_free.py, which shows
the same on the CPU with SyncRecorder). Skipped without CUDA; bench/gpu.sh's first command runs it.
"""
from __future__ import annotations

import pytest
import torch
from tqdm import tqdm

from tests.conftest import tiny_digits_config

from jemfast.outputs.metrics import MetricWindow
from jemfast.train import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["reference", "fused", "graph"])
def test_an_iteration_between_checks_does_not_sync(tmp_path, backend):
    cfg = tiny_digits_config(tmp_path / backend, sampler__backend=backend, run__device="cuda",
                             stability__check_every=100, run__log_every=1000, run__sample_every=1000,
                             run__ckpt_every=0)
    trainer = Trainer(cfg)
    trainer.window, trainer.bar = MetricWindow(), tqdm(disable=True)
    try:
        batches = trainer._batches(trainer._order_seed(), 0)
        for _ in range(3):  # Adam's state, cuDNN's algorithm choice, the graph capture
            x, y = next(batches)
            trainer._every_n_iterations(trainer._iteration(x, y).x_fake)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            x, y = next(batches)
            out = trainer._iteration(x, y)
            assert trainer._every_n_iterations(out.x_fake) is None
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert trainer.monitor.check() is None  # the check reads once, outside the watched iteration
    finally:
        trainer.lock.release()

"""A whole training iteration is sync-free between divergence checks, shown on the CPU with
SyncRecorder (the CPU counterpart of tests/test_gpu.py's ``set_sync_debug_mode`` tests).

One iteration of the Trainer's loop (next batch, PCD draw, the SGLD chain, write-back, loss,
backward, gradient norm, optimizer step, the device-side divergence monitor, the per-iteration
bookkeeping) records no op that would synchronise with the host on a GPU, for the reference and
the fused (Triton, interpreted here) backends; a check iteration records exactly one read, the
monitor's flags. Adam's ``step`` counters are host tensors on a GPU (not ``capturable``), so
reading them is no device sync. An ``.item()`` slipped into the chain is caught, once per step.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from tqdm import tqdm

from tests.conftest import tiny_digits_config, triton_marker

from jemfast.outputs.metrics import MetricWindow
from jemfast.sgld.sync_check import SyncRecorder, assert_sync_free
from jemfast.train import Trainer

DEVICE, triton_ok = triton_marker()
CHECK_EVERY, STEPS = 4, 3


def _trainer(tmp_path, backend: str) -> Trainer:
    cfg = tiny_digits_config(tmp_path / backend, sampler__backend=backend, sampler__n_steps=STEPS,
                             stability__check_every=CHECK_EVERY, run__log_every=1000, run__sample_every=1000,
                             run__ckpt_every=0)
    trainer = Trainer(cfg)
    trainer.window, trainer.bar = MetricWindow(), tqdm(disable=True)  # what Trainer.run/_train set up
    return trainer


def _iterations(trainer: Trainer, n: int, batches):
    """``n`` iterations as Trainer._train runs them; the last one's recorder."""
    for _ in range(n):
        host = [s["step"] for s in trainer.optimizer.state.values() if "step" in s]
        with SyncRecorder(host_tensors=host) as rec:
            x, y = next(batches)
            out = trainer._iteration(x, y)
            cause = trainer._every_n_iterations(out.x_fake)
        assert cause is None
    return rec


BACKENDS = ["reference", pytest.param("fused", marks=triton_ok)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_iterations_between_checks_are_sync_free_and_a_check_reads_once(tmp_path, backend):
    trainer = _trainer(tmp_path, backend)
    try:
        batches = trainer._batches(trainer._order_seed(), 0)
        next(batches)  # the epoch's first batch copies the epoch's order to the device, once
        _iterations(trainer, 1, batches)  # first iteration: Adam makes its state, the chain resolves
        assert trainer.progress.step == 1
        for _ in range(CHECK_EVERY - 2):  # steps 2 .. CHECK_EVERY - 1: no check
            rec = _iterations(trainer, 1, batches)
            assert_sync_free(rec)
            assert rec.ops > 200  # the recorder saw the iteration's work
            assert rec.launches["_sgld_kernel"] == (STEPS if backend == "fused" else 0)
        rec = _iterations(trainer, 1, batches)  # step CHECK_EVERY: the check
        assert trainer.progress.step % CHECK_EVERY == 0
        # one read: the monitor's flags and interval means, one tensor; and the in-memory good state's
        # copy of numpy's RNG state, a host tensor made from host data (no device involved)
        assert_sync_free(rec, Counter({"tolist": 1, "lift_fresh": 1}))
        assert rec.events[0].where.startswith("jemfast/stability/monitor.py:")  # DivergenceMonitor.check
        assert rec.events[1].where.startswith("jemfast/rundir/checkpoint.py:")  # rng_state()
    finally:
        trainer.lock.release()


def test_an_item_in_the_chain_is_caught_once_per_step(tmp_path, monkeypatch):
    import jemfast.sgld.reference as reference

    trainer = _trainer(tmp_path, "reference")
    try:
        batches = trainer._batches(trainer._order_seed(), 0)
        next(batches)
        _iterations(trainer, 1, batches)
        real = reference.energy_of

        def energy_with_a_read(*args, **kwargs):
            e = real(*args, **kwargs)
            e.sum().item()  # what a debugging print would do
            return e

        monkeypatch.setattr(reference, "energy_of", energy_with_a_read)
        rec = _iterations(trainer, 1, batches)
        assert Counter(e.op for e in rec.events) == Counter({"_local_scalar_dense": STEPS})
        assert all(e.where.startswith("tests/test_sync_free.py:") for e in rec.events)
        with pytest.raises(AssertionError, match="_local_scalar_dense"):
            assert_sync_free(rec)
    finally:
        trainer.lock.release()


@pytest.mark.parametrize("bad, kind", [
    (lambda x: x.tolist(), "read"), (lambda x: x.cpu(), "read"), (lambda x: x[x > 0], "shape"),
    (lambda x: x.nonzero(), "shape"), (lambda x: torch.unique(x), "shape"),
    (lambda x: x + torch.tensor([1.0]), "copy"), (lambda x: torch.randn(3, generator=torch.Generator()), "rng"),
    (lambda x: bool(x.sum() > 0), "read"), (lambda x: torch.equal(x, x), "read"),
], ids=["tolist", "cpu", "bool-mask", "nonzero", "unique", "tensor-from-host", "cpu-generator", "bool", "equal"])
def test_each_kind_of_sync_is_recorded(bad, kind):
    x = torch.randn(8)
    with SyncRecorder() as rec:
        bad(x)
    assert [e.kind for e in rec.events] == [kind], rec.events


def test_ordinary_device_work_and_host_tensors_record_nothing():
    x, step = torch.randn(8), torch.tensor(3.0)
    with SyncRecorder(host_tensors=[step]) as rec:
        y = (x * 2).clamp(-1, 1).sum() + torch.randn_like(x).mean()
        idx = torch.randint(0, 8, (4,))
        x.index_copy_(0, idx, x[idx] * 0.5)
        _ = (step + 1).item()  # a host counter, as Adam's
        _ = torch.where(x > 0, x, -x), y.detach()
    assert rec.events == []

"""The replay buffer's CUDA path (the fused gather + re-init kernel) run on the CPU under the
Triton interpreter, by turning on the switch that a CUDA device turns on (``_use_kernel``).

- kept rows are the buffer's rows bit for bit, re-initialised rows are U(-1, 1) from the
  kernel (or ``init_fn``'s rows, which replace them), and the buffer is unchanged until update;
- a draw and its write-back launch one kernel and record no host sync (SyncRecorder);
- the kernel's Philox state is saved in ``state_dict`` and restores the same draws.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import triton_marker

pytest.importorskip("triton", reason="triton is not installed")

from jemfast.buffer import ReplayBuffer  # noqa: E402
from jemfast.sgld.sync_check import SyncRecorder, assert_sync_free  # noqa: E402

DEVICE, mark = triton_marker()
pytestmark = [mark, pytest.mark.skipif(DEVICE.type != "cpu", reason="CUDA runs this path for real")]


def _kernel_buffer(**kw) -> ReplayBuffer:
    torch.manual_seed(0)
    buf = ReplayBuffer(50, (3, 4, 4), reinit_freq=0.5, **kw)
    buf._use_kernel = True  # what a CUDA device with Triton sets
    return buf


def test_kernel_draw_keeps_rows_exactly_and_reinitialises_the_rest():
    buf = _kernel_buffer()
    before = buf.data.clone()
    x, idx = buf.sample(40)
    fresh = ~(x == before[idx]).flatten(1).all(1)
    assert 5 < int(fresh.sum()) < 35  # about half the rows re-initialised (p = 0.5)
    assert torch.equal(x[~fresh], before[idx[~fresh]])
    assert x[fresh].min() >= -1 and x[fresh].max() < 1 and x[fresh].std() > 0.4  # U(-1, 1): std 0.577
    assert torch.equal(buf.data, before)  # nothing written until update
    buf.update(idx, x * 0)
    assert torch.equal(buf.data[idx], torch.zeros_like(x))


def test_init_fn_rows_replace_the_kernels_uniform_rows():
    buf = _kernel_buffer(init_fn=lambda n, y: torch.full((n, 3, 4, 4), 0.25))
    buf.data.uniform_(-1, 1)  # rows unlike init_fn's
    before = buf.data.clone()
    x, idx = buf.sample(40)
    kept = (x == before[idx]).flatten(1).all(1)
    assert (~kept).any() and torch.equal(x[~kept], torch.full_like(x[~kept], 0.25))


def test_kernel_draw_and_write_back_are_sync_free_and_one_launch():
    buf = _kernel_buffer()
    buf.sample(8)  # the first draw makes the kernel's Philox state
    with SyncRecorder() as rec:
        x, idx = buf.sample(8)
        buf.update(idx, x)
    assert_sync_free(rec)
    assert rec.launches == {"_gather_reinit_kernel": 1}


def test_kernel_rng_state_is_saved_and_restores_the_same_draws():
    buf = _kernel_buffer()
    buf.sample(4)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in buf.state_dict().items()}
    assert state["kernel_rng_state"].tolist()[1] == 4 * 48  # offset advanced by B * row size
    torch.manual_seed(3)
    a, ia = buf.sample(16)
    other = _kernel_buffer()
    other.load_state_dict(state)
    torch.manual_seed(3)  # idx and reinit masks come from torch's generator
    b, ib = other.sample(16)
    assert torch.equal(ia, ib) and torch.equal(a, b)

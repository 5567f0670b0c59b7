"""Replay-buffer draw (indices + 5 % re-init, fused Triton gather on CUDA) and write-back, on
the device, against the original design's CPU buffer copied to the device and back.
images/s = drawn rows per second for one draw + write-back."""
from __future__ import annotations

import pytest
import torch

import benchlib
from jemfast.buffer import ReplayBuffer


@pytest.mark.parametrize("where", ["device", "original-cpu-copy"])
@pytest.mark.parametrize("load", ["cnn8", "wrn"])
def test_buffer_draw_writeback(benchmark, record, loads, device, full, load, where):
    w = loads[load]
    benchmark.group = f"buffer-{load}"
    if where == "device":
        buffer = ReplayBuffer(10000, w.shape, device=device)

        def run():
            x, idx = buffer.sample(w.batch)
            buffer.update(idx, x)
            benchlib.sync(device)
    else:
        data = torch.rand((10000, *w.shape)) * 2 - 1

        def run():
            idx = torch.randint(0, data.shape[0], (w.batch,))
            fresh = torch.rand((w.batch, *w.shape)) * 2 - 1
            keep = (torch.rand(w.batch) >= 0.05).float().view(-1, *([1] * len(w.shape)))
            x = (keep * data[idx] + (1 - keep) * fresh).to(device)
            data[idx] = x.cpu()

    benchmark.pedantic(run, rounds=200 if full else 50, warmup_rounds=5, iterations=1)
    record(w.batch, workload=w.label, batch=w.batch, buffer=where, capacity=10000)

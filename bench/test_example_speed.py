"""examples/jem_original_style.py's training iteration with jemfast's sampler against the same
script with its own hand-written sampler, side by side in one process.

One iteration = ``sample_q`` (PCD draw, 20 SGLD steps, write-back) + the loss on the real,
sampled and labelled batches + backward + Adam step, the example's defaults (digits 1x8x8,
its CNN with 64 channels, batch 64). Variants, alternating round by round on one model and one
buffer (so load drift on a shared machine hits all alike):

- ``original``: the unmodified script (its own ``sample_q``, the buffer a CPU tensor);
- ``jemfast``: ``jemfast.compat.get_sample_q`` (backend ``auto``), the same CPU buffer;
- ``jemfast-device-buffer`` (CUDA only): the same with the buffer on the GPU, the fast path.

``speedup`` = median over rounds of (original time / variant time). On the CPU both samplers
run the same reference chain, so the figure shows what the swap costs: asserted >= MIN_RATIO
(a host sync or a copy too many would show); the claim "not slower" is that figure.
"""
from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import torch

import benchlib
import jemfast.compat

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "jem_original_style.py"
MIN_RATIO = 0.8


def _example():
    spec = importlib.util.spec_from_file_location("jem_original_style_bench", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_iteration_jemfast_vs_own_sampler(device, full, pytestconfig):
    ex = _example()
    args = ex.parse_args(["--device", str(device)])
    torch.manual_seed(0)
    f, buffer = ex.get_model_and_buffer(args, device)
    optim = torch.optim.Adam(f.parameters(), lr=1e-4)
    x = ex.init_random(args, args.batch_size).to(device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    samplers = {"original": (ex.get_sample_q(args, device), buffer),
                "jemfast": (jemfast.compat.get_sample_q(args, device), buffer)}
    if device.type == "cuda":
        samplers["jemfast-device-buffer"] = (jemfast.compat.get_sample_q(args, device), buffer.to(device))

    def runner(sample_q, buf):
        def run():
            loss = ex.iteration(f, sample_q, buf, x, x, y, args)[0]
            optim.zero_grad()
            loss.backward()
            optim.step()
        return run

    fns = {name: runner(*pair) for name, pair in samplers.items()}
    for fn in fns.values():  # warm-up: the first call resolves the backend (and captures on CUDA)
        fn()
    times = benchlib.interleaved_times(fns, device, rounds=benchlib.rounds(full, 7, 10))
    lines = []
    for name, ts in times.items():
        ratio = statistics.median(o / t for o, t in zip(times["original"], ts))
        pytestconfig._jemfast_results[f"example iteration [{name}]"] = {
            "images_per_s": args.batch_size / statistics.median(ts), "speedup": ratio}
        lines.append(f"{name} {benchlib.summary(ts)} ({ratio:.2f}x)")
    print(f"\nexample iteration on {benchlib.device_name(device)}, batch {args.batch_size}: {'; '.join(lines)}")
    if device.type == "cpu":
        ratio = statistics.median(o / t for o, t in zip(times["original"], times["jemfast"]))
        assert ratio >= MIN_RATIO, f"jemfast's sampler made the example's iteration {1 / ratio:.2f}x slower"

"""SGLD chain throughput (20 steps) per backend, workload, precision and memory layout;
images/s = batch / chain time.

Each benchmark makes its own chain (one compile or capture per workload). The first call
(torch.compile compile, CUDA-graph capture, cuDNN autotuning) is timed apart as
``first_call_s``, then ``rounds`` timed chains (after 2 more untimed ones in full mode).
Backends that cannot run on this device skip with the reason (``fused``/``graph`` need CUDA;
the Triton CPU interpreter is a correctness tool, not a backend to benchmark).

Variants: ``precision`` fp32 (on CUDA with TF32 on, labelled ``fp32 (TF32)``) or bf16 autocast
(full mode only); ``layout`` NCHW or channels-last model and chain state (channels-last: full
mode on the 3x32x32 workloads; in quick mode only the reference chain on cnn32, so the CPU runs
that code path). The ``compile`` backend carries the ``compile`` marker; in full mode it compiles
WRN-28-10 only in bf16 channels-last (a WRN compile takes minutes; a GPU stage has 8). For the WRN, ``tflops``
uses 4 FLOP per forward multiply-add (~21 GFLOP/image/step for WRN-28-10, DESIGN.md);
bench/summary.py sets it against the spec-sheet bf16 peak and the measured GEMM rate.
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from jemfast.sgld import ChainSpec, sampling_mode, unavailable

BACKENDS = ["reference", "fused", "graph", pytest.param("compile", marks=pytest.mark.compile)]
PRECISIONS = ["fp32", "bf16"]


@pytest.mark.parametrize("layout", benchlib.LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("load", ["cnn8", "cnn32", "wrn"])
def test_sgld_chain(benchmark, record, chain_for, loads, device, full, load, backend, precision, layout):
    if precision == "bf16" and not full:
        pytest.skip("bf16 variants run in full mode (--bench-full)")
    if layout == "channels_last" and load == "cnn8":
        pytest.skip("channels-last is measured on the 3x32x32 workloads (1x8x8 has one channel)")
    if layout == "channels_last" and not full and (load, backend) != ("cnn32", "reference"):
        pytest.skip("channels-last variants run in full mode (quick mode: reference on cnn32 only)")
    if full and (load, backend) == ("wrn", "compile") and (precision, layout) != ("bf16", "channels_last"):
        pytest.skip("full mode compiles WRN-28-10 once (bf16, channels-last): each compile takes minutes")
    why = unavailable(backend, device)
    if why is None and backend == "fused" and device.type != "cuda":
        why = "the Triton CPU interpreter is for correctness tests, not benchmarks"
    if why:
        pytest.skip(f"{backend} on {device.type}: {why}")
    w = loads[load]
    model = benchlib.make_model(w, device)
    x = benchlib.to_layout(model, benchlib.make_x(w, device), layout)
    chain = chain_for(backend)
    spec = ChainSpec(benchlib.N_STEPS, benchlib.STEP_SIZE, benchlib.NOISE, False,
                     torch.bfloat16 if precision == "bf16" else None)
    benchmark.group = f"sgld-chain-{load}-{precision}-{layout}"
    out = []

    def run():
        with sampling_mode(model):
            out[:] = [chain(model, x, None, spec)]
        benchlib.sync(device)

    with benchlib.tf32():
        first_call_s = benchlib.time_once(run, device)
        benchmark.pedantic(run, rounds=benchlib.rounds(full), warmup_rounds=2 if full else 0, iterations=1)
    step_flop = 4 * benchlib.forward_macs(model, w.shape, device)
    record(w.batch, flop_per_image=benchlib.N_STEPS * step_flop, workload=w.label, batch=w.batch,
           steps=benchlib.N_STEPS, backend=backend, precision=precision,
           float_mode=benchlib.float_mode(precision, device), layout=layout,
           state_channels_last=(bool(out[0].is_contiguous(memory_format=torch.channels_last))
                                if layout == "channels_last" else None),
           first_call_s=first_call_s, gflop_per_image_step=step_flop / 1e9)

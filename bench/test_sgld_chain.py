"""SGLD chain throughput (20 steps) per backend and workload; images/s = batch / chain time.

The first call (torch.compile compile, CUDA-graph capture) is timed apart as ``first_call_s``,
then ``rounds`` timed chains (after 2 more untimed ones in full mode). Backends that cannot run on this
device skip with the reason (``fused``/``graph`` need CUDA; the Triton CPU interpreter is a
correctness tool, not a backend to benchmark). In full mode each chain also runs under bf16
autocast. For the WRN, ``tflops`` and ``peak_fraction`` (of the GPU's dense bf16 peak) use
4 FLOP per forward multiply-add (~21 GFLOP/image/step for WRN-28-10, DESIGN.md).
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from jemfast.sgld import ChainSpec, sampling_mode, unavailable

BACKENDS = ["reference", "fused", "graph", "compile"]
PRECISIONS = ["fp32", "bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("load", ["cnn8", "cnn32", "wrn"])
def test_sgld_chain(benchmark, record, chains, loads, device, full, load, backend, precision):
    if precision == "bf16" and not full:
        pytest.skip("bf16 variants run in full mode (--bench-full)")
    why = unavailable(backend, device)
    if why is None and backend == "fused" and device.type != "cuda":
        why = "the Triton CPU interpreter is for correctness tests, not benchmarks"
    if why:
        pytest.skip(f"{backend} on {device.type}: {why}")
    w = loads[load]
    model, x = benchlib.make_model(w, device), benchlib.make_x(w, device)
    chain = chains(backend)
    spec = ChainSpec(benchlib.N_STEPS, benchlib.STEP_SIZE, benchlib.NOISE, False,
                     torch.bfloat16 if precision == "bf16" else None)
    benchmark.group = f"sgld-chain-{load}-{precision}"

    def run():
        with sampling_mode(model):
            out = chain(model, x, None, spec)
        benchlib.sync(device)
        return out

    with benchlib.tf32():
        first_call_s = benchlib.time_once(run, device)
        benchmark.pedantic(run, rounds=benchlib.rounds(full), warmup_rounds=2 if full else 0, iterations=1)
    step_flop = 4 * benchlib.forward_macs(model, w.shape, device)
    info = {"workload": w.label, "batch": w.batch, "steps": benchlib.N_STEPS, "backend": backend,
            "precision": precision, "first_call_s": first_call_s, "gflop_per_image_step": step_flop / 1e9}
    ips = w.batch / benchmark.stats.stats.median
    info["tflops"] = ips * benchlib.N_STEPS * step_flop / 1e12
    peak = benchlib.peak_bf16_tflops(device)
    if peak:
        info["peak_fraction"] = info["tflops"] / peak
    record(w.batch, **info)

"""The `layout` stage: memory format x cudnn.benchmark on the WRN-28-10 bf16 graph chain, profiled.

Usage: ``python3 bench/layout.py OUT.json [--trace TRACE.json.gz] [--rounds N]`` (CUDA).
``--device cpu --backend reference --workload cnn8 --precision fp32 --steps 2`` runs the same
flow on a CPU (a smoke test of this script; its figures mean nothing).

Four configurations of one workload (WRN-28-10, batch 64, 3x32x32, 20 SGLD steps, bf16
autocast, ``graph`` backend, TF32 on): model and chain state in NCHW or channels-last, each with
``torch.backends.cudnn.benchmark`` off and on (set before the capture, since a CUDA graph freezes
whatever convolution algorithms were picked when it was captured). For each: first-call seconds
(capture, plus cuDNN's autotuning when benchmark is on), ``rounds`` chains timed between device
synchronisations after 2 untimed ones (median and range), images/s, TFLOP/s by the cost model (4 FLOP per
forward multiply-add per step), whether the chain's output kept the channels-last layout, and a
torch.profiler split of one replay into convolution / elementwise / other (bench/kernel_split.py).
If the profiler shows none of the replay's kernels, the eager ``fused`` chain with the same
settings is profiled instead, and ``profiled`` says so. ``--trace`` keeps the fastest
configuration's Chrome trace (gzip).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchlib
import kernel_split
import machine
from jemfast.process.log import get_logger, setup_cli_logging
from jemfast.sgld import ChainSpec, make_chain, sampling_mode

log = get_logger("jemfast.bench.layout")
CL = torch.channels_last


def _chain_runner(backend: str, model, x: torch.Tensor, steps: int, dtype: torch.dtype | None):
    chain = make_chain(backend, x.device)[0]
    spec = ChainSpec(steps, benchlib.STEP_SIZE, benchlib.NOISE, False, dtype)

    def run() -> torch.Tensor:
        with sampling_mode(model):
            return chain(model, x, None, spec)

    return chain, run


def _profile(run, device: torch.device) -> tuple[dict, dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        benchlib.sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        trace = kernel_split.read_trace(path)
    return kernel_split.split(kernel_split.kernel_events(trace)), trace


def measure(w: benchlib.Workload, backend: str, device: torch.device, channels_last: bool,
            cudnn_benchmark: bool, rounds: int, steps: int, dtype: torch.dtype | None) -> tuple[dict, dict]:
    """One configuration's figures and the Chrome trace of its profiled chain."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    model = benchlib.make_model(w, device)
    x = benchlib.to_layout(model, benchlib.make_x(w, device), "channels_last" if channels_last else "nchw")
    step_flop = 4 * benchlib.forward_macs(model, w.shape, device)
    chain, run = _chain_runner(backend, model, x, steps, dtype)
    first_call_s = benchlib.time_once(run, device)
    for _ in range(2):
        run()
    times = []
    for _ in range(rounds):
        out = []
        times.append(benchlib.time_once(lambda: out.append(run()), device))
    med = statistics.median(times)
    split, trace = _profile(run, device)
    profiled = f"one {backend} chain" + (" (a graph replay)" if backend == "graph" else "")
    if backend == "graph" and split["kernels"] < steps:
        _, eager = _chain_runner("fused", model, x, steps, dtype)
        eager()
        split, trace = _profile(eager, device)
        profiled = "the eager fused chain (the graph replay's kernels were not in the trace)"
    del chain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tflops = w.batch * steps * step_flop / med / 1e12
    result = {"layout": "channels_last" if channels_last else "nchw", "cudnn_benchmark": cudnn_benchmark,
              "first_call_s": first_call_s, "median_s": med, "min_s": min(times), "max_s": max(times),
              "n": len(times), "images_per_s": w.batch / med, "tflops": tflops,
              "gflop_per_image_step": step_flop / 1e9,
              "state_channels_last": bool(out[0].is_contiguous(memory_format=CL)) if channels_last else None,
              "profiled": profiled, "profile": split}
    f = split["fraction"]
    log.info(f"{result['layout']:13s} cudnn.benchmark={cudnn_benchmark!s:5s}: {med * 1e3:7.1f} ms "
             f"({tflops:.0f} TFLOP/s, first call {first_call_s:.1f} s, n={len(times)}); profile: "
             f"conv {f['convolution']:.0%}, elementwise {f['elementwise']:.0%}, other {f['other']:.0%} "
             f"(layout transforms {split['layout_fraction']:.0%}); output channels-last: "
             f"{result['state_channels_last']}")
    return result, trace


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--trace", default=None, help="write the fastest configuration's Chrome trace here (.json.gz)")
    ap.add_argument("--rounds", type=int, default=benchlib.rounds(True))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="graph")
    ap.add_argument("--workload", default="wrn", choices=["cnn8", "cnn32", "wrn"], help="full-mode sizes")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=benchlib.N_STEPS)
    args = ap.parse_args()
    setup_cli_logging("bench/layout")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("needs a CUDA device (or --device cpu --backend reference for a smoke test)")
        return 3
    t0 = time.perf_counter()
    w = benchlib.workloads(full=True)[args.workload]
    results, traces = [], []
    with benchlib.tf32():
        for bench_on in (False, True):  # heuristics first: benchmark mode's cache would carry over
            for cl in (False, True):
                r, trace = measure(w, args.backend, device, cl, bench_on, args.rounds, args.steps,
                                   torch.bfloat16 if args.precision == "bf16" else None)
                results.append(r)
                traces.append(trace)
    torch.backends.cudnn.benchmark = False
    best = min(range(len(results)), key=lambda i: results[i]["median_s"])
    info = {"kind": "jemfast-gpu-layout", **machine.machine_info(), "workload": w.label, "batch": w.batch,
            "steps": args.steps, "precision": args.precision, "backend": args.backend, "device": str(device),
            "command": os.environ.get("JEMFAST_STAGE_COMMAND", " ".join(sys.argv)),
            "configs": results, "best": results[best]["layout"] + (" + cudnn.benchmark" if results[best]["cudnn_benchmark"] else ""),
            "wall_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(info, indent=1))
    if args.trace:
        with gzip.open(args.trace, "wt") as f:
            json.dump(traces[best], f)
    log.info(f"fastest: {info['best']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

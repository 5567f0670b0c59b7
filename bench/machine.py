"""What GPU machine this is and how fast its matrix unit and memory are: the `check` stage's JSON.

Usage: ``python3 bench/machine.py OUT.json`` (CUDA only; exit 3 without a CUDA device, unless
``JEMFAST_ALLOW_CPU=1``: then only the versions are written, for bench/gpu.sh's CPU rehearsal).

Writes ``{"kind": "jemfast-gpu-check", ...}`` with the versions (python, torch, CUDA, cuDNN,
triton, jemfast), the GPU (name, multiprocessors, memory), ``nvidia-smi``'s clocks and power
limit, what ``--backend auto`` resolves to, and two measured ceilings (METHOD.md's "two numbers"):

- ``gemm[dtype]``: an 8192x8192 @ 8192x8192 matrix product on random data, for bf16, fp32 with
  TF32 on, and strict fp32. ``tflops`` = 2 * 8192^3 / median seconds / 1e12 over ``n`` products
  timed one by one with CUDA events after 3 untimed ones. bench/summary.py reports the WRN chain
  against the bf16 rate (``gemm.bf16.tflops``) beside the spec-sheet dense bf16 peak.
- ``copy_gbs``: a 1 GiB device-to-device copy, bytes read plus bytes written per second / 1e9.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

N_GEMM, N_TIMED, N_WARM = 8192, 20, 3


def _time_ms(fn, n: int, warm: int) -> list[float]:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def gemm_rate(dtype: torch.dtype, tf32: bool, n: int = N_TIMED, size: int = N_GEMM) -> dict:
    """Matrix-product rate in TFLOP/s for ``size``^3 on random normal inputs (never zeros)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        out = torch.empty(size, size, device="cuda", dtype=dtype)
        times = _time_ms(lambda: torch.mm(a, b, out=out), n, N_WARM)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    flop = 2.0 * size**3
    tflops = sorted(flop / (t / 1e3) / 1e12 for t in times)
    return {"shape": [size, size, size], "dtype": str(dtype).replace("torch.", ""), "tf32": tf32, "n": n,
            "median_ms": statistics.median(times), "tflops": statistics.median(tflops),
            "tflops_min": tflops[0], "tflops_max": tflops[-1]}


def copy_rate(n_bytes: int = 1 << 30, n: int = 10) -> dict:
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = _time_ms(lambda: dst.copy_(src), n, N_WARM)
    med = statistics.median(times)
    return {"bytes": n_bytes, "n": n, "median_ms": med, "gbs": 2 * n_bytes / (med / 1e3) / 1e9}


def nvidia_smi() -> dict:
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.sm,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return dict(zip(query.split(","), (v.strip() for v in out.stdout.strip().split(","))))
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}


def versions() -> dict[str, str]:
    """Versions of python, torch, CUDA, cuDNN, triton and jemfast (a string says why one is missing)."""
    import platform

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
         "cudnn": str(torch.backends.cudnn.version())}
    for mod in ("triton", "jemfast"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            v[mod] = f"not importable: {exc}"
    return v


def machine_info() -> dict:
    """``{"gpu": CUDA device 0's name or "cpu", "versions": versions()}``: what every result file records."""
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "versions": versions()}


def main() -> int:
    from jemfast.process.log import get_logger, setup_cli_logging

    setup_cli_logging("bench/machine")
    log = get_logger("jemfast.bench.machine")
    if len(sys.argv) != 2:
        log.error("usage: python3 bench/machine.py OUT.json")
        return 2
    if not torch.cuda.is_available():
        if os.environ.get("JEMFAST_ALLOW_CPU") == "1":  # bench/gpu.sh's CPU rehearsal: versions only
            Path(sys.argv[1]).write_text(json.dumps({"kind": "jemfast-cpu-rehearsal", **machine_info()}, indent=1))
            log.info(f"no CUDA device (JEMFAST_ALLOW_CPU=1): versions only, wrote {sys.argv[1]}")
            return 0
        log.error("no CUDA device")
        return 3
    props = torch.cuda.get_device_properties(0)
    info = {"kind": "jemfast-gpu-check", **machine_info(),
            "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "nvidia_smi": nvidia_smi(),
            "cpu_count": os.cpu_count()}
    try:
        from jemfast.sgld import resolve_backend

        info["auto_backend"] = list(resolve_backend("auto", "cuda"))
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        info["auto_backend"] = f"error: {exc}"
    info["gemm"] = {"bf16": gemm_rate(torch.bfloat16, False), "tf32": gemm_rate(torch.float32, True),
                    "fp32": gemm_rate(torch.float32, False, n=5)}
    info["copy"] = copy_rate()
    Path(sys.argv[1]).write_text(json.dumps(info, indent=1))
    g = info["gemm"]
    log.info(f"{info['gpu']}: torch {info['versions']['torch']}, CUDA {info['versions']['cuda']}, "
             f"triton {info['versions']['triton']}")
    log.info(f"GEMM {N_GEMM}^3: bf16 {g['bf16']['tflops']:.0f}, TF32 {g['tf32']['tflops']:.0f}, "
             f"fp32 {g['fp32']['tflops']:.1f} TFLOP/s (median); copy {info['copy']['gbs']:.0f} GB/s; "
             f"auto backend {info['auto_backend']}; wrote {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

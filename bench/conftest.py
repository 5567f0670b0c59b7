"""pytest-benchmark suites of jemfast: ``pytest bench/`` (quick mode) from the repo root.

Modes: quick (default; what CI runs on a CPU: small batches, WRN-10-2, 3 rounds) and full
(``--bench-full`` or ``JEMFAST_BENCH_FULL=1``; for GPUs: batch 64, WRN-28-10, bf16 variants,
10 rounds). Every benchmark stores ``images_per_s``, the device and the workload in
``benchmark.extra_info`` (and so in ``--benchmark-json`` / ``--benchmark-autosave`` output).

CPU threads: one torch thread unless ``JEMFAST_BENCH_THREADS`` says otherwise. On the shared
2-core machine these figures come from, two OpenMP threads made a chain up to ~7x slower as soon
as anything else ran (a quick-mode run took 7 min instead of 2), so single-thread figures are
the reproducible ones; set ``JEMFAST_BENCH_THREADS=0`` for torch's default. The thread count and
the 1-minute load average are recorded with every result. On a CUDA machine torch's default is
kept unless ``JEMFAST_BENCH_THREADS`` is set.

CUDA: ``torch.backends.cudnn.benchmark = True`` for the whole session (as the trainer sets it),
so cuDNN picks convolution algorithms by timing them before a CUDA graph freezes them. Every
benchmark makes its own chain (``chain_for``): one compiled step or one set of captures per
workload, never one chain object seeing several shapes. Markers: ``compile`` on everything that
runs Inductor (bench/gpu.sh's ``bench`` stage runs ``-m "not compile"``, ``bench-compile*`` the rest).
"""
from __future__ import annotations

import os

import pytest
import torch

import benchlib
import machine


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="jemfast full benchmark mode (GPU sizes: WRN-28-10, batch 64, bf16 variants)")


def pytest_configure(config: pytest.Config) -> None:
    # CPU runs only: on a GPU machine the original design's CPU-side buffer work keeps torch's
    # default threads, so the baseline is not slowed down artificially.
    threads = int(os.environ.get("JEMFAST_BENCH_THREADS", "0" if torch.cuda.is_available() else "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    # Many (model, shape) pairs are compiled in one session; keep dynamo from giving up on them.
    from torch import _dynamo

    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    config._jemfast_results = {}


@pytest.fixture(scope="session")
def full(pytestconfig) -> bool:
    return benchlib.full_mode(pytestconfig)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def loads(full):
    return benchlib.workloads(full)


@pytest.fixture
def chain_for(device):
    """``chain_for(backend)``: a new chain function of ``backend`` for this benchmark alone."""
    from jemfast.sgld import make_chain

    return lambda backend: make_chain(backend, device)[0]


@pytest.fixture
def record(benchmark, device, full, pytestconfig):
    """``record(images, flop_per_image=None, baseline=None, **info)``: after ``benchmark.pedantic``
    ran, store images/s, the machine and ``info`` in ``extra_info``; with ``flop_per_image`` also
    ``tflops`` and ``peak_fraction`` (of the dense bf16 spec peak), with ``baseline`` (another
    benchmark's name) ``speedup_vs_original``. Returns images/s, or None under
    ``--benchmark-disable`` (the function ran once, untimed: nothing to record)."""

    def _record(images: int, flop_per_image: float | None = None, baseline: str | None = None,
                **info) -> float | None:
        if benchmark.stats is None:
            return None
        ips = images / benchmark.stats.stats.median
        if flop_per_image:
            info["tflops"] = ips * flop_per_image / 1e12
            peak = benchlib.peak_bf16_tflops(device)
            if peak:
                info["peak_fraction"] = info["tflops"] / peak
        base = pytestconfig._jemfast_results.get(baseline) if baseline else None
        if base:
            info["speedup_vs_original"] = ips / base["images_per_s"]
        benchmark.extra_info.update({
            "images_per_s": ips, "images_per_round": images, "device": str(device),
            "device_name": benchlib.device_name(device), "mode": "full" if full else "quick",
            "torch_threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
            "torch_version": torch.__version__, "versions": machine.versions(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "command": os.environ.get("JEMFAST_STAGE_COMMAND", "pytest bench/"), **info})
        pytestconfig._jemfast_results[benchmark.name] = dict(benchmark.extra_info)
        return ips

    return _record


def pytest_terminal_summary(terminalreporter, config) -> None:
    results = getattr(config, "_jemfast_results", {})
    if not results:
        return
    tr = terminalreporter
    tr.section("jemfast throughput (images/s, median)")
    for name, info in results.items():
        keys = ("speedup", "speedup_vs_original", "peak_fraction", "first_call_s")
        extra = "".join(f", {k} {info[k]:.3g}" for k in keys if k in info)
        tr.write_line(f"{name:60s} {info['images_per_s']:10.1f} img/s{extra}")

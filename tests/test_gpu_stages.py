"""The staged GPU runner (bench/gpu.sh) and its helpers, checked without a GPU.

- argument handling: no stage, unknown stage, missing or empty OUTDIR -> one usage line, exit 2,
  nothing created; ``-h`` -> usage, exit 0;
- ``check`` where CUDA is not visible (``CUDA_VISIBLE_DEVICES=""``) says so in one line, exits
  non-zero quickly and leaves that line in OUTDIR;
- the ``compile`` marker splits the benchmarks and GPU tests into the stages' selections;
- bench/kernel_split.py buckets known CUDA kernel names; bench/summary.py reports the WRN chain
  against both the spec bf16 peak and the measured GEMM rate, labels TF32 rows, and sets
  iterations against both original-design baselines.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, outside_xdist_env

GPU_SH = REPO / "bench" / "gpu.sh"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gpu_sh(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """gpu.sh with this interpreter as its PYTHON (its default, python3, may be one without torch
    where the tests run from a venv that is not activated)."""
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**outside_xdist_env(), "PYTHON": sys.executable, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize("args", [[], ["check"], ["nope", "OUT"], ["check", ""], ["check", "a", "b"]],
                         ids=["no-args", "no-outdir", "unknown-stage", "empty-outdir", "extra-arg"])
def test_bad_arguments_print_usage_and_exit_2(tmp_path, args):
    args = [a if a != "OUT" else str(tmp_path / "out") for a in args]
    r = _gpu_sh(*args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("usage: bash bench/gpu.sh STAGE OUTDIR")
    assert "check | bench | layout | compile | bench-compile" in lines[-1]
    if args and args[0] == "nope":
        assert lines == ["bench/gpu.sh: unknown stage 'nope'", lines[-1]]
        assert not (tmp_path / "out").exists()
    else:
        assert len(lines) == 1
    assert r.stdout == ""


def test_help_prints_usage_and_exits_0():
    r = _gpu_sh("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bash bench/gpu.sh STAGE OUTDIR")


def test_check_without_cuda_says_so_in_one_line(tmp_path):
    out = tmp_path / "out" / "nested"
    t0 = time.monotonic()
    r = _gpu_sh("check", str(out), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    took = time.monotonic() - t0
    assert r.returncode not in (0, 2), r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device visible" in lines[0], r.stderr
    assert took < 150  # one torch import, nothing else (generous: the CPU may be shared and busy)
    logs = list(out.glob("*.log"))
    assert len(logs) == 1 and logs[0].read_text().strip() == lines[0]


def test_a_stage_runs_its_steps_and_stops_at_its_limit(tmp_path):
    """The runner's mechanics on the CPU (``JEMFAST_ALLOW_CPU=1``; never installing here): the
    ``compile`` stage's pytest step runs (its CUDA tests skip), files are named cpu_DATE_STAGE;
    with a 1-second limit the step is not run and the stage fails, saying why."""
    env = {"JEMFAST_ALLOW_CPU": "1", "JEMFAST_NO_INSTALL": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = _gpu_sh("compile", str(tmp_path / "a"), env=env, timeout=600)
    (log,) = (tmp_path / "a").glob("cpu_*_compile.log")
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "== compile-tests" in text and "skipped" in text and "== compile: all steps passed" in text
    # never installs with JEMFAST_NO_INSTALL: either this checkout already imports (an editable
    # install of it, as in CI) or the stage puts it on PYTHONPATH
    assert "using PYTHONPATH" in text or "already importable" in text
    assert "== install" not in text.replace("== install: jemfast from", "")
    r = _gpu_sh("compile", str(tmp_path / "b"), env={**env, "JEMFAST_STAGE_LIMIT_S": "1"}, timeout=600)
    (log,) = (tmp_path / "b").glob("cpu_*_compile.log")
    assert r.returncode == 1
    assert "== compile-tests: not run (stage limit 1s reached)" in log.read_text()
    assert "FAILED: compile-tests (not run: time)" in r.stdout


def _collect(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if "::" in line]


def test_compile_marker_splits_the_stages():
    compiled = _collect("bench", "tests/test_gpu.py", "-m", "compile")
    rest = _collect("bench", "tests/test_gpu.py", "-m", "not compile")
    uses_compile = lambda tid: "compile" in tid.split("::")[-1] or "jemfast-best" in tid  # noqa: E731
    assert compiled and all(uses_compile(t) for t in compiled), compiled
    assert rest and not any(uses_compile(t) for t in rest), [t for t in rest if uses_compile(t)]
    assert any("test_sgld_chain" in t for t in compiled) and any("test_train_iteration" in t for t in compiled)
    assert any("tests/test_gpu.py" in t for t in compiled)


def test_kernel_names_fall_in_the_right_buckets():
    ks = _bench_module("kernel_split")
    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm80_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN": "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, float, true>": "layout",
        "void at::native::vectorized_elementwise_kernel<4, at::native::leaky_relu_kernel>": "elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "elementwise",
        "_sgld_kernel": "elementwise",
        "triton_poi_fused_add_leaky_relu_0": "elementwise",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {n: ks.bucket(n) for n in names} == names
    trace = {"traceEvents": [{"ph": "X", "cat": "kernel", "name": n, "dur": 1000.0 * (k + 1)}
                             for k, n in enumerate(names)] + [{"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "dur": 9e9}]}
    s = ks.split(ks.kernel_events(trace))
    assert s["kernels"] == len(names) and s["gpu_ms"] == pytest.approx(sum(range(1, 10)))
    assert s["ms"]["convolution"] == pytest.approx(1 + 2 + 3) and s["ms"]["layout"] == pytest.approx(4)
    assert s["fraction"]["other"] == pytest.approx((4 + 9) / 45)
    assert sum(s["fraction"].values()) == pytest.approx(1.0)


def test_layout_script_runs_its_flow_on_the_cpu(tmp_path):
    """bench/layout.py's four configurations, profile, JSON and trace, on a tiny CPU workload."""
    out, trace = tmp_path / "layout.json", tmp_path / "trace.json.gz"
    r = subprocess.run([sys.executable, "bench/layout.py", str(out), "--trace", str(trace), "--device", "cpu",
                        "--backend", "reference", "--workload", "cnn8", "--precision", "fp32", "--steps", "2",
                        "--rounds", "1"], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**outside_xdist_env(), "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["kind"] == "jemfast-gpu-layout" and data["steps"] == 2
    assert [(c["layout"], c["cudnn_benchmark"]) for c in data["configs"]] == [
        ("nchw", False), ("channels_last", False), ("nchw", True), ("channels_last", True)]
    assert all(c["median_s"] > 0 and c["profile"]["kernels"] == 0 for c in data["configs"])  # no GPU kernels
    assert all(c["state_channels_last"] for c in data["configs"][1::2])
    assert "traceEvents" in _bench_module("kernel_split").read_trace(trace)


def _bench_row(name: str, ips: float, rounds: int = 10, **info) -> dict:
    return {"name": name, "stats": {"median": 64 / ips, "rounds": rounds},
            "extra_info": {"images_per_s": ips, "device_name": "NVIDIA H100 80GB HBM3", "mode": "full",
                           "first_call_s": 1.0, **info}}


def test_summary_reports_both_fractions_and_both_baselines(tmp_path, capsys):
    wrn = {"workload": "WRN-28-10", "batch": 64, "gflop_per_image_step": 21.0, "layout": "channels_last"}
    # 64 images x 20 steps x 21 GFLOP / 0.0672 s = 400 TFLOP/s
    rows = [
        _bench_row("test_sgld_chain[wrn-reference-bf16-channels_last]", 200.0, backend="reference", precision="bf16",
                   float_mode="bf16 autocast", tflops=84.0, **wrn),
        _bench_row("test_sgld_chain[wrn-graph-bf16-channels_last]", 952.38, backend="graph", precision="bf16",
                   float_mode="bf16 autocast", tflops=400.0, **wrn),
        _bench_row("test_sgld_chain[wrn-graph-fp32-channels_last]", 500.0, backend="graph", precision="fp32",
                   float_mode="fp32 (TF32)", tflops=210.0, **wrn),
        _bench_row("test_train_iteration[original-strict-fp32]", 80.0, variant="original-strict-fp32",
                   workload="WRN-28-10", batch=64, float_mode="fp32 (strict)"),
        _bench_row("test_train_iteration[original-tf32]", 200.0, variant="original-tf32", workload="WRN-28-10",
                   batch=64, float_mode="fp32 (TF32)"),
        _bench_row("test_train_iteration[jemfast-best-bf16-cl]", 800.0, variant="jemfast-best-bf16-cl",
                   workload="WRN-28-10", batch=64, float_mode="bf16 autocast", layout="channels_last"),
    ]
    (tmp_path / "H100_20261130T1200Z_bench.json").write_text(json.dumps({"benchmarks": rows}))
    check = {"kind": "jemfast-gpu-check", "gpu": "NVIDIA H100 80GB HBM3", "multiprocessors": 132, "memory_gib": 79.0,
             "versions": {"python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "cudnn": "91000", "triton": "3.6.0"},
             "gemm": {k: {"tflops": t, "n": 20} for k, t in (("bf16", 800.0), ("tf32", 400.0), ("fp32", 50.0))},
             "copy": {"gbs": 3000.0}, "auto_backend": ["graph", "rule"]}
    (tmp_path / "H100_20261130T1200Z_check.json").write_text(json.dumps(check))
    summary = _bench_module("summary")
    assert summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    graph_bf16 = next(line for line in out.splitlines() if "| graph |" in line and "bf16" in line)
    assert "| 4.76x |" in graph_bf16  # vs the reference chain of the same workload/precision/layout
    assert "| 40.4% | 50.0% |" in graph_bf16  # 400 / 989 spec, 400 / 800 measured
    assert "fp32 (TF32)" in next(line for line in out.splitlines() if "| graph |" in line and "fp32" in line)
    best = next(line for line in out.splitlines() if "jemfast-best-bf16-cl" in line)
    assert "| 10.00x | 4.00x |" in best  # vs strict fp32 and vs TF32 original design
    assert "bf16 800 TFLOP/s" in out and "measured bf16 GEMM rate (800 TFLOP/s)" in out

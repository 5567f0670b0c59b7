"""The first GPU command (``bash bench/gpu.sh first OUTDIR``) rehearsed end to end on the CPU.

``JEMFAST_ALLOW_CPU=1`` runs it without CUDA, ``JEMFAST_BENCH_QUICK=1`` with the quick (tiny)
benchmark workloads, ``JEMFAST_NO_INSTALL=1`` without installing. Shown:

- every step runs in its order and writes as it goes: the log, one status line per step, the
  machine file, the iteration benchmark JSON (a real original-design row) and the summary;
- a step that outlives its cap (``JEMFAST_CAP_KERNEL_TESTS=2``) is stopped there, the later
  steps still run, and the stage exits 1 naming it;
- with too little of the stage's time left no step starts, the summary is still written, and
  each step is reported as not run.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, outside_xdist_env

STEPS = ["machine", "kernel-tests", "gpu-tests", "wrn-iteration", "wrn-chain"]
ENV = {"JEMFAST_ALLOW_CPU": "1", "JEMFAST_NO_INSTALL": "1", "JEMFAST_BENCH_QUICK": "1", "CUDA_VISIBLE_DEVICES": "",
       "JEMFAST_BENCH_ROUNDS": "2", "PYTHON": sys.executable}


def _first(out, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "first", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=900, env={**outside_xdist_env(), **ENV, **env})


def _status(out) -> list[list[str]]:
    (status,) = out.glob("cpu_*_first.status")
    return [line.split("\t") for line in status.read_text().splitlines()]


@pytest.mark.slow  # ~1 min: four pytest sessions and a benchmark on the CPU
def test_first_command_rehearsal_writes_its_files_and_caps_a_step(tmp_path):
    out = tmp_path / "out"
    r = _first(out, JEMFAST_CAP_KERNEL_TESTS="2")
    (log,) = out.glob("cpu_*_first.log")
    text = log.read_text()
    assert r.returncode == 1, text[-3000:]
    status = _status(out)
    assert [s[0] for s in status] == STEPS
    assert dict((s[0], s[1]) for s in status) == {"machine": "0", "kernel-tests": "124", "gpu-tests": "0",
                                                  "wrn-iteration": "0", "wrn-chain": "0"}
    assert "== kernel-tests: stopped after 2s" in text
    assert "FAILED: kernel-tests (exit 124)" in r.stdout
    (check,) = out.glob("cpu_*_first_check.json")
    assert json.loads(check.read_text())["kind"] == "jemfast-cpu-rehearsal"
    (iteration,) = out.glob("cpu_*_first_iteration.json")
    names = [b["name"] for b in json.loads(iteration.read_text())["benchmarks"]]
    assert names == ["test_train_iteration[original-strict-fp32]"]
    (summary,) = out.glob("cpu_*_first_summary.md")
    assert "| original-strict-fp32 | fp32 (strict) |" in summary.read_text()
    assert "## Training iteration" in text  # the summary is in the log too
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files


def test_first_command_with_no_time_left_runs_no_step_but_summarises(tmp_path):
    out = tmp_path / "out"
    r = _first(out, JEMFAST_STAGE_LIMIT_S="30")  # 30 s less the 25 s kept for the summary
    (log,) = out.glob("cpu_*_first.log")
    text = log.read_text()
    assert r.returncode == 1, text[-3000:]
    assert _status(out) == [[s, "not-run", "0"] for s in STEPS]
    assert all(f"== {s}: not run (stage limit 30s reached)" in text for s in STEPS)
    assert "== summary" in text and list(out.glob("cpu_*_first_summary.md"))

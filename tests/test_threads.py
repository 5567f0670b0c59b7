"""CPU thread policy (jemfast.process.threads): wait policy before torch, thread count from usable CPUs."""
import os
import re
import subprocess
import sys

import pytest
import torch

from jemfast.options.config import Config, validate
from jemfast.process import threads
from tests.conftest import REPO


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no quota
    assert threads.cgroup_cpu_limit(tmp_path) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_auto_caps_torch_count_at_available_cpus(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "_torch_count", 64)  # torch's default on a big host
        monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)  # a 1.5-CPU container
        assert threads.available_cpus() == min(2, len(os.sched_getaffinity(0)))
        assert threads.configure_threads(0) == torch.get_num_threads() == threads.available_cpus()
        assert threads.configure_threads(1) == torch.get_num_threads() == 1  # --threads wins
        monkeypatch.setattr(threads, "_torch_count", 1)  # auto never raises the count
        assert threads.configure_threads(0) == 1
    finally:
        torch.set_num_threads(before)


def test_threads_flag_must_not_be_negative():
    cfg = Config()
    cfg.run.threads = -1
    with pytest.raises(ValueError, match="threads"):
        validate(cfg)


def gomp_spin_count(code: str, omp_env: dict[str, str]) -> str | None:
    """libgomp's effective spin count (GOMP_SPINCOUNT, printed by OMP_DISPLAY_ENV=VERBOSE when it
    starts) in a fresh interpreter running ``code`` with ``omp_env`` set; None where OpenMP is not
    libgomp."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    env.update(omp_env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stdout + proc.stderr)
    return found.group(1) if found else None


def test_importing_jemfast_first_bounds_the_openmp_spin_and_the_user_setting_wins():
    spin_default = gomp_spin_count("import torch, jemfast", {})  # torch first: libgomp's default
    if spin_default is None:
        pytest.skip("torch's OpenMP runtime here is not libgomp (no GOMP_SPINCOUNT to read)")
    assert int(spin_default) == 300000
    assert gomp_spin_count("import jemfast, torch", {}) == threads.BOUNDED_SPIN
    assert gomp_spin_count("import jemfast, torch", {"OMP_WAIT_POLICY": "PASSIVE"}) == "0"  # the user's choice wins
    assert int(gomp_spin_count("import jemfast, torch", {"OMP_WAIT_POLICY": "ACTIVE"})) > 300000
    assert gomp_spin_count("import jemfast, torch", {"GOMP_SPINCOUNT": "12345"}) == "12345"


def test_the_start_up_line_names_the_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")
    assert threads.wait_policy() == "GOMP_SPINCOUNT=2000"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.wait_policy() == "OMP_WAIT_POLICY=PASSIVE"

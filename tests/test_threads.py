"""CPU thread policy (jemfast.process.threads): wait policy before torch, thread count from usable CPUs."""
import os
import re
import subprocess
import sys
import time

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


def gomp_spin_count(code: str, omp_env: dict[str, str]) -> tuple[str | None, str]:
    """libgomp's effective spin count (GOMP_SPINCOUNT, printed by OMP_DISPLAY_ENV=VERBOSE when it
    starts; None where OpenMP is not libgomp) in a fresh interpreter running ``code`` with
    ``omp_env`` set and two torch threads, and what ``code`` printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.CHOICE_VAR)}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE", "OMP_NUM_THREADS": "2", **omp_env})
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stdout + proc.stderr)
    printed = [line for line in proc.stdout.splitlines() if line.startswith("choice:")]
    return (found.group(1) if found else None), (printed[0] if printed else "")


CHOICE = "import os, jemfast, torch; torch.ones(2).sum(); print('choice:', os.environ.get('JEMFAST_OMP_WAIT'))"


def test_importing_jemfast_first_chooses_the_wait_policy_and_the_user_setting_wins():
    spin_default, _ = gomp_spin_count("import torch, jemfast", {})  # torch first: libgomp's default
    if spin_default is None:
        pytest.skip("torch's OpenMP runtime here is not libgomp (no GOMP_SPINCOUNT to read)")
    assert int(spin_default) == 300000
    spins, choice = gomp_spin_count(CHOICE, {})  # jemfast first: its choice, from the load now
    assert choice.startswith(("choice: ACTIVE:", "choice: PASSIVE:")), choice
    if "ACTIVE" in choice:
        assert int(spins) > 300000  # libgomp's "for ever"
    else:
        assert spins == "0"
    assert gomp_spin_count(CHOICE, {"OMP_WAIT_POLICY": "PASSIVE"}) == ("0", "choice: None")  # the user's wins
    assert gomp_spin_count(CHOICE, {"GOMP_SPINCOUNT": "12345"}) == ("12345", "choice: None")
    # a parent's choice is made again: a busy child that inherited ACTIVE from a quiet parent sleeps
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        spins, choice = gomp_spin_count(CHOICE, {"OMP_WAIT_POLICY": "ACTIVE", threads.CHOICE_VAR: "ACTIVE: quiet",
                                                 "OMP_NUM_THREADS": str(threads.available_cpus())})
    finally:
        hog.kill()
        hog.wait()
    if threads.available_cpus() <= 2:  # one hog leaves fewer free CPUs than threads only on a small machine
        assert choice.startswith("choice: PASSIVE:") and spins == "0", (choice, spins)


def fake_stat(path, busy: int, idle: int, cpus: int = 2) -> None:
    lines = [f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0"] + [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cpus)]
    path.write_text("\n".join(lines) + "\n")


def test_busy_cpus_reads_the_change_over_the_sample(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    fake_stat(stat, busy=1000, idle=1000)
    monkeypatch.setattr(threads.time, "sleep", lambda s: fake_stat(stat, busy=1006, idle=1006))
    assert threads.busy_cpus(0.06, stat) == (1.0, 2)  # 6 busy of 12 ticks on 2 CPUs: one busy
    assert threads.busy_cpus(0.06, tmp_path / "missing") is None


def test_the_choice_follows_free_cpus_and_one_thread_chooses_nothing(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.CHOICE_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_wait_policy(lambda: (0.1, 2)).startswith("ACTIVE: 0.1 of 2 CPUs busy")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert threads.wait_policy().startswith("OMP_WAIT_POLICY=ACTIVE: 0.1 of 2")
    # chosen by jemfast, so chosen again (a child process): one CPU taken leaves too few for 2 threads
    assert threads.choose_wait_policy(lambda: (1.0, 2)).startswith("PASSIVE: 1.0 of 2 CPUs busy")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread never spins: nothing to choose, nothing set
    assert threads.choose_wait_policy(lambda: (0.0, 2)) is None and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_wait_policy(lambda: None) is None  # no /proc/stat: libgomp's default
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's, even on a busy machine
    assert threads.choose_wait_policy(lambda: (2.0, 2)) is None and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_start_up_line_names_the_wait_policy(monkeypatch):
    monkeypatch.delenv(threads.CHOICE_VAR, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "2000")
    assert threads.wait_policy() == "GOMP_SPINCOUNT=2000 (set by the user)"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.wait_policy() == "OMP_WAIT_POLICY=PASSIVE (set by the user)"

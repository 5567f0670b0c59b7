"""The OpenMP wait policy follows the load during a run (jemfast.process.load_follower)."""
import os
import subprocess
import sys

import pytest

from jemfast.process import load_follower as lf
from jemfast.process import threads
from tests.conftest import REPO
from tests.test_threads import fake_stat


class FakeThrottle:
    def __init__(self):
        self.engaged = False

    def engage(self):
        self.engaged = True

    def release(self):
        self.engaged = False


def test_throttles_at_the_first_busy_sample_and_releases_after_two_quiet_ones(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    samples = iter([(0.0, 2), (1.0, 2), (0.1, 2), (0.9, 2), (0.0, 2), (0.2, 2), None, (0.0, 2)])
    f = lf.LoadFollower(2, threads.cpus_free, FakeThrottle(), sample=lambda: next(samples))
    got = [f.step() for _ in range(8)]
    # quiet; a hog's CPU: throttle; one quiet sample is not enough; busy again; two quiet: spin again;
    # an unreadable sample changes nothing; quiet stays quiet
    assert got == [False, True, True, True, True, False, False, False]
    assert f.switches == 2


def test_one_busy_cpu_of_sixteen_leaves_a_two_thread_run_spinning(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    f = lf.LoadFollower(2, threads.cpus_free, FakeThrottle(), sample=lambda: (1.0, 16))
    assert f.step() is False


def test_the_sampler_subtracts_this_process_own_cpu_time(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    fake_stat(stat, busy=0, idle=0)
    own = iter([0.0, 0.5])
    sampler = lf.LoadSampler(stat, own=lambda: next(own))
    tick = os.sysconf("SC_CLK_TCK")
    # one second of 2 CPUs: 1.5 CPUs busy, of which 0.5 CPU-seconds were this process's
    fake_stat(stat, busy=int(1.5 * tick), idle=int(0.5 * tick))
    other, n = sampler()
    assert n == 2 and other == pytest.approx(1.0, abs=0.02)
    assert lf.LoadSampler(tmp_path / "missing")() is None


# A fresh interpreter that spins (ACTIVE), engages and releases the real throttle, and prints the
# CPU seconds its threads burn while the main thread sleeps after a parallel region: the idle
# pool thread spins for ever unless throttled. Spinning is judged on the busiest of three windows:
# right after heavy load (a CI run) one 0.5 s window once saw the released pool burn nothing, then
# the next ones burned again; a throttle that stays engaged burns nothing in all three.
PROBE = """
import time, torch
from jemfast.process import load_follower as lf
x = torch.randn(512, 512)
def idle_cpu():
    x @ x  # a parallel region: its waits begin now, under the current spin count
    c0 = time.process_time(); time.sleep(0.5); return time.process_time() - c0
gomp = lf._libgomp()
if gomp is None:
    print('no libgomp'); raise SystemExit
t = lf.Throttle(gomp)
spinning = max(idle_cpu() for _ in range(3))
t.engage(); time.sleep(0.2)
throttled = idle_cpu()
t.release()
print('cpu', spinning, throttled, max(idle_cpu() for _ in range(3)))
"""


def test_the_real_throttle_stops_and_restarts_the_spinning():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", threads.CHOICE_VAR)}
    env.update({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"})
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "no libgomp" in proc.stdout:
        pytest.skip("torch's OpenMP runtime here is not libgomp")
    spinning, throttled, released = map(float, proc.stdout.split("cpu")[-1].split())
    # a spinning thread burns CPU whenever it is scheduled (even on a loaded machine, some of the
    # 0.5 s); a throttled one sleeps in libgomp after 1,000 spins
    assert throttled < 0.03, (spinning, throttled, released)
    assert spinning > 0.1 and released > 0.1, (spinning, throttled, released)

"""jemfast.process.pool.run_all: results in any order, and no worker outlives the process that
started it (a benchmark killed mid-run left its two runs computing for nobody)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jemfast.process.pool import run_all
from tests.conftest import REPO


def test_every_call_is_done_once_in_a_pool_and_in_order_alone():
    got = []
    run_all(divmod, [(7, 2), (9, 4), (10, 3)], 2, got.append)
    assert sorted(got) == [(2, 1), (3, 1), (3, 1)]
    alone = []
    run_all(divmod, [(7, 2), (9, 4)], 1, alone.append)
    assert alone == [(3, 1), (2, 1)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, time
        from jemfast.process.pool import run_all

        def work(i):
            # as a training run: SIGTERM asks it to stop, and it returns soon after
            stop = []
            signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
            with open(os.path.join({str(tmp_path)!r}, f"worker-{{os.getpid()}}-{{i}}"), "w") as f:
                f.write(repr(time.time()))
            for _ in range(1200):
                if stop:
                    return {{}}
                time.sleep(0.1)
            return {{}}

        if __name__ == "__main__":
            run_all(work, [(i,) for i in range(6)], 2, print)
    """)
    (tmp_path / "bench.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "bench.py")], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    t0 = time.time()
    while len(list(tmp_path.glob("worker-*"))) < 2:
        assert time.time() - t0 < 120 and parent.poll() is None, "the workers did not start"
        time.sleep(0.1)
    workers = {int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")}
    killed_at = time.time()
    parent.send_signal(signal.SIGKILL)  # no handler, no clean-up: only the kernel can tell them
    parent.wait()
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in workers if _running(pid)]
    assert not alive, f"workers {alive} outlived their parent"
    late = [p.name for p in tmp_path.glob("worker-*") if float(p.read_text()) > killed_at + 0.5]
    assert not late, f"calls {late} started after their parent was killed"  # the queued calls never start


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False

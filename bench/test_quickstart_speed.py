"""Quickstart speed (digits preset: CNN-64, batch 64, 20 SGLD steps) under CPU thread settings.

Each setting runs in a fresh interpreter (libgomp reads ``OMP_WAIT_POLICY`` once, when torch is
imported), rounds interleaved so every setting sees the same machine state. A worker times
``JEMFAST_BENCH_ITERS`` (30) training iterations after 3 warm-up ones and reports iterations/s;
the test prints median and range per setting with the 1-minute load average, and records them.

Settings: ``torch default`` imports torch before jemfast (libgomp's default spin-then-sleep
wait, torch's default thread count); ``jemfast auto`` is what ``python -m jemfast.train`` does
(passive wait, ``--threads 0``); ``spin 10k`` is a shorter spin (``GOMP_SPINCOUNT``, default
300000) with torch's threads; the others pin one thread with either wait policy.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> (import torch before jemfast, OpenMP environment to set, --threads value or None)
SETTINGS: dict[str, tuple[bool, dict[str, str], int | None]] = {
    "torch default": (True, {}, None),
    "jemfast auto": (False, {}, 0),
    "spin 10k": (True, {"GOMP_SPINCOUNT": "10000"}, None),
    "spin, 1 thread": (True, {}, 1),
    "passive, 1 thread": (False, {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}


def worker(torch_first: bool, threads: int | None, iters: int) -> None:
    """Time ``iters`` digits-preset training iterations; print one JSON line."""
    if torch_first:
        import torch  # noqa: F401  (libgomp reads the environment as it is now)
    policy = os.environ.get("OMP_WAIT_POLICY", f"spin {os.environ.get('GOMP_SPINCOUNT', 'default')}")
    import jemfast  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE if unset, then imports torch)
    import torch

    if not torch_first:
        policy = os.environ["OMP_WAIT_POLICY"]
    from jemfast.build import build_buffer, build_model, build_optimizer, build_sampler, seed_all
    from jemfast.config import Config, apply_preset
    from jemfast.data import load_data
    from jemfast.step import train_step
    from jemfast.threads import configure_threads

    if threads is not None:
        configure_threads(threads)
    cfg = Config()
    cfg.data.dataset = "digits"
    apply_preset(cfg)
    device = torch.device("cpu")
    seed_all(0)
    data = load_data(cfg.data, device)
    model = build_model(cfg, data.input_shape, data.n_classes, device)
    opt, sampler = build_optimizer(cfg, model), build_sampler(cfg)
    buf = build_buffer(cfg, data.input_shape, data.n_classes, device)
    batches = list(data.train.batches(cfg.optim.batch_size, 0, 0, drop_last=True))
    for i in range(3 + iters):
        if i == 3:
            t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        train_step(cfg, model, opt, sampler, buf, data.prepare_train(x), y, data.n_classes)
    wall = time.perf_counter() - t0
    print(json.dumps({"it_per_s": iters / wall, "threads": torch.get_num_threads(),
                      "wait_policy": policy}))


def run_setting(name: str, iters: int) -> dict:
    torch_first, omp_env, threads = SETTINGS[name]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(omp_env)
    code = ("import sys; sys.path.insert(1, 'bench'); import test_quickstart_speed as q; "
            f"q.worker({torch_first}, {threads}, {iters})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_1min": os.getloadavg()[0]}


def test_quickstart_iterations_per_second_by_thread_setting(record_property):
    rounds = int(os.environ.get("JEMFAST_BENCH_ROUNDS", "3"))
    iters = int(os.environ.get("JEMFAST_BENCH_ITERS", "30"))
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for r in range(rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))  # no setting always first
        for name in order:
            results[name].append(run_setting(name, iters))
    print(f"\ndigits preset, {iters} iterations per run, {rounds} interleaved rounds, "
          f"{os.cpu_count()} CPUs (it/s: median [min, max]; load = 1-min load average during the runs)")
    medians = {}
    for name, runs in results.items():
        rates = [run["it_per_s"] for run in runs]
        medians[name] = statistics.median(rates)
        loads = [run["load_1min"] for run in runs]
        print(f"  {name:20s} {medians[name]:6.2f} it/s [{min(rates):.2f}, {max(rates):.2f}]  "
              f"threads {runs[0]['threads']}, wait {runs[0]['wait_policy']}, load {min(loads):.1f}-{max(loads):.1f}")
        record_property(f"it_per_s[{name}]", medians[name])
        assert all(rate > 0 for rate in rates)
    assert results["jemfast auto"][0]["wait_policy"] == "PASSIVE"  # the settings took effect
    assert results["torch default"][0]["wait_policy"] == "spin default"
    print(f"  jemfast auto / torch default: {medians['jemfast auto'] / medians['torch default']:.2f}x")

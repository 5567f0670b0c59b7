"""What each stability remedy costs per iteration, side by side with none (docs/training.md
"Stability remedies").

Two workloads of :func:`jemfast.step.train_step` on the digits SmallCNN (``cnn8``; WRN-28-10 in
full mode): the **training step alone** (``--clf-only``: where SAM's second forward and backward
shows undiluted) and the **JEM iteration** (PCD draw, 20 SGLD steps, training step). Each
remedy's iterations are timed in interleaved rounds with the plain one (median of
``JEMFAST_BENCH_ROUNDS`` (5) rounds of 5 iterations, 10 of the training step alone, after 2
warm-up); the test prints the time
ratios to no remedy and asserts SAM costs more than 1.3x on the training step (it does a second
forward and backward) and no other remedy more than 1.5x anywhere.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

import benchlib
from jemfast.buffer import ReplayBuffer
from jemfast.build import build_optimizer
from jemfast.options.config import Config
from jemfast.sgld import SGLD
from jemfast.step import train_step

REMEDIES = {"none": {}, "energy-l2 0.1": {"loss.energy_l2": 0.1}, "sgld-grad-clip 1": {"sampler.grad_clip": 1.0},
            "sam-rho 0.05": {"optim.sam_rho": 0.05}, "sam-rho 2 adaptive": {"optim.sam_rho": 2.0, "optim.sam_adaptive": True},
            "px-augment false": {"loss.px_augment": False}}


def iteration(w: benchlib.Workload, device: torch.device, overrides: dict, clf_only: bool):
    cfg = Config().with_overrides({**overrides, "loss.clf_only": clf_only})
    model = benchlib.make_model(w, device)
    opt = build_optimizer(cfg, model)
    sampler = SGLD(benchlib.N_STEPS, benchlib.STEP_SIZE, benchlib.NOISE, grad_clip=cfg.sampler.grad_clip or None)
    buffer = ReplayBuffer(1000, w.shape, device=device)
    x = benchlib.make_x(w, device)
    y = torch.randint(0, 10, (w.batch,), device=device)
    x_px = x.clone() if not cfg.loss.px_augment and not clf_only else None  # the un-augmented copy train.py passes
    return lambda: train_step(cfg, model, opt, sampler, buffer, x, y, 10, x_px=x_px)


def seconds(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def test_remedy_cost_per_iteration(loads, device, full, record_property):
    w = loads["wrn" if full else "cnn8"]
    rounds = int(os.environ.get("JEMFAST_BENCH_ROUNDS", "5"))
    print(f"\n{w.name} on {device}, batch {w.batch}, {benchlib.N_STEPS} SGLD steps; median of {rounds} interleaved "
          f"rounds; time per iteration and its ratio to no remedy")
    for workload, clf_only in (("training step alone (--clf-only)", True), ("JEM iteration", False)):
        steps = {name: iteration(w, device, o, clf_only) for name, o in REMEDIES.items()}
        for step in steps.values():
            seconds(step, 2, device)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(rounds):
            for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                times[name].append(seconds(steps[name], 10 if clf_only else 5, device))
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f" {workload}:")
        for name, t in median.items():
            ratio = t / median["none"]
            print(f"  {name:20s} {1000 * t:8.2f} ms  x{ratio:.2f}")
            record_property(f"cost_ratio[{workload}][{name}]", ratio)
            if name.startswith("sam"):
                assert not clf_only or ratio > 1.3, (workload, name, ratio)
            else:
                assert ratio < 1.5, (workload, name, ratio)

"""A full JEM training iteration (PCD draw + 20 SGLD steps + write-back + training step),
jemfast against the "original design" baseline, all in one session.

Variants (images/s = real images per iteration / iteration time):
- ``original-strict-fp32``: :class:`benchlib.OriginalDesign` (buffer on the CPU, copied every
  iteration; ``autograd.grad`` per step; eager; TF32 off) -- the V100-era original.
- ``original-tf32``: the same with TF32 on (CUDA only).
- ``jemfast-reference``: :func:`jemfast.step.train_step`, buffer on the device, reference SGLD.
- ``jemfast-best``: ``train_step`` with ``--compile`` (compiled loss/backward, ``auto`` SGLD).
- ``jemfast-best-bf16``: the same under bf16 autocast (full mode).
``speedup_vs_original`` (in extra_info) = this variant's images/s over ``original-strict-fp32``'s.
Workload: the digits SmallCNN in quick mode, WRN-28-10 at batch 64 in full mode.
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from jemfast.buffer import ReplayBuffer
from jemfast.config import Config
from jemfast.build import build_optimizer
from jemfast.step import train_step
from jemfast.sgld import SGLD

VARIANTS = ["original-strict-fp32", "original-tf32", "jemfast-reference", "jemfast-best", "jemfast-best-bf16"]


def _jemfast_iteration(model, w, device, backend: str, compile_: bool, precision: str):
    cfg = Config()
    cfg.run.compile, cfg.run.precision, cfg.sampler.backend = compile_, precision, backend
    opt = build_optimizer(cfg, model)
    sampler = SGLD(benchlib.N_STEPS, benchlib.STEP_SIZE, benchlib.NOISE, backend, precision=precision)
    buffer = ReplayBuffer(10000, w.shape, device=device)
    x, y = benchlib.make_x(w, device), torch.randint(0, 10, (w.batch,), device=device)
    return lambda: train_step(cfg, model, opt, sampler, buffer, x, y, 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_iteration(benchmark, record, loads, device, full, pytestconfig, variant):
    if variant == "original-tf32" and device.type != "cuda":
        pytest.skip("TF32 is a CUDA setting; on the CPU it equals original-strict-fp32")
    if variant.endswith("bf16") and not full:
        pytest.skip("bf16 variants run in full mode (--bench-full)")
    w = loads["wrn" if full else "cnn8"]
    model = benchlib.make_model(w, device)
    benchmark.group = f"train-iteration-{w.name}"
    if variant.startswith("original"):
        orig = benchlib.OriginalDesign(model, w.shape, device)
        x_real, x_lab = benchlib.make_x(w, device, 2), benchlib.make_x(w, device, 3)
        y_lab = torch.randint(0, 10, (w.batch,), device=device)
        step = lambda: orig.step(x_real, x_lab, y_lab)  # noqa: E731
        floats = benchlib.strict_fp32() if variant == "original-strict-fp32" else benchlib.tf32()
    else:
        best = variant.startswith("jemfast-best")
        step = _jemfast_iteration(model, w, device, "auto" if best else "reference", best,
                                  "bf16" if variant.endswith("bf16") else "fp32")
        floats = benchlib.tf32()

    def run():
        step()
        benchlib.sync(device)

    with floats:
        first_call_s = benchlib.time_once(run, device)
        benchmark.pedantic(run, rounds=benchlib.rounds(full), warmup_rounds=2 if full else 0, iterations=1)
    info = {"workload": w.label, "batch": w.batch, "steps": benchlib.N_STEPS, "variant": variant,
            "first_call_s": first_call_s}
    base = pytestconfig._jemfast_results.get(benchmark.name.replace(variant, "original-strict-fp32"))
    if base and variant != "original-strict-fp32":
        info["speedup_vs_original"] = (w.batch / benchmark.stats.stats.median) / base["images_per_s"]
    record(w.batch, **info)

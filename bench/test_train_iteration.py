"""A full JEM training iteration (PCD draw + 20 SGLD steps + write-back + training step),
jemfast against the "original design" baseline, all in one session.

Variants (images/s = real images per iteration / iteration time; the float mode in brackets):
- ``original-strict-fp32``: :class:`benchlib.OriginalDesign` (buffer on the CPU, copied every
  iteration; ``autograd.grad`` per step; eager; TF32 off) -- the V100-era original. It does the
  same work as jemfast (two forward passes of B images where jemfast runs one of 2B; the
  original code's third, on a separate unlabelled batch, is left out: see its docstring).
- ``original-tf32``: the same with TF32 on, PyTorch's default for convolutions (CUDA only).
- ``jemfast-reference``: :func:`jemfast.step.train_step`, buffer on the device, reference SGLD,
  NCHW, fp32 (TF32 on CUDA).
- ``jemfast-graph-bf16-cl``: ``train_step`` with the ``graph`` chain, bf16 autocast,
  channels-last model and batch, no ``--compile`` (CUDA, full mode).
- ``jemfast-best`` [compile]: ``train_step`` with ``--compile`` (compiled loss/backward,
  ``auto`` SGLD), fp32 NCHW (quick mode only: in full mode the one WRN-28-10 compile goes to
  the next variant).
- ``jemfast-best-bf16-cl`` [compile]: the README's fast command: ``--precision bf16
  --channels-last --compile`` (full mode).
``speedup_vs_original`` (in extra_info) = this variant's images/s over ``original-strict-fp32``'s
when both ran in this session; bench/summary.py also sets every row against ``original-tf32``.
Workload: the digits SmallCNN in quick mode, WRN-28-10 at batch 64 in full mode. On CUDA the
session runs with ``cudnn.benchmark`` on (bench/conftest.py), the baselines included.
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from jemfast.buffer import ReplayBuffer
from jemfast.build import build_optimizer
from jemfast.options.config import Config
from jemfast.sgld import SGLD
from jemfast.step import train_step

COMPILE = pytest.mark.compile
VARIANTS = ["original-strict-fp32", "original-tf32", "jemfast-reference", "jemfast-graph-bf16-cl",
            pytest.param("jemfast-best", marks=COMPILE), pytest.param("jemfast-best-bf16-cl", marks=COMPILE)]
# variant -> (SGLD backend, --compile, precision, layout)
JEMFAST = {"jemfast-reference": ("reference", False, "fp32", "nchw"),
           "jemfast-graph-bf16-cl": ("graph", False, "bf16", "channels_last"),
           "jemfast-best": ("auto", True, "fp32", "nchw"),
           "jemfast-best-bf16-cl": ("auto", True, "bf16", "channels_last")}


def _jemfast_iteration(model, w, device, backend: str, compile_: bool, precision: str, layout: str):
    cfg = Config()
    cfg.run.compile, cfg.run.precision, cfg.sampler.backend = compile_, precision, backend
    cfg.run.channels_last = layout == "channels_last"
    opt = build_optimizer(cfg, model)
    sampler = SGLD(benchlib.N_STEPS, benchlib.STEP_SIZE, benchlib.NOISE, backend, precision=precision)
    buffer = ReplayBuffer(10000, w.shape, device=device)
    x = benchlib.to_layout(model, benchlib.make_x(w, device), layout)
    y = torch.randint(0, 10, (w.batch,), device=device)
    return lambda: train_step(cfg, model, opt, sampler, buffer, x, y, 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_iteration(benchmark, record, loads, device, full, variant):
    if variant == "original-tf32" and device.type != "cuda":
        pytest.skip("TF32 is a CUDA setting; on the CPU it equals original-strict-fp32")
    if variant.endswith("-cl") and not full:
        pytest.skip("bf16 channels-last variants run in full mode (--bench-full)")
    if variant == "jemfast-best" and full:
        pytest.skip("full mode compiles WRN-28-10 once, for jemfast-best-bf16-cl (each compile takes minutes)")
    if variant == "jemfast-graph-bf16-cl" and device.type != "cuda":
        pytest.skip("the graph backend needs CUDA")
    w = loads["wrn" if full else "cnn8"]
    model = benchlib.make_model(w, device)
    benchmark.group = f"train-iteration-{w.name}"
    if variant.startswith("original"):
        orig = benchlib.OriginalDesign(model, w.shape, device)
        x_lab = benchlib.make_x(w, device, 2)
        y_lab = torch.randint(0, 10, (w.batch,), device=device)
        step = lambda: orig.step(x_lab, y_lab)  # noqa: E731
        floats = benchlib.strict_fp32() if variant == "original-strict-fp32" else benchlib.tf32()
        precision, layout = "fp32", "nchw"
    else:
        backend, compile_, precision, layout = JEMFAST[variant]
        step = _jemfast_iteration(model, w, device, backend, compile_, precision, layout)
        floats = benchlib.tf32()

    def run():
        step()
        benchlib.sync(device)

    with floats:
        first_call_s = benchlib.time_once(run, device)
        benchmark.pedantic(run, rounds=benchlib.rounds(full), warmup_rounds=2 if full else 0, iterations=1)
    mode = "fp32 (strict)" if variant == "original-strict-fp32" else benchlib.float_mode(precision, device)
    baseline = benchmark.name.replace(variant, "original-strict-fp32") if variant != "original-strict-fp32" else None
    record(w.batch, baseline=baseline, workload=w.label, batch=w.batch, steps=benchlib.N_STEPS, variant=variant,
           float_mode=mode, layout=layout, first_call_s=first_call_s)

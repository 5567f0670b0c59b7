"""Shared pieces of the benchmark suites: workloads, timing, the "original design" baseline.

Workloads (``WORKLOADS``), per mode (quick: CPU/CI default; full: GPUs):

=========  =====================================  ============  ============
name       model                                  quick batch   full batch
=========  =====================================  ============  ============
cnn8       SmallCNN(hidden 64), digits 1x8x8      64            64
cnn32      SmallCNN(hidden 64), 3x32x32           16            64
wrn        WRN-10-2 (quick) / WRN-28-10 (full)    32            64
=========  =====================================  ============  ============

Cost model (DESIGN.md): one SGLD step (forward + input gradient) costs ~2x the forward, i.e.
4 FLOP per multiply-add of the forward: WRN-28-10 at 32x32 is 5.24 G MAC -> ~21 GFLOP per
image per step. :func:`forward_macs` counts the MACs of any model of ours with hooks.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from jemfast.energy import JEM
from jemfast.models import SmallCNN, WideResNet

N_STEPS = 20  # SGLD steps per chain (the paper's)
STEP_SIZE, NOISE = 1.0, 0.01
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per GPU


LAYOUTS = ("nchw", "channels_last")


def full_mode(config) -> bool:
    return bool(config.getoption("--bench-full")) or os.environ.get("JEMFAST_BENCH_FULL", "") not in ("", "0")


def rounds(full: bool, quick: int = 3, full_n: int = 10) -> int:
    """Timed rounds per benchmark: ``JEMFAST_BENCH_ROUNDS`` if set, else 3 (quick) / 10 (full)."""
    env = os.environ.get("JEMFAST_BENCH_ROUNDS")
    return int(env) if env else (full_n if full else quick)


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]
    batch: int
    build: Callable[[], nn.Module]
    label: str


def workloads(full: bool) -> dict[str, Workload]:
    wrn = (lambda: WideResNet(3, 10, 28, 10)) if full else (lambda: WideResNet(3, 10, 10, 2))
    return {
        "cnn8": Workload("cnn8", (1, 8, 8), 64, lambda: SmallCNN(1, 10, 64), "SmallCNN-64 1x8x8"),
        "cnn32": Workload("cnn32", (3, 32, 32), 64 if full else 16, lambda: SmallCNN(3, 10, 64), "SmallCNN-64 3x32x32"),
        "wrn": Workload("wrn", (3, 32, 32), 64 if full else 32, wrn, "WRN-28-10" if full else "WRN-10-2"),
    }


def make_model(w: Workload, device: torch.device, seed: int = 0) -> JEM:
    torch.manual_seed(seed)
    return JEM(w.build()).to(device)


def make_x(w: Workload, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((w.batch, *w.shape), generator=g) * 2 - 1).to(device)


def to_layout(model: nn.Module, x: torch.Tensor, layout: str) -> torch.Tensor:
    """Put a conv model (in place) and its 4-D input in ``layout`` (``nchw`` | ``channels_last``);
    returns the input. Channels-last is what cuDNN's bf16/TF32 convolution kernels read natively."""
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last)
    return x


def float_mode(precision: str, device: torch.device) -> str:
    """How the network's arithmetic runs, as results label it: ``bf16 autocast``, ``fp32 (TF32)``
    on CUDA (the benchmarks' default float mode, PyTorch's default for convolutions) or ``fp32``."""
    if precision == "bf16":
        return "bf16 autocast"
    return "fp32 (TF32)" if device.type == "cuda" else "fp32"


def forward_macs(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Multiply-adds of one forward pass of one image (Conv2d and Linear layers)."""
    total = 0

    def hook(mod: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out.numel() * k
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    if os.environ.get("JEMFAST_PEAK_TFLOPS"):
        return float(os.environ["JEMFAST_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for matmuls and cuDNN convolutions set to ``enabled``, restored after."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def strict_fp32() -> contextlib.AbstractContextManager:
    """TF32 off (the V100-era original)."""
    return _tf32(False)


def tf32() -> contextlib.AbstractContextManager:
    """TF32 on (what a modern eager run uses)."""
    return _tf32(True)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device,
                      rounds: int) -> dict[str, list[float]]:
    """Time each function ``rounds`` times, alternating between them (so load drift on a
    shared machine hits all alike); returns the seconds of every round per name."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return times


def summary(times: list[float]) -> str:
    med = statistics.median(times)
    spread = (max(times) - min(times)) / 2
    return f"{med * 1000:.1f} ms (+- {spread * 1000:.1f}, n={len(times)})"


class OriginalDesign:
    """One JEM iteration as the original code ran it, for the baseline (written from the paper's
    description and DESIGN.md, not copied): the replay buffer lives on the CPU; each iteration
    draws indices and re-init noise on the CPU, copies the batch to the device, runs 20 SGLD
    steps with ``torch.autograd.grad`` on ``x.requires_grad_()`` in eager fp32, copies the
    result back to the CPU buffer, and takes an Adam step. The caller sets the float mode
    (:func:`strict_fp32` for the V100-era original, :func:`tf32`).

    Same work as jemfast's ``train_step``: the labelled batch gives both the cross-entropy and
    E(x_real), so there are two forward passes of B images (real, fake) where jemfast runs one of
    2B. The original JEM code draws a separate unlabelled batch for E(x_real), a third forward
    and backward of B images: by the cost model (an SGLD step is 2 forwards, a training
    forward+backward 3) that is 49 forward-equivalents per image instead of 46, ~6.5 % more work,
    which this baseline does not charge to the original design."""

    def __init__(self, model: JEM, shape: tuple[int, ...], device: torch.device, capacity: int = 10000,
                 reinit: float = 0.05, lr: float = 1e-4) -> None:
        self.model, self.device, self.reinit = model, device, reinit
        self.buffer = torch.rand((capacity, *shape)) * 2 - 1  # on the CPU, as in the original
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def sample(self, batch: int) -> torch.Tensor:
        idx = torch.randint(0, self.buffer.shape[0], (batch,))
        fresh = torch.rand((batch, *self.buffer.shape[1:])) * 2 - 1
        keep = (torch.rand(batch) >= self.reinit).float().view(-1, *([1] * (self.buffer.dim() - 1)))
        x = (keep * self.buffer[idx] + (1 - keep) * fresh).to(self.device)
        self.model.eval()
        x.requires_grad_(True)
        for _ in range(N_STEPS):
            # d/dx of log p(x) = -dE/dx; the original ascends logsumexp with .data updates
            (g,) = torch.autograd.grad(-self.model.energy(x).sum(), [x], retain_graph=True)
            x.data += STEP_SIZE * g + NOISE * torch.randn_like(x)
        self.model.train()
        out = x.detach()
        self.buffer[idx] = out.cpu()  # device -> host copy: a sync every iteration
        return out

    def step(self, x_lab: torch.Tensor, y_lab: torch.Tensor) -> None:
        x_fake = self.sample(x_lab.shape[0])
        logits = self.model(x_lab)
        e_real = -torch.logsumexp(logits, dim=1).mean()
        e_fake = self.model.energy(x_fake).mean()
        loss = torch.nn.functional.cross_entropy(logits, y_lab) + (e_real - e_fake)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

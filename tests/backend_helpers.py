"""What the SGLD backend tests share (tests/test_backends.py, tests/test_backend_fused.py): a tiny
model whose chain really moves, its input, one chain run, and the noise-statistics check (the
tolerances are explained in tests/test_backends.py's docstring)."""
from __future__ import annotations

import pytest
import torch

from jemfast.energy import JEM
from jemfast.models import SmallCNN
from jemfast.sgld import ChainSpec, sampling_mode, unavailable
from jemfast.sgld.fused import FusedChain

B, SHAPE, STEPS, ALPHA, SIGMA = 64, (1, 8, 8), 20, 1.0, 0.01
ATOL = 1e-4


def tiny_model(seed: int = 0) -> JEM:
    torch.manual_seed(seed)
    model = JEM(SmallCNN(1, 10, hidden=8))
    with torch.no_grad():  # larger logits -> larger energy gradients -> the chain really moves
        model.classifier.head.weight.mul_(20.0)
    return model


def chain_input(seed: int = 1) -> torch.Tensor:
    return torch.rand((B, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run_chain(chain, model, x, y=None, noise=0.0, clamp=False, steps=STEPS):
    with sampling_mode(model):
        return chain(model, x, y, ChainSpec(steps, ALPHA, noise, clamp))


def fused_or_skip() -> FusedChain:
    why = unavailable("fused", "cpu")
    if why:
        pytest.skip(f"fused backend unavailable on the CPU here: {why}")
    return FusedChain()


def check_noise_stats(out: torch.Tensor, ref_noisy: torch.Tensor, ref_clean: torch.Tensor) -> None:
    d, d_ref = out - ref_clean, ref_noisy - ref_clean
    n = d.numel()
    assert d_ref.std() > 0.5 * SIGMA  # the noise is really there
    assert abs(d.mean().item()) < 5 * d_ref.std().item() / n ** 0.5
    assert abs(d.std().item() / d_ref.std().item() - 1) < 0.06

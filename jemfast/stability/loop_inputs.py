"""What :class:`jemfast.Guard` takes from a foreign training loop, made into jemfast's own terms:
its stability settings, the device its flags live on, its metrics as device scalars, and the
informative init in the original code's ``init_random(args, bs)`` form."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ..options.config import Config, StabilityConfig, check_value
from ..sgld.chain_init import ClassGaussians

def stability_config(config: StabilityConfig | Config | None, overrides: dict[str, Any]) -> StabilityConfig:
    """A checked copy of ``config`` (default: the defaults) with ``overrides`` by field name."""
    if config is None:
        cfg = StabilityConfig()
    elif isinstance(config, (StabilityConfig, Config)):
        cfg = copy.deepcopy(config.stability if isinstance(config, Config) else config)
    else:
        raise TypeError(f"Guard: config must be a StabilityConfig or a Config, got {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(StabilityConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"Guard: no stability setting {', '.join(unknown)} (the settings: {', '.join(names)})")
    for name in names:
        setattr(cfg, name, check_value(f"stability.{name}", overrides.get(name, getattr(cfg, name)), name))
    return cfg


def device_of(model: nn.Module, buffer: Any) -> torch.device:
    """Where the flags live: the model's device (a CPU buffer of a GPU model does not decide)."""
    for p in model.parameters():
        return p.device
    if isinstance(buffer, torch.Tensor):
        return buffer.device
    return torch.device(getattr(buffer, "device", "cpu"))


def device_scalar(value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """A float device scalar: a tensor's mean (detached), a number, or 0 for None."""
    if value is None:
        return torch.zeros((), device=device)
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value if value.dim() == 0 else value.float().mean()).float().to(device)
    return torch.full((), float(value), device=device)  # a fill kernel: no host-to-device copy


class OriginalInit:
    """The Gaussians as the original code's ``init_random(args, bs)`` (jemfast.compat's ``init_fn``)."""

    def __init__(self, gaussians: ClassGaussians) -> None:
        self.gaussians = gaussians

    def __call__(self, args: Any, bs: int) -> torch.Tensor:
        return self.gaussians(bs)

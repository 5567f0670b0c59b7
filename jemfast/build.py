"""Build the parts of a run from its configuration: device, model, optimizer, buffer, sampler.

Shared by the trainer, :func:`jemfast.rundir.checkpoint.load_checkpoint`, evaluation and benchmarks,
so a checkpoint is always read back into exactly what wrote it.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch import nn

from .buffer import ReplayBuffer
from .energy import JEM
from .models import build_classifier
from .options.config import Config
from .process.errors import UserError
from .sgld import SGLD


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` without CUDA is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, input_shape: tuple[int, ...], n_classes: int, device: torch.device) -> JEM:
    """The configured classifier wrapped as a :class:`JEM`, on ``device`` (channels-last if asked).

    On CUDA this also turns on ``cudnn.benchmark``: a CUDA graph freezes whatever convolution
    algorithm was chosen at capture, so it should be the benchmarked one, not the heuristic's.
    """
    model = JEM(build_classifier(cfg.model, input_shape, n_classes)).to(device)
    if cfg.run.channels_last and len(input_shape) == 3:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def apply_optimizer_settings(cfg: Config, optimizer: torch.optim.Optimizer) -> None:
    """Set ``--weight-decay`` (and SGD's ``--momentum``) on every parameter group: a restored
    optimizer state carries the checkpoint's values, and a resume may change them (the lr is
    set every iteration by the schedule)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.optim.weight_decay
        if isinstance(optimizer, torch.optim.SGD):
            group["momentum"] = cfg.optim.momentum


def build_buffer(cfg: Config, input_shape: tuple[int, ...], n_classes: int, device: torch.device,
                 init_fn: Callable[[int, torch.Tensor | None], torch.Tensor] | None = None) -> ReplayBuffer:
    """The replay buffer; ``init_fn`` (see :mod:`jemfast.sgld.chain_init`) replaces U(-1, 1) for fresh chains."""
    s = cfg.sampler
    if s.class_cond and s.buffer_size % n_classes:
        raise ValueError(f"--buffer-size (sampler.buffer_size) {s.buffer_size} with --class-cond: must be a multiple "
                         f"of the {n_classes} classes (each class owns an equal share of the rows)")
    return ReplayBuffer(s.buffer_size, input_shape, n_classes if s.class_cond else None, s.reinit_freq, device,
                        init_fn=init_fn)


def build_sampler(cfg: Config) -> SGLD:
    s = cfg.sampler
    return SGLD(s.n_steps, s.step_size, s.noise_std, s.backend, precision=cfg.run.precision,
                channels_last=cfg.run.channels_last, grad_clip=s.grad_clip or None, clamp=s.clamp, mode=s.mode)

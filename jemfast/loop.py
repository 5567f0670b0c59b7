"""One JEM training iteration, the learning-rate schedule, and accuracy evaluation.

Loss (per batch of B labelled real images and B fake images from PCD)::

    L = p_y_given_x_weight * CE(f(x_real), y) + p_x_weight * (mean E(x_real) - mean E(x_fake))

Everything returned by :func:`train_step` stays on the device; nothing here syncs with the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .buffer import ReplayBuffer
from .config import Config
from .data import Split
from .energy import energy_from_logits
from .sgld import SGLD


def lr_multiplier(cfg: Config, step: int, epoch: int) -> float:
    """Linear warm-up over ``warmup_iters`` iterations times ``decay_rate`` per passed decay epoch."""
    o = cfg.optim
    warm = min(1.0, (step + 1) / o.warmup_iters) if o.warmup_iters > 0 else 1.0
    return warm * o.decay_rate ** sum(1 for e in o.decay_epochs if epoch >= e)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepOutput:
    """Device tensors of one iteration (scalars unless noted)."""

    loss: torch.Tensor
    loss_ce: torch.Tensor
    loss_px: torch.Tensor
    e_real: torch.Tensor
    e_fake: torch.Tensor
    correct: torch.Tensor  # number of correct predictions in the batch
    grad_norm: torch.Tensor
    x_fake: torch.Tensor | None  # [B, *shape], None when p_x_weight == 0


def loss_terms(model: nn.Module, x: torch.Tensor, x_fake: torch.Tensor | None, y: torch.Tensor,
               p_y_given_x_weight: float, p_x_weight: float, precision: str) -> tuple[torch.Tensor, ...]:
    """Forward pass and loss of one iteration (what ``--compile`` compiles, with its backward).

    Returns ``(loss, loss_ce, loss_px, e_real, e_fake, correct)``, all device scalars.
    """
    b = x.shape[0]
    inputs = x if x_fake is None else torch.cat([x, x_fake])
    with autocast_ctx(x.device, precision):
        logits = model(inputs).float()
    logits_real = logits[:b]
    loss_ce = F.cross_entropy(logits_real, y)
    e_real = energy_from_logits(logits_real).mean()
    if x_fake is not None:
        e_fake = energy_from_logits(logits[b:]).mean()
        loss_px = e_real - e_fake
    else:
        e_fake = torch.zeros((), device=x.device)
        loss_px = torch.zeros((), device=x.device)
    loss = p_y_given_x_weight * loss_ce + p_x_weight * loss_px
    correct = (logits_real.argmax(1) == y).sum()
    return loss, loss_ce, loss_px, e_real, e_fake, correct


_compiled_loss_terms = None


def compiled_loss_terms() -> Callable[..., tuple[torch.Tensor, ...]]:
    """:func:`loss_terms` under ``torch.compile`` (made once; forward and backward compiled).

    Parameters are graph inputs, so the compiled code follows optimizer updates; the model's
    state_dict is untouched (no ``_orig_mod`` wrapper).
    """
    global _compiled_loss_terms
    if _compiled_loss_terms is None:
        _compiled_loss_terms = torch.compile(loss_terms)
    return _compiled_loss_terms


def train_step(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: SGLD,
               buffer: ReplayBuffer, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> StepOutput:
    """One JEM iteration on a labelled batch ``x: Tensor[B, *shape]``, ``y: Tensor[B]``."""
    b = x.shape[0]
    w = cfg.loss
    x_fake = None
    if w.p_x_weight > 0:
        y_fake = torch.randint(0, n_classes, (b,), device=x.device) if cfg.sampler.class_cond else None
        x_fake = sampler.sample(model, buffer, b, y_fake)
    model.train()
    terms = compiled_loss_terms() if cfg.run.compile else loss_terms
    loss, loss_ce, loss_px, e_real, e_fake, correct = terms(
        model, x, x_fake, y, w.p_y_given_x_weight, w.p_x_weight, cfg.run.precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=x.device)
    optimizer.step()
    return StepOutput(loss.detach(), loss_ce.detach(), loss_px.detach(), e_real.detach(),
                      e_fake.detach(), correct, grad_norm.detach(), x_fake)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 500, precision: str = "fp32") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``split``, in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    for x, y in split.batches(batch_size):
        with autocast_ctx(x.device, precision):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / max(1, len(split))

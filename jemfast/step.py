"""One JEM training iteration (the step), the learning-rate schedule, and test accuracy.

Loss (per batch of B labelled real images and B fake images from PCD)::

    L = p_y_given_x_weight * CE(f(x_real), y) + p_x_weight * (mean E(x_real) - mean E(x_fake))

Everything :func:`train_step` returns stays on the device; nothing here syncs with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .buffer import ReplayBuffer
from .config import Config, OptimConfig
from .data import Split
from .energy import energy_from_logits
from .modes import autocast, eval_mode, precision_dtype
from .sgld import SGLD


def lr_at(o: OptimConfig, step: int, epoch: int, scale: float = 1.0) -> float:
    """The learning rate of iteration ``step`` (0-based) in ``epoch`` (0-based).

    1) linear warm-up from lr/warmup_iters to lr over the first ``warmup_iters`` iterations;
    2) times ``decay_rate`` for every decay epoch already reached;
    3) times ``scale``, the cumulative factor of automatic restarts (jemfast.stability).
    """
    warm = min(1.0, (step + 1) / o.warmup_iters) if o.warmup_iters > 0 else 1.0
    return o.lr * warm * o.decay_rate ** sum(1 for e in o.decay_epochs if epoch >= e) * scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class StepOutput:
    """Device tensors of one iteration: ``metrics`` maps a name to a device scalar (the names
    are the columns of metrics.jsonl); ``x_fake: Tensor[B, *shape]`` or None when p_x_weight == 0."""

    metrics: dict[str, torch.Tensor]
    x_fake: torch.Tensor | None


def loss_terms(model: nn.Module, x: torch.Tensor, x_fake: torch.Tensor | None, y: torch.Tensor,
               p_y_given_x_weight: float, p_x_weight: float, precision: str) -> dict[str, torch.Tensor]:
    """Forward pass and loss of one iteration (what ``--compile`` compiles, with its backward).

    Returns device scalars by name: loss, loss_ce, loss_px, e_real, e_fake, acc (fraction of
    the real batch classified correctly).
    """
    b = x.shape[0]
    inputs = x if x_fake is None else torch.cat([x, x_fake])
    with autocast(x.device, precision_dtype(precision)):
        logits = model(inputs).float()
    logits_real = logits[:b]
    loss_ce = F.cross_entropy(logits_real, y)
    e_real = energy_from_logits(logits_real).mean()
    if x_fake is not None:
        e_fake = energy_from_logits(logits[b:]).mean()
        loss_px = e_real - e_fake
    else:
        e_fake = loss_px = torch.zeros((), device=x.device)
    loss = p_y_given_x_weight * loss_ce + p_x_weight * loss_px
    acc = (logits_real.argmax(1) == y).float().mean()
    return {"loss": loss, "loss_ce": loss_ce, "loss_px": loss_px, "e_real": e_real, "e_fake": e_fake, "acc": acc}


_compiled_loss_terms = None


def compiled_loss_terms() -> Callable[..., dict[str, torch.Tensor]]:
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
    """One JEM iteration on a labelled batch ``x: Tensor[B, *shape]``, ``y: Tensor[B]``.

    With ``run.channels_last`` 4-D batches are laid out channels-last (the model is too).
    Metrics: those of :func:`loss_terms` plus ``grad_norm`` (global L2 norm before the step).
    """
    b = x.shape[0]
    w = cfg.loss
    if cfg.run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x_fake = None
    if w.p_x_weight > 0:
        y_fake = torch.randint(0, n_classes, (b,), device=x.device) if cfg.sampler.class_cond else None
        x_fake = sampler.sample(model, buffer, b, y_fake)
        if cfg.run.channels_last and x_fake.dim() == 4:
            x_fake = x_fake.contiguous(memory_format=torch.channels_last)
    model.train()
    terms = compiled_loss_terms() if cfg.run.compile else loss_terms
    metrics = terms(model, x, x_fake, y, w.p_y_given_x_weight, w.p_x_weight, cfg.run.precision)
    optimizer.zero_grad(set_to_none=True)
    metrics["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    metrics["grad_norm"] = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=x.device)
    optimizer.step()
    return StepOutput({k: v.detach() for k, v in metrics.items()}, x_fake)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 500, precision: str = "fp32") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``split``, in eval mode (mode restored)."""
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    with eval_mode(model):
        for x, y in split.batches(batch_size):
            with autocast(x.device, precision_dtype(precision)):
                correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(1, len(split))

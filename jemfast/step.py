"""One JEM training iteration (the step), the learning-rate schedule, and test accuracy.

Loss (per batch of B labelled real images and B fake images from PCD)::

    L = p_y_given_x_weight * CE(f(x_real), y) + p_x_weight * (mean E(x_real) - mean E(x_fake))
        [+ p_x_given_y_weight * (mean E(x_real, y) - mean E(x_fake_y, y))]
        [+ energy_l2 * (mean E(x_real)^2 + mean E(x_fake)^2)]

with x_fake_y sampled given y. Semi-supervised runs pass a separate real batch for the p(x)
term (E(x_real) is then over that batch), and so do runs with ``--px-augment false`` (the same
images, un-augmented); ``--clf-only`` keeps the cross-entropy alone (no SGLD). With ``--sam-rho``
the weights step with the gradient at their sharpness-aware perturbation (:mod:`jemfast.sam`).

Everything :func:`train_step` returns stays on the device; nothing here syncs with the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import sam
from .buffer import ReplayBuffer
from .data import Split
from .energy import energy_from_logits
from .modes import autocast, batch_norm_statistics_frozen, batch_norms_in_training, eval_mode, precision_dtype
from .options.config import Config, LossConfig, OptimConfig, check_value
from .sgld import SGLD


def lr_at(o: OptimConfig, step: int, epoch: int, scale: float = 1.0, warmup_from: int = 0) -> float:
    """The learning rate of iteration ``step`` (0-based) in ``epoch`` (0-based).

    1) linear warm-up from lr/warmup_iters to lr over the ``warmup_iters`` iterations from
       ``warmup_from`` (0; an automatic restart may start the warm-up again, jemfast.stability.recovery);
    2) times ``decay_rate`` for every decay epoch already reached;
    3) times ``scale``, the cumulative factor of automatic restarts.
    """
    warm = min(1.0, (step - warmup_from + 1) / o.warmup_iters) if o.warmup_iters > 0 else 1.0
    return o.lr * warm * o.decay_rate ** sum(1 for e in o.decay_epochs if epoch >= e) * scale


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class StepOutput:
    """Device tensors of one iteration: ``metrics`` maps a name to a device scalar (the names
    are the columns of metrics.jsonl); ``x_fake: Tensor[B, *shape]`` or None when no SGLD ran."""

    metrics: dict[str, torch.Tensor]
    x_fake: torch.Tensor | None


def loss_terms(model: nn.Module, x: torch.Tensor, x_fake: torch.Tensor | None, y: torch.Tensor,
               p_y_given_x_weight: float, p_x_weight: float, precision: str,
               x_px: torch.Tensor | None = None, x_fake_y: torch.Tensor | None = None,
               p_x_given_y_weight: float = 0.0, energy_l2: float = 0.0) -> dict[str, torch.Tensor]:
    """Forward pass and loss of one iteration (what ``--compile`` compiles, with its backward).

    ``x: Tensor[B, *shape]`` is the labelled batch with labels ``y``; ``x_px: Tensor[B', *shape]``
    the separate real batch of the p(x) term (None: ``x`` doubles as it); ``x_fake`` the p(x)
    term's samples; ``x_fake_y: Tensor[B, *shape]`` samples given ``y`` for the p(x|y) term.
    All go through the model in one batch, except through batch norm in training mode, which
    couples the images of a batch: then each part has a pass of its own, as the original code
    runs them, the samples' passes leaving the running statistics to the real images
    (:func:`jemfast.modes.batch_norm_statistics_frozen`). Returns device scalars by name: loss, loss_ce,
    loss_px, e_real, e_fake, acc (fraction of ``x`` classified correctly), loss_pxy when
    ``x_fake_y`` is given, and energy_sq (mean E(real)^2 + mean E(fake)^2, unweighted) when
    ``energy_l2`` > 0 and ``x_fake`` is given.
    """
    parts = [(t, sampled) for t, sampled in ((x, False), (x_px, False), (x_fake, True), (x_fake_y, True))
             if t is not None]
    with autocast(x.device, precision_dtype(precision)):
        if len(parts) > 1 and batch_norms_in_training(model):
            outs = []
            for t, sampled in parts:
                with batch_norm_statistics_frozen(model) if sampled else contextlib.nullcontext():
                    outs.append(model(t).float())
            pieces = iter(outs)
        else:
            inputs = parts[0][0] if len(parts) == 1 else torch.cat([t for t, _ in parts])
            pieces = iter(model(inputs).float().split([t.shape[0] for t, _ in parts]))
    logits_real = next(pieces)
    logits_px = next(pieces) if x_px is not None else logits_real
    loss_ce = F.cross_entropy(logits_real, y)
    energies_real = energy_from_logits(logits_px)
    e_real = energies_real.mean()
    energy_sq = None
    if x_fake is not None:
        energies_fake = energy_from_logits(next(pieces))
        e_fake = energies_fake.mean()
        loss_px = e_real - e_fake
        if energy_l2 > 0:
            energy_sq = energies_real.square().mean() + energies_fake.square().mean()
    else:
        e_fake = loss_px = torch.zeros((), device=x.device)
    loss = p_y_given_x_weight * loss_ce + p_x_weight * loss_px
    acc = (logits_real.argmax(1) == y).float().mean()
    out = {"loss": loss, "loss_ce": loss_ce, "loss_px": loss_px, "e_real": e_real, "e_fake": e_fake, "acc": acc}
    if energy_sq is not None:
        out["energy_sq"] = energy_sq
        out["loss"] = loss + energy_l2 * energy_sq
    if x_fake_y is not None:
        out["loss_pxy"] = energy_from_logits(logits_real, y).mean() - energy_from_logits(next(pieces), y).mean()
        out["loss"] = out["loss"] + p_x_given_y_weight * out["loss_pxy"]
    return out


def jem_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_fake: torch.Tensor | None = None, *,
             x_fake_y: torch.Tensor | None = None, x_px: torch.Tensor | None = None,
             p_y_given_x_weight: float = 1.0, p_x_weight: float = 1.0, p_x_given_y_weight: float = 0.0,
             energy_l2: float = 0.0, precision: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The JEM objective for your own training loop: ``(loss, terms)``, with ``loss`` the scalar
    to call ``backward()`` on (the module docstring's L; the :func:`loss_terms` that
    ``jemfast.train`` uses) and ``terms`` its parts as device scalars: loss_ce, loss_px
    (E(real) - E(fake)), e_real, e_fake, acc, and loss_pxy when ``x_fake_y`` is given.

    ``model`` returns logits (a :class:`jemfast.JEM`, or the bare classifier); ``x, y`` the
    labelled batch; ``x_fake`` SGLD samples for the p(x) term (None: no p(x) term);
    ``x_fake_y`` samples given ``y`` for the p(x|y) term; ``x_px`` a separate real batch for
    E(real) (semi-supervised; None: ``x``); ``energy_l2`` the weight of the L2 penalty on the
    p(x) term's energies (``--energy-l2``). Everything goes through the model in one batch (a
    pass per part through batch norm in training mode: :func:`loss_terms`); set its train/eval
    mode yourself. ``precision="bf16"`` runs the forward under autocast.
    """
    px = check_value("loss.p_x_weight", p_x_weight, "p_x_weight")
    pyx = check_value("loss.p_y_given_x_weight", p_y_given_x_weight, "p_y_given_x_weight")
    pxy = check_value("loss.p_x_given_y_weight", p_x_given_y_weight, "p_x_given_y_weight")
    l2 = check_value("loss.energy_l2", energy_l2, "energy_l2")
    if pxy > 0 and x_fake_y is None:
        raise ValueError("p_x_given_y_weight > 0 needs x_fake_y (samples given y)")
    terms = loss_terms(model, x, x_fake, y, pyx, px if x_fake is not None else 0.0, precision,
                       x_px=x_px, x_fake_y=x_fake_y, p_x_given_y_weight=pxy, energy_l2=l2)
    loss = terms.pop("loss")
    return loss, terms


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


def generative_weights(w: LossConfig) -> tuple[float, float]:
    """``(p_x_weight, p_x_given_y_weight)`` in effect: both 0 with ``--clf-only``."""
    return (0.0, 0.0) if w.clf_only else (w.p_x_weight, w.p_x_given_y_weight)


def fake_batch(cfg: Config, model: nn.Module, sampler: SGLD, buffer: ReplayBuffer, n: int,
               y: torch.Tensor | None) -> torch.Tensor:
    """``Tensor[n, *shape]`` of SGLD samples (given ``y: Tensor[n]`` or None): PCD from the
    buffer, or with ``--sgld-init noise`` a short-run chain from ``buffer.random_init`` (the
    ``--init`` distribution; the buffer's rows are neither read nor written)."""
    if cfg.sampler.sgld_init == "noise":
        return sampler.run(model, buffer.random_init(n, y), y)
    return sampler.sample(model, buffer, n, y)


def _layout(cfg: Config, x: torch.Tensor | None) -> torch.Tensor | None:
    if x is not None and cfg.run.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def gradient_norm(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Device scalar: the global L2 norm of ``model``'s parameter gradients now (0 if none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)


def train_step(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: SGLD,
               buffer: ReplayBuffer, x: torch.Tensor, y: torch.Tensor, n_classes: int,
               x_px: torch.Tensor | None = None, loss_model: nn.Module | None = None) -> StepOutput:
    """One JEM iteration on a labelled batch ``x: Tensor[B, *shape]``, ``y: Tensor[B]``.

    ``loss_model`` (default ``model``) runs the loss forward: under torchrun the
    DistributedDataParallel wrapper, whose backward all-reduces the gradients; SGLD always uses
    the bare ``model``, so its input-gradient passes communicate nothing.

    ``x_px: Tensor[B', *shape]`` is a separate real batch for the p(x) term (semi-supervised
    runs); None uses ``x``. With ``run.channels_last`` 4-D batches are laid out channels-last
    (the model is too). Metrics: those of :func:`loss_terms` plus ``grad_norm`` (global L2 norm
    before the step), both at the current weights (with SAM too). The returned samples are the
    p(x) term's, else the p(x|y) term's.
    """
    b = x.shape[0]
    w = cfg.loss
    px_weight, pxy_weight = generative_weights(w)
    x, x_px = _layout(cfg, x), _layout(cfg, x_px)
    x_fake = x_fake_y = None
    if px_weight > 0:
        n = b if x_px is None else x_px.shape[0]
        y_fake = torch.randint(0, n_classes, (n,), device=x.device) if cfg.sampler.class_cond else None
        x_fake = _layout(cfg, fake_batch(cfg, model, sampler, buffer, n, y_fake))
    if pxy_weight > 0:
        x_fake_y = _layout(cfg, fake_batch(cfg, model, sampler, buffer, b, y))
    net = model if loss_model is None else loss_model
    net.train()
    terms = compiled_loss_terms() if cfg.run.compile else loss_terms
    extra = {} if x_px is None and x_fake_y is None else {
        "x_px": x_px, "x_fake_y": x_fake_y, "p_x_given_y_weight": pxy_weight}
    if w.energy_l2 > 0 and x_fake is not None:
        extra["energy_l2"] = w.energy_l2

    def gradient() -> dict[str, torch.Tensor]:
        out = terms(net, x, x_fake, y, w.p_y_given_x_weight, px_weight, cfg.run.precision, **extra)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        return out

    metrics = gradient()
    metrics["grad_norm"] = gradient_norm(model, x.device)
    if cfg.optim.sam_rho > 0:
        with sam.perturbed(model, cfg.optim.sam_rho, cfg.optim.sam_adaptive):
            gradient()  # the step's gradient: at the perturbed weights, same batch
    optimizer.step()
    return StepOutput({k: v.detach() for k, v in metrics.items()}, x_fake if x_fake is not None else x_fake_y)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 500, precision: str = "fp32") -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on ``split``, in eval mode (mode restored)."""
    correct = torch.zeros((), dtype=torch.int64, device=split.x.device)
    with eval_mode(model):
        for x, y in split.batches(batch_size):
            with autocast(x.device, precision_dtype(precision)):
                correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(1, len(split))

"""Adversarial robustness of the JEM classifier with SGLD refinement (paper section 5.4).

Defended classifier (the paper's): seed a chain at the input, run K steps of SGLD on the
unconditional energy E(x) = -logsumexp_y f(x)[y] with the checkpoint's step size alpha and
noise sigma,  x <- x - alpha * dE/dx + sigma * N(0, I),  then classify f(x_K). K = 0 is the
plain classifier.

White-box attack *through* the refinement: PGD differentiates the whole defended function,
including every SGLD step (each input gradient is taken with ``create_graph=True``, so the
attack gradient contains the second-order terms of the chain). The SGLD noise is resampled on
every call of the defended classifier (it is part of the defence); the attack gradient at each
PGD step is the mean over ``eot`` noise draws (expectation over transformation; ``eot=1``
default, i.e. a fresh draw each PGD step). Only input gradients are ever taken
(``torch.autograd.grad(..., inputs=...)``): parameters' ``.grad`` are never written.

PGD (own batched implementation): ``restarts`` runs, each from a uniformly random point of the
eps-ball, ``steps`` steps of size ``step_rel * eps`` (Linf: signed gradient; L2: normalised
gradient), projection onto the eps-ball and onto the data range [-1, 1] after every step.
Untargeted, maximising cross-entropy. An example counts as robust only if the defended
classifier is correct at every PGD iterate of every restart and on a final fresh evaluation.
eps is in data units: images live in [-1, 1], so eps = 2 * (pixel eps on the 0-1 scale), and
8/255 on the usual 0-1 scale is 16/255 = 0.063 here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sgld.reference import sgld_chain
from ..sgld.spec import ChainSpec
from .common import eval_mode, progress
from .figures import plt, save

NORMS = ("linf", "l2")


def refine(model: nn.Module, x: torch.Tensor, n_steps: int, step_size: float, noise_std: float,
           differentiable: bool) -> torch.Tensor:
    """K SGLD steps on E(x) seeded at ``x`` (the package's one loop, :func:`sgld_chain`).
    ``differentiable=True`` keeps the graph of every step (for attacking through the chain);
    otherwise the result is detached."""
    spec = ChainSpec(n_steps, step_size, noise_std)
    return sgld_chain(model, x if differentiable else x.detach(), None, spec, differentiable=differentiable)


def defended_logits(model: nn.Module, x: torch.Tensor, refine_steps: int, step_size: float,
                    noise_std: float, differentiable: bool) -> torch.Tensor:
    with torch.enable_grad():
        x_ref = refine(model, x, refine_steps, step_size, noise_std, differentiable)
    if differentiable:
        return model(x_ref).float()
    with torch.no_grad():
        return model(x_ref).float()


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _project(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, _view(eps, delta)), -_view(eps, delta))
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _view(torch.clamp(eps / n, max=1.0), delta)
    return (x + delta).clamp(-1, 1) - x


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * _view(eps, x)
    else:
        d = x[0].numel()
        u = torch.randn_like(x)
        u = u / _view(u.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        r = torch.rand(x.shape[0], device=x.device) ** (1.0 / d)
        delta = u * _view(eps * r, x)
    return _project(delta, x, eps, norm)


def pgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str,
               steps: int, step_rel: float, restarts: int, refine_steps: int, step_size: float,
               noise_std: float, eot: int = 1) -> torch.Tensor:
    """``Tensor[B] bool``: which rows stay correctly classified by the defended classifier
    under PGD within ``eps: Tensor[B]`` (per row) in ``norm``. A row is dropped from the attack
    as soon as one iterate is misclassified (it is broken; attacking it further changes nothing)."""
    with eval_mode(model):
        robust = defended_logits(model, x, refine_steps, step_size, noise_std, False).argmax(1) == y
        attack = eps > 0
        for _ in range(restarts):
            idx = (robust & attack).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xi, yi, ei = x[idx], y[idx], eps[idx]
            delta = _random_start(xi, ei, norm)
            ok = torch.ones(len(idx), dtype=torch.bool, device=x.device)
            active = torch.arange(len(idx), device=x.device)
            for _ in range(steps):
                xa, ya, ea = xi[active], yi[active], ei[active]
                da = delta[active].detach().requires_grad_(True)
                grad = torch.zeros_like(xa)
                wrong = torch.zeros(len(active), dtype=torch.bool, device=x.device)
                for _ in range(eot):
                    with torch.enable_grad():
                        logits = defended_logits(model, xa + da, refine_steps, step_size, noise_std, True)
                        loss = F.cross_entropy(logits, ya, reduction="sum")
                        grad = grad + torch.autograd.grad(loss, da)[0]
                    wrong |= logits.detach().argmax(1) != ya
                with torch.no_grad():
                    if norm == "linf":
                        step = grad.sign()
                    else:
                        step = grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                    delta[active] = _project(da.detach() + _view(ea * step_rel, xa) * step, xa, ea, norm)
                ok[active[wrong]] = False
                active = active[~wrong]
                if len(active) == 0:
                    break
            if len(active) > 0:
                final = defended_logits(model, xi[active] + delta[active], refine_steps, step_size,
                                        noise_std, False)
                ok[active] &= final.argmax(1) == yi[active]
            robust[idx] = ok
    return robust


def robustness_part(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: dict[str, list[float]],
                    refine_steps: list[int], steps: int, step_rel: float, restarts: int, eot: int,
                    step_size: float, noise_std: float, batch_size: int, dataset: str, out_dir: Path,
                    show: bool) -> dict[str, Any]:
    """Accuracy of the defended classifier for every (norm, eps, K) on ``x: Tensor[N, ...]``."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    n = x.shape[0]
    # every (example, eps) pair is one row; rows are attacked in chunks of batch_size
    rows = {norm: (x.repeat(len(e), *([1] * (x.dim() - 1))), y.repeat(len(e)),
                   torch.tensor(e, device=x.device, dtype=x.dtype).repeat_interleave(n))
            for norm, e in eps.items() if e}
    jobs = [(norm, k, i) for norm in rows for k in refine_steps for i in range(0, len(rows[norm][1]), batch_size)]
    ok: dict[tuple[str, int], list[torch.Tensor]] = {}
    for norm, k, i in progress(jobs, "robustness (PGD chunks)", show, total=len(jobs)):
        xs, ys, es = rows[norm]
        ok.setdefault((norm, k), []).append(
            pgd_robust(model, xs[i:i + batch_size], ys[i:i + batch_size], es[i:i + batch_size], norm,
                       steps, step_rel, restarts, k, step_size, noise_std, eot))
    for (norm, k), parts in ok.items():
        acc = torch.cat(parts).view(len(eps[norm]), n).float().mean(1).tolist()
        for e, a in zip(eps[norm], acc):
            results.setdefault(norm, {}).setdefault(f"{e:g}", {})[str(k)] = a
    fig = plot(results, refine_steps, dataset, out_dir / "robustness.png") if results else None
    return {"n": n, "accuracy": results, "refine_steps": refine_steps, "pgd_steps": steps,
            "pgd_restarts": restarts, "step_rel": step_rel, "eot": eot,
            "sgld_step_size": step_size, "sgld_noise": noise_std, "figure": fig,
            "eps_units": "data units; images in [-1, 1]"}


def plot(results: dict[str, dict[str, dict[str, float]]], refine_steps: list[int], dataset: str,
         path: Path) -> str:
    pyplot = plt()
    norms = [n for n in NORMS if n in results]
    fig, axes = pyplot.subplots(1, len(norms), figsize=(5.0 * len(norms), 3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        eps_keys = sorted(results[norm], key=float)
        for k in refine_steps:
            acc = [100 * results[norm][e][str(k)] for e in eps_keys]
            ax.plot([float(e) for e in eps_keys], acc, marker="o",
                    label=f"{k} SGLD refinement step{'s' if k != 1 else ''}")
        ax.set_title(f"PGD {'L-inf' if norm == 'linf' else 'L2'} ({dataset}, data in [-1, 1])", fontsize=10)
        ax.set_xlabel("epsilon")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)

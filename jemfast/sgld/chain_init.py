"""Distributions that fresh SGLD chains start from (``--init``).

- ``uniform``: U(-1, 1), the JEM paper's (built into :class:`jemfast.buffer.ReplayBuffer`).
- ``informative``: JEM++'s per-class Gaussian. For every class c the mean mu_c and covariance
  S_c of the training images of that class (flattened to D values) are fitted once; a fresh
  chain of class c is ``clamp(mu_c + L_c z, -1, 1)`` with ``z ~ N(0, I_D)`` and ``L_c L_c^T = S_c``;
  without a label the class is drawn uniformly.

An init function is a callable ``(n, y_or_None) -> Tensor[n, *shape]`` on the data's device.
The factors take ``n_classes * D * R`` floats of memory, R = min(D, the largest class's image
count) (10 x 3072^2 x 4 bytes = 377 MiB for CIFAR-10; 15 MiB for digits32's 3072 pixels and
~130 images per class).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..data import Split

InitFn = Callable[[int, "torch.Tensor | None"], torch.Tensor]


class ClassGaussians:
    """Per-class Gaussians fitted to ``split`` (an :data:`InitFn`).

    ``mean: Tensor[C, D]`` and ``scale: Tensor[C, D, R]`` (``scale[c] @ scale[c].T`` is class c's
    covariance, the biased estimate over its images; R = min(D, largest class size)) live on the
    split's device.
    """

    def __init__(self, split: Split, n_classes: int) -> None:
        x = split.x.reshape(len(split), -1).double()
        self.shape = tuple(split.x.shape[1:])
        self.n_classes = n_classes
        counts = [int((split.y == c).sum()) for c in range(n_classes)]
        if min(counts) == 0:
            raise ValueError(f"--init informative: class {counts.index(0)} has no training images")
        rank = min(x.shape[1], max(counts))
        means, scales = [], []
        for c in range(n_classes):
            xc = x[split.y == c]
            mu = xc.mean(0)
            # The thin SVD of the centred images d = U S V^T gives cov = d^T d / n = (V S/sqrt(n))(...)^T:
            # an exact factor, also of the singular covariances of pixels that never vary (digits'
            # borders), at the cost of an n x D decomposition instead of D x D (seconds, not minutes,
            # for 3072 pixels and ~130 images).
            _, sv, vh = torch.linalg.svd(xc - mu, full_matrices=False)
            factor = vh.T * (sv / xc.shape[0] ** 0.5)
            means.append(mu)
            scales.append(torch.nn.functional.pad(factor, (0, rank - factor.shape[1])))
        self.mean = torch.stack(means).float()
        self.scale = torch.stack(scales).float()

    def __call__(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[n, *shape]`` in [-1, 1]: :meth:`draw` clamped to the pixel range."""
        return self.draw(n, y).clamp_(-1.0, 1.0)

    def draw(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``Tensor[n, *shape]`` of Gaussian samples of class ``y[i]`` (uniform classes when
        ``y`` is None), unclamped."""
        device = self.mean.device
        if y is None:
            y = torch.randint(0, self.n_classes, (n,), device=device)
        y = y.to(device)
        z = torch.randn(n, self.scale.shape[2], device=device)
        # Every class's factor applied to every z, then each row's own class picked: no host
        # sync for grouping rows by class (n_classes x more flops, small next to SGLD).
        xs = torch.einsum("cij,nj->cni", self.scale, z)
        x = self.mean[y] + xs[y, torch.arange(n, device=device)]
        return x.view(n, *self.shape)


def make_init_fn(name: str, split: Split, n_classes: int) -> InitFn | None:
    """The init function of ``--init name`` fitted on ``split``; None for ``uniform`` (the
    buffer's built-in U(-1, 1))."""
    if name == "uniform":
        return None
    if name == "informative":
        return ClassGaussians(split, n_classes)
    raise ValueError(f"--init: unknown distribution {name!r} (uniform, informative)")

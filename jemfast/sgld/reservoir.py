"""A bounded, uniform sample of the labelled images a training loop has seen, per class.

:class:`jemfast.Guard` has no dataset of its own: the loop hands it the labelled batches it
already draws, and the informative init (:mod:`.chain_init`) is fitted from this sample when a
restart calls for it. Each class keeps at most ``per_class`` images, a uniform sample of all the
images of that class seen so far (reservoir sampling, Vitter's Algorithm R, run per class and
vectorised over a batch on the device: no host sync per batch).

Memory: ``n_classes * (per_class + 1) * D * 4`` bytes on the device, D the pixels of an image
(one spare row per class takes the rejected images' writes): 10 classes x 501 x 3,072 pixels =
61.6 MB for CIFAR-10 at the default 500 per class; the Gaussians fitted from it take about as
much again (``n_classes * D * min(D, per_class)`` floats).
"""
from __future__ import annotations

from typing import Any

import torch

from ..data import Split


class ClassReservoir:
    """Per-class reservoir of ``per_class`` images (``Tensor[C, per_class + 1, D]`` float32 on
    ``device``, allocated at the first :meth:`add`); ``seen: Tensor[C]`` counts the images of each
    class offered so far. Its random numbers come from its own generator (seeded with ``seed``),
    so keeping it changes no other random stream of the run."""

    def __init__(self, n_classes: int, per_class: int, device: torch.device | str, seed: int) -> None:
        if n_classes < 1 or per_class < 2:
            raise ValueError(f"a class reservoir needs >= 1 class and >= 2 images per class, "
                             f"got {n_classes} and {per_class}")
        self.n_classes, self.per_class, self.device = int(n_classes), int(per_class), torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.shape: tuple[int, ...] | None = None
        self.images: torch.Tensor | None = None
        self.seen = torch.zeros(self.n_classes, dtype=torch.int64, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes its images take (0 before the first batch)."""
        return 0 if self.images is None else self.images.numel() * self.images.element_size()

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer a batch ``x: Tensor[B, *shape]`` with labels ``y: Tensor[B]`` in [0, n_classes).

        The i-th image of class c ever offered (0-based) takes slot i while i < per_class, else
        replaces a uniformly chosen slot with probability per_class / (i + 1). Two images of one
        batch drawing the same slot: the later one stays (as if offered one by one).
        """
        shape = tuple(x.shape[1:])
        x = x.detach().to(self.device, torch.float32).reshape(x.shape[0], -1)
        y = y.detach().to(self.device, torch.int64).reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"the reservoir got {x.shape[0]} images and {y.shape[0]} labels")
        if self.images is None:
            self.shape = shape
            self.images = torch.zeros(self.n_classes, self.per_class + 1, x.shape[1], device=self.device)
        if x.shape[1] != self.images.shape[2]:
            raise ValueError(f"the reservoir holds images of {self.images.shape[2]} values, got {x.shape[1]}")
        k, b = self.per_class, x.shape[0]
        # not F.one_hot: its range check reads the labels on the host
        one_hot = (y[:, None] == torch.arange(self.n_classes, device=self.device)).long()
        rank = (one_hot.cumsum(0) - one_hot).gather(1, y[:, None]).squeeze(1)  # same class earlier in the batch
        index = self.seen[y] + rank  # this image's 0-based position in its class's stream
        draw = (torch.rand(b, generator=self.generator, device=self.device, dtype=torch.float64)
                * (index + 1)).long()  # uniform on 0..index
        slot = torch.where(index < k, index, torch.where(draw < k, draw, torch.full_like(draw, k)))
        # Of the images of one batch writing one (class, slot), only the last may write.
        key = y * (k + 1) + slot
        order = torch.arange(b, device=self.device)
        last = torch.full((self.n_classes * (k + 1),), -1, dtype=torch.int64, device=self.device)
        last.scatter_reduce_(0, key, order, reduce="amax")
        keep = (last[key] == order) & (slot < k)
        spare = y * (k + 1) + k  # the others write their class's spare row
        self.images.view(-1, x.shape[1]).index_copy_(0, torch.where(keep, key, spare), x)
        self.seen += one_hot.sum(0)

    def split(self, shape: tuple[int, ...] | None = None) -> Split:
        """The images kept, ``Split(x: Tensor[M, *shape], y: Tensor[M])`` on the device (``shape``:
        the images' shape, default as first offered). One host sync."""
        if self.images is None:
            raise ValueError("the reservoir is empty: no labelled batch was offered")
        shape = shape or self.shape
        counts = self.seen.clamp(max=self.per_class).tolist()
        x = torch.cat([self.images[c, :n] for c, n in enumerate(counts)])
        y = torch.cat([torch.full((n,), c, dtype=torch.int64, device=self.device) for c, n in enumerate(counts)])
        return Split(x.view(x.shape[0], *shape), y)

    def min_count(self) -> int:
        """The fewest images any class has in the reservoir (one host sync)."""
        return int(self.seen.clamp(max=self.per_class).min())

    def state_dict(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "per_class": self.per_class, "shape": self.shape,
                "images": self.images, "seen": self.seen, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (int(state["n_classes"]), int(state["per_class"])) != (self.n_classes, self.per_class):
            raise ValueError(f"the saved reservoir has {state['n_classes']} classes x {state['per_class']} images, "
                             f"this one {self.n_classes} x {self.per_class}")
        images = state["images"]
        self.shape = None if state["shape"] is None else tuple(int(s) for s in state["shape"])
        self.images = None if images is None else images.to(self.device, torch.float32).clone()
        self.seen = state["seen"].to(self.device, torch.int64).clone()
        self.generator.set_state(state["generator"].cpu())

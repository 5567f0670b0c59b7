"""Datasets, held whole on the training device as float tensors in [-1, 1].

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 1x8x8), fixed stratified
  train/valid/test split of 1,257 / 180 / 360.
- ``digits32``: the same images and split, upscaled to 32x32 (``--upscale``: bilinear by
  default, nearest or bicubic) and repeated to three channels (3x32x32, CIFAR's shape): the
  paper's architectures on embedded data, no download. With ``--augment true`` (its preset says
  false) its batches are flipped and cropped as CIFAR's are.
- ``toy2d``: a labelled mixture of 8 Gaussians on a circle of radius 0.6 (std 0.08), 2-D points.
- ``cifar10``, ``cifar100``, ``svhn``: torchvision, downloaded into ``data_dir``; the last
  ``n_valid`` images of a fixed permutation of the train split are the validation set.

Training batches go through :meth:`DataBundle.prepare_train`: augmentation (reflect-pad 4 +
random 32x32 crop, horizontal flip except SVHN), batched on the device, then the paper's
N(0, noise_std) noise (noise_std 0.03 in units of the [-1, 1] pixel scale).

Semi-supervised runs (``--labels-per-class N``) keep a labelled subset of the training split
(:attr:`DataBundle.labelled`: N images per class, a fixed stratified choice that depends on no
run seed); its batches come from :meth:`Split.cycled_batch`, while the whole training split,
labels unused, feeds the p(x) term and sets the epoch length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .options.config import DataConfig
from .process.errors import UserError

TOY_MODES = 8
TOY_RADIUS = 0.6
TOY_STD = 0.08


@dataclass
class Split:
    """``x: Tensor[N, *shape]`` float32 in [-1, 1] and ``y: Tensor[N]`` int64, on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def n_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, order_seed: int | None = None, start: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches from batch ``start`` on.

        ``order_seed`` shuffles with a permutation that depends only on that seed (so a resumed
        epoch replays the same order); ``None`` keeps the stored order.
        """
        n = len(self)
        if order_seed is None:
            order = torch.arange(n, device=self.x.device)
        else:
            gen = torch.Generator().manual_seed(order_seed)
            order = torch.randperm(n, generator=gen).to(self.x.device)
        for b in range(start, self.n_batches(batch_size, drop_last)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield self.x[idx], self.y[idx]

    def cycled_batch(self, batch_size: int, order_seed: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` (0-based) of an endless stream of reshuffles of this split: shuffle k of
        the stream is the permutation of seed ``(order_seed, k)``, so a batch depends only on
        ``order_seed`` and ``b`` (a resumed epoch replays it). ``batch_size`` may exceed ``len(self)``."""
        n = len(self)
        start, stop = b * batch_size, (b + 1) * batch_size
        first = start // n
        perms = [torch.randperm(n, generator=torch.Generator().manual_seed((order_seed * 1_000_003 + k) % 2**63))
                 for k in range(first, (stop - 1) // n + 1)]
        idx = torch.cat(perms)[start - first * n:stop - first * n].to(self.x.device)
        return self.x[idx], self.y[idx]


@dataclass
class DataBundle:
    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    train: Split
    valid: Split
    test: Split
    augment_flip: bool = False
    augment_crop: bool = False
    noise_std: float = 0.0
    labelled: Split | None = None  # semi-supervised: the labelled subset of ``train`` (None: all)
    labelled_idx: torch.Tensor | None = None  # its rows in ``train``, Tensor[n_classes * N] int64

    @property
    def augments(self) -> bool:
        """Whether :meth:`prepare_train` flips or crops."""
        return self.augment_flip or self.augment_crop

    def prepare_train(self, x: torch.Tensor, augment: bool = True) -> torch.Tensor:
        """A training batch ``x: Tensor[B, *shape]`` augmented (unless ``augment`` is False) and
        with N(0, noise_std) added."""
        if augment:
            x = self.augment(x)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random reflect-pad-4 crop and horizontal flip of ``x: Tensor[B, C, H, W]`` on its device."""
        if self.augment_crop:
            x = random_crop(x, pad=4)
        if self.augment_flip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return x


def labelled_rows(y: torch.Tensor, per_class: int, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Sorted ``Tensor[n_classes * per_class] int64`` of rows of ``y``: ``per_class`` of each
    class, drawn at random with a generator seeded by ``seed``. Raises UserError when a class
    has fewer images."""
    gen = torch.Generator().manual_seed(seed)
    y = y.cpu()
    chosen = []
    for c in range(n_classes):
        rows = (y == c).nonzero().squeeze(1)
        if len(rows) < per_class:
            raise UserError(f"--labels-per-class {per_class}: class {c} has only {len(rows)} training images")
        chosen.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random crop of ``x: Tensor[B, C, H, W]`` after reflect padding by ``pad``."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)


def _split(x: np.ndarray, y: np.ndarray, idx: np.ndarray, device: torch.device) -> Split:
    return Split(torch.as_tensor(x[idx], dtype=torch.float32, device=device),
                 torch.as_tensor(y[idx], dtype=torch.int64, device=device))


def load_digits_bundle(device: torch.device, side: int = 8, upscale: str = "bilinear",
                       augment: bool = False) -> DataBundle:
    """The digits split; ``side`` > 8 resizes to 3 x side x side (``digits32``) by ``upscale``
    (a mode of ``torch.nn.functional.interpolate``) and then flips and crops batches when
    ``augment``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # [1797, 1, 8, 8]
    if side != 8:
        corners = {} if upscale == "nearest" else {"align_corners": False}
        big = torch.nn.functional.interpolate(torch.from_numpy(x), size=(side, side), mode=upscale, **corners)
        x = big.clamp(-1, 1).expand(-1, 3, -1, -1).numpy()  # [1797, 3, side, side]
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=360, stratify=y, random_state=0)
    train, valid = train_test_split(rest, test_size=180, stratify=y[rest], random_state=0)
    name = "digits" if side == 8 else f"digits{side}"
    augment = augment and side != 8
    return DataBundle(name, tuple(x.shape[1:]), 10, _split(x, y, train, device),
                      _split(x, y, valid, device), _split(x, y, test, device), augment_flip=augment, augment_crop=augment)


def toy2d_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of the 8-Gaussian mixture, ``(x: [n, 2] float32, y: [n] int64)``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, TOY_MODES, n)
    angle = 2 * np.pi * y / TOY_MODES
    centers = TOY_RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1)
    x = centers + TOY_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32), y.astype(np.int64)


def load_toy2d_bundle(device: torch.device) -> DataBundle:
    splits = []
    for n, seed in ((4000, 0), (1000, 1), (1000, 2)):
        x, y = toy2d_points(n, seed)
        splits.append(_split(x, y, np.arange(n), device))
    return DataBundle("toy2d", (2,), TOY_MODES, *splits)


def uint8_to_unit_range(a: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return a.astype(np.float32) / 255.0 * 2.0 - 1.0


class DatasetUnavailable(UserError):
    """A torchvision dataset is neither in ``data_dir`` nor downloadable; ``reason`` says why."""

    def __init__(self, name: str, data_dir: str, reason: str) -> None:
        super().__init__(f"could not load {name} into --data-dir {data_dir} ({reason}); "
                         f"download it there by hand or try --dataset digits")
        self.reason = reason


def _torchvision_dataset(name: str, data_dir: str, train: bool):
    """The torchvision dataset object, read from ``data_dir``; downloaded only when it is not
    there (or fails torchvision's checksum)."""
    import torchvision

    if name == "svhn":
        cls, kwargs = torchvision.datasets.SVHN, {"split": "train" if train else "test"}
    else:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        kwargs = {"train": train}
    try:
        return cls(data_dir, download=False, **kwargs)
    except RuntimeError:  # "Dataset not found or corrupted"
        return cls(data_dir, download=True, **kwargs)


def torchvision_arrays(name: str, data_dir: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(x: [N, 3, 32, 32] uint8, y: [N] int64)`` of a torchvision split (SVHN's label 10 is
    already 0 there). Raises :class:`DatasetUnavailable`."""
    try:
        ds = _torchvision_dataset(name, data_dir, train)
    except Exception as exc:  # network errors, corrupt archives, read-only dirs
        raise DatasetUnavailable(name, data_dir, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if name == "svhn":
        return ds.data, np.asarray(ds.labels, dtype=np.int64)  # data: [N, 3, 32, 32]
    return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)  # HWC -> CHW


def load_torchvision_bundle(cfg: DataConfig, device: torch.device) -> DataBundle:
    x_tr, y_tr = torchvision_arrays(cfg.dataset, cfg.data_dir, train=True)
    x_te, y_te = torchvision_arrays(cfg.dataset, cfg.data_dir, train=False)
    x_tr, x_te = uint8_to_unit_range(x_tr), uint8_to_unit_range(x_te)
    perm = np.random.default_rng(0).permutation(len(y_tr))
    n_valid = min(cfg.n_valid, len(y_tr) - 1)
    train_idx, valid_idx = perm[:len(perm) - n_valid], perm[len(perm) - n_valid:]
    n_classes = 100 if cfg.dataset == "cifar100" else 10
    return DataBundle(cfg.dataset, (3, 32, 32), n_classes, _split(x_tr, y_tr, train_idx, device),
                      _split(x_tr, y_tr, valid_idx, device), _split(x_te, y_te, np.arange(len(y_te)), device),
                      augment_flip=cfg.augment and cfg.dataset != "svhn", augment_crop=cfg.augment)


def load_data(cfg: DataConfig, device: torch.device) -> DataBundle:
    """Load ``cfg.dataset`` onto ``device``. Raises UserError when it cannot be had."""
    if cfg.dataset in ("digits", "digits32"):
        bundle = load_digits_bundle(device, side=32 if cfg.dataset == "digits32" else 8, upscale=cfg.upscale,
                                    augment=cfg.augment)
    elif cfg.dataset == "toy2d":
        bundle = load_toy2d_bundle(device)
    else:
        bundle = load_torchvision_bundle(cfg, device)
    bundle.noise_std = cfg.noise_std
    if cfg.labels_per_class > 0:
        rows = labelled_rows(bundle.train.y, cfg.labels_per_class, bundle.n_classes).to(device)
        bundle.labelled_idx = rows
        bundle.labelled = Split(bundle.train.x[rows], bundle.train.y[rows])
    return bundle

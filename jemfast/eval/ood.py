"""Out-of-distribution detection with the paper's three scores (section 5.3):

- ``log_px``    = log p(x) up to a constant = logsumexp_y f(x)[y] = -E(x)
- ``max_py``    = max_y p(y|x)
- ``neg_grad``  = -|| d log p(x) / dx ||_2  (the "approximate mass" score)

AUROC of the in-distribution test split (positive class) against each OOD set; higher scores
mean "more in-distribution". OOD sets (``--ood``):

- ``noise``: U(-1, 1) pixels; ``constant``: every pixel of an image one value c ~ U(-1, 1)
  (per channel, so RGB images are solid colours); ``interp``: 0.5 * (x_i + x_j) for random
  pairs of in-distribution test images (i != j);
- ``inverted`` (-x), ``rot90``, ``hflip``, ``vflip``: transformed in-distribution test images;
- ``svhn``, ``cifar10``, ``cifar100``, ``celeba``: test splits via torchvision (CelebA center
  cropped to 140 and resized to 32x32). A set that cannot be loaded, or whose images do not
  have the model's input shape, is skipped with one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data import DataBundle
from ..modes import eval_mode
from ..process.log import get_logger
from .common import Skipped, is_image, progress
from .figures import plt, save
from .metrics import auroc

SCORES = ("log_px", "max_py", "neg_grad")
SCORE_LABELS = {"log_px": "log p(x)", "max_py": "max_y p(y|x)", "neg_grad": "-||d log p(x)/dx||"}
SYNTHETIC = ("noise", "constant", "interp")
TRANSFORMS = ("inverted", "rot90", "hflip", "vflip")
DATASETS = ("svhn", "cifar10", "cifar100", "celeba")
OOD_SETS = SYNTHETIC + TRANSFORMS + DATASETS
log = get_logger(__name__)


def default_ood(dataset: str) -> tuple[str, ...]:
    if dataset == "digits":
        return ("noise", "constant", "interp", "inverted", "rot90", "hflip")
    if dataset == "toy2d":
        return ("noise", "interp")
    others = tuple(d for d in ("svhn", "cifar10", "cifar100", "celeba") if d != dataset)
    return others + ("noise", "constant", "interp")


def ood_scores(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
               show: bool = False, desc: str = "scores") -> dict[str, np.ndarray]:
    """The three scores of every row of ``x: Tensor[N, *shape]`` (one forward + one input
    gradient per batch). No parameter ``.grad`` is written; the model's mode is restored."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in SCORES}
    with eval_mode(model), torch.enable_grad():
        starts = range(0, x.shape[0], batch_size)
        for i in progress(starts, desc, show, total=len(starts)):
            xb = x[i:i + batch_size].detach().float().clone().requires_grad_(True)
            logits = model(xb).float()
            log_px = torch.logsumexp(logits, 1)
            (grad,) = torch.autograd.grad(log_px.sum(), xb)
            out["log_px"].append(log_px.detach())
            out["max_py"].append(torch.softmax(logits.detach(), 1).max(1).values)
            out["neg_grad"].append(-grad.flatten(1).norm(dim=1))
    return {k: torch.cat(v).cpu().numpy().astype(np.float64) for k, v in out.items()}


def make_ood_set(name: str, data: DataBundle, n: int, gen: torch.Generator,
                 data_dir: str) -> torch.Tensor:
    """``Tensor[n', *input_shape]`` of OOD inputs on the data's device; raises Skipped."""
    ref = data.test.x
    shape, device = tuple(data.input_shape), ref.device
    if name == "noise":
        return (torch.rand((n, *shape), generator=gen) * 2 - 1).to(device)
    if name == "constant":
        c = torch.rand((n, shape[0]) + (1,) * (len(shape) - 1), generator=gen) * 2 - 1
        return c.expand(n, *shape).contiguous().to(device)
    if name == "interp":
        i = torch.randint(0, len(ref), (n,), generator=gen)
        j = (i + torch.randint(1, len(ref), (n,), generator=gen)) % len(ref)
        return 0.5 * (ref[i.to(device)] + ref[j.to(device)])
    if name in TRANSFORMS:
        if not is_image(shape):
            raise Skipped(f"{name}: needs image inputs, {data.name} has shape {shape}")
        x = ref[:n]
        return {"inverted": lambda: -x, "rot90": lambda: torch.rot90(x, 1, (2, 3)),
                "hflip": lambda: x.flip(3), "vflip": lambda: x.flip(2)}[name]()
    if name in DATASETS:
        if name == data.name:
            raise Skipped(f"{name}: is the in-distribution dataset")
        if shape != (3, 32, 32):
            raise Skipped(f"{name}: 3x32x32 images do not fit this model's input {'x'.join(map(str, shape))}")
        x = _load_dataset(name, data_dir)
        idx = torch.randperm(len(x), generator=gen)[:n]
        return x[idx].to(device)
    raise ValueError(f"--ood: unknown set {name!r}; choose from {', '.join(OOD_SETS)}")


def _load_dataset(name: str, data_dir: str) -> torch.Tensor:
    """Test split of a torchvision dataset as ``Tensor[N, 3, 32, 32]`` in [-1, 1] (CPU)."""
    if name == "celeba":
        return _load_celeba(data_dir)
    from ..data import DatasetUnavailable, torchvision_arrays, uint8_to_unit_range

    try:
        arr, _ = torchvision_arrays(name, data_dir, train=False)
    except DatasetUnavailable as exc:
        raise Skipped(f"{name}: not available ({exc.reason[:100]}); put it in --data-dir {data_dir}") from None
    return torch.from_numpy(uint8_to_unit_range(arr))


def _load_celeba(data_dir: str, limit: int = 10000) -> torch.Tensor:
    try:
        import torchvision
        from torchvision.transforms import functional as TF

        ds = torchvision.datasets.CelebA(data_dir, split="test", download=True)
        imgs = []
        for k in range(min(limit, len(ds))):
            img = TF.resize(TF.center_crop(ds[k][0], 140), [32, 32], antialias=True)
            imgs.append(TF.pil_to_tensor(img))
    except Exception as exc:  # no network / Google Drive quota / corrupt archive
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:100] or type(exc).__name__
        raise Skipped(f"celeba: not available ({reason}); put it in --data-dir {data_dir}") from None
    return torch.stack(imgs).float() / 255.0 * 2 - 1


def ood_part(model: nn.Module, data: DataBundle, sets: tuple[str, ...], n: int, batch_size: int,
             data_dir: str, seed: int, out_dir: Path, show: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    in_scores = ood_scores(model, data.test.x, batch_size, show, f"ood: {data.name} test")
    table: dict[str, dict[str, float]] = {}
    set_scores: dict[str, dict[str, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for name in sets:
        try:
            x = make_ood_set(name, data, n, gen, data_dir)
        except Skipped as exc:
            log.info(f"ood: skipped {exc}")
            skipped[name] = str(exc)
            continue
        s = ood_scores(model, x, batch_size, show, f"ood: {name}")
        set_scores[name] = s
        table[name] = {k: auroc(in_scores[k], s[k]) for k in SCORES}
        table[name]["n"] = int(x.shape[0])
    fig = histograms(in_scores, set_scores, table, data.name, out_dir / "ood_hist.png") if set_scores else None
    return {"in_distribution": f"{data.name} test", "n_in": len(data.test), "auroc": table,
            "skipped_sets": skipped, "figure": fig,
            "score_means": {"in": {k: float(np.mean(v)) for k, v in in_scores.items()},
                            **{name: {k: float(np.mean(v)) for k, v in s.items()}
                               for name, s in set_scores.items()}}}


def _clip_range(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    both = np.concatenate([a, b])
    both = both[np.isfinite(both)]
    if len(both) == 0:
        return -1.0, 1.0
    lo, hi = np.percentile(both, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def histograms(in_scores: dict[str, np.ndarray], set_scores: dict[str, dict[str, np.ndarray]],
               table: dict[str, dict[str, float]], dataset: str, path: Path) -> str:
    """One row per OOD set, one column per score: in-distribution (green) against OOD (red)."""
    pyplot = plt()
    names = list(set_scores)
    fig, axes = pyplot.subplots(len(names), len(SCORES), figsize=(4.0 * len(SCORES), 2.3 * len(names) + 0.6),
                                squeeze=False)
    for r, name in enumerate(names):
        for c, key in enumerate(SCORES):
            ax = axes[r, c]
            lo, hi = _clip_range(in_scores[key], set_scores[name][key])
            bins = np.linspace(lo, hi, 41)
            clip: Callable[[np.ndarray], np.ndarray] = lambda v: np.clip(v[np.isfinite(v)], lo, hi)  # noqa: E731
            ax.hist(clip(in_scores[key]), bins=bins, density=True, alpha=0.55, color="tab:green",
                    label=f"{dataset} test")
            ax.hist(clip(set_scores[name][key]), bins=bins, density=True, alpha=0.55, color="tab:red",
                    label=name)
            ax.set_title(f"{SCORE_LABELS[key]} vs {name}: AUROC {table[name][key]:.3f}", fontsize=9)
            ax.set_yticks([])
            ax.tick_params(axis="x", labelsize=8)
            if c == 0:
                ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("OOD score histograms (values outside the central 99 % are piled at the edges)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, path)

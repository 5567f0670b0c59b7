"""Pictures of what the model generates and believes:

- ``samples_short_run.png``: fresh short-run SGLD chains (``--sample-steps``, default 80) from
  U(-1, 1) noise with the checkpoint's step size and noise, class-conditional (SGLD on
  E(x, y) = -f(x)[y], one row per class) beside unconditional (SGLD on E(x), shown sorted by
  the predicted class);
- ``samples_buffer.png``: the saved replay buffer (per class when it is class-conditional,
  otherwise rows spread over the buffer sorted by predicted class);
- ``likely_real.png``: per class, the test images of that class with the highest and the
  lowest p(y|x).
Per-class pictures show at most the first 20 classes. For non-image data (toy2d) one density + samples plot of the buffer is drawn instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..data import DataBundle
from ..options.config import Config
from .common import is_image, logits_of, make_sampler
from .figures import mosaic_figure


def _rows_by_prediction(model: nn.Module, x: torch.Tensor, n_rows: int) -> list[torch.Tensor]:
    """Split ``x`` into ``n_rows`` rows after sorting by predicted class (then confidence)."""
    probs = torch.softmax(logits_of(model, x), 1)
    conf, pred = probs.max(1)
    order = torch.argsort(pred.double() * 2 - conf.double())
    x = x[order]
    per_row = -(-x.shape[0] // n_rows)
    return [x[i:i + per_row] for i in range(0, x.shape[0], per_row)]


MAX_CLASSES = 20  # per-class pictures show the first 20 classes (CIFAR-100 has 100)


def _class_labels(n_classes: int) -> list[str]:
    return [f"y={c}" for c in range(n_classes)]


def short_run(model: nn.Module, cfg: Config, data: DataBundle, n_steps: int, per_class: int,
              backend: str, device: torch.device, out_dir: Path) -> dict[str, Any]:
    k = min(data.n_classes, MAX_CLASSES)
    sampler = make_sampler(cfg, n_steps, backend, device)
    y = torch.arange(k, device=device).repeat_interleave(per_class)
    x_cond = sampler.run(model, torch.rand((k * per_class, *data.input_shape), device=device) * 2 - 1, y)
    x_unc = sampler.run(model, torch.rand((k * per_class, *data.input_shape), device=device) * 2 - 1)
    acc = float((logits_of(model, x_cond).argmax(1) == y).float().mean().item())
    cond_rows = [x_cond[c * per_class:(c + 1) * per_class] for c in range(k)]
    png = mosaic_figure([
        (f"class-conditional: SGLD on E(x,y)\n(classified as y: {100 * acc:.0f} %)", cond_rows, _class_labels(k)),
        ("unconditional: SGLD on E(x)\n(sorted by predicted class)", _rows_by_prediction(model, x_unc, k), None),
    ], out_dir / "samples_short_run.png",
        suptitle=f"short-run SGLD from U(-1,1): {n_steps} steps, step size {cfg.sampler.step_size:g}, "
                 f"noise {cfg.sampler.noise_std:g}")
    return {"figure": png, "steps": n_steps, "per_class": per_class, "backend": sampler.backend,
            "conditional_classified_as_y": acc}


def buffer_grid(model: nn.Module, buffer: ReplayBuffer, data: DataBundle, per_class: int,
                out_dir: Path) -> dict[str, Any]:
    k = min(data.n_classes, MAX_CLASSES)
    device = buffer.data.device
    if buffer.n_classes:
        share = buffer.per_class
        offs = torch.linspace(0, share - 1, min(per_class, share), device=device).long()
        rows = [buffer.data[c * share + offs] for c in range(k)]
        panel = ("class-conditional buffer (one row per class share)", rows, _class_labels(k))
    else:
        idx = torch.linspace(0, buffer.capacity - 1, min(k * per_class, buffer.capacity), device=device).long()
        panel = ("rows spread over the buffer, sorted by predicted class",
                 _rows_by_prediction(model, buffer.data[idx], k), None)
    png = mosaic_figure([panel], out_dir / "samples_buffer.png",
                        suptitle=f"replay buffer of the checkpoint ({buffer.capacity} chains)")
    return {"figure": png, "capacity": buffer.capacity, "class_conditional": bool(buffer.n_classes)}


def likely_real(model: nn.Module, data: DataBundle, per_class: int, out_dir: Path) -> dict[str, Any]:
    split = data.test
    probs = torch.softmax(logits_of(model, split.x), 1)
    p_true = probs.gather(1, split.y.view(-1, 1)).squeeze(1)
    most, least, extremes = [], [], {}
    for c in range(min(data.n_classes, MAX_CLASSES)):
        idx = (split.y == c).nonzero().squeeze(1)
        if len(idx) == 0:
            most.append(split.x[:0])
            least.append(split.x[:0])
            continue
        order = idx[torch.argsort(p_true[idx], descending=True)]
        m = min(per_class, len(order))
        most.append(split.x[order[:m]])
        least.append(split.x[order.flip(0)[:m]])
        extremes[str(c)] = {"max_p": float(p_true[order[0]]), "min_p": float(p_true[order[-1]])}
    labels = _class_labels(min(data.n_classes, MAX_CLASSES))
    png = mosaic_figure([("most likely: highest p(y|x)", most, labels),
                         ("least likely: lowest p(y|x)", least, labels)],
                        out_dir / "likely_real.png",
                        suptitle=f"{data.name} test images per true class y")
    return {"figure": png, "per_class": per_class, "p_y_given_x": extremes}


def samples_part(model: nn.Module, cfg: Config, buffer: ReplayBuffer, data: DataBundle, n_steps: int,
                 per_class: int, backend: str, device: torch.device, out_dir: Path) -> dict[str, Any]:
    if not is_image(tuple(data.input_shape)):
        from ..outputs.plots import save_toy2d_plot

        save_toy2d_plot(model, buffer.data[:2000], data.train.x[:2000], out_dir / "samples_buffer.png")
        return {"buffer": {"figure": "samples_buffer.png", "capacity": buffer.capacity}}
    return {"short_run": short_run(model, cfg, data, n_steps, per_class, backend, device, out_dir),
            "buffer": buffer_grid(model, buffer, data, per_class, out_dir),
            "likely_real": likely_real(model, data, per_class, out_dir)}

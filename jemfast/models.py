"""Classifiers f(x) -> logits that JEM reinterprets as energy models.

- :class:`WideResNet` — WRN-depth-width as in the JEM paper/original code: pre-activation blocks,
  leaky-ReLU(0.2), no batch norm by default (``norm`` none|batch|group|layer), optional dropout.
  ``layout`` ``jemfast`` (default) downsamples in a block's first conv; ``original`` is the
  original JEM code's ``Wide_ResNet`` to the operation: it downsamples in the second conv (so
  the first runs at full resolution: ~5.9 G multiply-adds for WRN-28-10 at 32x32, not ~5.2 G)
  and its batch norm has momentum 0.9. Same parameter names and shapes either way.
- :class:`SmallCNN` — three 3x3 convs, for 1x8x8 digits and 3x32x32 images alike.
- :class:`MLP` — for 2-D toy data.

All take ``x: Tensor[B, *input_shape]`` in [-1, 1] and return ``Tensor[B, n_classes]``.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .options.config import ModelConfig


def _norm(kind: str, channels: int, layout: str = "jemfast") -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=0.9 if layout == "original" else 0.1)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"model.norm: unknown normalization {kind!r}")


class WideBlock(nn.Module):
    """Pre-activation residual block: norm-lrelu-conv-dropout-norm-lrelu-conv (+ shortcut).
    ``layout`` ``jemfast`` strides the first conv, ``original`` the second (module docstring)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dropout: float,
                 layout: str = "jemfast") -> None:
        super().__init__()
        first, second = (1, stride) if layout == "original" else (stride, 1)
        self.norm1 = _norm(norm, c_in, layout)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=first, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = _norm(norm, c_out, layout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=second, padding=1, bias=True)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True)
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        out = self.conv2(F.leaky_relu(self.norm2(self.dropout(out)), 0.2))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis) as used by JEM. depth = 6n + 4."""

    def __init__(self, in_channels: int, n_classes: int, depth: int = 28, width: int = 10,
                 norm: str = "none", dropout: float = 0.0, layout: str = "jemfast") -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers = []
        c_in = widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(WideBlock(c_in, widths[group + 1], stride if i == 0 else 1, norm, dropout, layout))
                c_in = widths[group + 1]
        self.blocks = nn.Sequential(*layers)
        self.norm = _norm(norm, c_in, layout)
        self.head = nn.Linear(c_in, n_classes)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm(self.blocks(self.stem(x))), 0.2)
        return self.head(h.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """conv(h) -> conv(2h, stride 2) -> conv(4h, stride 2) -> global mean -> linear.

    SiLU activations: a smooth energy gives SGLD gradients without the kinks of ReLU.
    """

    def __init__(self, in_channels: int, n_classes: int, hidden: int = 64) -> None:
        super().__init__()
        h = hidden
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, h, 3, padding=1), nn.SiLU(),
            nn.Conv2d(h, 2 * h, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * h, 4 * h, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(4 * h, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Three hidden SiLU layers of width ``hidden``: ``Tensor[B, d] -> Tensor[B, n_classes]``."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_classifier(cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Build the classifier named by ``cfg.name`` for inputs of ``input_shape`` (no batch dim)."""
    if cfg.name == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"model: mlp needs flat inputs, the dataset gives {input_shape}; use --model cnn or wrn")
        return MLP(input_shape[0], n_classes, cfg.hidden)
    if len(input_shape) != 3:
        raise ValueError(f"model: {cfg.name} needs image inputs (C, H, W), the dataset gives {input_shape}; use --model mlp")
    if cfg.name == "cnn":
        return SmallCNN(input_shape[0], n_classes, cfg.hidden)
    if cfg.name == "wrn":
        return WideResNet(input_shape[0], n_classes, cfg.depth, cfg.width, cfg.norm, cfg.dropout, cfg.wrn_layout)
    raise ValueError(f"model: unknown model {cfg.name!r}")

"""Sample quality of digits without downloads: a Frechet distance and an inception-style score in
the features of a small classifier of the bundled digits ("digits FID", "digits IS").

The Inception network of the standard FID has never seen 8x8 digits, and its weights are a
download; this network is trained on the digits themselves, deterministically, in a few seconds
(:func:`digits_net`: fixed seed, fixed full-batch schedule), so every machine scores alike
without a file. Images of any digits shape (1x8x8, or 3x32x32 as ``digits32``) are brought to
1x8x8 (channel mean, area pooling) and read by :class:`DigitsNet`: its 64-d penultimate layer for
the Frechet distance, its 10 logits for the score. The metrics themselves are torch-fidelity's,
through its custom feature-extractor interface (:class:`DigitsFeatureExtractor`, registered as
``jemfast-digits``): FID from the two feature sets' Gaussians, IS = exp(E KL(p(y|x) || p(y)))
over 10 splits. Numbers are comparable between runs of jemfast, not with published FIDs.

Measured: real test digits against the training digits score best, and noise, blurred digits
and one class's digits worse (tests/test_digits_fidelity.py).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EXTRACTOR = "jemfast-digits"
FEATURES = ("features", "logits")
TRAIN_SEED, TRAIN_STEPS, TRAIN_LR = 0, 100, 1e-2


class DigitsNet(nn.Module):
    """A small CNN on ``Tensor[B, 1, 8, 8]`` in [-1, 1]: ``forward -> (features [B, 64], logits [B, 10])``."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                   nn.Flatten())
        self.hidden = nn.Linear(32 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.hidden(self.convs(x)))
        return h, self.out(h)


def to_digits8(x: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, C, H, W]`` (uint8 in [0, 255] or float in [-1, 1]) -> ``Tensor[B, 1, 8, 8]`` float in
    [-1, 1]: channels averaged, area-pooled to 8x8 (the inverse of digits32's upscaling, up to blur)."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    x = x.float().mean(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.adaptive_avg_pool2d(x, (8, 8))
    return x


@lru_cache(maxsize=1)
def digits_net() -> DigitsNet:
    """The feature network, trained on jemfast's digits training split (1,257 images): Adam,
    :data:`TRAIN_STEPS` full-batch steps from seed :data:`TRAIN_SEED`, on the CPU (5-15 s on 2
    cores; 96.7 % test accuracy). Cached
    per process; returned in eval mode, without gradients."""
    from ..data import load_digits_bundle

    train = load_digits_bundle(torch.device("cpu")).train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        net = DigitsNet()
        opt = torch.optim.Adam(net.parameters(), lr=TRAIN_LR)
        for _ in range(TRAIN_STEPS):
            loss = F.cross_entropy(net(train.x)[1], train.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


try:
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
except ImportError:  # pragma: no cover - torch-fidelity is a dependency
    FeatureExtractorBase, register_feature_extractor = nn.Module, None


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's interface to :func:`digits_net`: features ``features`` (FID) and ``logits`` (IS)."""

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        self.net = digits_net()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits = self.net.to(x.device)(to_digits8(x))
        by_name = {"features": features, "logits": logits}
        return tuple(by_name[name] for name in self.features_list)


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.detach().float().cpu()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def digits_fidelity(fake: torch.Tensor, real: torch.Tensor, splits: int = 10) -> dict[str, float]:
    """``{"digits_fid", "digits_is", "digits_is_std"}`` of images ``fake: Tensor[N, C, H, W]`` in
    [-1, 1] against ``real`` (the reference set, e.g. the training digits), with torch-fidelity."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, DigitsFeatureExtractor)
    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(fake), input2=_Images(real), fid=True, isc=True, feature_extractor=EXTRACTOR,
        feature_layer_fid="features", feature_layer_isc="logits", isc_splits=splits, cuda=False,
        cache=False, save_cpu_ram=True, verbose=False, batch_size=500)
    return {"digits_fid": float(metrics["frechet_inception_distance"]),
            "digits_is": float(metrics["inception_score_mean"]),
            "digits_is_std": float(metrics["inception_score_std"])}

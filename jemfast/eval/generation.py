"""Inception Score and Frechet Inception Distance of the model's samples, with the standard
FID Inception network, so the numbers are comparable with published ones (the paper's IS 8.76,
FID 38.4 on CIFAR-10).

Network and maths are torch-fidelity's: ``FeatureExtractorInceptionV3`` is the TF-Inception
graph of the original IS/FID code ported to PyTorch (with the TF 1.x bilinear resize to
299x299), the same network torchmetrics uses. Features: the 2048-d pool3 vector for FID and the
1008-way logits without the fc bias for IS (as the original IS code). IS and FID come from
``isc_features_to_metric`` (10 splits after torch-fidelity's fixed shuffle) and
``fid_statistics_to_metric``.

Weights (``weights-inception-2015-12-05-6726825d.pth``, the TF weights in torch-fidelity's
layout, ~95 MB) load from ``--inception-weights PATH`` or from the torch hub cache where
torch-fidelity puts them; nothing is downloaded. The file is read with ``weights_only=True``
first, so a file holding pickled code is refused before the library reads it.

Images in [-1, 1] become uint8 RGB as when saved to PNG (1-channel images repeated to 3). For
8x8 digits IS/FID are not meaningful (an ImageNet network sees 37x upscaled blobs); they are
still computed when weights are given, marked as such.

Samples scored (paper appendix B): the checkpoint's replay buffer ("unconditional"), and its
top 10 % by max_y p(y|x) ("conditional"); or fresh short-run chains (``--gen-source
short-run``, the SGLD backend of ``--backend``). FID reference: the training split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..process.errors import UserError
from .common import Skipped, logits_of, progress

# extractor(x: Tensor[B, C, H, W] in [-1, 1]) -> (features: Tensor[B, D], logits: Tensor[B, K])
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = ["2048", "logits_unbiased"]  # torch-fidelity's names: FID features, IS logits


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, 3, H, W]`` rounded as a PNG writer does."""
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians (float64);
    rounding can take it a hair below 0, clipped to 0."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def as64(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    out = fid_statistics_to_metric({"mu": as64(mu1), "sigma": as64(s1)},
                                   {"mu": as64(mu2), "sigma": as64(s2)}, verbose=False)
    return max(float(out[KEY_METRIC_FID]), 0.0)


def fid_from_features(f1: np.ndarray | torch.Tensor, f2: np.ndarray | torch.Tensor) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (each N >= 2)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = []
    for f in (f1, f2):
        t = torch.as_tensor(np.asarray(f), dtype=torch.float64)
        if t.ndim != 2 or t.shape[0] < 2:
            raise ValueError("FID needs at least 2 feature vectors")
        stats.append(fid_features_to_statistics(t))
    return frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` parts of IS = exp(E_x KL(p(y|x) || p(y))) of ``logits: [N, K]``
    (Salimans et al., 2016); the rows are shuffled with torch-fidelity's fixed seed first."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    out = isc_features_to_metric(t, splits=max(1, min(splits, t.shape[0])))
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def extract(extractor: Extractor, x: torch.Tensor, batch_size: int, show: bool,
            desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(features ``[N, D]``, logits ``[N, K]``) of ``x`` in float64 on the CPU."""
    feats, logits = [], []
    with torch.no_grad():
        starts = range(0, x.shape[0], batch_size)
        for i in progress(starts, desc, show, total=len(starts)):
            f, lg = extractor(x[i:i + batch_size])
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def find_inception_weights(path: str | None) -> Path:
    """The weights file to use, or Skipped saying where to put one."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--inception-weights {path} does not exist")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise Skipped(f"generation: no FID Inception weights; put {INCEPTION_FILE} (torch-fidelity's) in "
                  f"{cached.parent} or give --inception-weights PATH; IS/FID skipped")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.startswith(("Missing key", "Unexpected key", "size mismatch"))]
    return ((useful or lines or [type(exc).__name__])[0])[:120]


def inception_extractor(weights: Path, device: torch.device) -> Extractor:
    """The FID Inception network with ``weights`` on ``device`` as an :data:`Extractor`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        torch.load(weights, map_location="cpu", weights_only=True)
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                          feature_extractor_weights_path=str(weights))
    except Exception as exc:  # wrong file, corrupt file, pickled objects, another network's layout
        raise UserError(f"inception weights {weights} could not be loaded as the FID Inception "
                        f"network ({_first_line(exc)})") from None
    net = net.to(device).eval()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = net(to_uint8_rgb(x).to(device))
        return features, logits

    return run


def generated_images(model: nn.Module, buffer, source: str, sampler, n: int, input_shape,
                     device: torch.device, batch_size: int) -> torch.Tensor:
    if source == "buffer":
        idx = torch.randperm(buffer.capacity, device=buffer.data.device)[:n]
        return buffer.data[idx].clamp(-1, 1)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        out.append(sampler.run(model, torch.rand((b, *input_shape), device=device) * 2 - 1).clamp(-1, 1))
    return torch.cat(out)


def generation_scores(model: nn.Module, extractor: Extractor, fake: torch.Tensor, real: torch.Tensor,
                      batch_size: int, splits: int, show: bool) -> dict[str, Any]:
    """IS of all samples and of the top 10 % by max_y p(y|x) under ``model``; FID to ``real``."""
    f_fake, l_fake = extract(extractor, fake, batch_size, show, "generation: samples")
    f_real, _ = extract(extractor, real, batch_size, show, "generation: real")
    conf = torch.softmax(logits_of(model, fake), 1).max(1).values.cpu().numpy()
    top = np.argsort(-conf)[:max(2, len(conf) // 10)]
    is_all, is_all_std = inception_score(l_fake, splits)
    is_top, is_top_std = inception_score(l_fake[top], splits)
    return {"inception_score": is_all, "inception_score_std": is_all_std,
            "inception_score_top10": is_top, "inception_score_top10_std": is_top_std,
            "fid": fid_from_features(f_fake, f_real), "fid_top10": fid_from_features(f_fake[top], f_real),
            "n_fake": int(fake.shape[0]), "n_real": int(real.shape[0])}

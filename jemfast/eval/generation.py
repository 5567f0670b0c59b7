"""Inception Score and Frechet Inception Distance of the model's samples.

Maths (own implementation):

- IS = exp( E_x KL( p(y|x) || p(y) ) ), p(y) the mean of p(y|x) over the split; reported as
  mean and std over ``splits`` equal splits (Salimans et al., 2016).
- FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) of Gaussians fitted to two
  feature sets (Heusel et al., 2017). Tr((S_1 S_2)^(1/2)) is computed in float64 by symmetric
  eigendecompositions: with R = S_1^(1/2) (eigh), S_1 S_2 is similar to the symmetric PSD
  matrix R S_2 R, whose eigenvalues' square roots sum to the trace (tiny negative
  eigenvalues from rounding are clipped to 0).

Features: torchvision's ``inception_v3`` (2048-d pool features, 1008/1000-way logits) loaded
from ``--inception-weights`` (a state_dict file) or torchvision's hub cache; nothing is
downloaded. Images in [-1, 1] are resized (bilinear) to 299x299 and 1-channel images repeated
to 3 channels; ``transform_input=False`` since the weights expect [-1, 1] inputs. These are
torchvision's port of the weights, so the numbers are *not* comparable with the TF-Inception
values in the paper. For 8x8 digits IS/FID are not meaningful (an ImageNet network sees 37x
upscaled blobs); they are still computed when weights are given, marked as such.

Samples scored (paper appendix B): the checkpoint's replay buffer ("unconditional"), and its
top 10 % by max_y p(y|x) ("conditional"); or fresh short-run chains (``--gen-source
short-run``, the SGLD backend of ``--backend``). FID reference: the training split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .common import Skipped, eval_mode, logits_of, progress

# extractor(x: Tensor[B, C, H, W] in [-1, 1]) -> (features: Tensor[B, D], logits: Tensor[B, K])
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64) of ``features: [N, D]``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    r = _sqrt_psd(np.asarray(s1, dtype=np.float64))
    m = r @ np.asarray(s2, dtype=np.float64) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    return float(max(fid, 0.0))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over ``splits`` equal parts of ``probs: [N, K]`` (rows sum to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    splits = max(1, min(splits, p.shape[0]))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def extract(extractor: Extractor, x: torch.Tensor, batch_size: int, show: bool,
            desc: str) -> tuple[np.ndarray, np.ndarray]:
    feats, probs = [], []
    with torch.no_grad():
        starts = range(0, x.shape[0], batch_size)
        for i in progress(starts, desc, show, total=len(starts)):
            f, logits = extractor(x[i:i + batch_size])
            feats.append(f.double().cpu())
            probs.append(torch.softmax(logits.double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def find_inception_weights(path: str | None) -> Path:
    """The weights file to use, or Skipped saying why there is none."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--inception-weights {path} does not exist")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise Skipped(f"generation: no Inception weights (give --inception-weights PATH to a torchvision "
                  f"inception_v3 state_dict, or put {INCEPTION_FILE} in {cached.parent}); IS/FID skipped")


def inception_extractor(weights: Path, device: torch.device) -> Extractor:
    from torchvision.models import inception_v3

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False,
                           num_classes=state["fc.weight"].shape[0])
        net.load_state_dict(state)
    except Exception as exc:  # wrong file, corrupt file, pickled objects
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"inception weights {weights} could not be loaded ({reason})") from None
    net = net.to(device).eval()
    pooled: dict[str, torch.Tensor] = {}
    net.avgpool.register_forward_hook(lambda _m, _i, out: pooled.__setitem__("f", out.flatten(1)))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        logits = net(x)
        return pooled["f"], logits

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
    f_fake, p_fake = extract(extractor, fake, batch_size, show, "generation: samples")
    f_real, _ = extract(extractor, real, batch_size, show, "generation: real")
    with eval_mode(model):
        conf = torch.softmax(logits_of(model, fake), 1).max(1).values.cpu().numpy()
    top = np.argsort(-conf)[:max(2, len(conf) // 10)]
    is_all, is_all_std = inception_score(p_fake, splits)
    is_top, is_top_std = inception_score(p_fake[top], splits)
    return {"inception_score": is_all, "inception_score_std": is_all_std,
            "inception_score_top10": is_top, "inception_score_top10_std": is_top_std,
            "fid": fid_from_features(f_fake, f_real), "fid_top10": fid_from_features(f_fake[top], f_real),
            "n_fake": int(fake.shape[0]), "n_real": int(real.shape[0])}

"""jemfast.eval.digits_fidelity: the download-free sample-quality metric of the digits ranks real
held-out digits best and noise, blurred digits and one class's digits worse, at both digits
shapes; and it is torch-fidelity's FID/IS on the digits network's features (checked by hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jemfast.data import load_digits_bundle
from jemfast.eval.digits_fidelity import digits_fidelity, digits_net, to_digits8


def blurred(x: torch.Tensor) -> torch.Tensor:
    """A box blur 3 pixels of the 8x8 digit wide (3 x side / 8, odd)."""
    k = 3 * x.shape[-1] // 8 | 1
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, 1)


@pytest.mark.parametrize("side", [8, 32])
def test_real_digits_score_best_and_noise_blur_and_one_class_worse(side):
    data = load_digits_bundle(torch.device("cpu"), side=side)
    real, test = data.train.x, data.test.x
    g = torch.Generator().manual_seed(0)
    candidates = {
        "test digits": test,
        "uniform noise": torch.rand(test.shape, generator=g) * 2 - 1,
        "blurred test digits": blurred(test),
        "one class": real[data.train.y == 3].repeat(3, 1, 1, 1)[:len(test)],
    }
    scores = {name: digits_fidelity(x, real) for name, x in candidates.items()}
    fid = {name: s["digits_fid"] for name, s in scores.items()}
    assert min(fid, key=fid.get) == "test digits", fid
    assert all(fid[name] > 5 * fid["test digits"] for name in fid if name != "test digits"), fid
    isc = {name: s["digits_is"] for name, s in scores.items()}
    assert isc["test digits"] > 7.0 and isc["one class"] < 1.5 and max(isc, key=isc.get) == "test digits", isc


def test_it_is_the_frechet_distance_and_inception_score_of_the_networks_features():
    data = load_digits_bundle(torch.device("cpu"))
    fake, real = data.test.x[:200], data.train.x
    with torch.no_grad():
        f1, logits = digits_net()(to_digits8(fake))
        f2, _ = digits_net()(to_digits8(real))
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    from scipy import linalg

    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)  # dead ReLUs: singular
    got = digits_fidelity(fake, real, splits=1)
    assert got["digits_fid"] == pytest.approx(fid, rel=1e-3)
    p = torch.softmax(logits.double(), 1)
    isc = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert got["digits_is"] == pytest.approx(isc, rel=1e-4)
    assert (digits_net()(to_digits8(data.test.x))[1].argmax(1) == data.test.y).float().mean() > 0.93

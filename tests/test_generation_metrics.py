"""IS/FID through torch-fidelity's FID Inception network: the maths against closed forms, and
the whole path (weights file -> network -> features -> IS/FID) with random weights of that exact
architecture, since the real weights cannot be fetched here."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jemfast.energy import JEM
from jemfast.eval.common import Skipped
from jemfast.eval.generation import (INCEPTION_FILE, extract, fid_from_features, find_inception_weights,
                                     frechet_distance, generation_scores, inception_extractor,
                                     inception_score, to_uint8_rgb)
from jemfast.models import SmallCNN
from jemfast.process.errors import UserError


def random_fid_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save a state_dict of torch-fidelity's FID Inception with random weights to ``path``.

    The network is built from the library's class with its weight loader switched off;
    convolutions get He init (so activations neither vanish nor explode through ~50 layers)
    and the classifier a large scale (so IS tells diverse images from identical ones).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    nn.init.normal_(net.fc.weight, std=3.0)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    return random_fid_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """``Tensor[n, 3, 32, 32]`` in [-1, 1]: upsampled 8x8 noise, image-like and all different."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)


# ---- maths (no network) -------------------------------------------------------------------

def test_fid_closed_forms():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(500, 6))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # diagonal (commuting) covariances: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general SPD covariances against scipy's matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    ref = np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(ref, rel=1e-8)
    # samples from two known Gaussians approach the closed form
    x = rng.multivariate_normal(mu1[:2], np.diag(a[:2]), 200000)
    y = rng.multivariate_normal(mu2[:2], np.diag(b[:2]), 200000)
    expected2 = ((mu1[:2] - mu2[:2]) ** 2).sum() + ((np.sqrt(a[:2]) - np.sqrt(b[:2])) ** 2).sum()
    assert fid_from_features(x, y) == pytest.approx(expected2, abs=0.05)


def test_inception_score_extremes():
    k = 7
    confident = 50.0 * np.eye(k)[np.arange(700) % k]  # logits: each image sure of one class, classes balanced
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-9)
    assert 6 < inception_score(confident, splits=5)[0] <= k  # splits after a shuffle: near k
    assert inception_score(np.zeros((100, k)), splits=4) == pytest.approx((1.0, 0.0))
    assert inception_score(50.0 * np.eye(k)[np.zeros(50, dtype=int)], splits=1)[0] == pytest.approx(1.0)
    # a hand-computed case: two images, p = (3/4, 1/4) and (1/4, 3/4); p(y) = (1/2, 1/2)
    logits = np.log(np.array([[3.0, 1.0], [1.0, 3.0]]))
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp(kl), rel=1e-12)


def test_uint8_conversion_round_trips_dataset_pixels():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = u8.float() / 255.0 * 2 - 1  # how jemfast.data scales pixels
    rgb = to_uint8_rgb(x)
    assert rgb.shape == (1, 3, 16, 16) and rgb.dtype == torch.uint8
    assert all(torch.equal(rgb[:, c:c + 1], u8) for c in range(3))
    assert to_uint8_rgb(torch.tensor([-5.0, 5.0]).view(1, 1, 1, 2))[0, 0].flatten().tolist() == [0, 255]


# ---- weights: where they come from, what is refused ---------------------------------------

def test_no_weights_skips_with_one_line_naming_the_place(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(Skipped) as info:
        find_inception_weights(None)
    line = str(info.value)
    assert "\n" not in line and INCEPTION_FILE in line and str(tmp_path / "hub" / "checkpoints") in line
    with pytest.raises(UserError, match="does not exist"):
        find_inception_weights(str(tmp_path / "nope.pth"))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached


class _Marker:
    """Unpickling this touches a file: the proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_wrong_or_hostile_weight_files_are_one_line_errors(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)  # another network's layout
    with pytest.raises(UserError, match="FID Inception") as info:
        inception_extractor(other, torch.device("cpu"))
    assert "\n" not in str(info.value)
    hostile = tmp_path / "hostile.pth"
    marker = tmp_path / "pickle-ran"
    with open(hostile, "wb") as f:
        pickle.dump({"fc.weight": _Marker(str(marker))}, f, protocol=2)
    with pytest.raises(UserError):
        inception_extractor(hostile, torch.device("cpu"))
    assert not marker.exists()


def test_generation_scores_with_stand_in_extractor():
    """The IS/FID bookkeeping (all samples, top 10 % by p(y|x)) with a small extractor."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 5))

    def extractor(x):
        return net[:2](x), net(x)

    model = JEM(SmallCNN(1, 10, 4)).eval()
    real = torch.rand(200, 1, 8, 8) * 2 - 1
    same = generation_scores(model, extractor, real, real, 64, 4, False)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["n_fake"] == 200
    other = generation_scores(model, extractor, real * 0.2 + 0.5, real, 64, 4, False)
    assert other["fid"] > 1.0 and other["inception_score"] >= 1.0
    conf = torch.softmax(model(real * 0.2 + 0.5), 1).max(1).values
    top = torch.argsort(-conf)[:20]
    f_top = net[:2](real[top] * 0.2 + 0.5).detach()
    assert other["fid_top10"] == pytest.approx(fid_from_features(f_top, net[:2](real).detach()), rel=1e-6)


# ---- the whole path with random weights of the real architecture (slow: a 2048x2048 eigen-
# problem per FID and ~6 GFLOP per image on the CPU) ----------------------------------------

@pytest.fixture(scope="module")
def through_network(fid_weights):
    """Features and logits of 4 image-like, 4 noise and 3 identical images through the network."""
    net = inception_extractor(fid_weights, torch.device("cpu"))
    real = smooth_images(4, seed=1)
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    same = real[:1].expand(3, -1, -1, -1)
    return {name: extract(net, x, 4, False, name) for name, x in (("real", real), ("noise", noise),
                                                                     ("same", same))}


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(through_network):
    f_real, f_noise = through_network["real"][0], through_network["noise"][0]
    assert f_real.shape == (4, 2048) and np.isfinite(f_real).all()
    fid_noise = fid_from_features(f_noise, f_real)
    assert fid_noise > 10 * f_real.var(0).sum()  # large in units of the (random) features' spread
    assert fid_from_features(f_real, f_real) < 1e-3 * fid_noise


@pytest.mark.slow
def test_inception_score_of_identical_images_is_one(through_network):
    same_logits, diverse_logits = through_network["same"][1], through_network["real"][1]
    assert same_logits.shape == (3, 1008)
    assert inception_score(same_logits, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    assert inception_score(diverse_logits, splits=1)[0] > 1.05


@pytest.mark.slow
def test_same_numbers_as_torch_fidelity_own_pipeline(fid_weights):
    """Our path (float images -> uint8 -> one pass for both features) gives the numbers of
    torch-fidelity's calculate_metrics on the same uint8 images and weights."""
    import torch_fidelity

    class Uint8Set(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = to_uint8_rgb(x)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    fake, real = smooth_images(4, seed=3), smooth_images(4, seed=4)
    ref = torch_fidelity.calculate_metrics(input1=Uint8Set(fake), input2=Uint8Set(real), isc=True, fid=True,
                                           isc_splits=2, cuda=False, cache=False, verbose=False, batch_size=4,
                                           save_cpu_ram=True, feature_extractor_weights_path=str(fid_weights))
    net = inception_extractor(fid_weights, torch.device("cpu"))
    f_fake, l_fake = extract(net, fake, 4, False, "fake")
    f_real, _ = extract(net, real, 4, False, "real")
    assert inception_score(l_fake, 2)[0] == pytest.approx(ref["inception_score_mean"], rel=1e-5)
    assert fid_from_features(f_fake, f_real) == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)

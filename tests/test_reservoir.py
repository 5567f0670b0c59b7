"""jemfast.sgld.reservoir: the Guard's bounded per-class sample of the labelled images it is handed.

The batched, on-device reservoir is checked against a hand-written one-image-at-a-time
Algorithm R fed the same random numbers (so it is exactly that algorithm), against the
inclusion probability K / N that makes it a uniform sample, and for its memory bound.
"""
from __future__ import annotations

import pytest
import torch

from jemfast.sgld.reservoir import ClassReservoir


def stream(n_batches: int, batch: int, n_classes: int, seed: int = 0):
    """Batches of images whose every value is the image's serial number, with random labels."""
    g = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        ids = torch.arange(b * batch, (b + 1) * batch, dtype=torch.float32)
        yield ids[:, None, None].expand(batch, 2, 3).clone(), torch.randint(0, n_classes, (batch,), generator=g)


def algorithm_r(batches, n_classes: int, k: int, seed: int) -> list[list[float]]:
    """Vitter's Algorithm R per class, one image at a time, on the reservoir's random numbers
    (one float64 uniform per image, drawn a batch at a time)."""
    g = torch.Generator().manual_seed(seed)
    slots = [[None] * k for _ in range(n_classes)]
    seen = [0] * n_classes
    for x, y in batches:
        u = torch.rand(len(y), generator=g, dtype=torch.float64)
        for i, c in enumerate(y.tolist()):
            n = seen[c]
            if n < k:
                slots[c][n] = x[i, 0, 0].item()
            else:
                r = int(u[i].item() * (n + 1))
                if r < k:
                    slots[c][r] = x[i, 0, 0].item()
            seen[c] += 1
    return [[v for v in s if v is not None] for s in slots]


def kept(res: ClassReservoir) -> list[list[float]]:
    split = res.split()
    return [split.x[split.y == c][:, 0, 0].tolist() for c in range(res.n_classes)]


def test_it_is_algorithm_r_per_class_and_bounded():
    n_classes, k, seed = 3, 6, 11
    res = ClassReservoir(n_classes, k, "cpu", seed)
    batches = list(stream(40, 13, n_classes))  # odd batch: classes cross batch boundaries, repeat slots within one
    for x, y in batches:
        res.add(x, y)
    assert kept(res) == algorithm_r(batches, n_classes, k, seed)
    assert res.split().x.shape[1:] == (2, 3)
    assert res.seen.tolist() == [sum(int((y == c).sum()) for _, y in batches) for c in range(n_classes)]
    assert res.images.shape == (n_classes, k + 1, 6) and res.nbytes == n_classes * (k + 1) * 6 * 4  # the bound
    assert all(len(v) == k for v in kept(res))


def test_every_image_is_kept_with_probability_k_over_n():
    n_classes, k, n_batches, batch, trials = 2, 5, 10, 7, 600
    counts = torch.zeros(n_batches * batch)
    per_class = None
    for trial in range(trials):
        res = ClassReservoir(n_classes, k, "cpu", trial)
        batches = list(stream(n_batches, batch, n_classes, seed=1))  # the same labels every trial
        for x, y in batches:
            res.add(x, y)
        for ids in kept(res):
            counts[torch.tensor(ids).long()] += 1
        per_class = res.seen
    labels = torch.cat([y for _, y in stream(n_batches, batch, n_classes, seed=1)])
    expected = k / per_class[labels].double()
    freq = counts.double() / trials
    sd = (expected * (1 - expected) / trials).sqrt()
    assert ((freq - expected).abs() < 4.5 * sd).all(), (freq - expected).abs().max()
    first, last = labels < 0, labels < 0  # early and late images of each class alike
    for c in range(n_classes):
        idx = (labels == c).nonzero().flatten()
        first[idx[: len(idx) // 2]] = True
        last[idx[len(idx) // 2:]] = True
    assert abs((freq[first] - expected[first]).mean()) < 0.02 and abs((freq[last] - expected[last]).mean()) < 0.02


def test_state_dict_continues_exactly():
    batches = list(stream(30, 9, 4))
    whole = ClassReservoir(4, 5, "cpu", 3)
    for x, y in batches:
        whole.add(x, y)
    first = ClassReservoir(4, 5, "cpu", 3)
    for x, y in batches[:12]:
        first.add(x, y)
    saved = first.state_dict()
    second = ClassReservoir(4, 5, "cpu", 99)  # another seed: the generator's state comes from the save
    second.load_state_dict(saved)
    for x, y in batches[12:]:
        second.add(x, y)
    assert kept(second) == kept(whole) and torch.equal(second.seen, whole.seen)


def test_a_label_out_of_range_or_a_wrong_shape_is_refused():
    res = ClassReservoir(3, 4, "cpu", 0)
    with pytest.raises((IndexError, RuntimeError)):
        res.add(torch.zeros(2, 5), torch.tensor([0, 3]))
    res.add(torch.zeros(2, 5), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="holds images of 5 values"):
        res.add(torch.zeros(2, 6), torch.tensor([0, 1]))

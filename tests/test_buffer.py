"""ReplayBuffer: draws, re-initialisation statistics, class-conditional shares, write-back."""
import pytest
import torch

from jemfast import ReplayBuffer


def test_initialised_uniform_in_range():
    buf = ReplayBuffer(5000, (3, 2))
    assert buf.data.shape == (5000, 3, 2)
    assert buf.data.min() >= -1 and buf.data.max() < 1
    assert abs(buf.data.mean().item()) < 0.02  # U(-1,1): mean 0, se = 0.577/sqrt(30000) ~ 0.003
    assert abs(buf.data.var().item() - 1 / 3) < 0.02


def test_no_reinit_returns_stored_rows():
    buf = ReplayBuffer(50, (4,), reinit_freq=0.0)
    x, idx = buf.sample(32)
    assert idx.dtype == torch.int64 and idx.min() >= 0 and idx.max() < 50
    assert torch.equal(x, buf.data[idx])


def test_reinit_fraction_and_distribution():
    torch.manual_seed(0)
    p, n = 0.3, 20000
    buf = ReplayBuffer(100, (2,), reinit_freq=p)
    buf.data.fill_(5.0)  # sentinel outside [-1, 1]
    x, _ = buf.sample(n)
    fresh = (x.abs() <= 1).all(1)
    assert torch.equal(fresh, (x != 5.0).all(1))  # a row is either kept whole or replaced whole
    frac = fresh.float().mean().item()
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5
    rows = x[fresh]
    assert abs(rows.mean().item()) < 0.02 and abs(rows.var().item() - 1 / 3) < 0.02
    assert torch.all(buf.data == 5.0)  # sampling does not modify the buffer


def test_reinit_one_means_all_fresh():
    buf = ReplayBuffer(10, (3,), reinit_freq=1.0)
    buf.data.fill_(5.0)
    x, _ = buf.sample(64)
    assert (x.abs() <= 1).all()


def test_class_conditional_draws_come_from_the_class_share():
    buf = ReplayBuffer(100, (1,), n_classes=10, reinit_freq=0.0)
    assert buf.per_class == 10
    buf.data = torch.arange(100, dtype=torch.float32).div(10).floor().view(100, 1)  # row -> class id
    y = torch.randint(0, 10, (500,))
    x, idx = buf.sample(500, y)
    assert torch.equal(x.view(-1), y.float())
    assert torch.equal(idx // 10, y)
    assert len(torch.unique(idx)) > 50  # spread within the shares, not one row per class


def test_class_conditional_needs_classes():
    buf = ReplayBuffer(10, (1,))
    with pytest.raises(ValueError):
        buf.sample(4, torch.zeros(4, dtype=torch.int64))


def test_update_writes_back_and_state_roundtrip():
    buf = ReplayBuffer(20, (2,))
    idx = torch.tensor([3, 7])
    buf.update(idx, torch.full((2, 2), 0.25))
    assert torch.all(buf.data[idx] == 0.25)
    other = ReplayBuffer(20, (2,))
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.data, buf.data)
    with pytest.raises(ValueError, match="buffer"):
        ReplayBuffer(21, (2,)).load_state_dict(buf.state_dict())


@pytest.mark.parametrize("kwargs", [dict(capacity=0, shape=(1,)), dict(capacity=5, shape=(1,), reinit_freq=1.5),
                                    dict(capacity=5, shape=(1,), n_classes=10)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ReplayBuffer(**kwargs)

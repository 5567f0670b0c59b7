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


@pytest.mark.parametrize("kwargs", [dict(capacity=-1, shape=(1,)), dict(capacity=5, shape=(1,), reinit_freq=1.5),
                                    dict(capacity=5, shape=(1,), n_classes=10),
                                    dict(capacity=25, shape=(1,), n_classes=10),
                                    dict(capacity=20, shape=(1,), n_classes=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ReplayBuffer(**kwargs)


# ---- tensor interop, empty buffers, init_fn on the kernel path -------------------------------
def test_tensor_interop():
    buf = ReplayBuffer(12, (2, 3), reinit_freq=0.2)
    assert len(buf) == 12 and buf.shape == (12, 2, 3) and buf.size(0) == 12 and buf.size() == buf.data.shape
    assert buf.sample_shape == (2, 3)
    assert torch.equal(buf[:5], buf.data[:5]) and torch.equal(buf[3], buf.data[3])
    assert torch.equal(buf[torch.tensor([1, 4])], buf.data[[1, 4]])
    buf[2:4] = torch.full((2, 2, 3), 0.5, dtype=torch.float64)
    assert torch.all(buf.data[2:4] == 0.5) and buf.data.dtype == torch.float32
    assert [row.shape for row in buf][:1] == [(2, 3)] and len(list(buf)) == 12


def test_from_tensor_and_load_state_dict_of_a_plain_tensor():
    t = torch.rand(20, 3) * 2 - 1
    buf = ReplayBuffer.from_tensor(t, n_classes=4, reinit_freq=0.0)
    assert buf.per_class == 5 and buf.device == t.device
    x, idx = buf.sample(6)
    buf.update(idx, x + 1)
    assert torch.equal(t[idx], x + 1)  # an fp32 tensor on the device is the buffer's storage
    buf.reset()
    assert buf.data.data_ptr() == t.data_ptr() and t.abs().max() <= 1 and not torch.equal(t[idx], x + 1)  # reset in place
    copied = ReplayBuffer.from_tensor(t.double())
    assert copied.data.dtype == torch.float32 and copied.data.data_ptr() != t.data_ptr()
    with pytest.raises(ValueError, match="multiple of 3"):
        ReplayBuffer.from_tensor(t, n_classes=3)
    other = ReplayBuffer(20, (3,), reinit_freq=0.3)
    other.load_state_dict({"data": t})  # an original checkpoint's replay_buffer: data only
    assert torch.equal(other.data, t) and other.reinit_freq == 0.3


def test_torch_save_and_load_of_the_buffer_object(tmp_path):
    buf = ReplayBuffer(10, (2,), n_classes=5, reinit_freq=0.25)
    buf._kernel_rng = torch.tensor([7, 64])  # a gather kernel's noise state, as on CUDA
    torch.save({"replay_buffer": buf}, tmp_path / "ckpt.pt")  # what an original-style checkpoint() does
    back = torch.load(tmp_path / "ckpt.pt")["replay_buffer"]  # weights_only=True, torch's default
    assert isinstance(back, ReplayBuffer) and torch.equal(back.data, buf.data)
    assert (back.n_classes, back.reinit_freq, back.shape) == (5, 0.25, buf.shape)
    assert back.state_dict()["kernel_rng_state"].tolist() == [7, 64]
    torch.save(ReplayBuffer(0, (2,)), tmp_path / "empty.pt")
    assert len(torch.load(tmp_path / "empty.pt", weights_only=True)) == 0


def test_deepcopy_keeps_the_init_fn():
    import copy

    init = lambda n, y: torch.zeros(n, 2)  # noqa: E731
    buf = ReplayBuffer(4, (2,), init_fn=init)
    twin = copy.deepcopy(buf)
    assert twin.init_fn is init and torch.equal(twin.data, buf.data) and twin.data is not buf.data


def test_empty_buffer_gives_fresh_chains_and_keeps_nothing():
    torch.manual_seed(0)
    buf = ReplayBuffer(0, (1, 4, 4))
    x, idx = buf.sample(500)
    assert x.shape == (500, 1, 4, 4) and idx.numel() == 0
    assert x.min() >= -1 and x.max() < 1 and abs(x.var().item() - 1 / 3) < 0.02  # U(-1, 1)
    buf.update(idx, x)
    assert len(buf) == 0 and buf.data.shape == (0, 1, 4, 4)
    cond = ReplayBuffer(0, (2,), n_classes=3, init_fn=lambda n, y: y.float()[:, None].expand(n, 2))
    y = torch.tensor([2, 0, 1])
    assert torch.equal(cond.sample(3, y)[0], y.float()[:, None].expand(3, 2))
    from jemfast.options.config import check_value

    with pytest.raises(ValueError, match="must be >= 1"):
        check_value("sampler.buffer_size", 0)  # --buffer-size stays >= 1 (the CLI has --sgld-init noise)


def test_init_fn_is_honoured_on_the_kernel_path(monkeypatch):
    pytest.importorskip("triton")
    from jemfast import buffer as buffer_mod
    from jemfast.kernels import buffer as kernel_mod
    from tests.conftest import triton_marker

    device, marker = triton_marker()
    if marker.args[0]:
        pytest.skip("Triton cannot run here")
    calls = []
    real = kernel_mod.gather_reinit
    monkeypatch.setattr(kernel_mod, "gather_reinit", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(buffer_mod, "_kernel_usable", lambda device: True)  # as on CUDA
    init = lambda n, y: (5.0 + y.float()).view(n, 1, 1).expand(n, 3, 5).clone()  # noqa: E731
    buf = ReplayBuffer(12, (3, 5), n_classes=3, reinit_freq=0.5, device=device, init_fn=init)
    assert buf._use_kernel and torch.equal(buf.data[:4], torch.full((4, 3, 5), 5.0, device=device))
    buf.data.copy_(torch.rand(12, 3, 5, device=device) * 2 - 1)
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1], device=device)
    x, idx = buf.sample(9, y)
    assert calls, "the kernel path did not run"
    fresh = (x > 2).flatten(1).all(1)
    assert 0 < fresh.sum() < 9  # both kinds of rows in this draw
    assert torch.equal(x[fresh], init(9, y)[fresh])  # re-initialised rows are init_fn's, not U(-1, 1)
    assert torch.equal(x[~fresh], buf.data[idx[~fresh]])

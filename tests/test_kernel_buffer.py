"""jemfast.kernels.buffer: fused gather + U(-1, 1) re-init.

Runs on CUDA when present, otherwise on the CPU under Triton's interpreter; tests/conftest.py
sets ``TRITON_INTERPRET=1`` before anything imports triton.

Tolerances:
- rows that are not re-initialised are copies: compared bitwise with ``buffer[idx].float()``
  (fp32 and bf16 buffers; bf16 -> fp32 is exact). Re-initialised rows must lie in [-1, 1).
- statistics over n = 24,576 uniform draws, 5 standard errors: mean 0 +- 5 * sqrt(1/3 / n);
  variance 1/3 +- 5 * sqrt((1/5 - 1/9) / n) (fourth central moment of U(-1, 1) is 1/5);
  P(u < 0) = 1/2 +- 5 * 0.5 / sqrt(n); correlation of two draws (two calls, or two rows of
  3,072 values in one call) 0 +- 5 / sqrt(n).
"""
import pytest
import torch

from tests.conftest import triton_marker  # sets TRITON_INTERPRET=1 on machines without CUDA

pytest.importorskip("triton", reason="triton is not installed")

from jemfast.kernels import new_rng_state  # noqa: E402
from jemfast.kernels.buffer import gather_reinit, gather_reinit_reference  # noqa: E402

DEVICE, pytestmark = triton_marker()

CASES = [  # (buffer shape, idx, reinit)
    ((13, 3, 5, 5), [4, 12, 0], [False, True, False]),  # a batch of 3 rows out of 13
    ((13, 1, 8, 8), [7, 7, 2, 9, 1], [True, False, False, True, False]),  # duplicate index
    ((13, 3, 20, 20), [5, 6], [False, True]),  # 1200-element rows span two column blocks
    ((13,), [0, 12, 6], [False, False, True]),  # scalar rows
    ((1, 1), [0], [False]),  # one element
]


def _uniform_stats_sample(seed: int, rng: torch.Tensor | None = None) -> torch.Tensor:
    buffer = torch.zeros(2, 3, 32, 32, device=DEVICE)
    idx = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    reinit = torch.ones(8, dtype=torch.bool, device=DEVICE)
    rng = new_rng_state(seed, DEVICE) if rng is None else rng
    return gather_reinit(buffer, idx, reinit, rng).flatten().cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,idx,reinit", CASES)
def test_gather_matches_reference(shape, idx, reinit, dtype):
    buffer = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    idx = torch.tensor(idx, device=DEVICE)
    reinit = torch.tensor(reinit, device=DEVICE)
    rng = new_rng_state(17, DEVICE)
    out = gather_reinit(buffer, idx, reinit, rng)
    assert out.dtype == torch.float32 and out.shape == (len(idx), *shape[1:])
    keep = ~reinit
    assert torch.equal(out[keep], buffer[idx[keep]].float())
    fresh = out[reinit]
    assert ((fresh >= -1) & (fresh < 1)).all()
    # with the kernel's own uniforms the reference reproduces the whole batch
    assert torch.equal(gather_reinit_reference(buffer, idx, reinit, uniform=out), out)
    assert rng.tolist() == [17, out.numel()]


def test_reinit_rows_do_not_read_the_buffer():
    buffer = torch.full((4, 2, 3), float("nan"), device=DEVICE)
    buffer[1] = 0.25
    out = gather_reinit(buffer, torch.tensor([0, 1, 3], device=DEVICE),
                        torch.tensor([True, False, True], device=DEVICE), new_rng_state(0, DEVICE))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], buffer[1])


def test_out_argument_and_strided_index():
    buffer = torch.randn(13, 3, 4, 4, device=DEVICE)
    idx = torch.tensor([9, 0, 3, 1, 12, 5], device=DEVICE)[::2]  # non-contiguous [3]
    reinit = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    out = torch.empty(3, 3, 4, 4, device=DEVICE)
    assert gather_reinit(buffer, idx, reinit, new_rng_state(0, DEVICE), out=out) is out
    assert torch.equal(out, buffer[idx])
    with pytest.raises(ValueError, match="out"):
        gather_reinit(buffer, idx, reinit, new_rng_state(0, DEVICE), out=torch.empty(3, 48, device=DEVICE))


def test_bad_inputs_raise_value_error():
    buffer = torch.zeros(13, 4, 5, device=DEVICE)
    idx = torch.tensor([1, 2], device=DEVICE)
    reinit = torch.tensor([False, True], device=DEVICE)
    rng = new_rng_state(0, DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        gather_reinit(buffer.transpose(1, 2), idx, reinit, rng)
    with pytest.raises(ValueError, match="idx"):
        gather_reinit(buffer, idx.float(), reinit, rng)
    with pytest.raises(ValueError, match="reinit"):
        gather_reinit(buffer, idx, reinit.int(), rng)
    with pytest.raises(ValueError, match="reinit"):
        gather_reinit(buffer, idx, reinit[:1], rng)
    with pytest.raises(ValueError, match="rng_state"):
        gather_reinit(buffer, idx, reinit, rng[:1])
    with pytest.raises(ValueError, match="float32"):
        gather_reinit(buffer.int(), idx, reinit, rng)
    assert rng.tolist() == [0, 0]


def test_uniform_rows_mean_and_variance():
    u = _uniform_stats_sample(31).double()
    n = u.numel()
    assert n == 24_576
    assert u.min().item() >= -1.0 and u.max().item() < 1.0
    assert abs(u.mean().item()) < 5 * (1 / 3 / n) ** 0.5
    assert abs(u.var().item() - 1 / 3) < 5 * ((1 / 5 - 1 / 9) / n) ** 0.5
    assert abs((u < 0).double().mean().item() - 0.5) < 5 * 0.5 / n**0.5
    rows = u.view(8, -1)  # every row has its own counters: rows are distinct and uncorrelated
    assert len({tuple(r.tolist()) for r in rows}) == 8
    assert abs(torch.corrcoef(rows[:2])[0, 1].item()) < 5 / rows.shape[1] ** 0.5


def test_uniform_noise_fresh_per_call_and_reproducible():
    rng = new_rng_state(8, DEVICE)
    a = _uniform_stats_sample(0, rng)
    b = _uniform_stats_sample(0, rng)
    assert rng.tolist() == [8, 2 * a.numel()]
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()) < 5 / a.numel() ** 0.5
    assert torch.equal(a, _uniform_stats_sample(8))  # same (seed, offset) start -> bitwise identical
    assert not torch.equal(a, _uniform_stats_sample(9))


def test_replay_buffer_saves_and_reseeds_the_kernel_stream():
    from jemfast.buffer import ReplayBuffer

    def buffer() -> ReplayBuffer:
        buf = ReplayBuffer(50, (3, 4), reinit_freq=0.5, device=DEVICE)
        buf._use_kernel = True  # what a CUDA buffer does; here under the interpreter
        return buf

    def draw(buf: ReplayBuffer) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)  # indices and masks come from torch's generator
        return buf.sample(16)

    buf = buffer()
    assert "kernel_rng_state" not in buf.state_dict()
    draw(buf)
    state = buf.state_dict()
    assert state["kernel_rng_state"][1].item() == 16 * 12
    a, ia = draw(buf)
    other = buffer()
    other.load_state_dict(state)
    b, ib = draw(other)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    old = {k: v for k, v in state.items() if k != "kernel_rng_state"}  # a checkpoint from before
    buffer().load_state_dict(old)
    buf.reseed(5)
    c, _ = draw(buf)
    buf.reseed(5)
    d, _ = draw(buf)
    buf.reseed(6)
    e, _ = draw(buf)
    assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_draw_fresh_uniforms():
    buffer = torch.zeros(4, 3, 32, 32, device="cuda")
    idx = torch.tensor([0, 1, 2, 3], device="cuda")
    reinit = torch.tensor([True, False, True, True], device="cuda")
    rng = new_rng_state(3, "cuda")
    out = torch.empty(4, 3, 32, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernel outside the capture
        gather_reinit(buffer, idx, reinit, rng, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_reinit(buffer, idx, reinit, rng, out=out)
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first[0], out[0])
    assert torch.equal(first[1], out[1]) and torch.equal(out[1], buffer[1])
    assert rng.tolist() == [3, 3 * out.numel()]

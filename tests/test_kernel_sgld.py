"""jemfast.kernels.sgld: the fused SGLD kernel against its PyTorch reference.

Runs on CUDA when present, otherwise on the CPU under Triton's interpreter. ``TRITON_INTERPRET=1``
is set by tests/conftest.py before anything imports triton (it only takes effect then).

Tolerances:
- exact comparison (``noise_std=0`` or with the kernel's own noise fed to the reference):
  ``rtol = atol = 1e-6`` for fp32 and bf16 grads (bf16 is upcast exactly, so both compare in
  fp32; the slack covers FMA contraction on GPUs); under the interpreter equality is bitwise.
- statistics over n = 20,000 draws: 5 standard errors. mean: 5 * sigma / sqrt(n); std:
  5 * sigma / sqrt(2n); P(|z| < 1) = 0.6827 +- 5 * sqrt(p(1-p)/n); correlation of two draws:
  5 / sqrt(n). Seeds are fixed, so the tests are deterministic; 5 SE would fail by chance with
  probability ~6e-7 per check for a fresh seed.
"""
import pytest
import torch

from tests.conftest import triton_marker  # sets TRITON_INTERPRET=1 on machines without CUDA

pytest.importorskip("triton", reason="triton is not installed")

from jemfast.kernels import interpret_mode, new_rng_state  # noqa: E402
from jemfast.kernels.sgld import sgld_update_, sgld_update_reference  # noqa: E402

DEVICE, pytestmark = triton_marker()

RTOL = ATOL = 1e-6
N_STATS = 20_000
SHAPES = [(1,), (7, 3, 5, 5), (5, 1, 8, 8), (1025,)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if interpret_mode():
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _noise(n: int, rng: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """The kernel's noise for the next n counters of rng: an SGLD step on x = 0, grad = 0."""
    z = torch.zeros(n, device=DEVICE)
    return sgld_update_(z, torch.zeros_like(z), 0.0, std, rng)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [False, True])
def test_matches_reference_without_noise(shape, grad_dtype, clamp):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    grad = torch.randn(shape, generator=gen).to(DEVICE, grad_dtype)
    expected = sgld_update_reference(x, grad, 0.37, 0.0, clamp=clamp)
    rng = new_rng_state(3, DEVICE)
    out = sgld_update_(x, grad, 0.37, 0.0, rng, clamp=clamp)
    assert out is x  # in place
    _assert_close(x, expected)
    assert rng.tolist() == [3, x.numel()]  # the offset advances even without noise


@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (1025,)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_with_the_kernel_noise(shape, grad_dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    grad = torch.randn(shape, generator=gen).to(DEVICE, grad_dtype)
    start = new_rng_state(11, DEVICE)
    noise = _noise(x.numel(), start.clone()).view(shape)  # element i <-> counter offset + i
    expected = sgld_update_reference(x, grad, 1.0, 0.7, noise=noise)
    sgld_update_(x, grad, 1.0, 0.7, start.clone())
    _assert_close(x, expected)


def test_clamp_limits_to_unit_interval():
    x = torch.linspace(-3, 3, 301, device=DEVICE)
    grad = torch.linspace(1, -1, 301, device=DEVICE)
    expected = sgld_update_reference(x, grad, 0.5, 0.0, clamp=True)
    sgld_update_(x, grad, 0.5, 0.0, new_rng_state(0, DEVICE), clamp=True)
    _assert_close(x, expected)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    noisy = torch.zeros(N_STATS // 4, device=DEVICE)
    sgld_update_(noisy, torch.zeros_like(noisy), 0.0, 5.0, new_rng_state(1, DEVICE), clamp=True)
    assert noisy.abs().max().item() == 1.0


def test_clamp_keeps_nan_in_kernel_and_references():
    """A diverged chain must stay visible: NaN through the clamp is NaN, not -1."""
    from jemfast.sgld import torch_update

    x = torch.tensor([float("nan"), 0.5, 3.0, -3.0, float("inf"), float("-inf"), 0.0], device=DEVICE)
    grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan")], device=DEVICE)
    expected = torch.tensor([float("nan"), 0.5, 1.0, -1.0, 1.0, -1.0, float("nan")])
    for out in (sgld_update_(x.clone(), grad, 1.0, 0.0, new_rng_state(0, DEVICE), clamp=True),
                sgld_update_reference(x, grad, 1.0, 0.0, clamp=True),
                torch_update(x, grad, 1.0, 0.0, clamp=True)):
        out = out.cpu()
        assert torch.equal(out.isnan(), expected.isnan()), out
        assert torch.equal(out[~out.isnan()], expected[~expected.isnan()]), out
    noisy = sgld_update_(x.clone(), grad, 1.0, 0.3, new_rng_state(0, DEVICE), clamp=True).cpu()
    assert torch.equal(noisy.isnan(), expected.isnan()) and noisy[~noisy.isnan()].abs().max() <= 1.0


def test_non_contiguous_grad_is_handled():
    x = torch.randn(6, 5, device=DEVICE)
    grad = torch.randn(5, 6, device=DEVICE).t()
    assert not grad.is_contiguous()
    expected = sgld_update_reference(x, grad, 0.2, 0.0)
    sgld_update_(x, grad, 0.2, 0.0, new_rng_state(0, DEVICE))
    _assert_close(x, expected)


def test_channels_last_x_is_updated_in_its_own_layout():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 5, 5, generator=gen).to(DEVICE)  # NCHW: the launcher matches x's layout
    expected = sgld_update_reference(x, grad, 0.3, 0.0, clamp=True)
    out = sgld_update_(x, grad, 0.3, 0.0, new_rng_state(0, DEVICE), clamp=True)
    assert out is x and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    _assert_close(x, expected)


def test_bad_inputs_raise_value_error():
    rng = new_rng_state(0, DEVICE)
    x = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        sgld_update_(x.t(), torch.zeros(6, 4, device=DEVICE), 1.0, 0.0, rng)
    with pytest.raises(ValueError, match="shape"):
        sgld_update_(x, torch.zeros(4, 5, device=DEVICE), 1.0, 0.0, rng)
    with pytest.raises(ValueError, match="meta"):
        sgld_update_(x, torch.zeros(4, 6, device="meta"), 1.0, 0.0, rng)
    with pytest.raises(ValueError, match="float32"):
        sgld_update_(x.bfloat16(), torch.zeros(4, 6, device=DEVICE), 1.0, 0.0, rng)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        sgld_update_(x, torch.zeros(4, 6, device=DEVICE, dtype=torch.float16), 1.0, 0.0, rng)
    with pytest.raises(ValueError, match="rng_state"):
        sgld_update_(x, torch.zeros_like(x), 1.0, 0.0, rng.int())
    with pytest.raises(ValueError, match="rng_state"):
        sgld_update_(x, torch.zeros_like(x), 1.0, 0.0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        new_rng_state(-1, DEVICE)
    assert rng.tolist() == [0, 0]  # nothing launched


def test_noise_mean_and_std():
    sigma, n = 0.5, N_STATS
    z = _noise(n, new_rng_state(1234, DEVICE), std=sigma).double().cpu()
    assert abs(z.mean().item()) < 5 * sigma / n**0.5
    assert abs(z.std().item() - sigma) < 5 * sigma / (2 * n) ** 0.5
    p = 0.682689492  # P(|Z| < 1) for a standard normal
    inside = (z.abs() < sigma).double().mean().item()
    assert abs(inside - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.isfinite(z).all()


def test_noise_is_fresh_each_call_and_offsets_chain():
    n = N_STATS
    rng = new_rng_state(99, DEVICE)
    a = _noise(n, rng).cpu()
    b = _noise(n, rng).cpu()
    assert rng.tolist() == [99, 2 * n]
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
    assert abs(corr) < 5 / n**0.5
    # counters are consecutive: two launches of 1000 + 1500 draw exactly one launch of 2500
    both = _noise(2500, new_rng_state(5, DEVICE)).cpu()
    rng = new_rng_state(5, DEVICE)
    parts = torch.cat([_noise(1000, rng), _noise(1500, rng)]).cpu()
    assert torch.equal(both, parts)


def test_same_seed_reproduces_bitwise_and_other_seed_differs():
    start = new_rng_state(2024, DEVICE)
    x = torch.randn(7, 3, 5, 5, device=DEVICE)
    grad = torch.randn_like(x)
    a = sgld_update_(x.clone(), grad, 1.0, 0.01, start.clone())
    b = sgld_update_(x.clone(), grad, 1.0, 0.01, start.clone())
    c = sgld_update_(x.clone(), grad, 1.0, 0.01, new_rng_state(2025, DEVICE))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_draw_fresh_noise():
    n = 4096
    x = torch.zeros(n, device="cuda")
    grad = torch.zeros_like(x)
    rng = new_rng_state(7, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernel outside the capture
        sgld_update_(x, grad, 0.0, 1.0, rng)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgld_update_(x, grad, 0.0, 1.0, rng)
    draws = []
    for _ in range(2):
        x.zero_()
        graph.replay()
        draws.append(x.clone())
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1])
    assert rng.tolist() == [7, 3 * n]  # warm-up + two replays (capture does not run the kernel)
    again = _noise(n, torch.tensor([7, 2 * n], device="cuda"))
    torch.testing.assert_close(draws[1], again, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (1025,), (3,)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_grad_clip_matches_reference(shape, grad_dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    grad = (3 * torch.randn(shape, generator=gen)).to(DEVICE, grad_dtype)
    grad.view(-1)[0] = float("nan")  # NaN stays NaN through the clip, as torch.clamp keeps it
    expected = sgld_update_reference(x, grad, 0.5, 0.0, grad_clip=0.75, clamp=False)
    assert torch.isnan(expected.view(-1)[0])
    finite = expected.view(-1)[1:]
    assert (finite - x.view(-1)[1:]).abs().max() <= 0.5 * 0.75 + 1e-6  # every step within the clip
    assert not torch.allclose(expected, sgld_update_reference(x, grad, 0.5, 0.0), equal_nan=True)
    sgld_update_(x, grad, 0.5, 0.0, new_rng_state(0, DEVICE), grad_clip=0.75)
    assert torch.isnan(x.view(-1)[0])
    _assert_close(x.view(-1)[1:], finite)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_clip"):
            sgld_update_(x, grad, 0.5, 0.0, new_rng_state(0, DEVICE), grad_clip=bad)


def test_grad_clip_with_noise_adds_the_same_noise():
    x = torch.randn(6, 7, device=DEVICE)
    grad = 10 * torch.randn(6, 7, device=DEVICE)
    rng = new_rng_state(11, DEVICE)
    noise = _noise(x.numel(), rng.clone()).view(6, 7)
    out = sgld_update_(x.clone(), grad, 1.0, 1.0, rng, grad_clip=0.1)
    _assert_close(out, sgld_update_reference(x, grad, 1.0, 1.0, noise=noise, grad_clip=0.1))

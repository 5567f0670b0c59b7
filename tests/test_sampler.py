"""Reference SGLD against hand-computed gradient steps; mode/grad hygiene; PCD write-back."""
import pytest
import torch
from torch import nn

from jemfast import JEM, SGLD, ReplayBuffer


def linear_jem(seed=0, d=4, c=3) -> JEM:
    torch.manual_seed(seed)
    return JEM(nn.Linear(d, c))


def hand_grad_energy(model: JEM, x: torch.Tensor) -> torch.Tensor:
    """dE/dx for E(x) = -logsumexp(Wx + b): -W^T softmax(Wx + b), computed without autograd."""
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    p = torch.softmax(x @ w.T + b, dim=1)
    return -p @ w


def test_one_step_noise_free_is_a_gradient_step():
    model = linear_jem()
    x0 = torch.rand(6, 4) * 2 - 1
    x1 = SGLD(n_steps=1, step_size=0.7, noise_std=0.0).run(model, x0)
    assert torch.allclose(x1, x0 - 0.7 * hand_grad_energy(model, x0), atol=1e-6)


def test_twenty_steps_match_iterated_hand_formula():
    model = linear_jem(1)
    x = torch.rand(5, 4) * 2 - 1
    out = SGLD(n_steps=20, step_size=0.3, noise_std=0.0).run(model, x)
    for _ in range(20):
        x = x - 0.3 * hand_grad_energy(model, x)
    assert torch.allclose(out, x, atol=1e-5)


def test_conditional_chain_uses_class_energy():
    model = linear_jem(2)
    x0 = torch.zeros(3, 4)
    y = torch.tensor([0, 1, 2])
    x1 = SGLD(n_steps=1, step_size=1.0, noise_std=0.0).run(model, x0, y)
    # E(x, y) = -(W x + b)[y]  =>  dE/dx = -W[y]
    assert torch.allclose(x1, x0 + model.classifier.weight.detach()[y], atol=1e-6)


def test_noise_statistics_on_a_flat_energy():
    class Flat(nn.Module):  # constant logits: dE/dx = 0, the chain is a pure random walk
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.sum(1, keepdim=True) * 0 + self.w.expand(x.shape[0], 2)

    torch.manual_seed(0)
    x0 = torch.zeros(4000, 5)
    out = SGLD(n_steps=20, step_size=1.0, noise_std=0.01).run(JEM(Flat()), x0)
    std = out.std().item()
    assert abs(std - 0.01 * 20 ** 0.5) < 0.002  # sigma * sqrt(K); se ~ 0.0447 / sqrt(2 * 20000)
    assert abs(out.mean().item()) < 0.001


def test_leaves_mode_and_parameter_grads_untouched():
    model = linear_jem()
    model.train()
    sgld = SGLD(n_steps=3, step_size=0.1, noise_std=0.01)
    sgld.run(model, torch.rand(4, 4))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgld.run(model, torch.rand(4, 4))
    assert not model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uses_eval_mode_during_the_chain():
    seen = []

    class Spy(nn.Linear):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    model = JEM(Spy(4, 3))
    model.train()
    SGLD(n_steps=2).run(model, torch.rand(2, 4))
    assert seen == [False, False] and model.training


def test_sample_writes_chains_back_to_the_buffer():
    torch.manual_seed(0)
    model = linear_jem()
    buf = ReplayBuffer(30, (4,), reinit_freq=0.0)
    before = buf.data.clone()
    x = SGLD(n_steps=2, step_size=0.5, noise_std=0.0).sample(model, buf, 8)
    changed = (buf.data != before).any(1)
    assert changed.sum() >= 1 and changed.sum() <= 8
    # every changed row now holds one of the returned chains
    for row in buf.data[changed]:
        assert (x == row).all(1).any()


@pytest.mark.parametrize("kwargs", [dict(n_steps=0), dict(step_size=float("nan")), dict(step_size=-1.0),
                                    dict(noise_std=-0.1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SGLD(**kwargs)


def test_differentiable_chain_matches_the_hand_formula_jacobian():
    """Robustness refinement differentiates through the chain: its Jacobian (second-order terms
    included) equals that of the iterated hand-written gradient step."""
    from jemfast.sgld import ChainSpec, sgld_chain

    model = linear_jem(3)
    x0 = torch.rand(1, 4, dtype=torch.float32) * 2 - 1
    spec = ChainSpec(n_steps=3, step_size=0.4, noise_std=0.0)

    def hand(x):
        for _ in range(3):
            x = x - 0.4 * hand_grad_energy(model, x)
        return x

    chain_jac = torch.autograd.functional.jacobian(
        lambda x: sgld_chain(model, x, None, spec, differentiable=True), x0)
    hand_jac = torch.autograd.functional.jacobian(hand, x0)
    assert (hand_jac.view(4, 4) - torch.eye(4)).abs().max() > 0.01  # the chain really bends
    torch.testing.assert_close(chain_jac, hand_jac, rtol=1e-5, atol=1e-6)
    plain = sgld_chain(model, x0.clone().requires_grad_(True), None, spec)
    assert not plain.requires_grad  # the non-differentiable loop detaches
    torch.testing.assert_close(plain, hand(x0), rtol=0, atol=1e-6)


def test_a_stop_request_ends_the_chain_between_steps():
    from jemfast.process import interrupt

    model = linear_jem()
    calls = []
    original = model.energy

    def counting_energy(x, y=None):
        calls.append(1)
        if len(calls) == 2:
            interrupt.request_stop(15)  # as the trainer's SIGTERM handler does mid-chain
        return original(x, y)

    model.energy = counting_energy
    try:
        with pytest.raises(interrupt.StopRequested):
            SGLD(n_steps=20, step_size=0.1, noise_std=0.0).run(model, torch.rand(3, 4))
    finally:
        interrupt.clear()
    assert len(calls) == 2  # stopped before the third step

"""JEM's energy view against hand-computed values."""
import math

import torch
from torch import nn

from jemfast import JEM


def linear_jem() -> JEM:
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    return JEM(lin)


def test_forward_returns_classifier_logits():
    model = linear_jem()
    x = torch.tensor([[1.0, 2.0]])
    assert torch.equal(model(x), model.classifier(x))


def test_energy_is_negative_logsumexp_by_hand():
    model = linear_jem()
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    # logits: [1.5, 3.5, 1.0] and [0.5, -0.5, 0.0]
    expected = [-math.log(math.exp(1.5) + math.exp(3.5) + math.exp(1.0)),
                -math.log(math.exp(0.5) + math.exp(-0.5) + math.exp(0.0))]
    assert torch.allclose(model.energy(x), torch.tensor(expected), atol=1e-6)


def test_class_energy_is_negative_logit():
    model = linear_jem()
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([1, 2])
    assert torch.allclose(model.energy(x, y), torch.tensor([-3.5, -0.0]), atol=1e-6)


def test_energy_relation_log_p_y_given_x():
    # log p(y|x) = -E(x, y) + E(x)
    model = linear_jem()
    x = torch.randn(5, 2)
    y = torch.randint(0, 3, (5,))
    log_p = torch.log_softmax(model(x), 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(-model.energy(x, y) + model.energy(x), log_p, atol=1e-6)

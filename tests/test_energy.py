"""JEM's energy view against hand-computed values; LogDensity and JEM's unprefixed keys."""
import math

import pytest
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


# ---- energies without key prefixes ------------------------------------------------------------
from jemfast import LogDensity  # noqa: E402


class CCF(nn.Module):
    """The original JEM code's class-conditional model: forward is log p(x) or log p(x, y)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.net = classifier

    def forward(self, x, y=None):
        logits = self.net(x)
        return logits.logsumexp(1) if y is None else logits.gather(1, y[:, None]).squeeze(1)


def bn_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def test_jem_loads_the_classifiers_own_keys_and_keeps_its_prefixed_ones():
    old = bn_classifier(0)
    old(torch.randn(8, 2))  # running statistics away from their defaults
    model = JEM(bn_classifier(1))
    assert all(k.startswith("classifier.") for k in model.state_dict())  # our checkpoints' keys
    model.load_state_dict(old.state_dict())  # an original script's model_state_dict
    for k, v in old.state_dict().items():
        assert torch.equal(model.state_dict()["classifier." + k], v)
    fresh = JEM(bn_classifier(2))
    fresh.load_state_dict(model.state_dict())  # and its own keys as before
    assert torch.equal(fresh.classifier[0].weight, old[0].weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        JEM(bn_classifier(3)).load_state_dict({"0.weight": old[0].weight})  # strict still means strict


def test_jem_unprefixed_keys_of_a_classifier_with_its_own_classifier_submodule():
    class Net(nn.Module):  # torchvision's VGG/DenseNet name their head `classifier`
        def __init__(self):
            super().__init__()
            self.features, self.classifier = nn.Linear(2, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.classifier(self.features(x))

    old, model = Net(), JEM(Net())
    model.load_state_dict(old.state_dict())
    assert torch.equal(model.classifier.classifier.weight, old.classifier.weight)


def test_log_density_energy_keys_modes_and_forward():
    f = CCF(bn_classifier(0))
    ld = LogDensity(f)
    x, y = torch.randn(5, 2), torch.tensor([0, 2, 1, 1, 0])
    ld.eval()
    assert not f.training and not f.net[1].training  # modes are f's
    assert torch.equal(ld.energy(x), -f(x)) and torch.equal(ld.energy(x, y), -f(x, y=y))
    assert torch.equal(ld(x), f(x)) and torch.equal(ld(x, y=y), f(x, y=y))  # forward passes through
    assert list(ld.state_dict()) == list(f.state_dict())  # no prefix
    assert [p for p in ld.parameters()] == [p for p in f.parameters()]
    other = LogDensity(CCF(bn_classifier(1)))
    other.load_state_dict(f.state_dict())  # f's own checkpoint loads into the adapter
    other.eval()
    assert torch.equal(other.energy(x), ld.energy(x))
    plain = CCF(bn_classifier(2))
    plain.load_state_dict(ld.state_dict())  # and the adapter's into a bare f
    nested, nested2 = nn.ModuleList([ld]), nn.ModuleList([LogDensity(CCF(bn_classifier(3)))])
    assert list(nested.state_dict()) == ["0." + k for k in f.state_dict()]
    nested2.load_state_dict(nested.state_dict())  # the same keys inside a bigger model
    assert torch.equal(nested2[0].f.net[0].weight, f.net[0].weight)


def test_log_density_and_jem_give_the_same_energies():
    clf = bn_classifier(0).eval()
    x, y = torch.randn(6, 2), torch.randint(0, 3, (6,))
    jem, ld = JEM(clf), LogDensity(CCF(clf))
    assert torch.allclose(jem.energy(x), ld.energy(x), atol=0, rtol=0)
    assert torch.allclose(jem.energy(x, y), ld.energy(x, y), atol=0, rtol=0)

"""jemfast.eval metrics against direct computations: ECE, AUROC (IS/FID: test_generation_metrics);
PGD projections; input-gradient-only scoring and refinement (no parameter gradients, model unchanged)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from jemfast.energy import JEM, energy_from_logits
from jemfast.eval.metrics import auroc, expected_calibration_error, reliability_bins
from jemfast.eval.ood import ood_scores
from jemfast.eval.robustness import _project, _random_start, defended_logits, pgd_robust, refine
from jemfast.models import SmallCNN


def hand_ece(conf, correct, n_bins):
    """ECE the slow way: loop over bins ((m-1)/M, m/M], the first bin also takes 0."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (m == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def test_ece_matches_hand_computation():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 2000)
    correct = (rng.uniform(size=2000) < conf ** 2).astype(float)  # over-confident on purpose
    for bins in (1, 10, 20):
        assert expected_calibration_error(conf, correct, bins) == pytest.approx(hand_ece(conf, correct, bins), abs=1e-12)


def test_ece_small_worked_example():
    # bins of width 0.5: (0, .5] holds 0.2, 0.4 (acc 1/2, conf .3); (.5, 1] holds 0.9, 1.0 (acc 1, conf .95)
    conf, correct = np.array([0.2, 0.4, 0.9, 1.0]), np.array([1, 0, 1, 1])
    assert expected_calibration_error(conf, correct, 2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.05)
    # edges are right-closed: 0.5 belongs to the first bin
    bins = reliability_bins(np.array([0.5, 0.0]), np.array([1, 1]), 2)
    assert bins["count"].tolist() == [2, 0]
    assert expected_calibration_error(np.ones(10), np.ones(10), 20) == 0.0


def test_auroc_is_sklearns_on_random_scores_with_ties():
    rng = np.random.default_rng(1)
    for trial in range(5):
        pos = rng.normal(0.5, 1, 300).round(1)  # rounding makes many ties, within and across classes
        neg = rng.normal(0.0, 1, 200).round(1)
        labels = np.r_[np.ones(300), np.zeros(200)]
        assert auroc(pos, neg) == roc_auc_score(labels, np.r_[pos, neg])
    pos, neg = rng.integers(0, 3, 50).astype(float), rng.integers(0, 3, 70).astype(float)  # ties everywhere
    assert auroc(pos, neg) == roc_auc_score(np.r_[np.ones(50), np.zeros(70)], np.r_[pos, neg])


def test_auroc_hand_computed():
    # pairs (pos, neg) with pos > neg count 1, ties 1/2: 0.9 beats all 3; 0.6 beats all 3;
    # 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 3 + 1.5) / 9
    assert auroc(np.array([0.9, 0.4, 0.6]), np.array([0.5, 0.4, 0.1])) == pytest.approx(7.5 / 9, abs=1e-15)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auroc(np.ones(5), np.ones(7)) == 0.5
    # NaN = least in-distribution; infinities keep their order
    assert auroc(np.array([1.0]), np.array([np.nan])) == 1.0
    assert auroc(np.array([np.inf, -np.inf]), np.array([0.0, np.nan])) == pytest.approx(2.5 / 4)
    assert np.isnan(auroc(np.array([]), np.array([1.0])))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("training", [True, False])
def test_scores_and_refinement_take_no_parameter_gradients(training):
    torch.manual_seed(0)
    model = JEM(SmallCNN(1, 10, 8))
    model.train(training)
    before = _snapshot(model)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 10, (16,))
    s = ood_scores(model, x, batch_size=5)
    assert set(s) == {"log_px", "max_py", "neg_grad"} and all(v.shape == (16,) for v in s.values())
    refined = refine(model, x, 3, 1.0, 0.01, differentiable=False)
    assert not refined.requires_grad
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        out = defended_logits(model, xr, 2, 1.0, 0.01, differentiable=True)
        (g,) = torch.autograd.grad(out.sum(), xr)  # the attack's gradient through the chain
    assert g.abs().sum() > 0
    pgd_robust(model, x, y, torch.full((16,), 0.1), "l2", 2, 0.5, 1, 1, 1.0, 0.01)
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refinement_gradient_is_exact_through_the_chain():
    """The differentiable refinement's input gradient matches finite differences (noise off)."""
    class DoubleJEM(JEM):  # JEM.energy casts to fp32; keep fp64 for a tight comparison
        def energy(self, x, y=None):
            return energy_from_logits(self.classifier(x), y)

    torch.manual_seed(0)
    model = DoubleJEM(SmallCNN(1, 3, 4)).double().eval()
    x = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    f = lambda z: model(refine(model, z, 2, 0.5, 0.0, True))[0, 1]  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x)
    d = torch.randn_like(x)
    h = 1e-5
    fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
    assert (g * d).sum().item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    # ... and differs from the gradient that ignores the chain's Jacobian (attack "around" SGLD)
    with torch.enable_grad():
        (g0,) = torch.autograd.grad(model(refine(model, x, 2, 0.5, 0.0, False).requires_grad_(True))[0, 1], x,
                                    allow_unused=True)
    assert g0 is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_projection_stays_in_ball_and_range(norm):
    torch.manual_seed(0)
    x = torch.rand(50, 1, 8, 8) * 2 - 1
    eps = torch.linspace(0.0, 2.0, 50)
    delta = _project(torch.randn_like(x) * 3, x, eps, norm)
    start = _random_start(x, eps, norm)
    for d in (delta, start):
        size = d.flatten(1).abs().amax(1) if norm == "linf" else d.flatten(1).norm(dim=1)
        assert torch.all(size <= eps + 1e-5)
        assert torch.all((x + d).abs() <= 1 + 1e-6)


def test_pgd_eps_zero_is_clean_accuracy():
    torch.manual_seed(0)
    model = JEM(SmallCNN(1, 10, 8)).eval()
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    y = model(x).argmax(1)
    assert pgd_robust(model, x, y, torch.zeros(32), "linf", 3, 0.5, 1, 0, 1.0, 0.0).all()
    # a huge budget breaks an untrained model almost everywhere
    assert pgd_robust(model, x, y, torch.full((32,), 2.0), "linf", 10, 0.25, 1, 0, 1.0, 0.0).float().mean() < 0.5

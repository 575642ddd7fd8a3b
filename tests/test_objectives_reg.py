"""Regularised and margin objectives: alp, clp, vat, dynamic-at, mma, grad-reg.

Each test checks the method's formula against a hand computation on a tiny case, or a
behaviour that only the method has; the generic contract (finite loss, gradients reach every
parameter, mode restored) is tested for every registered objective elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import TinyCNN, make_quadrants
from robustlab.attacks.pgd import PGD
from robustlab.training.objectives import create
from robustlab.training.objectives.clp import random_partners
from robustlab.training.objectives.dynamic_at import fosc
from robustlab.training.objectives.vat import frozen_running_stats, kl_logits


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- alp -----------------------------------------------------------------------------------
def test_alp_is_mixed_ce_plus_mean_squared_logit_difference(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    threat = rl.ThreatModel("linf", 0.15)
    loss = create("alp", weight=0.7, steps=3)(toy_model, x, y, threat=threat, generator=gen(4))
    x_adv = PGD(threat, steps=3, keep_best=False).craft(toy_model, x, y, gen(4))
    zc, za = toy_model(x), toy_model(x_adv)
    pairing = sum(((zc[i] - za[i]) ** 2).sum() for i in range(16)) / (16 * zc.shape[1])
    expected = 0.5 * F.cross_entropy(zc, y) + 0.5 * F.cross_entropy(za, y) + 0.7 * pairing
    assert pairing > 1e-3  # the attack moved the logits: the term is tested, not zero
    torch.testing.assert_close(loss, expected)


# --- clp -----------------------------------------------------------------------------------
def test_clp_pairs_each_example_with_another_on_known_logits():
    logits = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.2, 0.2, 0.9], [1.0, 1.0, 0.0]])
    y = torch.tensor([1, 0, 2, 0])
    partner = random_partners(4, gen(3), torch.device("cpu"))
    assert sorted(partner.tolist()) == [0, 1, 2, 3]  # each example is someone's partner once
    assert (partner != torch.arange(4)).all()  # and nobody is paired with itself
    obj = create("clp", weight=0.5, squeeze=0.2)
    assert not obj.needs_threat
    loss = obj(nn.Identity(), logits, y, generator=gen(3))  # the "model" returns x as logits
    pairs = [((logits[i] - logits[int(partner[i])]) ** 2).sum() / 3 for i in range(4)]
    squeeze = (logits**2).sum() / 12
    expected = F.cross_entropy(logits, y) + 0.5 * sum(pairs) / 4 + 0.2 * squeeze
    torch.testing.assert_close(loss, expected)
    same = create("clp", weight=3.0)(nn.Identity(), logits[[1, 1, 1]], y[:3], generator=gen(0))
    torch.testing.assert_close(same, F.cross_entropy(logits[[1, 1, 1]], y[:3]))


# --- vat -----------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_vat_perturbation_norm_and_running_stats(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    torch.manual_seed(0)
    model = BNNet()
    model(x[:8])  # non-trivial running statistics to start from
    reference = copy.deepcopy(model)
    reference(x)  # what VAT's one clean train-mode pass does to the statistics
    obj = create("vat", eps=1.5)
    assert not obj.needs_threat
    obj(model, x, y, generator=gen(0)).backward()
    assert model.training and model.bn.momentum == 0.1
    for name, buf in reference.bn.named_buffers():  # the perturbed passes left them alone
        assert torch.equal(buf, getattr(model.bn, name)), name
    r = obj.perturbation(model, x, model(x), gen(0))
    torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((16,), 1.5))
    model.eval()
    with frozen_running_stats(model):  # graphs that saved eval-mode statistics stay valid
        out = model(x)
    out.sum().backward()


def test_vat_power_iteration_finds_the_top_eigenvector_of_the_kl_hessian():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    obj = create("vat", eps=0.5, power_iterations=30)
    z = lin(x)
    r = obj.perturbation(lin, x, z, gen(0))
    p = z.softmax(1)
    for i in range(3):  # Hessian of r -> KL(p || p(x + r)) at 0: W^T (diag p - p p^T) W
        h = lin.weight.T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ lin.weight
        top = torch.linalg.eigh(h.detach()).eigenvectors[:, -1]
        assert abs(float(r[i] @ top)) / 0.5 > 0.999
    y = torch.tensor([0, 1, 2])
    loss = obj(lin, x, y, generator=gen(0))
    expected = F.cross_entropy(z, y) + kl_logits(z, lin(x + r)).mean()
    torch.testing.assert_close(loss, expected)


# --- dynamic-at ----------------------------------------------------------------------------
def test_fosc_matches_a_hand_computation():
    x0 = torch.zeros(2, 3)
    x_adv = torch.tensor([[0.1, -0.05, 0.0], [0.1, -0.1, 0.1]])
    g = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 2.0]])
    # row 0: 0.1 * 3.5 - (0.1 * 1 + 0.05 * 2) = 0.15; row 1: at the maximising corner -> 0
    torch.testing.assert_close(fosc(x_adv, x0, g, 0.1), torch.tensor([0.15, 0.0]))


def test_dynamic_at_schedule_and_stopping(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    threat = rl.ThreatModel("linf", 0.1)
    obj = create("dynamic-at", steps=5, c_max=0.5)
    obj.begin_epoch(5, 12)  # T' = 12 * 100 / 120 = 10
    assert obj.threshold == pytest.approx(0.25)
    obj.begin_epoch(11, 12)
    assert obj.threshold == 0.0
    stop_all = create("dynamic-at", steps=5, c_max=1e9)
    stop_all.begin_epoch(0, 10)
    one_step = PGD(threat, steps=1, step_size=0.025, keep_best=False)
    torch.testing.assert_close(
        stop_all.perturb(toy_model, x, y, threat, gen(2)),
        one_step.craft(toy_model, x, y, gen(2)),
        atol=0,
        rtol=0,
    )
    plain = PGD(threat, steps=5, step_size=0.025, keep_best=False).craft(toy_model, x, y, gen(2))
    torch.testing.assert_close(obj.perturb(toy_model, x, y, threat, gen(2)), plain, atol=0, rtol=0)
    assert not torch.equal(plain, one_step.craft(toy_model, x, y, gen(2)))
    with pytest.raises(ValueError, match="linf"):
        obj(toy_model, x, y, threat=rl.ThreatModel("l2", 1.0))


# --- mma -----------------------------------------------------------------------------------
def test_mma_finds_the_shortest_perturbation_of_a_linear_model():
    lin = nn.Linear(5, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.5], [0.0, 0.0, 0.0, 0.0, 0.0]]))
        lin.bias.zero_()
    x = torch.tensor([[0.3, 0.0, 0.2, 0.0, 0.1], [2.0, -1.0, 1.0, 0.0, 1.0]])
    y = torch.zeros(2, dtype=torch.long)  # margins z0 - z1: 0.55 and 6.5; ||w0 - w1||_1 = 5
    threat = rl.ThreatModel("linf", 0.2, bounds=(-10.0, 10.0))
    obj = create("mma", d_max=0.4)
    x_star, broken = obj.shortest(lin, x, y, threat, gen(0))
    assert broken.tolist() == [True, False]  # the second point needs 1.3 > d_max
    radius = threat.distance(x_star, x)
    assert 0.11 <= radius[0] <= 0.11 + 0.4 / 2**9  # the minimal linf distance 0.55 / 5
    assert lin(x_star[:1]).argmax(1).item() == 1
    assert radius[1] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="linf and l2"):
        obj.shortest(lin, x, y, rl.ThreatModel("l1", 1.0), gen(0))


def test_mma_loss_trains_correct_points_at_delta_star_and_wrong_ones_clean(toy_model, toy_data):
    x, y = toy_data[0][:24], toy_data[1][:24].clone()
    y[:6] = (y[:6] + 1) % 4  # six misclassified points
    threat = rl.ThreatModel("linf", 0.1)
    obj = create("mma", steps=5)
    loss = obj(toy_model, x, y, threat=threat, generator=gen(1))
    correct = toy_model(x).argmax(1) == y
    assert correct.sum() >= 12 and not correct[:6].any()
    x_star, broken = obj.shortest(toy_model, x[correct], y[correct], threat, gen(1))
    assert (threat.distance(x_star, x[correct]) <= 0.2 + 1e-6).all()  # d_max = 2 eps
    assert (toy_model(x_star).argmax(1) != y[correct])[broken].all() and broken.any()
    ce_clean = F.cross_entropy(toy_model(x), y, reduction="none")
    terms = ce_clean.clone()  # misclassified points: clean CE
    terms[correct] = F.cross_entropy(toy_model(x_star), y[correct], reduction="none") * broken
    expected = ce_clean.mean() / 3 + 2 / 3 * terms.mean()
    torch.testing.assert_close(loss, expected)


# --- grad-reg ------------------------------------------------------------------------------
def test_grad_reg_penalty_matches_the_closed_form_of_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.rand(5, 2, 4), torch.tensor([0, 1, 2, 1, 0])
    obj = create("grad-reg", weight=0.3)
    assert not obj.needs_threat
    loss = obj(lin, x, y)
    loss.backward()
    w, b = (p.detach().clone().requires_grad_(True) for p in lin[1].parameters())
    z = x.flatten(1) @ w.T + b
    g = (z.softmax(1) - F.one_hot(y, 3)) @ w  # d CE_i / d x_i = W^T (p_i - e_y)
    expected = (F.cross_entropy(z, y, reduction="none") + 0.3 * g.square().sum(1)).mean()
    torch.testing.assert_close(loss, expected)
    expected.backward()  # the double backward gives the parameter gradient of the penalty
    torch.testing.assert_close(lin[1].weight.grad, w.grad)
    torch.testing.assert_close(lin[1].bias.grad, b.grad)


# --- options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, options, what",
    [
        ("alp", {"weight": -1.0}, "alp weight"),
        ("clp", {"squeeze": float("nan")}, "clp squeeze"),
        ("vat", {"eps": 0}, "vat eps"),
        ("dynamic-at", {"dynamic_epochs": 0}, "dynamic-at dynamic_epochs"),
        ("mma", {"clean_weight": 1.5}, "mma clean_weight"),
        ("grad-reg", {"weight": "1"}, "grad-reg weight"),
    ],
)
def test_bad_options_are_named(name, options, what):
    with pytest.raises(ValueError, match=what):
        create(name, **options)


# --- training ------------------------------------------------------------------------------
def _robust_accuracy(objective: str, options: dict, toy_data) -> float:
    x, y = make_quadrants(512, seed=5)
    threat = rl.ThreatModel("linf", 0.18)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial weights for every objective
        model = TinyCNN()
    rl.training.fit(
        model,
        (x, y),
        objective=objective,
        threat=threat,
        epochs=8,
        batch_size=64,
        optimizer="adam",
        lr=0.01,
        schedule="cosine",
        weight_decay=0.0,
        objective_options=options,
    )
    return rl.attacks.create("pgd", threat, steps=20)(model, *toy_data).robust_accuracy


@pytest.fixture(scope="module")
def natural_robust_accuracy(toy_data) -> float:
    return _robust_accuracy("natural", {}, toy_data)


@pytest.mark.parametrize("objective", ["alp", "mma"])
def test_alp_and_mma_make_a_model_more_robust(objective, toy_data, natural_robust_accuracy):
    robust = _robust_accuracy(objective, {"steps": 5}, toy_data)
    # measured over init seeds 0-3: natural 0.12-0.55, alp 0.75-0.91, mma 0.70-0.92 (gap >= 0.36)
    assert robust - natural_robust_accuracy > 0.2, (natural_robust_accuracy, robust)

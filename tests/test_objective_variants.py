"""The paper and lecture variants of ALP, CLP and MMA (issue 23, item 3) against hand-computed
losses: an identity linear model (logits = inputs) and fixed adversarial points, so every term
is a number written out below."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.training.objectives.pgd_at import PGDAT

THREAT = rl.ThreatModel("linf", 0.1)


def _identity() -> nn.Linear:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    return model


def ce(logits: list[float], y: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[y]


def _fixed_adversary(monkeypatch, x_adv: torch.Tensor) -> None:
    monkeypatch.setattr(PGDAT, "adversarial", lambda self, model, x, y, threat, gen: x_adv)


# --- ALP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "lecture"])
def test_alp_variants_by_hand(monkeypatch, variant):
    x, x_adv, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    _fixed_adversary(monkeypatch, x_adv)
    obj = rl.training.create_objective("alp", weight=0.25, variant=variant)
    got = obj(_identity(), x, y, threat=THREAT).item()
    # clean logits (1, 0), adversarial (0, 1): ||a - b||^2 = 2 over K = 2 classes
    if variant == "paper":  # mixed CE, squared distance averaged over classes
        want = (ce([1, 0], 0) + ce([0, 1], 0)) / 2 + 0.25 * 2 / 2
    else:  # adversarial CE only, squared distance summed over classes
        want = ce([0, 1], 0) + 0.25 * 2
    assert got == pytest.approx(want, rel=1e-6)
    assert obj.config()["variant"] == variant


# --- CLP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "lecture"])
def test_clp_variants_by_hand(monkeypatch, variant):
    # a batch of two: each example's partner is the other one, whatever the draw
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    x_adv = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    _fixed_adversary(monkeypatch, x_adv)
    obj = rl.training.create_objective("clp", weight=0.5, squeeze=0.1, variant=variant)
    got = obj(_identity(), x, y, threat=THREAT).item()
    # pair differences (1, -2) and (-1, 2): squared sums 5 each; squared logits 1 and 4
    if variant == "paper":  # clean CE, no attack; terms averaged over the 2 classes
        want = (ce([1, 0], 0) + ce([0, 2], 1)) / 2 + 0.5 * 5 / 2 + 0.1 * (1 + 4) / 4
    else:  # CE at the adversarial points; terms summed over classes
        want = (ce([0, 1], 0) + ce([1, 0], 1)) / 2 + 0.5 * 5 + 0.1 * (1 + 4) / 2
    assert got == pytest.approx(want, rel=1e-6)


def test_clp_lecture_needs_a_threat_and_the_paper_does_not():
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    assert torch.isfinite(rl.training.create_objective("clp")(_identity(), x, y))
    with pytest.raises(ValueError, match="needs a threat model"):
        rl.training.create_objective("clp", variant="lecture")(_identity(), x, y)


# --- MMA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "lecture"])
def test_mma_variants_by_hand(variant):
    # 0 and 1 correct (class 0), 2 misclassified; AN-PGD breaks 0 only
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    obj = rl.training.create_objective("mma", variant=variant)
    seen = []

    def shortest(model, xc, yc, threat, generator):
        seen.append(xc.clone())
        return torch.tensor([[0.4, 0.6], [1.5, 0.5]]), torch.tensor([True, False])

    obj.shortest = shortest
    got = obj(_identity(), x, y, threat=THREAT).item()
    assert torch.equal(seen[0], x[:2])  # only the correct points are searched
    broken, at_d_max, wrong = ce([0.4, 0.6], 0), ce([1.5, 0.5], 0), ce([0, 1], 0)
    clean = (ce([1, 0], 0) + ce([2, 0], 0) + ce([0, 1], 0)) / 3
    if variant == "paper":  # c = 1/3; the hinge drops the correct point AN-PGD did not break
        want = clean / 3 + (2 / 3) * (broken + 0 + wrong) / 3
    else:  # no clean term, no hinge: the unbroken point trains at its d_max point
        want = (broken + at_d_max + wrong) / 3
    assert got == pytest.approx(want, rel=1e-6)


def test_mma_explicit_options_override_the_variant():
    obj = rl.training.create_objective("mma", variant="lecture", clean_weight=0.5)
    assert (obj.clean_weight, obj.hinge, obj.variant) == (0.5, False, "lecture")
    paper = rl.training.create_objective("mma").config()
    assert (paper["clean_weight"], paper["hinge"]) == (pytest.approx(1 / 3), True)


# --- shared -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alp", "clp", "mma"])
def test_lecture_variants_train_a_real_model(name):
    torch.manual_seed(0)
    model = rl.models.create("lenet", num_classes=4, input_size=16)
    x, y = torch.rand(6, 1, 16, 16), torch.arange(6) % 4
    obj = rl.training.create_objective(name, variant="lecture", steps=2)
    loss = obj(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=f"valid {name} variants are: paper, lecture"):
        rl.training.create_objective(name, variant="slides")

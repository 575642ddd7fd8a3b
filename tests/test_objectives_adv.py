"""Adversarial-training objectives fgsm-at, fast-at, free-at, trades, mart: each checked against
a hand computation of its rule, plus a short training run showing a robustness gain."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import robustlab as rl
from helpers import TinyCNN, make_quadrants
from robustlab.training.objectives import create
from robustlab.training.objectives.mart import mart_loss
from robustlab.training.objectives.trades import trades_loss

LINF = rl.ThreatModel("linf", 0.1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch(toy_data):
    return toy_data[0][:32].clone(), toy_data[1][:32].clone()


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]


# --- fgsm-at, fast-at ---------------------------------------------------------------------------
def test_fgsm_at_is_the_clean_and_fgsm_mix(toy_model, batch):
    x, y = batch
    x0 = x.clone()
    toy_model.train()
    loss = create("fgsm-at")(toy_model, x, y, threat=LINF, generator=_gen())
    x_fgsm = (x + 0.1 * _input_grad(toy_model, x, y).sign()).clamp(0, 1)
    want = 0.5 * F.cross_entropy(toy_model(x), y) + 0.5 * F.cross_entropy(toy_model(x_fgsm), y)
    torch.testing.assert_close(loss, want)
    assert torch.equal(x, x0) and toy_model.training
    clean = create("fgsm-at", alpha=1.0)(toy_model, x, y, threat=LINF)
    torch.testing.assert_close(clean, F.cross_entropy(toy_model(x), y))
    with pytest.raises(ValueError, match="alpha"):
        create("fgsm-at", alpha=1.5)


def test_fast_at_steps_from_a_random_start(toy_model, batch):
    x, y = batch
    obj = create("fast-at")
    x_adv = obj.perturb(toy_model, x, y, LINF, _gen(3))
    assert LINF.contains(x_adv, x).all()
    # by hand: uniform start, one step of 1.25 eps, projection into ball and bounds
    start = LINF.random_init(x, _gen(3))
    delta = (start + 0.125 * _input_grad(toy_model, start, y).sign() - x).clamp(-0.1, 0.1)
    torch.testing.assert_close(x_adv, (x + delta).clamp(0, 1))
    fgsm = (x + 0.1 * _input_grad(toy_model, x, y).sign()).clamp(0, 1)
    assert (x_adv - fgsm).abs().amax() > 0.05
    assert not torch.equal(x_adv, obj.perturb(toy_model, x, y, LINF, _gen(4)))
    loss = obj(toy_model, x, y, threat=LINF, generator=_gen(3))
    torch.testing.assert_close(loss, F.cross_entropy(toy_model(x_adv), y))
    with pytest.raises(ValueError, match="alpha"):
        create("fast-at", alpha=0)


# --- free-at ------------------------------------------------------------------------------------
def _replay(obj, model, x, y, threat=LINF):
    loss = obj(model, x, y, threat=threat)
    model.zero_grad()
    loss.backward()
    obj.after_backward()
    return loss


def test_free_at_carries_delta_in_the_ball_and_bounds(toy_model, batch):
    x, y = batch
    obj = create("free-at", replays=2)
    assert obj.replays == 2 and obj.state_dict() == {}
    _replay(obj, toy_model, x, y)
    want = (x + 0.1 * _input_grad(toy_model, x, y).sign()).clamp(0, 1) - x  # from delta = 0
    torch.testing.assert_close(obj.delta, want)
    # the next minibatch starts from the carried delta
    x2, y2 = x.flip(0), y.flip(0)
    d = obj.delta.clone()
    loss = _replay(obj, toy_model, x2, y2)
    torch.testing.assert_close(loss, F.cross_entropy(toy_model((x2 + d).clamp(0, 1)), y2))
    assert obj.delta.abs().amax() <= 0.1 + 1e-6
    assert LINF.contains(x2 + obj.delta, x2).all()
    # a smaller batch uses and updates the first rows only; a larger one grows delta
    d = obj.delta.clone()
    _replay(obj, toy_model, x[:5], y[:5])
    assert obj.delta.shape == x.shape and torch.equal(obj.delta[5:], d[5:])
    assert not torch.equal(obj.delta[:5], d[:5])
    big = torch.cat([x, x[:8]])
    _replay(obj, toy_model, big, torch.cat([y, y[:8]]))
    assert obj.delta.shape[0] == 40 and LINF.contains(big + obj.delta, big).all()


def test_free_at_l2_and_misuse(toy_model, batch):
    x, y = batch
    l2 = rl.ThreatModel("l2", 0.5)
    obj = create("free-at")
    for _ in range(3):
        _replay(obj, toy_model, x, y, l2)
    assert l2.contains(x + obj.delta, x).all()
    assert obj.delta.flatten(1).norm(dim=1).amax() > 0.4  # steps of length eps
    with pytest.raises(ValueError, match="linf and l2"):
        obj(toy_model, x, y, threat=rl.ThreatModel("l1", 1.0))
    obj(toy_model, x, y, threat=LINF)
    with pytest.raises(RuntimeError, match="before loss.backward"):
        obj.after_backward()
    with pytest.raises(ValueError, match="delta"):
        obj.load_state_dict({"noise": x})
    with pytest.raises(ValueError, match="replays"):
        create("free-at", replays=0)


def test_free_at_resume_from_state_dict_is_exact(batch):
    x, y = batch
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    obj = create("free-at", replays=2)

    def run(obj, model, opt, steps):
        out = []
        for i in range(steps):
            sl = slice(0, 32) if i % 3 else slice(0, 20)  # include partial batches
            loss = obj(model, x[sl], y[sl], threat=LINF)
            opt.zero_grad()
            loss.backward()
            obj.after_backward()
            opt.step()
            out.append(loss.item())
        return out

    run(obj, model, opt, 4)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), obj.state_dict())
    first = run(obj, model, opt, 4)
    model2 = TinyCNN()
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved[1])
    obj2 = create("free-at", replays=2)
    obj2.load_state_dict(saved[2])
    assert run(obj2, model2, opt2, 4) == first
    fresh = create("free-at", replays=2)  # without the state the run differs
    model3 = TinyCNN()
    model3.load_state_dict(saved[0])
    assert run(fresh, model3, torch.optim.SGD(model3.parameters(), lr=0.05), 1)[0] != first[0]


# --- trades, mart -------------------------------------------------------------------------------
def _kl_by_hand(p, q):
    """KL(p_i || q_i) per row of two lists of probability vectors."""
    return [
        sum(p[i][c] * math.log(p[i][c] / q[i][c]) for c in range(len(p[i]))) for i in range(len(p))
    ]


def test_trades_outer_loss_by_hand(toy_model, batch):
    x, y = batch
    obj = create("trades", beta=6.0, steps=3)
    x_adv = obj.perturb(toy_model, x, LINF, _gen())
    assert LINF.contains(x_adv, x).all()
    obj.perturb = lambda *args: x_adv  # a fixed x' to check the outer formula
    loss = obj(toy_model, x, y, threat=LINF)
    p = F.softmax(toy_model(x), 1).tolist()
    q = F.softmax(toy_model(x_adv), 1).tolist()
    ce = sum(-math.log(p[i][int(y[i])]) for i in range(len(p))) / len(p)
    assert loss.item() == pytest.approx(ce + 6.0 * sum(_kl_by_hand(p, q)) / len(p), rel=1e-5)
    clean = create("trades", beta=0.0)(toy_model, x, y, threat=LINF)
    torch.testing.assert_close(clean, F.cross_entropy(toy_model(x), y))


@pytest.mark.parametrize("outer", [trades_loss, mart_loss])
def test_outer_losses_detach_nothing(outer):
    """Autograd agrees with finite differences in both logits: no stop-gradient anywhere
    (detaching p(x), or MART's weight 1 - p_y(x), fails this)."""
    g = torch.Generator().manual_seed(0)
    lc = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    la = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda a, b: outer(a, b, y, 6.0), (lc, la))


def test_trades_inner_maximisation_raises_the_kl(toy_model, batch):
    x, y = batch
    with torch.no_grad():
        p = F.softmax(toy_model(x), 1)

    def kl(xa):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(toy_model(xa), 1), p, reduction="batchmean").item()

    x_adv = create("trades", steps=5).perturb(toy_model, x, LINF, _gen())
    assert LINF.contains(x_adv, x).all()
    assert kl(x_adv) > 5 * kl(LINF.random_init(x, _gen()))
    with pytest.raises(ValueError, match="linf and l2"):
        create("trades").perturb(toy_model, x, rl.ThreatModel("l1", 1.0), _gen())


def test_mart_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    lc, la = torch.randn(5, 4, generator=g), 3 * torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 3])
    p, q, t = F.softmax(lc, 1).tolist(), F.softmax(la, 1).tolist(), y.tolist()
    bce, reg = [], []
    for i in range(5):
        top_wrong = max(q[i][k] for k in range(4) if k != t[i])
        bce.append(-math.log(q[i][t[i]]) - math.log(1.0001 - top_wrong))
        kl = sum(p[i][c] * (math.log(p[i][c]) - math.log(q[i][c] + 1e-12)) for c in range(4))
        reg.append(kl * (1.0000001 - p[i][t[i]]))
    assert mart_loss(lc, la, y, 0.0).item() == pytest.approx(sum(bce) / 5, rel=1e-5)
    want = (sum(bce) + 5.0 * sum(reg)) / 5
    assert mart_loss(lc, la, y, 5.0).item() == pytest.approx(want, rel=1e-5)


def test_mart_attacks_cross_entropy(toy_model, batch):
    x, y = batch
    obj = create("mart", steps=5)
    x_adv = obj.perturb(toy_model, x, y, LINF, _gen())
    assert LINF.contains(x_adv, x).all()
    with torch.no_grad():
        assert F.cross_entropy(toy_model(x_adv), y) > 2 * F.cross_entropy(toy_model(x), y)
    obj.perturb = lambda *args: x_adv  # the loss is the outer formula at that point
    loss = obj(toy_model, x, y, threat=LINF)
    torch.testing.assert_close(loss, mart_loss(toy_model(x), toy_model(x_adv), y, 6.0))


# --- training -----------------------------------------------------------------------------------
def _train(objective: str, threat, **options) -> TinyCNN:
    """A tiny loop in the trainer's documented order: ceil(epochs / replays) passes, each
    minibatch ``replays`` times loss -> zero_grad -> backward -> after_backward -> step."""
    x, y = make_quadrants(512, seed=5)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial weights for every objective
        model = TinyCNN()
    obj = create(objective, **options)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen, epochs = _gen(), 8
    model.train()
    for epoch in range(math.ceil(epochs / obj.replays)):
        order = torch.randperm(len(x), generator=_gen(epoch))
        for i in range(0, len(x), 64):
            xb, yb = x[order[i : i + 64]], y[order[i : i + 64]]
            for _ in range(obj.replays):
                loss = obj(model, xb, yb, threat=threat, generator=gen)
                opt.zero_grad()
                loss.backward()
                obj.after_backward()
                opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def natural_robust_accuracy(toy_data):
    threat = rl.ThreatModel("linf", 0.18)
    model = _train("natural", threat)
    return rl.attacks.create("pgd", threat, steps=20)(model, *toy_data).robust_accuracy


# PGD-20 robust accuracy measured over init seeds 0-3: natural 0.18-0.37, trades 0.59-0.83,
# free-at 0.55-0.86, fast-at 0.74-0.81, mart 0.78-0.92 (smallest gap over natural: 0.28);
# fgsm-at 0.43-0.62 is left out (gap down to 0.06).
@pytest.mark.parametrize(
    "objective, options",
    [
        ("trades", {"steps": 5}),
        ("free-at", {"replays": 4}),
        ("fast-at", {}),
        ("mart", {"steps": 5}),
    ],
)
def test_training_makes_a_model_more_robust(objective, options, natural_robust_accuracy, toy_data):
    threat = rl.ThreatModel("linf", 0.18)
    model = _train(objective, threat, **options)
    robust = rl.attacks.create("pgd", threat, steps=20)(model, *toy_data).robust_accuracy
    assert robust - natural_robust_accuracy > 0.15, (robust, natural_robust_accuracy)

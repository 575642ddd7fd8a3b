"""Certified training (IBP, CROWN-IBP; robustlab/training/objectives/ibp.py): the schedules
against hand values, the verified loss against the worst-case logits built by hand where the
bounds are exact, and a few training steps that verify more points than natural training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import NUM_CLASSES, make_quadrants
from robustlab.defenses.verify import verify
from robustlab.training.objectives.ibp import anneal, eps_ramp, verified_loss, worst_case_logits

THREAT = rl.ThreatModel("linf", 0.1)


def _linear(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(6, 3))


def _interior(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Points whose linf ball of radius 0.1 lies inside [0, 1] (the box clips nothing)."""
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 1, 2, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _steps(obj, model, x, y, n: int) -> None:
    """``n`` training-mode calls, as the trainer makes them (the objective counts them)."""
    model.train()
    for _ in range(n):
        obj(model, x, y, threat=THREAT)


# --- the schedules ---------------------------------------------------------------------------
def test_eps_ramp_and_anneal_by_hand():
    # warm-up 2 epochs, ramp over 4: 0 until t = 2, then (t - 2) / 4, then 1
    assert [eps_ramp(t, 2, 4) for t in (0, 1.99, 2, 3, 5, 6, 9)] == [0, 0, 0, 0.25, 0.75, 1, 1]
    assert (eps_ramp(1.99, 2, 0), eps_ramp(2, 2, 0)) == (0, 1)
    # kappa 1 -> 0.5 (IBP): a quarter into the ramp 0.875; CROWN-IBP's formula
    # (eps_max - eps (1 - final)) / eps_max at eps = 0.03 of 0.1, final 0: 0.7
    assert anneal(0.25, 0.5) == 0.875 and anneal(1, 0.5) == 0.5 and anneal(0, 0.0) == 1
    assert anneal(0.3, 0.0) == pytest.approx((0.1 - 0.03 * (1 - 0.0)) / 0.1)


def test_schedule_follows_begin_epoch_per_step():
    model, (x, y) = _linear(), _interior()
    obj = rl.training.create_objective(
        "crown-ibp", warmup=1, ramp=2, kappa_final=0.0, beta_final=0.5
    )
    # outside a trainer: the end of the schedule
    assert (obj.position, obj.fraction, obj.kappa, obj.beta) == (None, 1, 0, 0.5)
    obj.begin_epoch(0, 5)
    assert (obj.fraction, obj.kappa, obj.beta) == (0, 1, 1)
    _steps(obj, model, x, y, 4)  # epoch 0: 4 steps, all at eps 0
    assert obj.fraction == 0
    obj.begin_epoch(1, 5)  # 4 steps per epoch from now on
    assert obj.position == 1 and obj.fraction == 0
    _steps(obj, model, x, y, 2)
    assert obj.position == 1.5
    assert (obj.fraction, obj.kappa, obj.beta) == (0.25, 0.75, 0.875)
    model.eval()
    obj(model, x, y, threat=THREAT)  # eval-mode calls are not training steps
    assert obj.position == 1.5
    obj.begin_epoch(2, 5)
    assert (obj.fraction, obj.kappa, obj.beta) == (0.5, 0.5, 0.75)
    obj.begin_epoch(3, 5)
    assert (obj.fraction, obj.kappa, obj.beta) == (1, 0, 0.5)
    ibp = rl.training.create_objective("ibp", warmup=0, ramp=4)
    ibp.begin_epoch(1, 5)
    assert (ibp.fraction, ibp.kappa, ibp.beta) == (0.25, 0.875, 0)


def test_schedule_state_resumes_exactly():
    model, (x, y) = _linear(), _interior()
    a = rl.training.create_objective("ibp", warmup=0, ramp=3)
    a.begin_epoch(0, 4)
    _steps(a, model, x, y, 3)
    b = rl.training.create_objective("ibp", warmup=0, ramp=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for obj in (a, b):
        obj.begin_epoch(1, 4)
        _steps(obj, model, x, y, 1)
    assert a.position == b.position == pytest.approx(1 + 1 / 3)
    with pytest.raises(ValueError, match="'schedule'"):
        b.load_state_dict({"delta": torch.zeros(3)})


def test_loss_uses_the_ramped_eps_and_weights():
    model, (x, y) = _linear(), _interior()
    obj = rl.training.create_objective(
        "crown-ibp", warmup=0, ramp=4, kappa_final=0.2, beta_final=0.0, eps_scale=1.5
    )
    obj.begin_epoch(1, 4)  # fraction 1/4: eps 1.5 * 0.1 / 4, kappa 0.8, beta 0.75
    model.eval()
    got = obj(model, x, y, threat=THREAT)
    ball = rl.ThreatModel("linf", 1.5 * 0.1 / 4)
    want = 0.8 * F.cross_entropy(model(x), y) + 0.2 * verified_loss(model, x, y, ball, 0.75)
    torch.testing.assert_close(got, want)
    obj.begin_epoch(0, 4)  # eps 0: the natural loss alone
    torch.testing.assert_close(obj(model, x, y, threat=THREAT), F.cross_entropy(model(x), y))


# --- the verified loss -------------------------------------------------------------------------
def test_worst_case_logits_layout():
    lower = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = worst_case_logits(lower, torch.tensor([0, 2]))
    assert torch.equal(got, torch.tensor([[0.0, -1.0, -2.0], [-3.0, -4.0, 0.0]]))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_verified_loss_is_ce_of_exact_worst_case_logits_on_a_linear_model(beta):
    """On one linear layer every bound is exact: min over the ball of z_y - z_j is
    (w_y - w_j) x + b_y - b_j - eps ||w_y - w_j||_1."""
    model, (x, y) = _linear(), _interior()
    w, b = model[1].weight.detach(), model[1].bias.detach()
    flat, eps = x.flatten(1), THREAT.eps
    logits = flat @ w.T + b
    hand = torch.zeros(len(x), 3)
    for i in range(len(x)):
        for j in range(3):
            if j != y[i]:
                lower = logits[i, y[i]] - logits[i, j] - eps * (w[y[i]] - w[j]).abs().sum()
                hand[i, j] = -lower
    want = F.cross_entropy(hand, y)
    torch.testing.assert_close(verified_loss(model, x, y, THREAT, beta), want)
    obj = rl.training.create_objective("ibp", kappa_final=0.0)  # end of schedule: verified only
    torch.testing.assert_close(obj(model, x, y, threat=THREAT), want)


def test_verified_loss_bounds_the_loss_inside_the_ball():
    """Soundness: the CE of each point at any z in the ball is <= its verified CE."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _interior(4)
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        xi, yi = x[i : i + 1], y[i : i + 1]
        bound = verified_loss(model, xi, yi, THREAT, beta=0.5)
        z = xi + THREAT.eps * (2 * torch.rand(64, 1, 2, 3, generator=g) - 1)
        ce = F.cross_entropy(model(z), yi.expand(64), reduction="none")
        assert (ce <= bound + 1e-5).all()


# --- errors ----------------------------------------------------------------------------------
def test_models_bound_propagation_cannot_read_are_refused():
    x, y = make_quadrants(4, seed=0)
    res = rl.models.create("resnet20", num_classes=NUM_CLASSES, input_size=16)
    with pytest.raises(ValueError, match=r"certified training needs a model .*\(BasicBlock\)"):
        rl.training.create_objective("ibp")(res, x, y, threat=THREAT)
    lenet = rl.models.create("lenet", num_classes=NUM_CLASSES, input_size=16)
    rl.training.create_objective("ibp")(lenet, x, y, threat=THREAT)  # IBP handles max pooling
    with pytest.raises(ValueError, match="MaxPool2d.*method='ibp'"):
        rl.training.create_objective("crown-ibp", beta_final=0.5)(lenet, x, y, threat=THREAT)
    with pytest.raises(ValueError, match="norm for ibp training"):
        rl.training.create_objective("ibp")(lenet, x, y, threat=rl.ThreatModel("l1", 1.0))
    with pytest.raises(ValueError, match="warmup"):
        rl.training.create_objective("ibp", warmup=-1)
    with pytest.raises(ValueError, match="kappa_final"):
        rl.training.create_objective("crown-ibp", kappa_final=1.5)


# --- training ----------------------------------------------------------------------------------
def _train(objective: str, x, y, threat, **options) -> nn.Module:
    """10 epochs of 4 Adam steps on ``(x, y)`` (batches of 32) with the objective's schedule."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rl.models.create("ibp-small", num_classes=NUM_CLASSES, input_size=16, hidden=32)
    obj = rl.training.create_objective(objective, **options)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for epoch in range(10):
        obj.begin_epoch(epoch, 10)
        for i in range(0, len(x), 32):
            loss = obj(model, x[i : i + 32], y[i : i + 32], threat=threat)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_certified_training_verifies_more_than_natural_training():
    """Same model, data, optimiser and steps: natural training verifies nothing at eps 0.05
    (its IBP-verified CE is huge); IBP training verifies most held-out points, CROWN-IBP
    (kappa -> 0, slower on this toy) at least lowers the verified CE."""
    threat = rl.ThreatModel("linf", 0.05)
    x, y = make_quadrants(128, seed=5)
    xt, yt = make_quadrants(128, seed=6)
    natural = _train("natural", x, y, threat)
    ibp = _train("ibp", x, y, threat, warmup=1, ramp=3)
    crown = _train("crown-ibp", x, y, threat, warmup=1, ramp=3)
    nat_v = verify(natural, xt, yt, threat, "ibp").accuracy
    ibp_v = verify(ibp, xt, yt, threat, "ibp").accuracy
    assert ibp_v >= nat_v + 0.5, (nat_v, ibp_v)
    nat_loss = verified_loss(natural, xt, yt, threat)
    assert verified_loss(ibp, xt, yt, threat) < nat_loss
    assert verified_loss(crown, xt, yt, threat, beta=1.0) < nat_loss / 10


class _Crash(Exception):
    pass


def test_trainer_resume_is_exact_mid_ramp(tmp_path):
    """The trainer drives the schedule through begin_epoch; a run stopped after epoch 1 and
    resumed ends with the same weights as one run straight through (the per-step ramp inside
    epoch 2 needs the step count the state carries)."""
    data = make_quadrants(64, seed=7)
    kw = dict(
        objective="ibp",
        threat=THREAT,
        batch_size=16,
        lr=0.01,
        epochs=3,
        optimizer="adam",
        schedule="constant",
        objective_options={"warmup": 0, "ramp": 3},
    )

    def make():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return rl.models.create("ibp-small", num_classes=NUM_CLASSES, input_size=16, hidden=16)

    def crash(rec):
        if rec["epoch"] == 1:
            raise _Crash

    rl.training.fit(make(), data, out=tmp_path / "full", **kw)
    with pytest.raises(_Crash):
        rl.training.fit(make(), data, out=tmp_path / "part", callback=crash, **kw)
    rl.training.fit(make(), data, out=tmp_path / "part", resume=True, **kw)
    a = rl.models.load(tmp_path / "full/model.safetensors").state_dict()
    b = rl.models.load(tmp_path / "part/model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

"""The objectives of issue 23 item 2 against their papers' definitions on cases with known
answers: curriculum AT's schedule, YOPO's first-layer update, mixup's mixed loss, MMC + PGD,
noise-at's learnable input sigma, and the spectral-normalisation model option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.models.heads import MMCHead
from robustlab.models.lipschitz import normalised_layers
from robustlab.models.noise import InputNoise, disabled, noise_parameter_names
from robustlab.training.objectives.mmc import mmc_loss

THREAT = rl.ThreatModel("linf", 0.1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- curriculum ---------------------------------------------------------------------------
def _run_schedule(obj, accuracies: list[float]) -> list[int]:
    """The lesson at the start of each epoch, the epoch before having scored ``accuracies``."""
    lessons = []
    for epoch, acc in enumerate(accuracies):
        obj.begin_epoch(epoch, len(accuracies))
        lessons.append(obj.lesson)
        obj.record(round(acc * 100), 100)
    return lessons


def test_curriculum_advances_exactly_when_accuracy_crosses_the_threshold():
    obj = rl.training.create_objective("curriculum", max_steps=3, threshold=0.5, patience=None)
    # epoch e starts with the verdict on epoch e - 1: 0.6 (epoch 2) and 0.5 (epoch 4) pass
    lessons = _run_schedule(obj, [0.2, 0.4, 0.6, 0.3, 0.5, 0.9, 0.9, 0.9, 0.1])
    assert lessons == [0, 0, 0, 1, 1, 2, 3, 3, 3]  # capped at max_steps


def test_curriculum_patience_is_the_papers_plateau_criterion():
    obj = rl.training.create_objective("curriculum", max_steps=5, patience=2)
    # best 0.5 at epoch 0; epochs 1 and 2 do not improve -> lesson 1 at epoch 3; the new
    # lesson's best starts afresh (0.1 is an improvement there)
    lessons = _run_schedule(obj, [0.5, 0.4, 0.5, 0.1, 0.2, 0.2, 0.2, 0.0])
    assert lessons == [0, 0, 0, 1, 1, 1, 1, 2]


def test_curriculum_state_resumes_the_same_schedule():
    a = rl.training.create_objective("curriculum", max_steps=4, threshold=0.5)
    _run_schedule(a, [0.6, 0.8])  # lesson 1 from epoch 1; epoch 1's 0.8 not judged yet
    b = rl.training.create_objective("curriculum", max_steps=4, threshold=0.5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # a checkpoint after epoch 1
    assert b.lesson == 1
    for obj in (a, b):
        obj.begin_epoch(2, 5)
    assert (a.lesson, b.lesson) == (2, 2) and a.state_dict()["schedule"].equal(
        b.state_dict()["schedule"]
    )
    with pytest.raises(ValueError, match="set patience"):
        rl.training.create_objective("curriculum", patience=None, threshold=None)


def test_curriculum_mixes_strengths_and_counts_the_lessons_rows():
    obj = rl.training.create_objective("curriculum", max_steps=3, threshold=0.5)
    obj.lesson = 2
    assert obj.strengths(7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    obj.lesson = 0  # lesson 0 is clean training: the recorded accuracy is the clean one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    loss = obj(model, x, y, threat=THREAT, generator=_gen(0))
    logits = model(x)
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    assert (obj.correct, obj.seen) == ((logits.argmax(1) == y).sum().item(), 8)


# --- YOPO ---------------------------------------------------------------------------------
def _linear_case():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))  # the first layer is the whole model
    x, y = torch.rand(5, 1, 2, 2) * 0.8 + 0.1, torch.tensor([0, 1, 2, 0, 1])
    return model, x, y


def test_yopo_inner_step_is_the_sign_step_of_the_frozen_first_layer_gradient():
    model, x, y = _linear_case()
    obj = rl.training.create_objective("yopo", outer=1, inner=1, step_size=0.03)
    eta = THREAT.random_init(x, _gen(4)) - x
    q = torch.randn(5, 3)
    new = obj.inner_steps(model, model[1], x, eta, q, THREAT)
    W = model[1].weight.detach().numpy()
    g = q.numpy() @ W  # grad_eta <q, W (x + eta) + b>, per row
    hand = np.clip(eta.flatten(1).numpy() + 0.03 * np.sign(g), -0.1, 0.1)
    hand = np.clip(x.flatten(1).numpy() + hand, 0, 1) - x.flatten(1).numpy()
    assert np.allclose(new.flatten(1).numpy(), hand, atol=1e-6)


def test_yopo_gradient_is_the_papers_accumulated_update():
    model, x, y = _linear_case()
    obj = rl.training.create_objective("yopo", outer=1, inner=1, step_size=0.03)
    loss = obj(model, x, y, threat=THREAT, generator=_gen(5))
    loss.backward()
    # by hand: eta_1 uniform (same draw), q = dCE/dz at x + eta_1, one inner step to eta_2,
    # then grad W = q^T (x + eta_1) + q^T (x + eta_2), grad b = 2 sum_i q_i
    x0 = THREAT.random_init(x, _gen(5))
    z = model(x0)
    ce = F.cross_entropy(z, y)
    q = (torch.softmax(z, 1) - F.one_hot(y, 3)).detach() / len(x)
    x1 = x + obj.inner_steps(model, model[1], x, x0 - x, q, THREAT)
    W_grad = q.T @ x0.flatten(1) + q.T @ x1.flatten(1)
    assert torch.allclose(loss, ce)
    assert torch.allclose(model[1].weight.grad, W_grad, atol=1e-6)
    assert torch.allclose(model[1].bias.grad, 2 * q.sum(0), atol=1e-6)


# --- mixup --------------------------------------------------------------------------------
def test_mixup_loss_is_the_mixed_cross_entropy_by_hand():
    model, x, y = _linear_case()
    obj = rl.training.create_objective("mixup", alpha=1.0)
    lam, perm = obj.draw(len(x), _gen(7))
    loss = obj(model, x, y, generator=_gen(7))  # the same draws
    W, b = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    xm = lam * x.flatten(1).numpy() + (1 - lam) * x.flatten(1).numpy()[perm.numpy()]
    z = xm @ W.T + b
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    rows = np.arange(len(x))
    hand = -(lam * logp[rows, y.numpy()] + (1 - lam) * logp[rows, y.numpy()[perm.numpy()]]).mean()
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(len(x)))


def test_mixup_lambda_is_beta_alpha_alpha():
    lams = np.array(
        [rl.training.create_objective("mixup", alpha=1.0).draw(2, _gen(s))[0] for s in range(2000)]
    )
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.std() - 12**-0.5) < 0.02  # uniform
    small = np.array(
        [rl.training.create_objective("mixup", alpha=0.1).draw(2, _gen(s))[0] for s in range(500)]
    )
    assert np.mean((small < 0.05) | (small > 0.95)) > 0.6  # Beta(0.1, 0.1): mass at the ends


# --- MMC + PGD ----------------------------------------------------------------------------
def test_mmc_with_pgd_takes_the_loss_at_the_ascent_of_the_mmc_loss():
    torch.manual_seed(2)
    head = MMCHead(4, 3, c_mm=10.0, feature_dim=3)
    model = nn.Sequential(nn.Flatten(), head)
    x, y = torch.rand(6, 1, 2, 2) * 0.6 + 0.2, torch.tensor([0, 1, 2, 0, 1, 2])
    clean = rl.training.create_objective("mmc")
    z = head.features(x.flatten(1))
    hand = 0.5 * (z - head.centers[y]).square().sum(1)
    assert torch.allclose(clean(model, x, y), hand.mean())
    adv = rl.training.create_objective("mmc", steps=1, step_size=0.1)
    assert adv.needs_threat and not clean.needs_threat
    with pytest.raises(ValueError, match="needs a threat model"):
        adv(model, x, y)
    loss = adv(model, x, y, threat=THREAT, generator=_gen(3))
    # by hand: random start x0, one sign step of eps on grad_x 0.5 ||A x + c - mu_y||^2
    x0 = THREAT.random_init(x, _gen(3))
    A = head.dense.weight.detach()
    r = head.features(x0.flatten(1)).detach() - head.centers[y]
    x1 = THREAT.project(x0 + 0.1 * (r @ A).sign().view_as(x), x)
    assert torch.allclose(loss, mmc_loss(model(x1), y).mean(), atol=1e-6)
    assert loss > clean(model, x, y)


# --- noise-at: learnable input sigma ------------------------------------------------------
def test_learnable_input_noise_is_trained_saved_and_switched_off(tmp_path):
    model = rl.models.create(
        "lenet", num_classes=4, input_size=16, noise="input", noise_options={"init": 0.15}
    )
    assert noise_parameter_names(model) == ["input_noise.sigma"]
    assert model.input_noise.sigma.robustlab_no_decay
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(9)
    n = torch.randn_like(x)
    torch.manual_seed(9)
    assert torch.allclose(model.input_noise(x), x + 0.15 * n)
    model.eval()
    with disabled(model):
        assert torch.equal(model(x), model(x))
    assert not torch.equal(model(x), model(x))  # on again, in eval mode too
    with torch.no_grad():
        model.input_noise.sigma.fill_(0.07)
    rl.models.save(model, tmp_path / "m.safetensors", meta={})
    loaded = rl.models.load(tmp_path / "m.safetensors")
    assert loaded.input_noise.sigma.item() == pytest.approx(0.07)
    assert any(isinstance(m, InputNoise) for m in loaded.modules())


def test_noise_at_with_sigma_model_trains_the_models_sigma():
    model = rl.models.create(
        "lenet", num_classes=4, input_size=16, noise="cni-w", noise_options={"input_sigma": 0.1}
    )
    x, y = torch.rand(6, 1, 16, 16), torch.randint(0, 4, (6,))
    obj = rl.training.create_objective("noise-at", sigma="model", steps=1)
    torch.manual_seed(0)
    obj(model, x, y, threat=THREAT, generator=_gen(0)).backward()
    g = model.input_noise.sigma.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().item() > 0
    plain = rl.models.create("lenet", num_classes=4, input_size=16)
    with pytest.raises(ValueError, match="has none"):
        obj(plain, x, y, threat=THREAT)
    with pytest.raises(ValueError, match="valid noise-at sigmas are: model"):
        rl.training.create_objective("noise-at", sigma="learned")


# --- Lipschitz control --------------------------------------------------------------------
def _spectral_norms(model: nn.Module) -> list[float]:
    return [
        torch.linalg.matrix_norm(m.weight.detach().flatten(1), 2).item()
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


def test_spectral_normalisation_bounds_every_layer_and_round_trips(tmp_path):
    torch.manual_seed(0)
    plain = rl.models.create("smallcnn", input_size=16)
    assert max(_spectral_norms(plain)) > 1.5  # what the option has to change
    model = rl.models.create("smallcnn", input_size=16, lipschitz="spectral")
    assert len(normalised_layers(model)) == 7  # 4 convs, 3 linears
    x = torch.rand(4, 1, 16, 16)
    model.train()
    for _ in range(20):  # power iterations, one per training forward
        model(x)
    norms = _spectral_norms(model)
    assert len(norms) == 7 and all(0.9 < s <= 1 + 1e-2 for s in norms), norms
    rl.models.save(model, tmp_path / "sn.safetensors", meta={})
    loaded = rl.models.load(tmp_path / "sn.safetensors")
    assert loaded.robustlab_arch["kwargs"]["lipschitz"] == "spectral"
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="valid lipschitzs are: spectral"):
        rl.models.create("smallcnn", lipschitz="orthogonal")

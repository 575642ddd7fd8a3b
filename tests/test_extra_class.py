"""The extra-class detector (Grosse et al. 2017): a K + 1-output model trained with adversarial
points labelled K, read as a detector that rejects where the extra class wins."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import NUM_CLASSES, TinyCNN, make_quadrants
from robustlab.defenses.detector import threshold_at
from robustlab.training.objectives import create as create_objective

K = NUM_CLASSES


class Affine(nn.Module):
    """Fixed logits ``W x.flatten + b`` with K + 1 outputs."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(K + 1, d, generator=g))
        self.b = nn.Parameter(torch.randn(K + 1, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


class WithExtra(nn.Module):
    """TinyCNN with one more output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.net.fc = nn.Linear(self.net.fc.in_features, K + 1)

    def forward(self, x):
        return self.net(x)


def test_score_and_outputs_by_hand():
    x, _ = make_quadrants(64, seed=0, size=4)
    model = Affine(16)
    det = rl.defenses.create("extra-class", model, threshold=0.0)
    z = (x.flatten(1) @ model.w.T + model.b).detach().double()
    margin = z[:, K] - z[:, :K].max(1).values
    assert torch.allclose(det.scores(x).double(), margin, atol=1e-5)
    with torch.no_grad():
        out = det(x)
    assert out.shape == (64, K + 1)
    assert torch.allclose(out[:, :K].double(), z[:, :K], atol=1e-5)
    # threshold 0 is the paper's rule: rejected exactly where the extra class is the argmax
    assert torch.equal(out.argmax(1) == K, z.argmax(1) == K)
    assert 0 < int((z.argmax(1) == K).sum()) < 64  # both cases occur
    assert torch.allclose(det.base(x), model(x)[:, :K])


def test_fit_sets_the_threshold_at_the_fpr_on_all_points():
    x, _ = make_quadrants(100, seed=1, size=4)
    model = Affine(16, seed=1)
    det = rl.defenses.create("extra-class", model, fpr=0.1).fit(x)
    assert det.threshold == threshold_at(det.scores(x), 0.1) and det.fit_samples == 100
    assert int((det.scores(x) > det.threshold).sum()) <= 10
    assert det.config()["needs"].startswith("a model with K + 1 outputs")


def test_a_model_without_the_extra_output_is_a_clear_error(toy_model, toy_data):
    x, y = toy_data
    with pytest.raises(ValueError, match="num_classes = K \\+ 1"):
        rl.defenses.create("extra-class", nn.Sequential(nn.Flatten(), nn.Linear(4, 2))).fit(
            torch.rand(8, 1, 2, 2)
        )
    objective = create_objective("extra-class")
    with pytest.raises(ValueError, match="one output more than the data has classes"):
        objective(toy_model, x[:16], y[:16], threat=rl.ThreatModel("linf", 0.1))


def test_objective_is_the_weighted_sum_at_the_fgsm_point():
    x, y = make_quadrants(32, seed=2)
    torch.manual_seed(0)
    model = WithExtra().eval()
    threat = rl.ThreatModel("linf", 0.1)
    loss = create_objective("extra-class", weight=0.3)(model, x, y, threat=threat)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg)[:, :K], y), xg)
    x_adv = (x + 0.1 * g.sign()).clamp(0, 1)
    extra = torch.full_like(y, K)
    expected = 0.7 * F.cross_entropy(model(x), y) + 0.3 * F.cross_entropy(model(x_adv), extra)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_training_with_the_objective_makes_a_detector_of_fgsm_points():
    x, y = make_quadrants(512, seed=3)
    torch.manual_seed(0)
    model = WithExtra()
    objective = create_objective("extra-class")
    threat = rl.ThreatModel("linf", 0.15)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(60):
        i = slice(64 * (step % 8), 64 * (step % 8 + 1))
        opt.zero_grad()
        objective(model, x[i], y[i], threat=threat, generator=gen).backward()
        opt.step()
    model.eval()
    xt, yt = make_quadrants(256, seed=4)
    det = rl.defenses.create("extra-class", model).fit(x[:256])
    fgsm = rl.attacks.create("fgsm", threat)(rl.models.heads.ClassLogits(model), xt, yt).x_adv
    tpr = float(det.detect(fgsm).float().mean())
    fpr = float(det.detect(xt).float().mean())
    assert tpr > 0.8 and fpr < 0.15, (tpr, fpr)


def test_cli_evaluates_a_model_with_the_extra_output(fake_fmnist, tmp_path, monkeypatch):
    from robustlab.cli import main

    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(
        rl.models.create("lenet", num_classes=11), ckpt, meta={"dataset": "fashion-mnist"}
    )
    base = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--attack",
        "pgd",
        "--steps",
        "1",
        "--n-points",
        "4",
        "--quiet",
        "--fit-n",
        "32",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main(base + ["--defense", "extra-class"]) == 0
    rec = json.loads((tmp_path / "a" / "results.json").read_text())
    assert rec["adaptive"]["rejects"] is True
    assert main(base) == 2  # without the defense, 11 outputs on 10 classes is refused

"""The semi-supervised objectives (uat, mart-semi, noisy-student, rst with a given pool): the
pool joined and marked, losses against their definitions, the pool's labels never read, and
the recipe key ``[data] unlabeled``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import make_quadrants
from robustlab.cli_inputs import unlabeled_pool
from robustlab.config import load_recipe
from robustlab.training.objectives import create
from robustlab.training.objectives.mart import mart_loss
from robustlab.training.objectives.mart_semi import kl_term
from robustlab.training.objectives.pool import join

THREAT = rl.ThreatModel("linf", 0.1)
KW = {"num_classes": 4, "input_size": 16}


class Constant(nn.Module):
    """Logits that ignore the input: ``b`` for every image (a trainable bias)."""

    def __init__(self, b: list[float]) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def _lenet(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return rl.models.create("lenet", **KW).eval()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def test_join_marks_the_pool_after_the_labelled_images():
    x, y = make_quadrants(6, seed=0)
    extra = torch.rand(3, 1, 16, 16)
    xa, ya, pool = join(x, y, 4, extra, "t")
    assert torch.equal(xa, torch.cat([x, extra])) and torch.equal(ya[:4], y[:4])
    assert ya[4:].tolist() == [-1, -2, -3, -4, -5]  # rows 0, 1: hidden labels; 2-4: given
    assert torch.equal(pool, torch.cat([x[4:], extra]))
    xb, yb, _ = join(x, y, 6, None, "t")
    assert xb is x and torch.equal(yb, y)
    with pytest.raises(ValueError, match="same image size"):
        join(x, y, 4, torch.rand(2, 3, 16, 16), "t")
    with pytest.raises(ValueError, match="at most 6"):
        join(x, y, 7, None, "t")
    with pytest.raises(ValueError, match="unlabelled pool"):
        create("uat", targets="online")
    with pytest.raises(TypeError, match="float tensor of images"):
        create("uat", targets="online", unlabeled="fashion-mnist")


def test_uat_fixed_targets_weigh_the_pool_by_lambda():
    """Constant logits b: the PGD points change nothing, so the loss is
    (1/B) [sum_L CE(b, y) + lam sum_U CE(b, y~)] with y~ the teacher's argmax."""
    b = [0.5, -1.0, 2.0, 0.0]
    x, y = make_quadrants(8, seed=1)
    teacher = Constant([0.0, 0.0, 0.0, 3.0])  # pseudo-label 3 everywhere
    obj = create("uat", targets="fixed", teacher=teacher, labeled=5, weight=0.25, steps=2)
    xa, ya = obj.setup(Constant(b), x, y)
    loss = obj(Constant(b), xa, ya, threat=THREAT, generator=_gen())
    ce = [math.log(sum(math.exp(v) for v in b)) - b[c] for c in range(4)]
    by_hand = (sum(ce[c] for c in y[:5].tolist()) + 0.25 * 3 * ce[3]) / 8
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_uat_online_is_trades_kl_on_the_pool_and_fixed_is_pgd_at():
    x, y = make_quadrants(8, seed=2)
    model, teacher = _lenet(0), _lenet(1)
    online = create("uat", targets="online", labeled=0, steps=3)
    xa, ya = online.setup(model, x, y)
    trades = create("trades", beta=1.0, steps=3)
    full = trades(model, x, y, threat=THREAT, generator=_gen())
    ce = F.cross_entropy(model(x), y)  # TRADES = CE + KL: UAT-OT is its KL, without labels
    torch.testing.assert_close(online(model, xa, ya, threat=THREAT, generator=_gen()), full - ce)
    fixed = create("uat", targets="fixed", teacher=teacher, labeled=3, steps=3)
    xa, ya = fixed.setup(model, x, y)
    y_pseudo = torch.cat([y[:3], teacher(x[3:]).argmax(1)])
    expected = create("pgd-at", steps=3)(model, x, y_pseudo, threat=THREAT, generator=_gen())
    torch.testing.assert_close(fixed(model, xa, ya, threat=THREAT, generator=_gen()), expected)


def test_mart_semi_kl_term_by_hand_and_full_term_is_mart_on_pseudo_labels():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])
    adv = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    t = torch.tensor([0, 2])
    p, q = clean.softmax(1).numpy(), adv.softmax(1).numpy()
    kl = (p * (np.log(p) - np.log(q + 1e-12))).sum(1)
    by_hand = 6.0 * np.mean(kl * (1.0000001 - p[[0, 1], [0, 2]]))
    assert kl_term(clean, adv, t, 6.0).item() == pytest.approx(by_hand, rel=1e-5)

    x, y = make_quadrants(8, seed=3)
    model, teacher = _lenet(0), _lenet(1)
    y_pseudo = torch.cat([y[:5], teacher(x[5:]).argmax(1)])
    full = create("mart-semi", teacher=teacher, labeled=5, term="full", steps=2)
    xa, ya = full.setup(model, x, y)
    expected = create("mart", steps=2)(model, x, y_pseudo, threat=THREAT, generator=_gen())
    torch.testing.assert_close(full(model, xa, ya, threat=THREAT, generator=_gen()), expected)
    semi = create("mart-semi", teacher=teacher, labeled=5, gamma=0.5, steps=2)
    semi.setup(model, x, y)
    x_adv = semi.mart.perturb(model, x, y_pseudo, THREAT, _gen())
    c, a = model(x), model(x_adv)
    expected = (
        5 * mart_loss(c[:5], a[:5], y[:5], 6.0) + 0.5 * 3 * kl_term(c[5:], a[5:], y_pseudo[5:], 6.0)
    ) / 8
    torch.testing.assert_close(semi(model, xa, ya, threat=THREAT, generator=_gen()), expected)


def test_noisy_student_soft_labels_and_confidence_filter_by_hand():
    x, y = make_quadrants(6, seed=4)
    b = [0.2, -0.3, 1.0, 0.0]
    # the teacher: confident (max prob > 0.3) on rows 0, 1, not on row 2 (its logits are flat)
    teacher_logits = torch.tensor([[2.0, 0, 0, 0], [0, 0, 1.0, 0], [0.1, 0, 0, 0]])

    class Teacher(nn.Module):
        def forward(self, xb):  # the pool's images, identified by their first pixel
            return teacher_logits[[pool_rows[float(v)] for v in xb[:, 0, 0, 0]]]

    pool_rows = {float(v): i for i, v in enumerate(x[3:, 0, 0, 0])}
    obj = create("noisy-student", teacher=Teacher(), labeled=3, temperature=2.0, sigma=0.0)
    xa, ya = obj.setup(Constant(b), x, y)
    loss = obj(Constant(b), xa, ya, generator=_gen())
    log_p = np.array(b) - np.log(np.exp(b).sum())
    q = (teacher_logits / 2.0).softmax(1).numpy()
    keep = q.max(1) >= 0.3
    assert keep.tolist() == [True, True, False]
    by_hand = (
        -sum(log_p[c] for c in y[:3].tolist())
        - sum(k * (qi * log_p).sum() for k, qi in zip(keep, q, strict=True))
    ) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("name", ["uat", "mart-semi", "noisy-student", "rst"])
def test_the_pool_labels_are_never_read(name):
    x, y = make_quadrants(12, seed=5)
    garbage = y.clone()
    garbage[6:] = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(9)).flip(0)
    assert not torch.equal(garbage, y)
    model, teacher = _lenet(0), _lenet(1)
    opts = {"teacher": teacher, "labeled": 6}
    opts |= {"steps": 2} if name in ("uat", "mart-semi") else {}
    opts |= {"base": "pgd-at", "base_options": {"steps": 2}} if name == "rst" else {}
    losses, sets = [], []
    for labels in (y, garbage):
        obj = create(name, **opts)
        xa, ya = obj.setup(model, x, labels)
        sets.append(ya)
        losses.append(obj(model, xa, ya, threat=THREAT, generator=_gen()))
    assert torch.equal(sets[0], sets[1]) and torch.equal(losses[0], losses[1])


def test_a_given_pool_joins_the_training_set():
    x, y = make_quadrants(10, seed=6)
    toy_model = _lenet(2)
    pool = make_quadrants(5, seed=7)[0]
    rst = create("rst", teacher=toy_model, unlabeled=pool, base="pgd-at")
    xa, ya = rst.setup(toy_model, x, y)
    assert torch.equal(xa, torch.cat([x, pool])) and torch.equal(ya[:10], y)
    assert torch.equal(ya[10:], toy_model(pool).argmax(1))
    assert rst.config()["unlabeled"] == "<5 images of shape (1, 16, 16)>"
    uat = create("uat", targets="online", unlabeled=pool)
    model = _lenet(0)
    history = rl.training.fit(
        model,
        (x, y),
        objective="uat",
        threat=THREAT,
        epochs=1,
        batch_size=8,
        objective_options={"targets": "online", "unlabeled": pool, "steps": 1},
    )
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert uat.setup(model, x, y)[1][10:].tolist() == [-1, -2, -3, -4, -5]


def test_recipe_key_unlabeled(tmp_path, monkeypatch):
    base = (
        '[data]\nn_train = 4\nunlabeled = "fashion-mnist"\n{extra}'
        '[threat]\nnorm = "linf"\neps = "0.1"\n[train]\nobjective = "{obj}"\nepochs = 1\n'
    )
    path = tmp_path / "r.toml"
    path.write_text(base.format(extra="unlabeled_n = 3\n", obj="uat"))
    recipe = load_recipe(path)
    assert (recipe.unlabeled, recipe.unlabeled_n) == ("fashion-mnist", 3)
    path.write_text(base.format(extra="", obj="pgd-at"))
    with pytest.raises(ValueError, match="takes no unlabelled pool.*uat"):
        load_recipe(path)
    # the training set itself: the pool is the images after the first n_train
    images = torch.arange(10.0).view(10, 1, 1, 1)
    monkeypatch.setattr(rl.data, "load", lambda name, split, **kw: (images, -torch.ones(10)))
    assert unlabeled_pool("fashion-mnist", 3, "fashion-mnist", 4).flatten().tolist() == [4, 5, 6]
    assert unlabeled_pool("mnist", None, "fashion-mnist", 4).flatten().tolist() == list(range(10))
    with pytest.raises(ValueError, match="n_train"):
        unlabeled_pool("fashion-mnist", 3, "fashion-mnist", None)
    with pytest.raises(ValueError, match="at most 6"):
        unlabeled_pool("fashion-mnist", 7, "fashion-mnist", 4)
    arrays = tmp_path / "pool.npz"
    np.savez(arrays, x=np.zeros((3, 2, 2), np.uint8), y=np.zeros(3, np.int64))
    assert unlabeled_pool(str(arrays), None, "fashion-mnist", 4).shape == (3, 1, 2, 2)

"""PGD's update rules (sgd, rmsprop, adagrad, ftrl) against the optimisers they name:
torch.optim's own step, and a NumPy transcription of TensorFlow's FTRL kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustlab import ThreatModel, attacks
from robustlab.attacks.optimizers import FTRL, OPTIMIZERS, make

# a quadratic f(w) = 0.5 * sum(a * (w - c)^2) whose gradient the rules ascend (maximise -f)
A = torch.tensor([[0.5, 2.0, 0.01, 40.0, 1.0, 0.2]], dtype=torch.float64)
C = torch.tensor([[1.0, -2.0, 0.5, 0.1, -0.3, 3.0]], dtype=torch.float64)
W0 = torch.tensor([[0.3, 0.0, -1.0, 0.2, 0.7, -0.4]], dtype=torch.float64)
STEPS, LR = 25, 0.05


def ascent_grad(w: torch.Tensor) -> torch.Tensor:
    """The gradient of the maximised loss -f at w."""
    return -A * (w - C)


def rule_iterates(name: str, lr: float = LR) -> list[torch.Tensor]:
    rule, w, out = make(name), W0.clone(), []
    for _ in range(STEPS):
        w = rule.update(ascent_grad(w), w, lr)
        out.append(w)
    return out


def torch_iterates(opt_cls: type[torch.optim.Optimizer], **kw) -> list[torch.Tensor]:
    w = W0.clone().requires_grad_(True)
    opt, out = opt_cls([w], lr=LR, maximize=True, **kw), []
    for _ in range(STEPS):
        w.grad = ascent_grad(w.detach())
        opt.step()
        out.append(w.detach().clone())
    return out


@pytest.mark.parametrize(
    ("name", "opt_cls"),
    [("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad)],
)
def test_update_rules_follow_torch_optim(name, opt_cls):
    """Unprojected, the rule's iterates are torch.optim's with its default hyper-parameters
    (so the defaults are torch's too)."""
    ours, theirs = rule_iterates(name), torch_iterates(opt_cls)
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {t + 1}")
    assert not torch.allclose(ours[-1], W0)  # it moved


def tf_ftrl(
    w0: np.ndarray,
    lr: float,
    power: float = -0.5,
    acc0: float = 0.1,
    l1: float = 0.0,
    l2: float = 0.0,
) -> list[np.ndarray]:
    """TensorFlow's ApplyFtrl (training_ops.cc), minimising f = the maximised loss negated."""
    w, n, z, out = w0.copy(), np.full_like(w0, acc0), np.zeros_like(w0), []
    for _ in range(STEPS):
        g = -ascent_grad(torch.from_numpy(w)).numpy()  # df/dw
        n_new = n + g * g
        z = z + g - (n_new**-power - n**-power) / lr * w
        quadratic = n_new**-power / lr + 2 * l2
        w = np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / quadratic, 0.0)
        n = n_new
        out.append(w)
    return out


@pytest.mark.parametrize(
    "kw", [{}, {"l1": 0.2, "l2": 0.1}, {"lr_power": -0.3, "initial_accumulator": 1.0}]
)
def test_ftrl_follows_tensorflows_kernel(kw):
    rule, w = FTRL(**kw), W0.clone()
    ref = tf_ftrl(
        W0.numpy(),
        0.5,
        kw.get("lr_power", -0.5),
        kw.get("initial_accumulator", 0.1),
        kw.get("l1", 0.0),
        kw.get("l2", 0.0),
    )
    for t, expected in enumerate(ref):
        w = rule.update(ascent_grad(w), w, 0.5)
        np.testing.assert_allclose(
            w.numpy(), expected, rtol=1e-12, atol=1e-15, err_msg=f"step {t + 1}"
        )
    if kw.get("l1"):
        assert (w == 0).any()  # l1 zeroes the coordinates whose |z| stays under it


def test_ftrl_defaults_are_tensorflows():
    rule = FTRL()
    assert (rule.power, rule.n, rule.l1, rule.l2) == (0.5, 0.1, 0.0, 0.0)
    with pytest.raises(TypeError, match="update"):
        rule(W0)


@pytest.mark.parametrize(("kw", "match"), [({"alpha": 1.0}, "alpha"), ({"eps": -1.0}, "eps")])
def test_rmsprop_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        OPTIMIZERS["rmsprop"](**kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"initial_accumulator": 0.0}, "initial_accumulator"),
        ({"lr_power": 0.5}, "lr_power"),
        ({"l1": -0.1}, "l1"),
    ],
)
def test_ftrl_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        FTRL(**kw)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad", "ftrl"])
def test_pgd_takes_the_rules_own_projected_update(name, toy_model, toy_data):
    """create("pgd", optimizer=name) moves to the projected update of the perturbation with
    learning rate step_size, not to the sign step of a direction (which would make sgd,
    rmsprop and adagrad one and the same attack for linf)."""
    x, y = toy_data[0][:16], toy_data[1][:16]
    t, lr, steps = ThreatModel("linf", 0.3), 0.02, 3
    atk = attacks.create(
        "pgd", t, optimizer=name, steps=steps, step_size=lr, random_start=False, keep_best=False
    )
    got = atk(toy_model, x, y).x_adv

    def loss_at(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = toy_model(z)
        return atk.loss(logits, y, False), logits

    rule, xa = make(name), x.clone()
    for _ in range(steps):
        xa = t.project(x + rule.update(atk.input_grad(loss_at, xa)[2], xa - x, lr), x)
    torch.testing.assert_close(got, xa, rtol=0, atol=1e-6)
    sign = attacks.create("pgd", t, steps=steps, step_size=lr, random_start=False, keep_best=False)(
        toy_model, x, y
    ).x_adv
    assert not torch.allclose(got, sign, atol=1e-4)


UPDATE_RULES = [n for n, rule in OPTIMIZERS.items() if not rule.steepest]


def test_the_update_rules_are_the_four():
    assert UPDATE_RULES == ["sgd", "rmsprop", "adagrad", "ftrl"]


@pytest.mark.parametrize("name", UPDATE_RULES)
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.3), ("l2", 3.0)])
def test_every_update_rule_breaks_the_toy_model(name, norm, eps, toy_model, toy_data):
    """At PGD's default step size, on the margin loss: the toy model's cross-entropy is
    saturated (input gradients near 1e-8), where a step in the gradient's own scale stalls."""
    x, y = toy_data[0][:64], toy_data[1][:64]
    atk = attacks.create("pgd", ThreatModel(norm, eps), optimizer=name, loss="cw-margin")
    assert atk(toy_model, x, y).robust_accuracy < 0.3


@pytest.mark.parametrize("name", UPDATE_RULES)
def test_update_rule_state_follows_the_samples_through_early_stop(name, toy_model, toy_data):
    x, y = toy_data
    t, opts = ThreatModel("linf", 0.15), {"optimizer": name, "loss": "cw-margin", "step_size": 0.1}
    full = attacks.create("pgd", t, **opts)(toy_model, x, y)
    early = attacks.create("pgd", t, early_stop=True, **opts)(toy_model, x, y)
    assert torch.equal(full.success, early.success)
    assert 0 < int(full.success.sum()) < len(x)
    assert torch.equal(full.x_adv[~full.success], early.x_adv[~full.success])

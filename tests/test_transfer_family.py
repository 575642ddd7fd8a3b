"""The transfer families on MI-FGSM's loop (DI, TI, NI/SI, VMI) against their papers'
definitions, and the transfer attack's ensemble surrogate."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TinyCNN
from robustlab import ThreatModel, attacks
from robustlab.attacks._momentum_family import AUTO_KERNEL, AUTO_KERNEL_SIDE
from robustlab.attacks._transfer_ops import diverse, gaussian_kernel, smooth
from robustlab.attacks.transfer import Ensemble

LINF = ThreatModel("linf", 0.1)


def _run(name, threat, model, x, y, **opts):
    return attacks.create(name, threat, **opts)(
        model, x, y, generator=torch.Generator().manual_seed(0)
    )


# --- with their own ingredient off, the families are MI-FGSM (I-FGSM for NI with mu = 0) ---
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(
    ("name", "off"),
    [("di-fgsm", {"diversity": 0.0}), ("ti-fgsm", {"kernel": 1}), ("vmi-fgsm", {"samples": 0})],
)
def test_a_family_without_its_ingredient_is_mi_fgsm(name, off, norm, toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    t = ThreatModel(norm, 0.1 if norm == "linf" else 1.0)
    fam = _run(name, t, toy_model, x, y, **off)
    mi = _run("mi-fgsm", t, toy_model, x, y)
    assert torch.equal(fam.x_adv, mi.x_adv)
    # and with it on, the iterates differ
    assert not torch.equal(_run(name, t, toy_model, x, y).x_adv, mi.x_adv)


def test_ni_with_no_momentum_is_i_fgsm(toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    ni = _run("ni-fgsm", LINF, toy_model, x, y, momentum=0.0)
    ifgsm = _run("pgd", LINF, toy_model, x, y, random_start=False, step_size=0.01)
    assert torch.equal(ni.x_adv, ifgsm.x_adv)


# --- TI: the kernel and the convolution by hand ----------------------------------------------
def test_ti_kernel_and_convolution_by_hand():
    k = gaussian_kernel(3, torch.zeros(1))
    phi = [math.exp(-9 / 2), 1.0, math.exp(-9 / 2)]  # the density at -3, 0, 3 (constant drops)
    hand = torch.tensor([[a * b for b in phi] for a in phi])
    torch.testing.assert_close(k, hand / hand.sum())
    assert gaussian_kernel(15, k).sum().item() == pytest.approx(1.0)
    grad = torch.zeros(1, 2, 5, 5)
    grad[0, 0, 2, 2] = 1.0  # channel 0: a delta in the centre spreads into the kernel
    grad[0, 1, 0, 0] = -2.0  # channel 1: a corner delta, zero padding truncates the kernel
    out = smooth(grad, k)
    centre = torch.zeros(5, 5)
    centre[1:4, 1:4] = k
    corner = torch.zeros(5, 5)
    corner[:2, :2] = -2.0 * k[1:, 1:]
    torch.testing.assert_close(out[0, 0], centre)
    torch.testing.assert_close(out[0, 1], corner)


def test_one_ti_step_follows_the_smoothed_gradient_sign(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    res = _run("ti-fgsm", LINF, toy_model, x, y, steps=1, kernel=5, keep_best=False)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(toy_model(xr), y, reduction="sum"), xr)
    expected = LINF.project(x + 0.1 * smooth(grad, gaussian_kernel(5, x)).sign(), x)
    torch.testing.assert_close(res.x_adv, expected, rtol=0, atol=1e-6)


def test_ti_auto_kernel_is_7_on_small_images(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    auto = _run("ti-fgsm", LINF, toy_model, x, y, steps=2)
    assert torch.equal(auto.x_adv, _run("ti-fgsm", LINF, toy_model, x, y, steps=2, kernel=7).x_adv)
    assert not torch.equal(
        auto.x_adv, _run("ti-fgsm", LINF, toy_model, x, y, steps=2, kernel=15).x_adv
    )
    assert (AUTO_KERNEL_SIDE, AUTO_KERNEL) == (64, (15, 7))


# --- DI: the transform ------------------------------------------------------------------------
def test_di_transform_resizes_and_pads_with_probability_p():
    x = torch.full((3, 2, 20, 20), 0.7)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out, drawn = diverse(x, 1.0, 0.75, g, fill=0.5)
        assert drawn and out.shape == x.shape
        block = (out == 0.7).all(dim=(0, 1))  # the resized image, one draw for the whole batch
        rows, cols = block.any(1).sum().item(), block.any(0).sum().item()
        assert 15 <= rows < 20 and rows == cols  # int(20 * 0.75) = 15
        assert block.sum().item() == rows * cols
        assert (out[:, :, ~block] == 0.5).all()  # the rest is padding
        same, drawn = diverse(x, 0.0, 0.75, g, fill=0.5)
        assert same is x and not drawn
    # the gradient flows through the transform: nearest-neighbour copies sum back
    xr = torch.rand(1, 1, 20, 20, requires_grad=True)
    out, _ = diverse(xr, 1.0, 0.75, torch.Generator().manual_seed(1), fill=0.0)
    (grad,) = torch.autograd.grad(out.sum(), xr)
    assert grad.sum().item() == pytest.approx(float(out.ne(0).sum()))


def test_di_needs_images():
    lin = nn.Sequential(nn.Linear(8, 3))
    x, y = torch.rand(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="need images"):
        attacks.create("di-fgsm", LINF)(lin, x, y)
    attacks.create("di-fgsm", LINF, diversity=0.0)(lin, x, y)  # without DI and TI: fine


# --- NI: the look-ahead point by hand --------------------------------------------------------
class Recorder(nn.Module):
    """The inputs the model is differentiated at (calls with gradients enabled)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.seen.append(x.detach().clone())
        return self.inner(x)


def test_ni_takes_the_gradient_at_the_look_ahead(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    model = Recorder(toy_model)
    alpha, mu = 0.02, 0.8
    _run("ni-fgsm", LINF, model, x, y, steps=2, momentum=mu, step_size=alpha, keep_best=False)
    assert len(model.seen) == 2
    xr = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(toy_model(xr), y, reduction="sum"), xr)
    x1 = LINF.project(x + alpha * g0.sign(), x)
    g_ref = g0 / g0.abs().mean(dim=(1, 2, 3), keepdim=True)  # the reference's velocity
    torch.testing.assert_close(model.seen[0], x)
    torch.testing.assert_close(model.seen[1], x1 + alpha * mu * g_ref)


def test_si_averages_the_gradient_over_scaled_copies(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    model = Recorder(toy_model)
    _run("ni-fgsm", LINF, model, x, y, steps=1, scales=3, keep_best=False)
    assert len(model.seen) == 3
    for i, seen in enumerate(model.seen):  # scaled towards the centre of the bounds
        torch.testing.assert_close(seen, 0.5 + (x - 0.5) / 2**i)


def test_ni_is_linf_only():
    with pytest.raises(ValueError, match="linf"):
        attacks.create("di-fgsm", ThreatModel("l2", 1.0), nesterov=True)
    assert attacks.ATTACKS.get("ni-fgsm").norms == ("linf",)


# --- VMI: the variance by hand on a model with a known gradient ------------------------------
class Quadratic(nn.Module):
    """Logits (0, sum(a * x^2) / 2): the second logit's input gradient is a * x."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = a

    def forward(self, x):
        q = (self.a * x.square()).flatten(1).sum(1) / 2
        return torch.stack([torch.zeros_like(q), q], 1)


def test_vmi_adds_the_neighbourhood_variance(toy_data):
    x = toy_data[0][:4]
    y = torch.zeros(4, dtype=torch.long)
    a = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(0))
    model = Recorder(Quadratic(a))
    t, alpha, mu, n, beta = ThreatModel("linf", 0.2), 0.05, 1.0, 3, 1.5
    res = _run(
        "vmi-fgsm",
        t,
        model,
        x,
        y,
        steps=2,
        step_size=alpha,
        samples=n,
        beta=beta,
        keep_best=False,
        loss=lambda z, _: z[:, 1],
    )
    assert len(model.seen) == 2 * (1 + n)  # 1 + N gradients a step
    nb0 = model.seen[1 : 1 + n]
    assert all(((p - x).abs() <= beta * 0.2 + 1e-6).all() for p in nb0)
    assert all(not torch.equal(p, x) for p in nb0)

    def l1(v):
        return v / v.abs().flatten(1).sum(1).reshape(-1, 1, 1, 1)

    g0 = a * x
    m1 = l1(g0)
    x1 = t.project(x + alpha * m1.sign(), x)
    v1 = sum(a * p for p in nb0) / n - g0
    m2 = mu * m1 + l1(a * x1 + v1)
    x2 = t.project(x1 + alpha * m2.sign(), x)
    torch.testing.assert_close(model.seen[1 + n], x1)
    torch.testing.assert_close(res.x_adv, x2)


def test_options_are_validated():
    for opts, match in [
        ({"kernel": 4}, "odd.*use 5"),
        ({"kernel": "big"}, "kernel"),
        ({"diversity": 1.5}, "diversity"),
        ({"samples": -1}, "samples"),
        ({"resize": 0.0}, "resize"),
        ({"scales": 0}, "scales"),
        ({"beta": -1.0}, "beta"),
    ]:
        with pytest.raises(ValueError, match=match):
            attacks.create("vmi-fgsm", LINF, **opts)
    with pytest.raises(TypeError, match="nesterov"):
        attacks.create("ni-fgsm", LINF, nesterov="yes")
    cfg = attacks.create("di-fgsm", LINF, kernel=7, scales=2).config()
    assert (cfg["diversity"], cfg["kernel"], cfg["scales"], cfg["nesterov"]) == (0.5, 7, 2, False)
    assert attacks.create("vmi-fgsm", LINF).config()["samples"] == 20
    vmi = attacks.create("vmi-fgsm", LINF)
    assert (vmi.samples, vmi.beta, vmi.steps, vmi.momentum) == (20, 1.5, 10, 1.0)
    assert vmi.step_size == pytest.approx(0.01)


# --- the ensemble surrogate -------------------------------------------------------------------
def _other(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyCNN().eval()


def test_ensemble_gradient_is_the_mean_of_the_members_logit_gradients(toy_model, toy_data):
    x = toy_data[0][:4].clone().requires_grad_(True)
    m2 = _other(5)
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((v * Ensemble([toy_model, m2])(x)).sum(), x)
    (g1,) = torch.autograd.grad((v * toy_model(x)).sum(), x)
    (g2,) = torch.autograd.grad((v * m2(x)).sum(), x)
    torch.testing.assert_close(g, (g1 + g2) / 2)


def test_transfer_from_an_ensemble(toy_model, toy_data):
    x, y = toy_data[0][:64], toy_data[1][:64]
    t = ThreatModel("linf", 0.3)
    m2 = _other(5)
    m2.train()
    opts = {"attack": "di-fgsm", "attack_options": {"steps": 5}}
    one = _run("transfer", t, toy_model, x, y, surrogate=toy_model, **opts)
    listed = _run("transfer", t, toy_model, x, y, surrogate=[toy_model], **opts)
    assert torch.equal(one.x_adv, listed.x_adv)  # a one-model list is that model
    both = attacks.create("transfer", t, surrogate=[toy_model, m2], **opts)
    res = both(toy_model, x, y, generator=torch.Generator().manual_seed(0))
    assert m2.training and not toy_model.training  # each member's own mode back
    ens = Ensemble([toy_model, copy.deepcopy(m2).eval()])
    ref = _run("di-fgsm", t, ens, x, y, steps=5)
    assert torch.equal(res.x_adv, ref.x_adv)  # the inner attack on the mean logits
    assert both.config()["surrogate"] == ["TinyCNN", "TinyCNN"]
    assert one.robust_accuracy < 0.5


def test_ensemble_surrogate_bad_input(toy_model, toy_data):
    with pytest.raises(ValueError, match="empty"):
        attacks.create("transfer", LINF, surrogate=[])
    with pytest.raises(TypeError, match="surrogate must be"):
        attacks.create("transfer", LINF, surrogate=[toy_model, "resnet18"])
    three = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    atk = attacks.create("transfer", LINF, surrogate=[toy_model, three])
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        atk(toy_model, *[t[:4] for t in toy_data])


@pytest.mark.parametrize(("name", "opts"), [("ni-fgsm", {}), ("di-fgsm", {"diversity": 1.0})])
def test_early_stop_judges_the_iterate_not_the_point_the_gradient_saw(
    name, opts, toy_model, toy_data
):
    """NI's gradient sees the look-ahead, DI's a transformed image; stopping a sample early on
    those points' predictions would return iterates that are not adversarial."""
    x, y = toy_data[0][:64], toy_data[1][:64]
    t = ThreatModel("linf", 0.2)
    full = _run(name, t, toy_model, x, y, **opts)
    early = _run(name, t, toy_model, x, y, early_stop=True, **opts)
    assert 0 < int(full.success.sum()) < len(x)
    assert torch.equal(early.success, full.success)

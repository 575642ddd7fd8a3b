"""Feature capture, and the statistical detectors against their papers' definitions computed by
hand with NumPy: PCA (Hendrycks & Gimpel 2017) and Mahalanobis (Lee et al. 2018), one layer
and the feature ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.defenses.mahalanobis import Mahalanobis
from robustlab.defenses.pca_detector import PCADetector
from robustlab.models.features import capture, feature_module


def _mlp(d_in: int = 9, hidden: int = 5, k: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, k))
        .double()
        .eval()
    )


def _images(n: int, seed: int, c: int = 1, side: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g, dtype=torch.float64)


# --- feature capture ---------------------------------------------------------------------


def test_capture_inputs_outputs_and_logits():
    model, x = _mlp(), _images(6, 0)
    logits, (pen, img, hidden) = capture(model, x, [None, "1", "1"], inputs=True)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(pen, model[:3](x))  # input of the last Linear
    torch.testing.assert_close(img, x.flatten(1))  # input of the first Linear
    torch.testing.assert_close(hidden, img)
    _, (out,) = capture(model, x, ["1"], inputs=False)
    torch.testing.assert_close(out, model[:2](x))  # output of the first Linear
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_capture_is_differentiable_and_cleans_up_on_error():
    model = _mlp()
    x = _images(4, 1).requires_grad_(True)
    _, (pen,) = capture(model, x, [None])
    (g,) = torch.autograd.grad(pen.sum(), x)
    assert g.abs().sum() > 0
    with pytest.raises(RuntimeError):  # a forward pass that fails: the hooks still go
        capture(model, torch.zeros(2, 1, 4, 4, dtype=torch.float64), [None, "1"])
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_capture_errors_name_the_option():
    model = _mlp()
    x = _images(2, 0)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        capture(model, x, ["nope"], option="layer")
    with pytest.raises(TypeError, match="layer must be a module name"):
        feature_module(model, 3, option="layer")
    with pytest.raises(TypeError, match="sequence"):
        capture(model, x, "1")

    class Wrapper(nn.Module):
        def __init__(self, copies: int) -> None:
            super().__init__()
            self.net, self.spare, self.copies = _mlp(), nn.Linear(2, 2), copies  # spare: idle

        def forward(self, x):  # copies > 1 replicates the inputs, as noise samples do
            return self.net(torch.cat([x] * self.copies)).view(self.copies, len(x), -1).mean(0)

    with pytest.raises(ValueError, match="did not run.*with layer="):
        capture(Wrapper(1), x, ["spare"], option="layer")
    with pytest.raises(ValueError, match=r"\[4\] rows for 2 inputs"):
        capture(Wrapper(2), x, ["net.3"])
    assert feature_module(nn.Sequential(nn.ReLU())) == (None, None)
    logits, (feats,) = capture(nn.Sequential(nn.Flatten()), x, [None])  # no Linear: logits
    torch.testing.assert_close(feats, logits)


# --- PCA detector ------------------------------------------------------------------------


def _fitted_pca(x: torch.Tensor, **kw) -> PCADetector:
    det = PCADetector(_mlp(), **kw)
    det.fit_statistics(x, None, batch_size=7)
    return det


def test_pca_matches_numpy_svd():
    x = _images(40, 2)
    det = _fitted_pca(x, components=4)
    a = x.flatten(1).numpy()
    mu = a.mean(0)
    _, s, vt = np.linalg.svd(a - mu, full_matrices=False)
    variances = s**2 / (len(a) - 1)
    np.testing.assert_allclose(det.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(det.variances.numpy(), variances, rtol=1e-10)
    overlap = det.basis.numpy().T @ vt.T  # same basis up to sign: +-1 on the diagonal
    np.testing.assert_allclose(np.abs(overlap), np.eye(9), atol=1e-9)
    xt = _images(5, 3)
    coef = (xt.flatten(1).numpy() - mu) @ vt.T / np.sqrt(variances)
    expected = (coef[:, -4:] ** 2).mean(1)
    np.testing.assert_allclose(det.score_from(xt, None).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(
        np.abs(det.coefficients(xt).numpy()), np.abs(coef), rtol=1e-9, atol=1e-12
    )
    c_train = det.coefficients(x).numpy()  # whitened: identity covariance on the fitting data
    np.testing.assert_allclose(np.cov(c_train.T), np.eye(9), atol=1e-9)


def test_pca_known_answer_on_a_subspace():
    g = torch.Generator().manual_seed(4)
    directions = torch.linalg.qr(torch.randn(9, 3, generator=g, dtype=torch.float64))[0]
    codes = torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1])
    x = (0.5 + 0.05 * codes @ directions.T).reshape(50, 1, 3, 3)
    det = _fitted_pca(x, components=1)
    assert len(det.variances) == 3  # the null directions of the data are left out
    u, lam = det.basis[:, -1], det.variances[-1]
    probe = (det.mean + 0.2 * u).reshape(1, 1, 3, 3)  # on the last component only
    torch.testing.assert_close(det.score_from(probe, None), 0.2**2 / lam[None])
    det.components = 2  # mean square over two components: half of it
    torch.testing.assert_close(det.score_from(probe, None), 0.2**2 / lam[None] / 2)
    with pytest.raises(ValueError, match="span only 3 principal"):
        _fitted_pca(x, components=4)


def test_pca_detector_fit_gradients_and_config():
    det = rl.defenses.create("pca-detector", _mlp(), components=3)
    with pytest.raises(ValueError, match="no PCA yet"):
        det.score(_images(2, 5))
    x = _images(60, 6)
    det.fit(x)
    assert det.fitted and det.fit_samples == 12
    cfg = det.config()
    assert cfg["name"] == "pca-detector" and cfg["components"] == 3 and cfg["rank"] == 9
    assert cfg["rtol"] == 1e-10 and cfg["holdout"] == 0.2
    xt = _images(3, 7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: det.score_from(v, None), (xt,))
    out = det(xt.detach())
    assert out.shape == (3, 4)
    assert torch.equal(out.argmax(1) == 3, det.detect(xt.detach()))
    with pytest.raises(ValueError, match="components"):
        PCADetector(_mlp(), components=0)


# --- Mahalanobis detector ----------------------------------------------------------------


def _hand_mahalanobis(f_train, y_train, f_test):
    classes = np.unique(y_train)
    means = np.stack([f_train[y_train == c].mean(0) for c in classes])
    centred = f_train - means[np.searchsorted(classes, y_train)]
    cov = centred.T @ centred / len(f_train)  # mean of class-centred outer products
    prec = np.linalg.pinv(cov)
    diff = f_test[:, None, :] - means[None]
    return means, cov, np.einsum("nkd,de,nke->nk", diff, prec, diff)


@pytest.mark.parametrize("hidden, n", [(5, 60), (20, 12)])  # full rank; singular (pinv)
def test_mahalanobis_matches_numpy(hidden, n):
    model = _mlp(hidden=hidden)
    x, xt = _images(n, 8), _images(4, 9)
    y = torch.arange(n) % 3
    det = Mahalanobis(model)
    assert det.layer == "3"
    det.fit_statistics(x, y, batch_size=5)
    with torch.no_grad():
        f, ft = model[:3](x).numpy(), model[:3](xt).numpy()
    means, cov, dist = _hand_mahalanobis(f, y.numpy(), ft)
    np.testing.assert_allclose(det.means.numpy(), means, rtol=1e-10)
    np.testing.assert_allclose(det.covariance.numpy(), cov, atol=1e-12)
    np.testing.assert_allclose(
        det.distances(torch.from_numpy(ft)).detach().numpy(), dist, rtol=1e-7
    )
    np.testing.assert_allclose(det.score(xt).detach().numpy(), dist.min(1), rtol=1e-7)


def test_mahalanobis_named_layer_and_missing_class():
    model = _mlp()
    x, y = _images(30, 10), torch.tensor([0, 2] * 15)  # class 1 absent: no Gaussian
    det = Mahalanobis(model, layer="1")  # input of the first Linear: the flattened image
    det.fit_statistics(x, y, batch_size=8)
    assert det.classes.tolist() == [0, 2] and det.means.shape == (2, 9)
    _, _, dist = _hand_mahalanobis(x.flatten(1).numpy(), y.numpy(), x[:3].flatten(1).numpy())
    np.testing.assert_allclose(det.score(x[:3]).numpy(), dist.min(1), rtol=1e-7)
    with pytest.raises(ValueError, match="pass the labels"):
        det.fit_statistics(x, None, batch_size=8)
    with pytest.raises(ValueError, match="no module named"):
        Mahalanobis(model, layer="head")


def test_mahalanobis_input_preprocessing():
    model = _mlp()
    x, y, xt = _images(60, 11), torch.arange(60) % 3, _images(4, 12)
    plain = Mahalanobis(model)
    plain.fit_statistics(x, y, batch_size=64)
    noisy = Mahalanobis(model, noise=0.01)
    noisy.fit_statistics(x, y, batch_size=64)
    xg = xt.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(plain.score(xg).sum(), xg)
    moved = xt - 0.01 * grad.sign()  # the paper's step, against the distance's gradient
    torch.testing.assert_close(noisy.score(xt), plain.score(moved))
    assert (noisy.score(xt) < plain.score(xt)).all()  # a step towards the closest mean
    assert noisy.config()["noise"] == 0.01


def test_mahalanobis_forward_fit_and_gradients():
    model = _mlp()
    det = rl.defenses.create("mahalanobis", model)
    x, y = _images(50, 13), torch.arange(50) % 3
    det.fit(x, y)
    assert det.fitted and det.fit_samples == 10
    cfg = det.config()
    assert (cfg["name"], cfg["layer"], cfg["features"], cfg["gaussians"]) == (
        "mahalanobis",
        "3",
        5,
        3,
    )
    xt = _images(5, 14)
    out = det(xt)
    torch.testing.assert_close(out[:, :3], model(xt))
    assert torch.equal(out.argmax(1) == 3, det.detect(xt))
    xg = xt.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(det.score, (xg,))
    det.threshold = -1.0  # every input rejected: the rejection column wins
    assert (det(xt).argmax(1) == 3).all()


# --- Mahalanobis feature ensemble ---------------------------------------------------------


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 4),
            nn.Tanh(),
            nn.Linear(4, 3),
        )
        .double()
        .eval()
    )


def test_mahalanobis_ensemble_layers_by_hand():
    """Each column is the one-layer detector's closest-class distance on per-channel means of
    the layer's output (the paper's pooling), with the NumPy hand computation."""
    model = _convnet()
    det = rl.defenses.create("mahalanobis-ensemble", model)
    assert det.layers == ["2", "5"]  # the pooling module and the last activation
    x, y, xt = _images(40, 13, side=4), torch.arange(40) % 3, _images(5, 14, side=4)
    det.fit_reference(x, y, batch_size=16)
    with torch.no_grad():
        pool, pen = model[:3](x).mean((2, 3)).numpy(), model[:6](x).numpy()
        pool_t, pen_t = model[:3](xt).mean((2, 3)).numpy(), model[:6](xt).numpy()
        got = det.characteristics(xt, model(xt)).numpy()
    for col, (f, ft) in enumerate(((pool, pool_t), (pen, pen_t))):
        _, _, dist = _hand_mahalanobis(f, y.numpy(), ft)
        np.testing.assert_allclose(got[:, col], dist.min(1), rtol=1e-7)


def test_mahalanobis_ensemble_is_supervised_and_rejects_attacked_points(toy_model, toy_data):
    x, y = toy_data
    det = rl.defenses.create("mahalanobis-ensemble", toy_model).fit(x[:160], y[:160])
    cfg = det.config()
    assert det.layers == ["conv", "fc"]  # functional activations: the weight modules
    assert cfg["supervised"] and cfg["attack"]["name"] == "fgsm" and cfg["features"] == [8, 4]
    assert cfg["training_points"]["adversarial"] > 0 and det.fitted
    xt, yt = x[160:], y[160:]
    with torch.no_grad():
        out = det(xt)
    assert out.shape == (len(xt), 5) and torch.equal(out[:, :4], toy_model(xt))
    adv = rl.attacks.create("fgsm", rl.ThreatModel("linf", 0.3))(toy_model, xt, yt).x_adv
    tpr, fpr = det.detect(adv).float().mean(), det.detect(xt).float().mean()
    assert tpr > fpr + 0.3, (tpr, fpr)


def test_mahalanobis_ensemble_preprocessing_steps_each_layer_on_its_own_gradient():
    model = _convnet(2)
    x, y, xt = _images(40, 16, side=4), torch.arange(40) % 3, _images(3, 17, side=4)
    det = rl.defenses.create("mahalanobis-ensemble", model, noise=0.01)
    det.fit_reference(x, y, batch_size=64)
    got = det.characteristics(xt, model(xt))
    for col in range(2):
        xg = xt.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(det.layer_scores(xg)[:, col].sum(), xg)
        moved = det.layer_scores(xt - 0.01 * grad.sign())[:, col]
        torch.testing.assert_close(got[:, col], moved)
        assert (moved < det.layer_scores(xt)[:, col]).all()

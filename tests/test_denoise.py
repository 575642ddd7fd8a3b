"""Denoised smoothing: the DnCNN denoiser, its two training objectives, resumable training,
safe checkpoints and the "denoised" defense."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab.defenses
from helpers import NUM_CLASSES, TinyCNN, make_quadrants
from robustlab.defenses.denoise import Denoised
from robustlab.models.dncnn import Denoiser, load_denoiser
from robustlab.noise import sample
from robustlab.training.denoiser import STATE_FILE, WEIGHTS_FILE, train_denoiser


class CentrePixels(nn.Module):
    """A classifier that reads one pixel per quadrant (the centre of each 8x8 quadrant of
    make_quadrants): ~100% clean accuracy, but noise at the pixel level ruins it. Unlike
    TinyCNN, which pools over whole quadrants and stays within a few points of the
    quadrant-mean oracle under noise, it leaves a denoiser something to recover."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, NUM_CLASSES)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, 0, 4::8, 4::8].flatten(1))


@pytest.fixture(scope="module")
def probe() -> nn.Module:
    model = CentrePixels()
    x, y = make_quadrants(512, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def train_x() -> torch.Tensor:
    return make_quadrants(512, seed=5)[0]


def small() -> Denoiser:
    return Denoiser(depth=4, width=16)


def noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + sample(x, "gaussian", sigma, torch.Generator().manual_seed(9))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_denoiser_contract():
    den = Denoiser(in_channels=3, depth=5, width=8)
    assert den.kwargs() == {"in_channels": 3, "depth": 5, "width": 8}
    assert sum(isinstance(m, nn.Conv2d) for m in den.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in den.modules()) == 3
    x = torch.rand(2, 3, 7, 9) * 3 - 1  # noisy inputs lie outside [0, 1]: not clipped
    out = den.eval()(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)  # zero-initialised last layer: an untrained denoiser is identity
    with torch.no_grad():
        den.body[-1].weight.normal_()
    assert not torch.equal(den(x), x)
    assert den(x).min() < 0 < 1 < den(x).max()  # output not clamped
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        den(torch.rand(2, 1, 7, 9))
    for bad in ({"depth": 1}, {"width": 0}, {"in_channels": 2.0}):
        with pytest.raises(ValueError):
            Denoiser(**bad)


def test_mse_training_denoises(train_x):
    sigma = 0.5
    den = small()
    history = train_denoiser(den, train_x, sigma=sigma, epochs=5, batch_size=32, lr=3e-3)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < history[0]["loss"]
    assert den.training  # the mode it had before training
    x = make_quadrants(256, seed=1)[0]
    xn = noisy(x, sigma)
    with torch.no_grad():
        mse = F.mse_loss(den.eval()(xn), x).item()
    best_constant = F.mse_loss(train_x.mean(0, keepdim=True).expand_as(x), x).item()
    assert F.mse_loss(xn, x).item() == pytest.approx(sigma**2, rel=0.05)  # doing nothing
    assert mse < 0.2 * sigma**2  # measured 0.026 vs 0.25
    assert mse < 0.8 * best_constant  # uses the image, not just the average image (0.040)


def test_stab_training_restores_a_clean_classifier(probe, train_x):
    sigma = 1.0
    x, y = make_quadrants(512, seed=1)
    assert accuracy(probe, x, y) > 0.98
    xn = noisy(x, sigma)
    plain = accuracy(probe, xn, y)  # measured 0.35
    flags = [p.requires_grad for p in probe.parameters()]
    before = copy.deepcopy(probe.state_dict())
    stab = small()
    probe.train()  # to see that its mode comes back
    history = train_denoiser(
        stab,
        train_x,
        sigma=sigma,
        classifier=probe,
        objective="stab",
        epochs=3,
        batch_size=32,
        lr=3e-3,
    )
    assert probe.training
    probe.eval()
    assert all(0 <= r["stab_accuracy"] <= 1 for r in history)
    assert history[-1]["stab_accuracy"] > history[0]["stab_accuracy"]
    # the classifier is frozen while training and given back as it was
    assert [p.requires_grad for p in probe.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in probe.state_dict().items())
    assert all(p.grad is None for p in probe.parameters())  # no gradients were computed
    mse = small()
    train_denoiser(mse, train_x, sigma=sigma, epochs=3, batch_size=32, lr=3e-3)
    with_stab = accuracy(Denoised(probe, stab.eval()), xn, y)  # measured 0.89
    with_mse = accuracy(Denoised(probe, mse.eval()), xn, y)  # measured 0.56
    assert with_stab > plain + 0.4
    assert with_stab > with_mse + 0.15  # Stab optimises for this classifier, MSE does not
    # the composition is what smoothing votes over
    smooth = robustlab.defenses.create("smoothing", Denoised(probe, stab), sigma=sigma, samples=8)
    plain_smooth = robustlab.defenses.create("smoothing", probe, sigma=sigma, samples=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert (smooth.eval()(x[:128], generator=g).argmax(1) == y[:128]).float().mean() > (
            plain_smooth.eval()(x[:128], generator=g).argmax(1) == y[:128]
        ).float().mean() + 0.3


def test_resume_equals_uninterrupted(train_x, tmp_path, probe):
    init = small()
    opts = {"sigma": 0.5, "classifier": probe, "objective": "stab", "batch_size": 64, "seed": 4}
    a, b, fresh = copy.deepcopy(init), copy.deepcopy(init), small()
    rng = torch.get_rng_state()
    hist_a = train_denoiser(a, train_x[:256], epochs=2, out=tmp_path / "a", **opts)
    train_denoiser(b, train_x[:256], epochs=1, out=tmp_path / "b", **opts)
    b = fresh  # as in a new process: the weights come from the saved state
    hist_b = train_denoiser(b, train_x[:256], epochs=2, out=tmp_path / "b", **opts)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # BatchNorm statistics included
    assert [r["loss"] for r in hist_a] == [r["loss"] for r in hist_b]
    log = (tmp_path / "b" / "denoiser_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in log] == [1, 2]
    # nothing left to do: same weights, same history
    assert train_denoiser(b, train_x[:256], epochs=2, out=tmp_path / "b", **opts) == hist_b
    with pytest.raises(ValueError, match="sigma"):
        train_denoiser(
            small(), train_x[:256], epochs=3, out=tmp_path / "b", **(opts | {"sigma": 0.25})
        )
    with pytest.raises(ValueError, match="epochs >= 2"):
        train_denoiser(small(), train_x[:256], epochs=1, out=tmp_path / "b", **opts)
    with pytest.raises(ValueError, match="architecture"):
        train_denoiser(
            Denoiser(depth=3, width=16), train_x[:256], epochs=3, out=tmp_path / "b", **opts
        )


def test_checkpoint_round_trip(train_x, tmp_path):
    den = small()
    train_denoiser(den, train_x[:64], sigma=0.25, epochs=1, out=tmp_path, seed=2, noise="laplace")
    assert (tmp_path / STATE_FILE).is_file()
    loaded = load_denoiser(tmp_path / WEIGHTS_FILE)
    assert isinstance(loaded, Denoiser) and not loaded.training
    assert loaded.kwargs() == den.kwargs()
    meta = loaded.robustlab_meta
    assert (meta["sigma"], meta["noise"], meta["objective"], meta["epoch"], meta["seed"]) == (
        0.25,
        "laplace",
        "mse",
        1,
        2,
    )
    assert "robustlab_version" in meta and "sha256" in meta
    x = noisy(train_x[:8], 0.25)
    with torch.no_grad():
        assert torch.equal(loaded(x), den.eval()(x))
    model = robustlab.defenses.create(
        "denoised", TinyCNN().eval(), denoiser=tmp_path / WEIGHTS_FILE
    )
    assert model.config()["sigma"] == 0.25
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_denoiser(tmp_path / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"objective": "l1"}, "unknown objective"),
        ({"objective": "stab"}, "needs classifier"),
        ({"classifier": CentrePixels()}, "uses no classifier"),
        ({"noise": "uniform"}, "unknown noise"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_options(train_x, options, match):
    with pytest.raises(ValueError, match=match):
        train_denoiser(small(), train_x[:8], **({"sigma": 0.25, "epochs": 1} | options))


def test_bad_images():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_denoiser(small(), torch.rand(4, 1, 8, 8) + 1, sigma=0.25, epochs=1)
    with pytest.raises(ValueError, match="channels"):
        train_denoiser(small(), torch.rand(4, 3, 8, 8), sigma=0.25, epochs=1)


def test_registry_and_frozen_classifier():
    toy_model = TinyCNN().eval()
    assert "denoised" in robustlab.defenses.names()
    den = small()
    model = robustlab.defenses.create("denoised", toy_model, denoiser=den)
    assert isinstance(model, Denoised)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        den.body[-1].weight.normal_(std=0.1)
        assert torch.equal(model(x), toy_model(den(x)))
    model.train()
    assert den.training and not toy_model.training  # the classifier stays in eval mode
    assert model.config()["name"] == "denoised"
    with pytest.raises(TypeError, match="classifier comes first"):
        Denoised(den, toy_model)
    with pytest.raises(TypeError, match="denoiser"):
        robustlab.defenses.create("denoised", toy_model)

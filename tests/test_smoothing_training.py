"""Training for randomised smoothing: the gaussian-aug, noise-at and smoothadv objectives, and
fine-tuning from a checkpoint ([model] init)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import TinyCNN
from robustlab.attacks.smoothadv import soft_smoothed_loss
from robustlab.cli import main
from robustlab.config import load_recipe
from robustlab.models.init import init_weights
from robustlab.models.noise import noise_parameter_names
from robustlab.noise import sample

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KW = {"num_classes": 4, "input_size": 16}


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _objective(name: str, **options):
    return rl.training.create_objective(name, **options)


class Spy(nn.Module):
    """Records the mode and the input of every forward of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.detach().clone()))
        return self.model(x)


# --- gaussian-aug ------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_gaussian_aug_is_cross_entropy_at_x_plus_the_generators_noise(toy_model, toy_data, noise):
    x, y = toy_data[0][:32], toy_data[1][:32]
    obj = _objective("gaussian-aug", sigma=0.3, noise=noise)
    loss = obj(toy_model, x, y, generator=_gen())
    expected = F.cross_entropy(toy_model(x + sample(x, noise, 0.3, _gen())), y)
    assert torch.allclose(loss, expected)
    assert obj.config() == {"name": "gaussian-aug", "sigma": 0.3, "noise": noise}
    assert not obj.needs_threat


def test_gaussian_aug_does_not_clip_the_noisy_input(toy_model, toy_data):
    spy = Spy(toy_model)
    _objective("gaussian-aug", sigma=0.5)(spy, toy_data[0][:16], toy_data[1][:16], generator=_gen())
    ((_, seen),) = spy.calls
    assert seen.min() < 0 and seen.max() > 1  # Cohen et al. add the noise and do not clip


def _shortcut_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two features: a faint class pattern (+-0.04 per pixel, perfectly predictive on clean
    images, drowned by sigma = 0.5 noise) and a bright quadrant (+0.3, in the wrong place for
    30% of the images, but readable through the noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    pattern = torch.randint(0, 2, (4, 1, 16, 16), generator=_gen(99)) * 2 - 1
    x = 0.4 + 0.04 * pattern[y].float()
    wrong = torch.rand(n, generator=g) < 0.3
    q = torch.where(wrong, torch.randint(0, 4, (n,), generator=g), y)
    for k in range(4):
        r, c = divmod(k, 2)
        x[q == k, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 0.3
    return x.clamp(0, 1), y


def test_gaussian_aug_is_far_more_accurate_under_noise_than_natural_training():
    x, y = _shortcut_data(512, seed=1)
    xt, yt = _shortcut_data(512, seed=5)
    acc = {}
    for name, options in (("natural", {}), ("gaussian-aug", {"sigma": 0.5})):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = TinyCNN()
        rl.training.fit(
            model,
            (x, y),
            objective=name,
            objective_options=options,
            epochs=15,
            batch_size=32,
            lr=0.01,
            optimizer="adam",
            weight_decay=0.0,
            schedule="constant",
        )
        model.eval()
        g = _gen(9)
        with torch.no_grad():
            clean = (model(xt).argmax(1) == yt).float().mean().item()
            noisy = (
                sum(
                    (model(xt + sample(xt, "gaussian", 0.5, g)).argmax(1) == yt)
                    .float()
                    .mean()
                    .item()
                    for _ in range(4)
                )
                / 4
            )
        acc[name] = clean, noisy
    assert acc["natural"][0] == 1.0  # natural training reads the faint pattern...
    assert acc["natural"][1] < 0.5  # ...which the noise drowns (measured: 0.44)
    assert acc["gaussian-aug"][1] > acc["natural"][1] + 0.2  # measured: 0.69


# --- noise-at ----------------------------------------------------------------------------------
THREAT = rl.ThreatModel("linf", 0.1)


def test_noise_at_hand_computations(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    g = _gen()
    d_adv, d_clean = sample(x, "gaussian", 0.2, g), sample(x, "gaussian", 0.2, g)
    clean = F.cross_entropy(toy_model(x + d_clean), y)
    adv_at_x = F.cross_entropy(toy_model(x + d_adv), y)

    def loss(w: float, threat: rl.ThreatModel) -> torch.Tensor:
        obj = _objective("noise-at", sigma=0.2, adv_weight=w, steps=3)
        return obj(toy_model, x, y, threat=threat, generator=_gen())

    zero = rl.ThreatModel("linf", 0.0)
    assert torch.allclose(loss(0.0, THREAT), clean)  # only the noisy clean term
    assert torch.allclose(loss(1.0, zero), adv_at_x)  # eps 0: x_adv = x
    assert torch.allclose(loss(0.5, zero), 0.5 * adv_at_x + 0.5 * clean)
    adv = loss(1.0, THREAT)
    assert adv > adv_at_x  # the attack raises the noisy loss
    assert torch.allclose(loss(0.3, THREAT), 0.3 * adv + 0.7 * clean)


def test_noise_at_attacks_the_noisy_model_in_eval_and_trains_in_train_mode(toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        spy = Spy(TinyCNN()).train()
    loss = _objective("noise-at", sigma=0.3, steps=4)(spy, x, y, threat=THREAT, generator=_gen())
    loss.backward()
    modes = [training for training, _ in spy.calls]
    assert modes == [False] * 4 + [True] * 2  # 4 attack steps in eval, 2 loss terms in train
    attack_inputs = [seen for _, seen in spy.calls[:4]]
    for seen in attack_inputs:  # every step saw noise far outside the eps ball
        assert (seen - x).abs().amax() > 3 * THREAT.eps
    for a, b in zip(attack_inputs, attack_inputs[1:], strict=False):  # a fresh draw each step
        assert (a - b).abs().amax() > 3 * THREAT.eps
    assert spy.training


def test_noise_at_with_epgd_and_option_errors(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    spy = Spy(toy_model)
    obj = _objective("noise-at", attack="epgd", samples=3, steps=2)
    loss = obj(spy, x, y, threat=THREAT, generator=_gen())
    assert torch.isfinite(loss)
    attack_calls = [seen for training, seen in spy.calls if not training]
    # 2 steps x m = 3 forwards of the batch, each with its own draw (fresh weight noise too)
    assert len(attack_calls) == 6 and all(len(c) == len(x) for c in attack_calls)
    assert obj.config()["attack"] == "epgd" and obj.config()["samples"] == 3
    for bad in (
        {"adv_weight": 1.5},
        {"attack": "fgsm"},
        {"samples": 0},
        {"steps": 0},
        {"step_size": 0.0},
        {"sigma": -0.1},
        {"noise": "uniform"},
    ):
        with pytest.raises(ValueError):
            _objective("noise-at", **bad)


# --- smoothadv ---------------------------------------------------------------------------------
def test_soft_smoothed_loss_is_minus_log_of_the_mean_probability(toy_model, toy_data):
    x, y = toy_data[0][:8], toy_data[1][:8]
    noise = sample(x.expand(3, *x.shape), "gaussian", 0.3, _gen())
    p = torch.stack([F.softmax(toy_model(x + noise[i]), 1)[torch.arange(8), y] for i in range(3)])
    loss = soft_smoothed_loss(toy_model, x, y, noise)[0]
    assert torch.allclose(loss, -p.mean(0).log(), atol=1e-6)
    single = soft_smoothed_loss(toy_model, x, y, noise[:1])[0]
    assert torch.allclose(
        single, F.cross_entropy(toy_model(x + noise[0]), y, reduction="none"), atol=1e-6
    )


def test_smoothadv_at_eps_zero_is_the_mean_cross_entropy_over_the_draws(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    obj = _objective("smoothadv", sigma=0.25, samples=4)
    loss = obj(toy_model, x, y, threat=rl.ThreatModel("l2", 0.0), generator=_gen())
    noise = sample(x.expand(4, *x.shape), "gaussian", 0.25, _gen())
    expected = torch.stack([F.cross_entropy(toy_model(x + noise[i]), y) for i in range(4)])
    assert torch.allclose(loss, expected.mean(), atol=1e-6)


@pytest.mark.parametrize("threat", [rl.ThreatModel("l2", 1.0), rl.ThreatModel("linf", 0.1)])
def test_smoothadv_attacks_with_the_draws_of_its_loss(toy_model, toy_data, threat):
    x, y = toy_data[0][:16], toy_data[1][:16]
    obj = _objective("smoothadv", sigma=0.25, samples=3, steps=5)
    loss = obj(toy_model, x, y, threat=threat, generator=_gen())
    noise = sample(x.expand(3, *x.shape), "gaussian", 0.25, _gen())  # the same first draw
    x_adv = obj.adversarial(toy_model, x, y, noise, threat, _gen())
    assert threat.contains(x_adv, x).all()
    assert torch.allclose(threat.distance(x_adv, x).max(), torch.tensor(threat.eps), rtol=1e-3)
    expected = torch.stack([F.cross_entropy(toy_model(x_adv + noise[i]), y) for i in range(3)])
    assert torch.allclose(loss, expected.mean(), atol=1e-6)  # the loss reuses the draws
    assert (
        soft_smoothed_loss(toy_model, x_adv, y, noise)[0].sum()
        > soft_smoothed_loss(toy_model, x, y, noise)[0].sum()
    )


def test_smoothadv_ramps_eps_over_the_warmup_epochs(toy_model, toy_data):
    x, y = toy_data[0][:16], toy_data[1][:16]
    threat = rl.ThreatModel("l2", 1.0)
    obj = _objective("smoothadv", steps=4, warmup=4)
    noise = sample(x.expand(2, *x.shape), "gaussian", 0.25, _gen())
    for epoch, eps in ((0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)):
        obj.begin_epoch(epoch, 10)
        dist = threat.distance(obj.adversarial(toy_model, x, y, noise, threat, _gen()), x)
        assert dist.max().item() == pytest.approx(eps, rel=1e-3), epoch
    for bad in (
        {"warmup": 0},
        {"samples": 0},
        {"steps": 0},
        {"step_size": -1.0},
        {"sigma": math.inf},
        {"noise": "uniform"},
    ):
        with pytest.raises(ValueError):
            _objective("smoothadv", **bad)


# --- [model] init ------------------------------------------------------------------------------
def _saved(tmp_path: Path, name: str = "smallcnn", **kw) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rl.models.create(name, **KW, **kw)
    return rl.models.save(model, tmp_path / f"{name}.safetensors")


def test_init_weights_fine_tunes_a_plain_checkpoint_into_a_cni_model(tmp_path):
    path = _saved(tmp_path)
    plain = rl.models.load(path)
    model = rl.models.create("smallcnn", noise="cni-w", **KW)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    left = init_weights(model, path)
    assert left == sorted(noise_parameter_names(model))
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in left else plain.state_dict()[key]
        assert torch.equal(value, expected), key


def test_init_weights_names_what_does_not_fit(tmp_path):
    model = rl.models.create("smallcnn", noise="cni-w", **KW)
    with pytest.raises(ValueError, match=r"keys the checkpoint lacks.*feature_extractor\.conv1"):
        init_weights(model, _saved(tmp_path, "lenet"))
    with pytest.raises(ValueError, match=r"keys the model lacks.*\.alpha"):
        init_weights(rl.models.create("smallcnn", **KW), _saved(tmp_path, noise="pni-w"))
    with pytest.raises(ValueError, match=r"shape mismatches.*fc3\.weight"):
        init_weights(rl.models.create("smallcnn", num_classes=10, input_size=16), _saved(tmp_path))
    with pytest.raises(FileNotFoundError):
        init_weights(model, tmp_path / "none.safetensors")
    with pytest.warns(UserWarning, match="the models differ"):
        init_weights(rl.models.create("smallcnn", activation="gelu", **KW), _saved(tmp_path))


def test_fit_starts_from_init_records_it_and_resume_does_not_reload_it(
    tmp_path, toy_data, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a relative init path resolves against the current directory
    source = rl.models.load(_saved(tmp_path, "lenet"))
    model = rl.models.create("lenet", noise="cni-w", **KW)
    run = tmp_path / "run"
    opts = {
        "objective": "gaussian-aug",
        "epochs": 1,
        "batch_size": 64,
        "lr": 1e-9,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "schedule": "constant",
    }
    rl.training.fit(model, toy_data, out=run, init="lenet.safetensors", **opts)
    for key, value in source.state_dict().items():  # lr ~ 0: still the checkpoint's weights
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key
    sidecar = json.loads((run / "model.json").read_text())
    assert sidecar["train_config"]["init"] == "lenet.safetensors"
    (tmp_path / "lenet.safetensors").unlink()  # a resumed run must not read it again
    resumed = rl.models.create("lenet", noise="cni-w", **KW)
    opts["epochs"] = 2
    history = rl.training.fit(
        resumed, toy_data, out=run, init="lenet.safetensors", resume=True, **opts
    )
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(ValueError, match="init must be the path of a .safetensors"):
        rl.training.TrainConfig(init="model.pt").validate()


# --- recipes -----------------------------------------------------------------------------------
def test_recipes_parse():
    aug = load_recipe(CONFIGS / "gaussian_aug.toml")
    assert aug.train.objective == "gaussian-aug"
    assert aug.train.objective_options["sigma"] == 0.25
    cni = load_recipe(CONFIGS / "cni.toml")
    assert cni.train.objective == "noise-at" and cni.model["noise"] == "cni-w"
    assert cni.train.init == "runs/pgd_at/model.safetensors" and "init" not in cni.model
    smooth = load_recipe(CONFIGS / "smoothadv.toml")
    assert smooth.train.objective == "smoothadv" and smooth.threat.norm == "l2"
    for recipe in (aug, cni, smooth):  # each builds its objective and model
        rl.training.create_objective(recipe.train.objective, **recipe.train.objective_options)
        opts = {k: v for k, v in recipe.model.items() if k != "arch"}
        rl.models.create(recipe.model["arch"], **opts)


def test_cli_fine_tunes_from_a_relative_init(tmp_path, monkeypatch, fake_fmnist):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    base = (
        '[data]\ndataset = "fashion-mnist"\nval_n = 16\nn_train = 128\n'
        '[train]\nobjective = "gaussian-aug"\nepochs = 1\nbatch_size = 64\n'
        'optimizer = "adam"\nlr = 0.001\n[model]\narch = "lenet"\n'
    )
    Path("plain.toml").write_text(base)
    assert main(["train", "--config", "plain.toml", "--out", "plain", "--quiet"]) == 0
    Path("tune.toml").write_text(base + 'noise = "cni-w"\ninit = "plain/model.safetensors"\n')
    # another seed: a fresh model would start from other weights than the plain run
    assert main(["train", "--config", "tune.toml", "--out", "tune", "--seed", "1", "--quiet"]) == 0
    tuned = rl.models.load("tune/model.safetensors")
    assert tuned.robustlab_meta["train_config"]["init"] == "plain/model.safetensors"
    assert tuned.robustlab_arch["kwargs"]["noise"] == "cni-w"
    plain = rl.models.load("plain/model.safetensors").state_dict()
    moved = max((tuned.state_dict()[k] - v).abs().max().item() for k, v in plain.items())
    assert moved < 0.01  # two Adam steps of 0.001 from the plain weights, not a fresh init

"""Smoothing curves: the draws and votes against the Smoothing defense, the accuracy grid, the
smoothing.json record and the ``robustlab smooth`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from helpers import NUM_CLASSES, TinyCNN
from robustlab.cli import main
from robustlab.evaluation.smoothing_curves import (
    SCHEMA,
    draw_logits,
    smoothing_curves,
    vote_decisions,
)
from robustlab.models.noise import inject, noisy_layers
from robustlab.noise import sample

VOTES = ("prediction", "soft", "weighted")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Table(nn.Module):
    """Ignores its input and returns ``table`` (rows in the order the sampler asks for them:
    input by input, draw by draw within an input), in one forward."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table.reshape(-1, table.shape[-1])

    def forward(self, x):
        assert len(x) == len(self.table)
        return self.table


# --- draws -------------------------------------------------------------------------------------
def test_draw_logits_are_the_model_on_the_samplers_noise(toy_model, toy_data):
    """Input-by-input packing: one forward of every input's draws, noise drawn in that order."""
    x = toy_data[0][:5]
    got = draw_logits(toy_model, x, 0.3, 6, gen(1), batch_size=1000)
    xs = x.repeat_interleave(6, 0)
    with torch.no_grad():
        want = toy_model(xs + sample(xs, "gaussian", 0.3, gen(1))).view(5, 6, NUM_CLASSES)
    assert torch.equal(got, want)
    small = draw_logits(toy_model, x, 0.3, 6, gen(1), batch_size=4)  # chunks split inputs
    g = gen(1)
    noise = torch.cat([sample(xs[i : i + 4], "gaussian", 0.3, g) for i in range(0, 30, 4)])
    with torch.no_grad():
        want = toy_model(xs + noise).view(5, 6, NUM_CLASSES)
        clean = toy_model(x)
    assert torch.allclose(small, want, atol=1e-5)
    at_zero = draw_logits(toy_model, x, 0.0, 3, gen(1), batch_size=4)
    assert torch.allclose(at_zero, clean[:, None].expand(-1, 3, -1), atol=1e-5)


def test_draw_logits_place_weight_noise_draws_by_draw(toy_data):
    """A model with weight noise gets one copy of each input per forward (draw by draw): draw d
    of every input comes from the d-th noise tensor drawn."""
    model = TinyCNN().eval()
    inject(model, "pni-w")
    for layer in noisy_layers(model):
        layer.noise_enabled = False  # still packed draw by draw, but deterministic
    x = toy_data[0][:5]
    got = draw_logits(model, x, 0.3, 4, gen(2), batch_size=64)
    g = gen(2)
    with torch.no_grad():
        want = torch.stack([model(x + sample(x, "gaussian", 0.3, g)) for _ in range(4)], 1)
    assert torch.equal(got, want)


# --- votes -------------------------------------------------------------------------------------
def test_vote_decisions_by_hand_with_ties():
    """Input 0: draws for class 0, class 1 and class 2, with class 1 the highest mean
    probability of the first two and of all three; input 1: two draws narrowly for class 0, one
    strongly for class 1."""
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.0, 5.0, -1.0], [-2.0, -3.0, 9.0]],
            [[2.0, 1.9, 0.0], [2.0, 1.9, 0.0], [0.0, 10.0, -1.0]],
        ]
    )
    two = vote_decisions(logits, 2)
    assert list(two) == list(VOTES)
    assert two["prediction"].tolist() == [1, 0]  # a tie goes to the higher mean probability
    assert two["soft"].tolist() == [1, 0]
    assert two["weighted"].tolist() == [1, 0]  # 1 + 1/2 against 1/2 + 1: tied again
    three = vote_decisions(logits, 3)
    assert three["prediction"].tolist() == [1, 0]  # a three-way tie, not the lowest index
    assert three["soft"].tolist() == [1, 1]
    assert three["weighted"].tolist() == [0, 0]  # 1 + 1/2 + 1/2 against 1/2 + 1 + 1/4
    one = vote_decisions(logits, 1, votes=["soft"])
    assert list(one) == ["soft"] and one["soft"].tolist() == [0, 0]


@pytest.mark.parametrize("vote", VOTES)
def test_vote_decisions_match_the_smoothing_defense_on_scripted_logits(vote):
    """Random small-integer logits (many ties) through the defense and through vote_decisions."""
    table = torch.randint(0, 3, (40, 5, 4), generator=gen(3)).float()
    for n in (1, 2, 5):
        smooth = rl.defenses.create(
            "smoothing", Table(table[:, :n]), sigma=0.0, samples=n, vote=vote
        )
        with torch.no_grad():
            want = smooth(torch.zeros(40, 1, 2, 2)).argmax(1)
        assert torch.equal(vote_decisions(table, n)[vote], want), n


@pytest.mark.parametrize("vote", VOTES)
def test_vote_decisions_match_the_smoothing_defense_on_the_same_draws(toy_model, toy_data, vote):
    """The smoothed classifier and vote_decisions on draw_logits of the same generator."""
    x = toy_data[0][:24]
    for n in (1, 5, 16):
        logits = draw_logits(toy_model, x, 0.5, n, gen(4), batch_size=64)
        smooth = rl.defenses.create(
            "smoothing", toy_model, sigma=0.5, samples=n, vote=vote, batch_size=64
        )
        with torch.no_grad():
            want = smooth(x, generator=gen(4)).argmax(1)
        assert torch.equal(vote_decisions(logits, n)[vote], want), n


def test_one_draw_prediction_is_its_argmax(toy_model, toy_data):
    logits = draw_logits(toy_model, toy_data[0][:32], 0.4, 3, gen(5))
    assert torch.equal(vote_decisions(logits, 1)["prediction"], logits[:, 0].argmax(1))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2, 3), 1), "shape \\(N, draws, K\\)"),
        ((torch.zeros(2, 3, 4), 4), "n must be an integer in 1..3"),
        ((torch.zeros(2, 3, 4), 0), "n must be an integer in 1..3"),
    ],
)
def test_vote_decisions_reject_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        vote_decisions(*args)
    with pytest.raises(ValueError, match="unknown vote 'majority'"):
        vote_decisions(torch.zeros(2, 3, 4), 1, votes=["majority"])


# --- curves ------------------------------------------------------------------------------------
def test_curves_cover_the_grid_and_write_json(toy_model, toy_data, tmp_path):
    x, y = toy_data[0][:64], toy_data[1][:64]
    with torch.no_grad():
        plain = (toy_model(x).argmax(1) == y).float().mean().item()
    rec = smoothing_curves(
        toy_model,
        x,
        y,
        sigmas=[2.0, 0.0, 2.0],
        samples=[8, 1, 2],
        seed=3,
        out=tmp_path / "run",
        config={"checkpoint": "m"},
    )
    assert rec["schema"] == SCHEMA and rec["base_accuracy"] == pytest.approx(plain)
    assert rec["random_model"] is False
    assert rec["config"] == {
        "sigmas": [0.0, 2.0],
        "samples": [1, 2, 8],
        "votes": list(VOTES),
        "noise": "gaussian",
        "seed": 3,
        "batch_size": 1024,
        "n": 64,
        "checkpoint": "m",
    }
    grid = [(r["sigma"], r["samples"], r["vote"]) for r in rec["rows"]]
    assert grid == [(s, n, v) for s in (0.0, 2.0) for n in (1, 2, 8) for v in VOTES]
    assert all(r["n"] == 64 and 0 <= r["accuracy"] <= 1 for r in rec["rows"])
    assert all(r["accuracy"] == pytest.approx(plain) for r in rec["rows"] if r["sigma"] == 0)
    # the rows are the smoothed classifier's accuracy on the same draws
    logits = draw_logits(toy_model, x, 2.0, 8, torch.Generator().manual_seed(3))
    for r in rec["rows"]:
        if r["sigma"] == 2.0:
            pred = vote_decisions(logits, r["samples"])[r["vote"]]
            assert r["accuracy"] == (pred == y).float().mean().item()
    noisy = {
        r["samples"]: r["accuracy"]
        for r in rec["rows"]
        if r["sigma"] == 2.0 and r["vote"] == "prediction"
    }
    assert noisy[1] < plain and noisy[1] < noisy[8]  # one draw is noisy; votes recover
    saved = json.loads((tmp_path / "run" / "smoothing.json").read_text())
    assert saved == rec
    assert {"created", "versions", "commit", "seconds"} <= set(saved)


def test_curves_are_seeded_and_sigmas_independent(toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    a = smoothing_curves(toy_model, x, y, sigmas=[0.3, 0.6], samples=[4], votes=["soft"])
    b = smoothing_curves(toy_model, x, y, sigmas=[0.6], samples=[4], votes=["soft"])
    assert a["rows"][1]["accuracy"] == b["rows"][0]["accuracy"]


def test_a_random_model_gets_all_draws_at_sigma_zero(toy_model, toy_data):
    """Without input noise a randomised model's vote still averages its own randomness."""
    from helpers import Noisy

    x, y = toy_data[0][:32], toy_data[1][:32]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rec = smoothing_curves(
            Noisy(toy_model, sigma=2.0), x, y, sigmas=[0.0], samples=[1, 32], votes=["soft"]
        )
    assert rec["random_model"] is True
    one, many = (r["accuracy"] for r in rec["rows"])
    assert one != many


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigmas": [-0.1]}, ValueError, "sigma must be a finite number >= 0"),
        ({"sigmas": [float("nan")]}, ValueError, "sigma must be a finite number >= 0"),
        ({"sigmas": []}, ValueError, "sigmas is empty"),
        ({"sigmas": 0.25}, TypeError, "sigmas must be a list"),
        ({"samples": [0]}, ValueError, "every entry of samples must be an integer >= 1"),
        ({"samples": [2.0]}, ValueError, "every entry of samples must be an integer >= 1"),
        ({"samples": "16"}, TypeError, "samples must be a list"),
        ({"votes": ["majority"]}, ValueError, "unknown vote 'majority'; valid votes are"),
        ({"noise": "uniform"}, ValueError, "unknown noise 'uniform'"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"config": {"seed": 1}}, ValueError, "config may not set seed"),
        ({"config": {"model": object()}}, TypeError, "config must hold JSON-able entries"),
    ],
)
def test_curves_reject_bad_arguments(toy_model, toy_data, kwargs, error, match):
    x, y = toy_data[0][:4], toy_data[1][:4]
    args = {"sigmas": [0.25], "samples": [4]} | kwargs
    with pytest.raises(error, match=match):
        smoothing_curves(toy_model, x, y, **args)


def test_curves_reject_bad_data(toy_model, toy_data):
    x, y = toy_data[0][:4], toy_data[1][:4]
    grid = {"sigmas": [0.25], "samples": [4]}
    with pytest.raises(ValueError, match="y must have shape"):
        smoothing_curves(toy_model, x, y[:3], **grid)
    with pytest.raises(ValueError, match="labels out of range"):
        smoothing_curves(toy_model, x, torch.full((4,), NUM_CLASSES), **grid)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        smoothing_curves(F.relu, x, y, **grid)


# --- command line ------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, monkeypatch, fake_fmnist):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    path = tmp_path / "run" / "model.safetensors"
    rl.models.save(rl.models.create("lenet"), path, meta={"dataset": "fashion-mnist"})
    return path


def test_cli_smooth_writes_the_curves(checkpoint, capsys):
    code = main(
        [
            "smooth",
            str(checkpoint),
            "--sigmas",
            "0,0.25",
            "--samples",
            "1, 4",
            "--votes",
            "prediction,soft",
            "--n",
            "16",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0 and capsys.readouterr().out == ""
    (path,) = checkpoint.parent.glob("smooth-gaussian-n16-seed0-*/smoothing.json")
    rec = json.loads(path.read_text())
    assert rec["config"]["checkpoint"] == str(checkpoint) and rec["config"]["n"] == 16
    assert rec["config"]["dataset"] == "fashion-mnist" and rec["config"]["split"] == "test"
    assert rec["config"]["samples"] == [1, 4] and "command" in rec["config"]
    assert len(rec["rows"]) == 2 * 2 * 2
    out = checkpoint.parent / "elsewhere"
    assert (
        main(
            [
                "smooth",
                str(checkpoint),
                "--sigmas",
                "0.5",
                "--samples",
                "2",
                "--n",
                "8",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--noise",
                "laplace",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "weighted vote" in text and "n=2" in text and str(out / "smoothing.json") in text
    assert json.loads((out / "smoothing.json").read_text())["config"]["noise"] == "laplace"


def test_cli_smooth_errors_are_clear(checkpoint, capsys):
    assert main(["smooth", str(checkpoint), "--sigmas", "0,x", "--samples", "4"]) == 2
    assert "--sigmas takes comma-separated floats" in capsys.readouterr().err
    assert main(["smooth", str(checkpoint), "--sigmas", "0.1", "--samples", "1.5"]) == 2
    assert "--samples takes comma-separated ints" in capsys.readouterr().err
    assert (
        main(
            [
                "smooth",
                str(checkpoint),
                "--sigmas",
                "-1",
                "--samples",
                "4",
                "--n",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "sigma must be a finite number >= 0" in capsys.readouterr().err
    assert (
        main(
            [
                "smooth",
                str(checkpoint),
                "--sigmas",
                "0.1",
                "--samples",
                "4",
                "--n",
                "4",
                "--votes",
                "hard",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "unknown vote 'hard'" in capsys.readouterr().err

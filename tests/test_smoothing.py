"""Randomised smoothing: the voting rules, Cohen et al.'s predict/certify against exact cases,
determinism, the certification run and CLI, and the attacks on smoothed models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, norm
from torch import nn

import robustlab as rl
from robustlab import cli
from robustlab.attacks.smoothadv import soft_smoothed_loss
from robustlab.defenses import ABSTAIN, Smoothing, certify, predict
from robustlab.evaluation.certification import run_certification
from robustlab.noise import radius, sample


class Halfspace(nn.Module):
    """Two classes split by the hyperplane ``w.x = b``: class 0 where ``w.x > b``. Under
    Gaussian noise its smoothed classifier's radius is exactly the distance to the plane."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w.flatten(), b

    def forward(self, x):
        z = x.flatten(1) @ self.w - self.b
        return torch.stack([z, -z], 1)


class Scripted(nn.Module):
    """Ignores its input; returns the rows of ``table`` in order, one per input row."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table, self.at = table, 0

    def forward(self, x):
        out = self.table[self.at : self.at + len(x)]
        self.at += len(x)
        return out


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- voting rules ------------------------------------------------------------------------------
TABLE = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0], [0.0, 10.0, -1.0]])


@pytest.mark.parametrize(("vote", "winner"), [("prediction", 0), ("weighted", 0), ("soft", 1)])
def test_votes_by_hand(vote, winner):
    """Two draws narrowly for class 0, one strongly for class 1: the hard and the rank-weighted
    votes pick 0, the mean probability picks 1."""
    out = Smoothing(Scripted(TABLE), sigma=0.1, samples=3, vote=vote)(torch.zeros(1, 1, 2, 2))
    probs = F.softmax(TABLE, 1).mean(0)
    expected = {
        "prediction": torch.tensor([2, 1, 0]) / 3,
        "weighted": torch.tensor([1 + 1 + 0.5, 0.5 + 0.5 + 1, 0.25 + 0.25 + 0.25]) / 5.25,
        "soft": probs,
    }[vote]
    assert out.argmax(1).item() == winner
    floor = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(out[0].exp(), expected.clamp_min(floor), rtol=1e-5, atol=0)


def test_soft_on_logits_is_the_mean_logit():
    out = Smoothing(Scripted(TABLE), sigma=0.1, samples=3, vote="soft", soft_on="logits")(
        torch.zeros(1, 1, 2, 2)
    )
    torch.testing.assert_close(out[0], TABLE.mean(0))


def test_a_tied_vote_goes_to_the_higher_mean_probability():
    table = torch.tensor([[3.0, 0.0, 2.9], [0.0, 0.1, 5.0]])  # one vote each for 0 and 2
    out = Smoothing(Scripted(table), sigma=0.1, samples=2)(torch.zeros(1, 1, 2, 2))
    assert out.argmax(1).item() == 2
    assert out[0, 0] < out[0, 2] and out[0, 2] - out[0, 0] < 1e-6  # lifted by one ulp only


def test_sigma_zero_is_the_base_model(toy_model, toy_data):
    x = toy_data[0][:32]
    with torch.no_grad():
        base = toy_model(x)
        for vote in ("prediction", "soft", "weighted"):
            out = Smoothing(toy_model, sigma=0.0, samples=5, vote=vote)(x)
            assert torch.equal(out.argmax(1), base.argmax(1)), vote
        logits = Smoothing(toy_model, sigma=0.0, samples=5, vote="soft", soft_on="logits")(x)
        pred, rad = certify(toy_model, x[:4], sigma=0.0, n0=10, n=200)
    torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, base[:4].argmax(1)) and (rad == 0).all()


@pytest.mark.parametrize("vote", ["prediction", "soft", "weighted"])
def test_determinism_with_a_generator(vote, toy_model, toy_data):
    x = toy_data[0][:16]
    smooth = Smoothing(toy_model, sigma=1.5, samples=8, vote=vote, batch_size=20)
    with torch.no_grad():
        a, b, c = smooth(x, generator=gen(3)), smooth(x, generator=gen(3)), smooth(x, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    seeded = Smoothing(toy_model, sigma=1.5, samples=8, vote=vote, batch_size=20, generator=gen(3))
    with torch.no_grad():
        assert torch.equal(seeded(x), a)
    p1 = predict(toy_model, x[:4], sigma=0.5, n=50, generator=gen(1))
    p2 = predict(toy_model, x[:4], sigma=0.5, n=50, generator=gen(1))
    assert torch.equal(p1, p2)


def test_batching_does_not_change_the_votes(toy_model, toy_data):
    """Every (input, draw) pair is voted once, whatever the chunking."""
    x = toy_data[0][:7]
    counts = [
        rl.defenses.vote_counts(toy_model, x, 13, sigma=0.3, batch_size=b, generator=gen())
        for b in (1, 5, 1000)
    ]
    assert all(int(c.sum()) == 7 * 13 for c in counts)
    assert all((c.sum(1) == 13).all() for c in counts)


def test_smoothing_improves_accuracy_under_noise(toy_model, toy_data):
    """On inputs corrupted by strong noise, voting over 64 draws is more accurate than one."""
    x, y = toy_data[0][:200], toy_data[1][:200]
    x = (x + 0.6 * torch.randn(x.shape, generator=gen(9))).clamp(0, 1)
    with torch.no_grad():
        one = Smoothing(toy_model, sigma=0.5, samples=1)(x, gen(1)).argmax(1)
        many = Smoothing(toy_model, sigma=0.5, samples=64)(x, gen(1)).argmax(1)
    assert (many == y).float().mean() > (one == y).float().mean() + 0.05


# --- the surrogate gradient --------------------------------------------------------------------
def test_vote_backward_is_the_soft_smoothed_gradient(toy_model, toy_data):
    x = toy_data[0][:6]
    xg = x.clone().requires_grad_(True)
    out = Smoothing(toy_model, sigma=0.3, samples=4, batch_size=24)(xg, gen(2))
    v = torch.randn(out.shape, generator=gen(7))  # any cotangent: compare vector-Jacobian
    (g,) = torch.autograd.grad((out * v).sum(), xg)
    draws = sample(x.repeat_interleave(4, 0), "gaussian", 0.3, gen(2))
    xr = x.clone().requires_grad_(True)
    logits = toy_model(xr.repeat_interleave(4, 0) + draws)
    log_mean = F.softmax(logits, 1).view(6, 4, -1).mean(1).log()
    (g_ref,) = torch.autograd.grad((log_mean * v).sum(), xr)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert g.flatten(1).abs().sum(1).min() > 0
    masked = Smoothing(toy_model, sigma=0.3, samples=4, grad="none")(xg, gen(2))
    assert not masked.requires_grad


# --- Cohen et al.: exact cases -----------------------------------------------------------------
def test_certify_matches_the_exact_halfspace_radius():
    """Halfspace at distance d from x: p_A = Phi(d / sigma), the true radius is d. The count
    is checked against its own bound (SciPy's Clopper-Pearson = beta quantile), the radius
    against sigma Phi^-1(p_lower) and against d from below."""
    torch.manual_seed(0)
    w = torch.randn(1, 1, 4, 4)
    w = w / w.norm()
    x = torch.full((1, 1, 4, 4), 0.5)
    d, sigma, n, alpha = 0.3, 0.25, 20_000, 0.001
    model = Halfspace(w, float((x * w).sum()) - d)
    (cert,) = rl.defenses.certify_iter(
        model, x, sigma=sigma, n0=100, n=n, alpha=alpha, generator=gen(5)
    )
    p_a = norm.cdf(d / sigma)
    assert cert.prediction == 0
    assert abs(cert.count / n - p_a) < 4 * math.sqrt(p_a * (1 - p_a) / n)
    p_low = beta.ppf(alpha, cert.count, n - cert.count + 1)
    assert cert.p_lower == pytest.approx(p_low, rel=1e-9)
    assert cert.radius == pytest.approx(sigma * norm.ppf(p_low), rel=1e-9)
    assert 0.9 * d < cert.radius < d


def test_laplace_certifies_the_exact_l1_radius_in_one_dimension():
    """1-D threshold at distance d: p_A = 1 - exp(-d / b) / 2 and -b log(2 (1 - p_A)) = d."""
    x = torch.full((1, 1, 1, 1), 0.7)
    d, b = 0.2, 0.1
    model = Halfspace(torch.ones(1), 0.7 - d)
    p_a = 1 - 0.5 * math.exp(-d / b)
    assert radius(p_a, "laplace", b) == pytest.approx(d)
    (cert,) = rl.defenses.certify_iter(
        model, x, sigma=b, n=20_000, noise="laplace", generator=gen(6)
    )
    assert cert.norm == "l1" and cert.prediction == 0
    assert 0.85 * d < cert.radius < d


def test_a_split_vote_abstains():
    """On the plane itself the two classes are equally likely: predict and certify abstain."""
    x = torch.zeros(20, 1, 1, 1)
    model = Halfspace(torch.ones(1), 0.0)
    assert (predict(model, x, sigma=0.5, n=2000, generator=gen()) == ABSTAIN).float().mean() > 0.9
    pred, rad = certify(model, x[:5], sigma=0.5, n0=100, n=2000, generator=gen())
    assert (pred == ABSTAIN).all() and (rad == 0).all()


def test_predict_returns_the_majority_far_from_the_plane():
    x = torch.tensor([0.4, -0.4]).view(2, 1, 1, 1)
    pred = predict(
        Halfspace(torch.ones(1), 0.0), x, sigma=0.1, n=500, generator=gen(), bounds=(-1, 1)
    )
    assert pred.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": 0.1, "alpha": 1.5}, "alpha"),
        ({"sigma": 0.1, "noise": "uniform"}, "noise"),
        ({"sigma": 0.1, "n": 0}, "n"),
    ],
)
def test_certify_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        certify(Halfspace(torch.ones(1), 0.0), torch.zeros(1, 1, 1, 1), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vote": "mean"}, "vote"),
        ({"samples": 0}, "samples"),
        ({"soft_on": "x"}, "soft_on"),
        ({"sigma": float("nan")}, "sigma"),
    ],
)
def test_smoothing_rejects_bad_options(kwargs, match, toy_model):
    with pytest.raises(ValueError, match=match):
        rl.defenses.create("smoothing", toy_model, **kwargs)


# --- certification runs ------------------------------------------------------------------------
def test_certification_resumes_to_the_rows_of_one_run(toy_model, toy_data, tmp_path):
    x, y = toy_data[0][:6], toy_data[1][:6]
    kw = dict(sigma=0.25, n0=20, n=200, seed=3)
    full = run_certification(toy_model, x, y, out=tmp_path / "a", **kw)
    run_certification(toy_model, x[:4], y[:4], out=tmp_path / "b", **kw)  # "crashed" after 4
    resumed = run_certification(toy_model, x, y, out=tmp_path / "b", **kw)
    rows = [(tmp_path / d / "certify.jsonl").read_text().splitlines()[1:] for d in "ab"]
    strip = [
        [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rs] for rs in rows
    ]
    assert strip[0] == strip[1]
    assert full["certified_accuracy"] == resumed["certified_accuracy"]
    acc0 = full["certified_accuracy"][0]
    assert acc0["radius"] == 0 and acc0["accuracy"] == full["clean_accuracy"]
    radii = [json.loads(r)["radius"] * json.loads(r)["correct"] for r in rows[0]]
    assert full["average_certified_radius"] == pytest.approx(sum(radii) / 6)
    with pytest.raises(ValueError, match="another configuration"):
        run_certification(toy_model, x, y, out=tmp_path / "a", **(kw | {"sigma": 0.5}))


def test_cli_certify_streams_rows_and_resumes(fake_fmnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    model = rl.models.create("lenet")
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(model, ckpt, meta={"dataset": "fashion-mnist"})
    args = [
        "certify",
        str(ckpt),
        "--sigma",
        "0.25",
        "--n",
        "100",
        "--n0",
        "10",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "c"),
    ]
    assert cli.main(args + ["--n-points", "2"]) == 0
    assert cli.main(args + ["--n-points", "3", "--skip", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln[:1].isdigit() and "\t" in ln]
    assert [r.split("\t")[0] for r in rows] == ["0", "1", "2"]  # the 3rd run adds one row
    summary = json.loads((tmp_path / "c" / "certify.json").read_text())
    assert summary["n"] == 3 and summary["norm"] == "l2" and summary["config"]["n"] == 100


# --- attacks on smoothed models ----------------------------------------------------------------
def test_soft_smoothed_loss_by_hand(toy_model, toy_data):
    x, y = toy_data[0][:5], toy_data[1][:5]
    delta = 0.2 * torch.randn((3,) + x.shape, generator=gen())
    loss, _ = soft_smoothed_loss(toy_model, x, y, delta)
    probs = torch.stack([F.softmax(toy_model(x + d), 1) for d in delta]).mean(0)
    torch.testing.assert_close(loss, -probs.gather(1, y[:, None]).squeeze(1).log())


@pytest.mark.parametrize("name", ["epgd", "smoothadv"])
def test_attacks_break_a_smoothed_model_where_masked_gradients_do_not(name, toy_model, toy_data):
    """With the votes' gradient masked (grad="none"), PGD on the smoothed model cannot move;
    EPGD and SmoothAdv attack the base model under the noise and break it."""
    x, y = toy_data[0][:48], toy_data[1][:48]
    threat = rl.ThreatModel("linf", 0.3)
    masked = Smoothing(toy_model, sigma=0.1, samples=16, grad="none", generator=gen(1))
    with torch.no_grad():
        clean = (masked(x).argmax(1) == y).float().mean()
    with pytest.raises(RuntimeError, match="does not require grad"):
        rl.attacks.create("pgd", threat, steps=5)(masked, x, y)
    res = rl.attacks.create(name, threat, samples=4, steps=10)(masked, x, y)
    assert clean > 0.9 and res.robust_accuracy < clean - 0.4
    with torch.no_grad():  # success is the smoothed vote's own verdict
        assert res.success.float().mean() == pytest.approx(
            (masked(res.x_adv).argmax(1) != y).float().mean().item(), abs=0.1
        )


def test_cli_evaluates_inside_a_defense(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    args = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--attack",
        "pgd",
        "--steps",
        "1",
        "--n-points",
        "6",
        "--out",
        str(tmp_path / "e"),
        "--quiet",
        "--defense",
        "smoothing",
        "--defense-option",
        "sigma=0.2",
        "--defense-option",
        "samples=3",
    ]
    assert cli.main(args) == 0
    record = json.loads((tmp_path / "e" / "results.json").read_text())
    assert record["config"]["defense"] == {"name": "smoothing", "sigma": 0.2, "samples": 3}
    assert "randomised-output" in [f["name"] for f in record["flags"]]
    assert cli.main(args[:-1] + ["oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_denoise_then_certify_behind_the_denoiser(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    common = ["--sigma", "0.25", "--device", "cpu", "--quiet"]
    den = [
        "denoise",
        str(ckpt),
        "--epochs",
        "1",
        "--n-train",
        "64",
        "--depth",
        "3",
        "--width",
        "8",
        *common,
    ]
    assert cli.main(den + ["--out", str(tmp_path / "mse")]) == 0
    first = tmp_path / "mse" / "denoiser.safetensors"
    assert (
        cli.main(
            den + ["--objective", "stab", "--init", str(first), "--out", str(tmp_path / "stab")]
        )
        == 0
    )
    stab = tmp_path / "stab" / "denoiser.safetensors"
    assert stab.exists()
    assert (
        cli.main(
            [
                "certify",
                str(ckpt),
                "--n",
                "50",
                "--n0",
                "10",
                "--n-points",
                "2",
                "--denoiser",
                str(stab),
                "--out",
                str(tmp_path / "c"),
                *common,
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "c" / "certify.json").read_text())
    assert summary["config"]["denoiser"] == str(stab) and summary["n"] == 2
    assert (
        cli.main(
            [
                "denoise",
                str(ckpt),
                "--epochs",
                "1",
                "--objective",
                "stab",
                "--out",
                str(tmp_path / "mse"),
                *common,
            ]
        )
        == 2
    )  # settings changed
    assert "error" in capsys.readouterr().err


def test_weight_noise_is_drawn_afresh_for_every_copy_of_an_input():
    """PNI-W draws its weight noise once per forward: the copies of one input must go to
    different forwards, or all n 'draws' would be one (and certify's bound would be void)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rl.models.create("lenet", noise="pni-w", noise_options={"init": 2.0}).eval()
        x = torch.rand(2, 1, 28, 28, generator=gen())
        counts = rl.defenses.vote_counts(model, x, 200, sigma=0.0, batch_size=1000)
        calls = []
        hook = model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        rl.defenses.vote_counts(model, x, 7, sigma=0.0, batch_size=1000)
        hook.remove()
    assert (counts.sum(1) == 200).all()
    assert ((counts > 0).sum(1) > 1).all()  # with one weight draw per input: a single class
    assert calls == [2] * 7  # one forward per draw, holding each input once

"""l0 smoothing (Lee, Yuan, Chang, Jaakkola, NeurIPS 2019, arXiv:1906.04948): the
"uniform-l0" noise of :mod:`robustlab.noise` and the l0 radius of
:mod:`robustlab.defenses.l0_certificate`.

The thresholds ``rho_r^-1(1/2)`` are checked against the tables the paper's reference code
computed (github.com/guanghelee/Randomized_Smoothing, ``thresholds/mnist/0.8.txt``, K = 1,
d = 784; ``thresholds/imagenet/0.2.txt``, K = 255, d = 224 * 224 * 3; printed rounded up at
1e-20) and against a brute-force Neyman-Pearson computation over every noisy point of every
pair of inputs at l0 distance r on tiny dimensions.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

import robustlab as rl
from robustlab import cli
from robustlab.defenses import certify_iter
from robustlab.defenses.l0_certificate import l0_radius, l0_threshold
from robustlab.noise import L0_LEVELS, check_noise, check_quantised, radius, sample
from robustlab.training.objectives.gaussian_aug import GaussianAug

# rho_r^-1(1/2) for r = 0, 1, ... as the reference code printed them
MNIST_08 = [  # alpha = 0.8, K = 1
    "0.50000000000000000001",
    "0.87500000000000000001",
    "0.96875000000000000001",
    "0.99218750000000000001",
    "0.99275000000000000001",
    "0.99698750000000000001",
    "0.99900687500000000001",
    "0.99970371875000000001",
    "0.99991632968750000001",
    "0.99991875875000000001",
    "0.99996548168750000001",
    "0.99998822162187500001",
    "0.99999636420546875001",
    "0.99999894052336718751",
    "0.99999895943106875001",
    "0.99999955394032718751",
    "0.99999984569826579688",
    "0.99999995166789444922",
    "0.99999998571004881231",
    "0.99999998589341508922",
    "0.99999999392417376591",
]
IMAGENET_02 = [  # alpha = 0.2, K = 255
    "0.50000000000000000000",
    "0.69686274509803921569",
    "0.85373533256439830835",
    "0.97898829668830238747",
    "0.99493645881485561183",
    "0.99619020439204454170",
    "0.99744272681434420339",
    "0.99864514829441225005",
    "0.99976849778447424675",
    "0.99993970389648837618",
]


@pytest.mark.parametrize(
    ("alpha", "levels", "table"), [(0.8, 1, MNIST_08), (0.2, 255, IMAGENET_02)]
)
def test_thresholds_match_the_reference_tables(alpha, levels, table):
    for r, printed in enumerate(table):
        assert abs(Fraction(printed) - l0_threshold(r, alpha, levels)) <= Fraction(1, 10**20), r


def test_radius_reads_the_thresholds_as_the_paper_does():
    """R = the largest r with p_lower > rho_r^-1(1/2) (MNIST, alpha 0.8, K = 1, d = 784)."""
    for p, expected in [
        (0.5, 0),
        (0.6, 0),
        (0.875, 0),
        (0.8751, 1),
        (0.99, 2),
        (0.9928, 4),
        (0.99992, 9),
        (1.0, 784),
    ]:
        assert l0_radius(p, 0.8, 784, levels=1) == expected, p
    assert l0_radius(0.4, 0.8, 784, levels=1) == 0


# --- brute force on tiny dimensions ---------------------------------------------------------
def _law(x, alpha, levels):
    """Every noisy point z of x with its exact probability: each coordinate kept with
    probability alpha, else each of the other levels with (1 - alpha) / K."""
    a = Fraction(repr(alpha))
    b = (1 - a) / levels
    return {
        z: math.prod(a if zi == xi else b for zi, xi in zip(z, x, strict=True))
        for z in itertools.product(range(levels + 1), repeat=len(x))
    }


def _worst_case_threshold(p_law, q_law):
    """Neyman-Pearson over single points: fill the points of largest p/q first until q
    reaches 1/2 (the last one in part); the p collected then."""
    points = sorted(p_law, key=lambda z: p_law[z] / q_law[z], reverse=True)
    p = q = Fraction(0)
    for z in points:
        if q + q_law[z] >= Fraction(1, 2):
            return p + p_law[z] * (Fraction(1, 2) - q) / q_law[z]
        p, q = p + p_law[z], q + q_law[z]
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("d", "levels", "alpha"),
    [
        (2, 1, 0.8),
        (2, 2, 0.5),
        (2, 3, 0.1),
        (3, 1, 0.7),
        (3, 2, 0.9),
        (3, 3, 0.3),
        (4, 1, 0.6),
        (4, 2, 0.4),
    ],
)
def test_thresholds_match_brute_force_over_every_pair(d, levels, alpha):
    """Every x (the first few when there are many) and every x' at l0 distance r: the worst
    case over all noisy points equals l0_threshold(r); alpha 0.1 with K = 3 keeps less often
    than it moves to any one other level (the ratio order reverses)."""
    grid = list(itertools.product(range(levels + 1), repeat=d))
    laws = {x: _law(x, alpha, levels) for x in grid}
    for x in grid[:8]:
        for x2 in grid:
            r = sum(a != b for a, b in zip(x, x2, strict=True))
            assert _worst_case_threshold(laws[x], laws[x2]) == l0_threshold(r, alpha, levels)


@pytest.mark.parametrize(("d", "levels", "alpha"), [(2, 1, 0.8), (2, 2, 0.5), (3, 1, 0.7)])
def test_radius_is_sound_for_every_deterministic_classifier(d, levels, alpha):
    """Every set A of noisy points (a base classifier's top class) with P_x(A) above the
    threshold keeps Q_x'(A) > 1/2 for every x' within the radius, and the radius is tight
    for some A when A may be randomised (the threshold is the Neyman-Pearson infimum)."""
    grid = list(itertools.product(range(levels + 1), repeat=d))
    laws = {x: _law(x, alpha, levels) for x in grid}
    x = grid[0]
    for mask in range(1, 2 ** len(grid)):
        region = [z for i, z in enumerate(grid) if mask >> i & 1]
        p = sum(laws[x][z] for z in region)
        if p <= Fraction(1, 2):
            continue
        p_lower = float(p) if Fraction(float(p)) <= p else math.nextafter(float(p), 0.0)
        r = l0_radius(p_lower, alpha, d, levels)
        for x2 in grid:
            if sum(a != b for a, b in zip(x, x2, strict=True)) <= r:
                assert sum(laws[x2][z] for z in region) > Fraction(1, 2)


# --- the radius -----------------------------------------------------------------------------
def test_radius_is_monotone_and_capped_by_d():
    thresholds = [l0_threshold(r, 0.2, L0_LEVELS) for r in range(30)]
    assert all(a < b for a, b in itertools.pairwise(thresholds))
    ps = [0.5 + 0.5 * (1 - 10 ** (-k / 4)) for k in range(40)]
    radii = [l0_radius(p, 0.2, 784) for p in ps]
    assert radii == sorted(radii) and radii[-1] > radii[5] > 0
    for r in range(1, 10):  # just above the threshold of r: radius r; at it: r - 1
        t = thresholds[r]
        assert l0_radius(math.nextafter(float(t), 2.0), 0.2, 784) == r
        assert l0_radius(float(t), 0.2, 784) in (r - 1, r)  # float(t) may round up past t
    assert l0_radius(0.999999, 0.2, 3) == 3  # never more coordinates than the input has
    assert l0_radius(0.51, 0.5, 784, levels=1) == 784  # alpha = 1 / (K + 1): input forgotten


def test_radius_errors_name_the_problem():
    with pytest.raises(ValueError, match="keep probability"):
        l0_radius(0.9, 1.0, 10)
    with pytest.raises(ValueError, match="keep probability"):
        l0_radius(0.9, 0.0, 10)
    with pytest.raises(ValueError, match="p_lower"):
        l0_radius(1.5, 0.5, 10)
    with pytest.raises(ValueError, match="input dimension"):
        l0_radius(0.9, 0.5, 0)
    with pytest.raises(ValueError, match="l0_radius"):
        radius(0.9, "uniform-l0", 0.5)


# --- the noise ------------------------------------------------------------------------------
def _levels(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, L0_LEVELS + 1, (n, 1, 8, 8), generator=g).float() / L0_LEVELS


def test_noise_keeps_alpha_and_moves_to_the_other_levels_uniformly():
    x = _levels(800, 0)  # 51,200 coordinates
    alpha = 0.7
    z = x + sample(x, "uniform-l0", alpha, torch.Generator().manual_seed(1))
    kept = z == x  # bit-identical where kept
    n = x.numel()
    assert abs(kept.float().mean().item() - alpha) < 5 * math.sqrt(alpha * (1 - alpha) / n)
    level, new = (x * 255).round().long(), (z * 255).round().long()
    assert ((z * 255 - new).abs() < 1e-3).all() and new.min() >= 0 and new.max() <= 255
    shift = ((new - level) % 256)[~kept]  # 1..255: never the old level, every other alike
    assert shift.min() >= 1
    counts = torch.bincount(shift, minlength=256)[1:]
    assert chisquare(counts.numpy()).pvalue > 1e-4
    again = x + sample(x, "uniform-l0", alpha, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


def test_noise_is_off_for_unquantised_inputs_and_certify_refuses_them():
    x = torch.full((1, 1, 4, 4), 0.3)  # 76.5 levels: not on k / 255
    z = x + sample(x, "uniform-l0", 0.5, torch.Generator().manual_seed(0))
    moved = z != x
    assert moved.any() and ((z[moved] * 255 - (z[moved] * 255).round()).abs() < 1e-3).all()
    with pytest.raises(ValueError, match="quantise it first"):
        check_quantised(x)
    with pytest.raises(ValueError, match="quantise it first"):
        certify_iter(_KeepsFirst(), x, sigma=0.9, noise="uniform-l0", n0=5, n=10)
    with pytest.raises(ValueError, match="bounds"):
        certify_iter(
            _KeepsFirst(),
            _levels(1, 0),
            sigma=0.9,
            noise="uniform-l0",
            n0=5,
            n=10,
            bounds=(0.0, 2.0),
        )


@pytest.mark.parametrize("keep", [0.0, 1.0, 1.2, -0.1])
def test_keep_probability_outside_the_open_unit_interval_is_refused(keep):
    with pytest.raises(ValueError, match="keep probability alpha"):
        check_noise("uniform-l0", keep)


# --- certify, the smoothing defense, training, the CLI ---------------------------------------
class _KeepsFirst(nn.Module):
    """Class 0 when one of the first 30 coordinates is 0 (their clean value here), else class
    1: under the noise, P(class 0) = 1 - (1 - alpha)^30 exactly."""

    def forward(self, x):
        some_kept = (x.flatten(1)[:, :30] == 0).any(1)
        return F.one_hot((~some_kept).long(), 2).float()


def test_certify_end_to_end_on_a_toy_model():
    x = _levels(2, 3)
    x.view(2, -1)[:, :30] = 0.0
    g = torch.Generator().manual_seed(0)
    certs = list(
        certify_iter(
            _KeepsFirst(), x, sigma=0.2, noise="uniform-l0", n0=20, n=2000, alpha=0.001, generator=g
        )
    )
    p = 1 - 0.8**30
    for c in certs:
        assert c.prediction == 0 and c.norm == "l0"
        assert abs(c.count / 2000 - p) < 5 * math.sqrt(p * (1 - p) / 2000)
        assert c.radius == l0_radius(c.p_lower, 0.2, 64) >= 2


def test_smoothing_defense_and_gaussian_aug_draw_the_l0_noise():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(len(x), 2, requires_grad=True)

    x = _levels(3, 4)
    smooth = rl.defenses.create(
        "smoothing",
        Recorder(),
        sigma=0.8,
        noise="uniform-l0",
        samples=50,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        smooth.eval()(x)
    noisy = torch.cat(seen)
    assert noisy.shape == (150, 1, 8, 8)
    assert abs((noisy == x.repeat_interleave(50, 0)).float().mean().item() - 0.8) < 0.03
    seen.clear()
    objective = GaussianAug(sigma=0.8, noise="uniform-l0")
    loss = objective.loss(
        Recorder(), x, torch.zeros(3, dtype=torch.long), None, torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss) and 0.6 < (seen[0] == x).float().mean() < 0.95
    assert ((seen[0] * 255 - (seen[0] * 255).round()).abs() < 1e-3).all()


def test_cli_certifies_l0(fake_fmnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    args = [
        "certify",
        str(ckpt),
        "--noise",
        "uniform-l0",
        "--n",
        "50",
        "--n0",
        "10",
        "--n-points",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli.main([*args, "--keep", "0.9", "--out", str(tmp_path / "c")]) == 0
    summary = json.loads((tmp_path / "c" / "certify.json").read_text())
    assert summary["norm"] == "l0" and summary["config"]["noise"] == "uniform-l0"
    assert summary["config"]["sigma"] == 0.9 and summary["n"] == 2
    assert cli.main([*args, "--keep", "1.5", "--out", str(tmp_path / "d")]) == 2
    assert "keep probability alpha" in capsys.readouterr().err


def test_the_noisy_input_has_gradient_one_where_kept_and_zero_where_replaced():
    x = _levels(2, 5).requires_grad_(True)
    noisy = x + sample(x, "uniform-l0", 0.5, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(noisy.sum(), x)
    assert torch.equal(grad, (noisy == x).float())

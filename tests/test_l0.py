"""The l0 threat model (changed pixels) against brute force and hand counts, and the sparse
attacks that use it (Sparse-RS, PGD_0) on a linear model with a known one-pixel answer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab import ThreatModel, attacks
from robustlab.attacks.sparse_rs import alpha_schedule
from robustlab.evaluation.suites import SUITES
from robustlab.threat import CONTINUOUS_NORMS, as_pixels

L0_ATTACKS = ["pgd-l0", "sparse-rs"]


def changed_pixels(x_adv: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """The oracle count: pixels (H x W positions) with any channel different, per sample."""
    a, b = x_adv.numpy(), x.numpy()
    return (a != b).any(axis=1).reshape(len(a), -1).sum(axis=1)


# --- distance, budget, containment -----------------------------------------------------------
def test_distance_counts_pixels_over_channels_by_hand():
    x = torch.zeros(2, 3, 2, 2)
    v = x.clone()
    v[0, 0, 0, 0] = 0.5  # one channel of pixel (0, 0): 1 pixel
    v[0, :, 1, 1] = 0.2  # all channels of pixel (1, 1): 1 more pixel
    v[1, 1, 0, 1], v[1, 2, 0, 1] = 1e-7, -1e-7  # two channels of one pixel, tiny: 1 pixel
    t = ThreatModel("l0", 1)
    assert t.distance(v, x).tolist() == [2.0, 1.0]
    assert t.distance(x, x).tolist() == [0.0, 0.0]
    # (N, D) inputs: each value is a pixel
    assert ThreatModel("l0", 1).distance(torch.tensor([[0.0, 1, 1]]), torch.zeros(1, 3)) == 2


def test_contains_is_an_exact_count():
    x = torch.full((1, 1, 3, 3), 0.5)
    v = x.clone()
    v.view(-1)[:3] += torch.tensor([0.1, 1e-6, 1e-7])  # 3 changed pixels, two of them tiny
    assert ThreatModel("l0", 3).contains(v, x).tolist() == [True]
    assert ThreatModel("l0", 2).contains(v, x).tolist() == [False]
    with pytest.raises(RuntimeError, match="outside the l0 ball"):
        ThreatModel("l0", 2).check(v, x)
    out_of_box = x.clone()
    out_of_box.view(-1)[0] = 1.5
    assert ThreatModel("l0", 3).contains(out_of_box, x).tolist() == [False]


@pytest.mark.parametrize(
    ("eps", "match"),
    [
        (0, r"integer >= 1, got 0"),
        (2.5, r"integer >= 1, got 2\.5"),
        (-1, "integer >= 1"),
        ("1/2", "integer >= 1"),
        (float("inf"), "integer >= 1"),
        (float("nan"), "integer >= 1"),
    ],
)
def test_l0_eps_must_be_a_pixel_count(eps, match):
    with pytest.raises(ValueError, match=match):
        ThreatModel("l0", eps)


def test_l0_eps_accepts_integral_values_and_keeps_an_int():
    for eps in (3, 3.0, "3"):
        t = ThreatModel("l0", eps)
        assert t.eps == 3 and isinstance(t.eps, int)
    assert ThreatModel.from_dict(ThreatModel("l0", 7).to_dict()) == ThreatModel("l0", 7)


# --- projection --------------------------------------------------------------------------------
def brute_force_projection(v: torch.Tensor, x: torch.Tensor, k: int, lo: float, hi: float):
    """Over every set of k pixels: the nearest point to v that changes only those (each kept
    pixel clipped to the box), and the smallest squared distance (one sample, (C, P))."""
    best, best_d = None, float("inf")
    for keep in itertools.combinations(range(x.shape[1]), k):
        cand = x.clone()
        cand[:, list(keep)] = v[:, list(keep)].clamp(lo, hi)
        d = float((cand - v).square().sum())
        if d < best_d - 1e-12:
            best, best_d = cand, d
    return best, best_d


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("spread", [0.3, 2.0])  # inside the box mostly / often outside it
def test_projection_matches_brute_force(k, spread):
    g = torch.Generator().manual_seed(10 * k + int(spread))
    lo, hi = -0.5, 1.0
    x = lo + (hi - lo) * torch.rand(8, 2, 2, 3, generator=g, dtype=torch.float64)
    v = x + spread * torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = ThreatModel("l0", k, bounds=(lo, hi))
    p = t.project(v, x)
    assert t.contains(p, x).all() and (changed_pixels(p, x) <= k).all()
    for i in range(len(x)):
        want, want_d = brute_force_projection(
            as_pixels(v[i : i + 1])[0], as_pixels(x[i : i + 1])[0], k, lo, hi
        )
        got_d = float((p[i] - v[i]).square().sum())
        assert got_d == pytest.approx(want_d, rel=1e-12, abs=1e-12)
        assert torch.allclose(as_pixels(p[i : i + 1])[0], want)  # gains have no ties here


def test_projection_inside_the_box_keeps_the_largest_changes():
    x = torch.zeros(1, 2, 1, 4)
    v = x.clone()
    v[0, :, 0] = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.0, 0.0, 0.3, 0.0]])  # sq: .01 .25 .18 .04
    p = ThreatModel("l0", 2).project(v, x)
    assert torch.equal(p[0, :, 0, [1, 2]], v[0, :, 0, [1, 2]])
    assert torch.equal(p[0, :, 0, [0, 3]], x[0, :, 0, [0, 3]])  # reset exactly to x


def test_projection_breaks_ties_by_lower_index():
    x = torch.zeros(2, 1, 2, 3)
    v = x + 0.5
    p = ThreatModel("l0", 2).project(v, x)
    want = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]] * 2)
    assert torch.equal(p.flatten(1), want)
    assert torch.equal(ThreatModel("l0", 2).project(v, x), p)  # deterministic


def test_projection_with_budget_above_the_pixel_count_is_the_box_clip():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 2, 2, generator=g)
    v = x + 2 * torch.randn(x.shape, generator=g)
    assert torch.equal(ThreatModel("l0", 10).project(v, x), v.clamp(0, 1))


# --- random start and step ----------------------------------------------------------------
def test_random_init_changes_eps_pixels_in_the_box_deterministically():
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = ThreatModel("l0", 5, bounds=(0.0, 1.0))
    a = t.random_init(x, torch.Generator().manual_seed(1))
    b = t.random_init(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (changed_pixels(a, x) == 5).all()  # uniform values differ from x almost surely
    assert t.contains(a, x).all()
    c = t.random_init(x, torch.Generator().manual_seed(2))
    assert not torch.equal((a != x).any(1), (c != x).any(1))  # the sets are random
    assert (changed_pixels(ThreatModel("l0", 99).random_init(x), x) == 16).all()


def test_steepest_step_is_the_l1_normalised_gradient():
    g = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    s = ThreatModel("l0", 3).steepest_step(g, 7.0)
    assert torch.allclose(s.flatten(1).abs().sum(1), torch.full((3,), 7.0))
    assert torch.allclose(s * g.flatten(1).abs().sum(1)[:, None, None, None], 7.0 * g)
    assert torch.equal(
        ThreatModel("l0", 3).steepest_step(torch.zeros_like(g), 7.0), torch.zeros_like(g)
    )


def test_box_diameter():
    assert ThreatModel("l0", 1).box_diameter((3, 4, 5)) == 20
    assert ThreatModel("l0", 1).box_diameter((7,)) == 7
    assert ThreatModel("l2", 1, bounds=(0, 2)).box_diameter((1, 2, 2)) == 4
    assert ThreatModel("l1", 1).box_diameter((1, 2, 2)) == 4
    assert ThreatModel("linf", 1).box_diameter((1, 2, 2)) == 1


# --- which attacks take l0 -----------------------------------------------------------------
def test_only_attacks_declaring_l0_accept_it():
    assert attacks.Attack.norms == CONTINUOUS_NORMS == ("linf", "l2", "l1")
    l0 = ThreatModel("l0", 3)
    for name in attacks.names():
        cls = attacks.ATTACKS.get(name)
        if "l0" in cls.norms:
            continue
        with pytest.raises(ValueError, match=r"supports the norms .*not 'l0'"):
            cls(l0)
    assert sorted(n for n in attacks.names() if "l0" in attacks.ATTACKS.get(n).norms) == sorted(
        [*L0_ATTACKS, "cw-l0", "jsma"]
    )  # and the minimum-norm l0 attacks
    for name in L0_ATTACKS:
        with pytest.raises(ValueError, match=r"supports the norms l0, not 'linf'"):
            attacks.create(name, ThreatModel("linf", 0.1))


def test_suites_with_an_l0_list_run_only_l0_attacks():
    assert [a for a, _ in SUITES.get("standard").for_norm("l0")] == ["pgd-l0", "sparse-rs"]
    for name in SUITES.names():
        suite = SUITES.get(name)
        for attack, options in suite.norms.get("l0", []):
            attacks.create(attack, ThreatModel("l0", 3), **options)  # builds: declares l0


# --- the attacks on a linear model with a known answer ----------------------------------------
HOT = 9  # the one pixel that flips the class


def one_pixel_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Logits (0, z), z = w.x + b on (N, 2, 4, 4) inputs: w = 10 on both channels of pixel
    HOT, +-0.05 elsewhere, b = -7.5. On x in [0.1, 0.3]: z < -1, class 0; setting pixel HOT
    to any corner but (0, 0) gives z > 1; changing any other pixel moves z by at most 0.1."""
    g = torch.Generator().manual_seed(0)
    w = 0.05 * (torch.randint(0, 2, (2, 16), generator=g) * 2 - 1).float()
    w[:, HOT] = 10.0
    lin = nn.Linear(32, 1)
    with torch.no_grad():
        lin.weight.copy_(w.flatten()[None])
        lin.bias.fill_(-7.5)

    class OnePixel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.lin(x.flatten(1))
            return torch.cat([torch.zeros_like(z), z], dim=1)

    x = 0.1 + 0.2 * torch.rand(6, 2, 4, 4, generator=g)
    return OnePixel().eval(), x, torch.zeros(6, dtype=torch.long)


def test_one_pixel_model_has_the_known_answer():
    """The oracle: of all 1-pixel changes to a corner, exactly those at HOT flip the class."""
    model, x, y = one_pixel_model()
    assert (model(x).argmax(1) == y).all()
    for pixel, colour in itertools.product(range(16), itertools.product((0.0, 1.0), repeat=2)):
        xa = x.clone().flatten(2)
        xa[:, :, pixel] = torch.tensor(colour)
        flips = model(xa.view_as(x)).argmax(1) != y
        assert flips.all().item() == (pixel == HOT and colour != (0.0, 0.0))
        assert flips.any().item() == flips.all().item()


@pytest.mark.parametrize(
    ("name", "options"),
    [("sparse-rs", {"n_queries": 300}), ("pgd-l0", {"steps": 10, "restarts": 1})],
)
def test_attacks_find_the_one_pixel_example(name, options):
    model, x, y = one_pixel_model()
    res = attacks.create(name, ThreatModel("l0", 1), **options)(
        model, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert res.success.all()
    assert (changed_pixels(res.x_adv, x) == 1).all()
    changed = (res.x_adv != x).any(1).flatten(1)
    assert changed[:, HOT].all()


@pytest.mark.parametrize("name", L0_ATTACKS)
@pytest.mark.parametrize("eps", [1, 3])
def test_never_more_than_eps_changed_pixels(name, eps, toy_model, toy_data):
    x, y = toy_data[0][:32], toy_data[1][:32]
    options = {"n_queries": 100} if name == "sparse-rs" else {"steps": 5, "restarts": 2}
    res = attacks.create(name, ThreatModel("l0", eps), **options)(toy_model, x, y)
    assert (changed_pixels(res.x_adv, x) <= eps).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


# --- Sparse-RS's schedule, queries, small images ---------------------------------------------
def test_alpha_schedule_is_the_reference():
    """rs_attacks.py's p_selection for L0, iterations rescaled to 10,000."""
    got = [
        alpha_schedule(0.3, it, 10000)
        for it in (
            0,
            1,
            50,
            51,
            200,
            201,
            500,
            501,
            1000,
            1001,
            2000,
            2001,
            4000,
            4001,
            6000,
            6001,
            8000,
            8001,
            9999,
        )
    ]
    div = [1, 2, 2, 4, 4, 5, 5, 6, 6, 8, 8, 10, 10, 12, 12, 15, 15, 20, 20]
    assert got == pytest.approx([0.3 / d for d in div])
    assert alpha_schedule(0.3, 5, 100) == pytest.approx(0.3 / 5)  # 5 of 100: 500 of 10,000


def test_sparse_rs_counts_queries():
    model, x, y = one_pixel_model()
    y = y.clone()
    y[0] = 1  # misclassified on the clean input: one query, returned unchanged
    res = attacks.create("sparse-rs", ThreatModel("l0", 1), n_queries=50)(model, x, y)
    assert res.queries[0] == 1 and torch.equal(res.x_adv[0], x[0])
    assert (res.queries[1:] >= 2).all() and (res.queries <= 1 + 50).all()
    broken_late = res.queries[1:].max()
    assert broken_late > 2  # a random start rarely sits on HOT: the search did the work


def test_sparse_rs_with_a_budget_of_every_pixel_recolours():
    """k >= the number of pixels: no pixel outside the set, the search recolours its own."""
    model, x, y = one_pixel_model()
    res = attacks.create("sparse-rs", ThreatModel("l0", 40), n_queries=20)(model, x, y)
    assert ThreatModel("l0", 40).contains(res.x_adv, x).all() and res.success.all()


def test_evaluate_and_the_cli_run_an_l0_threat(
    toy_model, toy_data, fake_fmnist, tmp_path, monkeypatch
):
    """The evaluation (and its box check, in pixels) and ``--norm l0`` end to end."""
    import json

    from robustlab.cli import main
    from robustlab.evaluation.checks import eps_covers_box

    x, y = toy_data[0][:8], toy_data[1][:8]
    res = rl.evaluate(toy_model, x, y, ThreatModel("l0", 3), suite="quick")
    assert 0 <= res.robust_accuracy <= res.clean_accuracy
    assert [a["attack"] for a in res.per_attack] == ["1:pgd-l0"]
    assert eps_covers_box(ThreatModel("l0", 255), (1, 16, 16)) is None
    assert eps_covers_box(ThreatModel("l0", 256), (1, 16, 16))["name"] == "eps-covers-box"
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    ckpt = tmp_path / "m.safetensors"
    rl.models.save(rl.models.create("lenet"), ckpt, meta={"dataset": "fashion-mnist"})
    out = tmp_path / "e"
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--norm",
                "l0",
                "--eps",
                "5",
                "--suite",
                "quick",
                "--n-points",
                "4",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rec = json.loads((out / "results.json").read_text())
    assert rec["threat"]["norm"] == "l0" and rec["threat"]["eps"] == 5
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--norm",
                "l0",
                "--eps",
                "784",
                "--quiet",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 2
    )  # covers every pixel: refused

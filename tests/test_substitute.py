"""The substitute-model attack (Papernot et al. 2017) against its definition: Jacobian-based
augmentation on a linear substitute, a linear oracle learnt and fooled where its exact margin
allows, no gradient of the attacked model, queries counted exactly, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import ThreatModel, attacks
from robustlab.attacks.substitute import Substitute, jacobian_augmentation

D = 16  # inputs (N, 1, 4, 4)
LINF = ThreatModel("linf", 0.1)


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Flatten, then the affine map ``weight @ x + bias``; no draw from the global RNG."""
    lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin)


def pattern(seed: int = 0) -> torch.Tensor:
    """A +-1 vector of length D with both signs."""
    return torch.randint(0, 2, (D,), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1


def oracle(v: torch.Tensor) -> nn.Module:
    """Two classes, logits (f/2, -f/2) with f = v . (x - 0.5): class 0 where f > 0; its exact
    linf distance to the boundary is |f| / ||v||_1."""
    return linear(torch.stack([v / 2, -v / 2]), torch.stack([-v.sum() / 4, v.sum() / 4]))


def points(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 4, 4), uniform in [0.2, 0.8]."""
    u = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.6 * u


def untrained(classes: int = 2, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    return linear(torch.randn(classes, D, generator=g) * 0.1, torch.zeros(classes))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_jacobian_augmentation_is_the_papers_step():
    # two classes: d softmax_o / dx = p_o (1 - p_o) (w_o - w_other), so the step's sign is
    # sign(w_o - w_other); points near the bounds are clipped to them
    w = torch.stack([pattern(3), torch.zeros(D)]) * 0.5
    sub = linear(w, torch.zeros(2))
    x = torch.cat([points(6, 4), torch.full((1, 1, 4, 4), 0.98), torch.full((1, 1, 4, 4), 0.01)])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    d = (w[labels] - w[1 - labels]).sign().view(-1, 1, 4, 4)
    for step in (0.1, -0.1):
        new = jacobian_augmentation(sub, x, labels, step, (0.0, 1.0), batch_size=3)
        assert torch.equal(new, (x + step * d).clamp(0, 1))
    assert all(p.grad is None for p in sub.parameters())


def test_rounds_grow_the_set_with_the_flipping_step():
    # lr so small that the substitute keeps its initial weights: the final set is known exactly
    v, w = pattern(), pattern(5)
    sub = linear(torch.stack([w, -w]) * 0.3, torch.zeros(2))
    x = points(8, 6)
    atk = Substitute(LINF, substitute=sub, rounds=3, tau=1, lmbda=0.05, lr=1e-12)
    trained = atk.fit_substitute(oracle(v), x, gen())
    s, labels = trained.points, trained.labels
    assert len(s) == 8 * 4 and torch.equal(s[:8], x)
    with torch.no_grad():
        assert torch.equal(labels, oracle(v)(s).argmax(1))  # every point labelled by the oracle
    d = (2 * w * (1 - 2 * labels[:, None].float())).sign().view(-1, 1, 4, 4)  # w_o - w_other
    assert torch.equal(s[8:16], (x - 0.05 * d[:8]).clamp(0, 1))  # round 0: towards the boundary
    assert torch.equal(s[16:], (s[:16] + 0.05 * d[:16]).clamp(0, 1))  # round 1: flipped


def test_learns_a_linear_oracle_and_fools_it_where_the_margin_allows():
    v = pattern()
    model, x = oracle(v), points(64, 7)
    with torch.no_grad():
        y = model(x).argmax(1)
        margin = (v * (x.flatten(1) - 0.5)).sum(1).abs() / v.abs().sum()
    atk = Substitute(LINF, substitute=untrained(), rounds=5, epochs=10, lr=0.01)
    held_out = points(500, 8)
    with torch.no_grad():
        agree = (
            (
                atk.fit_substitute(model, x, gen()).model(held_out).argmax(1)
                == model(held_out).argmax(1)
            )
            .float()
            .mean()
        )
    assert agree > 0.85
    res = atk(model, x, y, generator=gen())
    reachable = margin < 0.7 * LINF.eps
    assert reachable.float().mean() > 0.7  # "most points": the eps allows it for most
    assert res.success[reachable].float().mean() > 0.9
    assert not res.success[margin > LINF.eps].any()  # never beyond the exact margin


class NoBackward(torch.autograd.Function):
    """Identity whose backward raises."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("the substitute attack asked for a gradient of the attacked model")


class Trapped(nn.Module):
    """The attacked model behind a backward that raises, its logits detached as well."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(NoBackward.apply(x)).detach()


def test_takes_no_gradient_of_the_attacked_model():
    v = pattern()
    model, x = oracle(v), points(32, 9)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert not attacks.ATTACKS.get("substitute").uses_gradients
    atk = attacks.create(
        "substitute", ThreatModel("linf", 0.2), substitute=untrained(), rounds=3, lr=0.05
    )
    res = atk(Trapped(model), x, y, generator=gen())
    assert res.success.float().mean() > 0.8
    assert all(p.grad is None for p in model.parameters())


class Counting(nn.Module):
    """Counts the rows the attacked model is asked to label."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += len(x)
        return self.inner(x)


@pytest.mark.parametrize(
    ("opts", "labels"),
    [
        ({"rounds": 3}, 5 * 4),  # S_0 = the 5 attacked points, doubled twice
        ({"rounds": 3, "seed_data": points(7, 10), "max_new": 10}, 7 + 7 + 10),
        ({"rounds": 1}, 5),
    ],
    ids=["doubling", "seed-data-capped", "one-round"],
)
def test_queries_are_counted_exactly(opts, labels):
    model, x = Counting(oracle(pattern())), points(5, 11)
    y = torch.zeros(5, dtype=torch.long)
    res = Substitute(LINF, batch_size=4, **opts)(model, x, y, generator=gen())
    assert model.rows == 2 + labels + 5  # the base's probe, the labels, the replay
    assert int(res.queries.sum()) == labels + 5
    assert int(res.queries.max() - res.queries.min()) <= 1 and (res.queries >= 2).all()


def test_deterministic_reusable_and_leaves_the_caller_alone():
    model, x = oracle(pattern()), points(16, 12)
    y = torch.zeros(16, dtype=torch.long)
    sub = untrained()
    before = {k: t.clone() for k, t in sub.state_dict().items()}
    atk = Substitute(LINF, substitute=sub, rounds=3, lr=0.05)
    rng = torch.get_rng_state()
    first = atk(model, x, y, generator=gen(3))
    again = atk(model, x, y, generator=gen(3))
    assert torch.equal(first.x_adv, again.x_adv) and torch.equal(first.queries, again.queries)
    assert all(torch.equal(before[k], t) for k, t in sub.state_dict().items())
    default = Substitute(LINF, rounds=2)  # the default MLP is drawn from the generator too
    assert torch.equal(
        default(model, x, y, generator=gen(4)).x_adv, default(model, x, y, generator=gen(4)).x_adv
    )
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG never drawn from


@pytest.mark.parametrize(
    ("opts", "exc", "match"),
    [
        ({"substitute": "mlp"}, TypeError, "substitute must be an untrained torch.nn.Module"),
        ({"attack": "substitute"}, ValueError, "white-box attack"),
        ({"lmbda": 0}, ValueError, "lmbda"),
        ({"optimizer": "lbfgs"}, ValueError, "valid optimizers are: adam, sgd"),
        ({"rounds": 0}, ValueError, "rounds"),
        ({"seed_data": torch.full((3, 1, 4, 4), 2.0)}, ValueError, "seed_data: x has values"),
        ({"seed_data": [0.5]}, TypeError, "seed_data: x must be a torch.Tensor"),
    ],
)
def test_bad_options(opts, exc, match):
    with pytest.raises(exc, match=match):
        Substitute(LINF, **opts)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (
            {"substitute": untrained(classes=3)},
            "substitute returns 3 logits.*give the substitute 2",
        ),
        ({"seed_data": points(3, 13)[:, :, :2]}, "seed_data of shape .* does not match x"),
        ({"substitute": nn.Flatten()}, "no parameters to train"),
    ],
)
def test_substitute_that_does_not_fit_the_model(opts, match):
    x = points(4, 14)
    with pytest.raises(ValueError, match=match):
        Substitute(LINF, rounds=1, **opts)(oracle(pattern()), x, torch.zeros(4, dtype=torch.long))

"""Bound propagation (robustlab.models.bounds): IBP, CROWN and CROWN-IBP are sound on random
small networks of every supported layer type (sampled points and linf corners inside the ball
∩ box), equal the closed-form exact bound on a single linear layer, and refuse what they do
not support, naming the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.defenses.verify import verify
from robustlab.models import bounds
from robustlab.models.layers import Normalize

THREATS = [rl.ThreatModel("linf", 0.04), rl.ThreatModel("l2", 0.4)]


def _randomise_bn(net: nn.Module, g: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)


def _networks() -> dict[str, nn.Module]:
    """Random (untrained) networks covering every supported layer, float64, eval mode."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    nets = {
        "conv-bn-avgpool": nn.Sequential(
            Normalize(0.4, 0.3),
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 12),
            nn.ReLU(),
            nn.Linear(12, 5),
        ),
        "mlp-bn-dropout": nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        ),
        "deep-conv": nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()),
            nn.Conv2d(3, 2, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8, 5),
        ),
    }
    for net in nets.values():
        _randomise_bn(net, g)
        net.double().eval()
    return nets


def _inside(x: torch.Tensor, threat: rl.ThreatModel, g: torch.Generator) -> list[torch.Tensor]:
    """Random points of the ball ∩ box (linf: also random corners of the ball, clipped)."""
    points = []
    for k in range(60):
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        if threat.norm == "linf":
            d = threat.eps * (d.sign() if k % 2 else d.clamp(-1, 1))
        else:
            scale = threat.eps * torch.rand(len(x), 1, 1, 1, generator=g, dtype=x.dtype)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * scale
        z = (x + d).clamp(*threat.bounds)
        assert threat.contains(z, x).all()
        points.append(z)
    return points


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
@pytest.mark.parametrize("name", list(_networks()))
def test_bounds_are_sound_on_random_networks(name, threat):
    net = _networks()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    chain = bounds.network(net, x)
    spec = bounds.margin_spec(y, 5, x.dtype)
    found = {
        m: (bounds.logit_bounds(chain, x, threat, m), bounds.margin_bounds(chain, x, y, threat, m))
        for m in bounds.METHODS
    }
    with torch.no_grad():
        for z in [x, *_inside(x, threat, g)]:
            logits = net(z)
            margins = torch.einsum("nsk,nk->ns", spec, logits)
            for method, ((lo, hi), margin_lo) in found.items():
                assert (logits >= lo - 1e-9).all() and (logits <= hi + 1e-9).all(), method
                assert (margins >= margin_lo - 1e-9).all(), method


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.norm)
def test_crown_is_at_least_as_tight_as_ibp(threat):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    tighter = 0
    for net in _networks().values():
        ibp = verify(net, x, y, threat, "ibp").margins
        for method in ("crown", "crown-ibp"):
            assert (verify(net, x, y, threat, method).margins >= ibp - 1e-6).all(), method
        raw = bounds.margin_bounds(bounds.network(net, x), x, y, threat, "crown")
        tighter += int((raw > ibp + 1e-6).sum())
    assert tighter > 0.5 * 3 * 6 * 4  # CROWN itself, not only the max with IBP, is tighter


@pytest.mark.parametrize("norm, eps, dual", [("linf", 0.05, 1), ("l2", 0.2, 2)])
def test_a_linear_layer_gets_the_exact_bound_from_every_method(norm, eps, dual):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).double().eval()
    x = 0.3 + 0.4 * torch.rand(5, 1, 4, 4, dtype=torch.float64)  # ball inside [0, 1]
    y = torch.tensor([0, 1, 2, 3, 1])
    w, b = net[1].weight, net[1].bias
    exact = torch.stack(
        [
            torch.stack(
                [
                    (w[yi] - w[j]) @ xi.flatten() + b[yi] - b[j] - eps * (w[yi] - w[j]).norm(p=dual)
                    for j in range(4)
                    if j != yi
                ]
            )
            for xi, yi in zip(x, y.tolist(), strict=True)
        ]
    )
    chain = bounds.network(net, x)
    for method in bounds.METHODS:
        found = bounds.margin_bounds(chain, x, y, rl.ThreatModel(norm, eps), method)
        assert torch.allclose(found, exact.detach(), atol=1e-9), method


def test_the_box_makes_the_linf_bound_exact_at_the_edge():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 3)).double().eval()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64).round()  # on the box's corners
    y = torch.tensor([0, 1, 2])
    threat = rl.ThreatModel("linf", 0.3)
    found = bounds.margin_bounds(bounds.network(net, x), x, y, threat, "crown")
    w, b = net[1].weight.detach(), net[1].bias.detach()
    lo, hi = (x - 0.3).clamp(0, 1).flatten(1), (x + 0.3).clamp(0, 1).flatten(1)
    for i, yi in enumerate(y.tolist()):
        others = [j for j in range(3) if j != yi]
        a = w[yi] - w[others]  # (2, 9): the minimum over the box, coordinate by coordinate
        want = (a.clamp(min=0) * lo[i]).sum(1) + (a.clamp(max=0) * hi[i]).sum(1) + b[yi] - b[others]
        assert torch.allclose(found[i], want, atol=1e-9)
        closed_form = a @ x[i].flatten() + b[yi] - b[others] - 0.3 * a.abs().sum(1)
        assert (found[i] > closed_form + 1e-3).all()  # the box cut the ball


def test_unsupported_layers_are_named():
    x = torch.rand(2, 1, 4, 4)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"layer 2 \(Tanh\) is not supported.*ReLU"):
        bounds.network(tanh, x)
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(16, 8), nn.GELU()))
    with pytest.raises(ValueError, match=r"layer 1\.1 \(GELU\)"):
        bounds.network(nested, x)
    pooled = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).eval()
    chain = bounds.network(pooled, x)  # IBP takes max pooling
    y = torch.tensor([0, 1])
    assert bounds.margin_bounds(chain, x, y, rl.ThreatModel("linf", 0.01), "ibp").shape == (2, 2)
    for method in ("crown", "crown-ibp"):
        with pytest.raises(ValueError, match=r"layer 2 \(MaxPool2d\).*method='ibp'"):
            bounds.margin_bounds(chain, x, y, rl.ThreatModel("linf", 0.01), method)
    with pytest.raises(ValueError, match="unknown norm for bound propagation"):
        bounds.margin_bounds(chain, x, y, rl.ThreatModel("l1", 0.01), "ibp")


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc2(x + torch.relu(self.fc1(x)))


class _Declared(_Residual):
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def bound_layers(self):
        return [("flat", nn.Flatten()), ("fc1", self.fc1), ("relu", nn.ReLU()), ("fc2", self.fc2)]


def test_models_read_as_chains_or_refused():
    x = torch.rand(3, 1, 4, 4)
    with pytest.raises(ValueError, match="not the chain of its modules.*bound_layers"):
        bounds.network(_Residual(), x)
    assert bounds.network(_Declared(), x).names == ["flat", "fc1", "relu", "fc2"]
    model = rl.models.create("smallcnn", num_classes=10).eval()  # children + a flatten
    x = torch.rand(2, 1, 28, 28)
    chain = bounds.network(model, x)
    assert "classifier.fc1:flatten" in chain.names and chain.shapes[-1] == (10,)
    lo, hi = bounds.logit_bounds(chain, x, rl.ThreatModel("linf", 0.0), "ibp")
    with torch.no_grad():  # eps 0: the bounds pin the logits
        assert torch.allclose(lo, model(x), atol=1e-4) and torch.allclose(hi, model(x), atol=1e-4)

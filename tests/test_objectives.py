"""The objective contract, checked on every registered training objective (see
``robustlab/training/objectives/base.py``), on a plain model and on one with BatchNorm."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import robustlab as rl
from helpers import make_quadrants
from robustlab.training.objectives import OBJECTIVES

THREAT = rl.ThreatModel("linf", 0.1)
# small inner loops so the whole contract runs in seconds; options an objective lacks are dropped
CHEAP = {"steps": 2, "search_steps": 3, "replays": 2}


def _model(arch: str, objective: str) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = {"head": "mmc"} if objective == "mmc" else {}
        classes = 5 if objective == "extra-class" else 4  # its extra output, last
        if objective in ("ibp", "crown-ibp"):  # bound propagation reads chains only
            arch = "ibp-small"  # (resnet20 has residual connections; lenet max pooling)
        return rl.models.create(arch, num_classes=classes, input_size=16, **head)


def _objective(name: str, arch: str):
    cls = OBJECTIVES.get(name)
    params = inspect.signature(cls).parameters
    opts = {k: v for k, v in CHEAP.items() if k in params}
    if "teacher" in params:  # distillation (student stage) and rst
        opts["teacher"] = _model(arch, "natural").eval()
    if "labeled" in params:
        opts["labeled"] = 8
    if "base_options" in params:
        opts["base_options"] = {"steps": 2}
    return rl.training.create_objective(name, **opts)


@pytest.fixture(scope="module")
def batch():
    x, y = make_quadrants(16, seed=3)
    return x, y


@pytest.mark.parametrize("arch", ["lenet", "resnet20"])
@pytest.mark.parametrize("name", rl.training.objectives())
def test_objective_contract(name, arch, batch):
    model = _model(arch, name)
    obj = _objective(name, arch)
    x0, y0 = batch
    x, y = obj.setup(model, x0.clone(), y0.clone())
    assert torch.equal(x, x0) and len(y) == len(y0)
    xc, yc = x.clone(), y.clone()
    gen = torch.Generator().manual_seed(1)
    model.train()
    modes = [m.training for m in model.modules()]
    loss = obj(model, x, y, threat=THREAT, generator=gen)
    # no parameter gradient leaks out of the inner maximisation, nothing touched the inputs
    assert all(p.grad is None for p in model.parameters()), name
    assert torch.equal(x, xc) and torch.equal(y, yc)
    assert [m.training for m in model.modules()] == modes  # every module's mode given back
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    loss.backward()
    obj.after_backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"{name}: no finite gradient for {missing}"
    # eval mode stays eval mode
    model.eval()
    obj(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(1))
    assert not any(m.training for m in model.modules())
    assert isinstance(obj.config(), dict) and obj.config()["name"] == name


@pytest.mark.parametrize("name", rl.training.objectives())
def test_objective_state_round_trip(name, batch):
    """A fresh objective loaded with another's state computes the same next loss."""
    model = _model("lenet", name).eval()  # deterministic forward: no dropout in lenet
    a = _objective(name, "lenet")
    x, y = a.setup(model, *batch)
    for _ in range(2):  # two steps, so carried state (free-at's delta) is non-trivial
        a(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(2)).backward()
        a.after_backward()
    model.zero_grad(set_to_none=True)
    b = _objective(name, "lenet")
    b.setup(model, *batch)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    la = a(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(3))
    lb = b(model, x, y, threat=THREAT, generator=torch.Generator().manual_seed(3))
    assert torch.equal(la, lb), name


def test_objectives_need_what_they_need(batch):
    x, y = batch
    with pytest.raises(ValueError, match="needs a threat model"):
        rl.training.create_objective("pgd-at")(_model("lenet", "pgd-at"), x, y)
    with pytest.raises(TypeError, match="its options are: steps"):
        rl.training.create_objective("pgd-at", stepz=3)
    with pytest.raises(ValueError, match="valid objectives are"):
        rl.training.create_objective("tradez")

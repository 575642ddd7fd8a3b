"""Shared fixtures: a synthetic data set with a clear signal and a tiny CNN trained on it.

Everything is generated here, offline and deterministic, in well under a second.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TinyCNN, make_quadrants, write_idx


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # tiny tensors: threading overhead dominates on 2 shared cores
    yield


@pytest.fixture(scope="session")
def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_quadrants(256, seed=1)


@pytest.fixture(scope="session")
def _trained(toy_data) -> nn.Module:
    torch_state = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.set_rng_state(torch.Generator().manual_seed(0).get_state())
        model = TinyCNN()
        xt, yt = make_quadrants(1024, seed=2)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(model(xt), yt).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    assert torch.equal(torch.get_rng_state(), torch_state)
    return model


@pytest.fixture
def toy_model(_trained) -> nn.Module:
    """A fresh copy of a tiny CNN with ~100% clean accuracy on ``toy_data`` (eval mode)."""
    return copy.deepcopy(_trained)


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    """A small Fashion-MNIST-format data set (train 512, test 128) with a learnable signal."""
    root = tmp_path_factory.mktemp("data") / "fashion-mnist"
    root.mkdir()
    for n, seed, prefix in ((512, 3, "train"), (128, 4, "t10k")):
        x, y = make_quadrants(n, seed=seed, size=28)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", (x[:, 0] * 255).round().numpy())
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y.numpy())
    return root.parent

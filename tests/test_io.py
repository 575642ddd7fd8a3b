"""Atomic writes keep the permissions a new file gets under the umask (issue: 0600 results)."""

import os
import stat

import pytest
import torch

import robustlab as rl
from robustlab._io import atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_umask_mode(tmp_path, umask_022):
    atomic_write(tmp_path / "a.json", "{}\n")
    assert _mode(tmp_path / "a.json") == 0o644


def test_atomic_write_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "b.txt", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "b.txt") == 0o600


def test_checkpoint_and_sidecar_readable_by_others(tmp_path, umask_022):
    model = rl.models.create("smallcnn", num_classes=10)
    rl.models.save(model, tmp_path / "m.safetensors")
    for name in ("m.safetensors", "m.json"):
        assert _mode(tmp_path / name) == 0o644, name
    loaded = rl.models.load(tmp_path / "m.safetensors").state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())

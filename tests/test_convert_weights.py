"""The one-time conversion of a ``.pt`` state dict into safetensors
(:func:`robustlab.models.convert_weights`): PyTorch's restricted loader only, the usual
nestings found, DataParallel prefixes stripped, a sidecar recording the source; and a
malicious pickle never executes, neither here nor given as weights to ``from_spec``."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robustlab import models


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("wrap", "key", "found"),
    [
        (lambda s: s, None, None),
        (lambda s: {"state_dict": s, "epoch": 3, "best_acc": 0.9}, None, "state_dict"),
        (lambda s: {"model": s, "optimizer": {"lr": 0.1}}, None, "model"),
        (lambda s: {"net": s}, None, "net"),
        (lambda s: {"model": {"config": 1}, "ema": s}, None, "ema"),
        (lambda s: {"model_state_dict": s, "epoch": 1}, None, "model_state_dict"),
        (lambda s: {"weights_averaged": s, "step": 10}, "weights_averaged", "weights_averaged"),
    ],
    ids=[
        "bare",
        "state_dict",
        "model",
        "net",
        "ema-after-non-tensor-model",
        "model_state_dict",
        "explicit-key",
    ],
)
def test_finds_the_state_dict(tmp_path, wrap, key, found):
    state = _state()
    src, dst = tmp_path / "in.pt", tmp_path / "out" / "w.safetensors"
    torch.save(wrap(state), src)
    record = models.convert_weights(src, dst, key=key)
    assert _equal(load_file(dst), state)
    assert record["key"] == found and record["prefixes_stripped"] == []
    assert record["tensors"] == len(state)
    assert record["source"] == str(src.resolve())
    assert record["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert record["sha256"] == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "out" / "w.safetensors.json").read_text()) == record


def test_strips_dataparallel_prefix_and_handles_shared_storage(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    state = {"module.a": w, "module.b": w, "module.c": w.t()}  # tied and non-contiguous
    src, dst = tmp_path / "in.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": state}, src)
    record = models.convert_weights(src, dst)
    assert record["prefixes_stripped"] == ["module."]
    out = load_file(dst)
    assert set(out) == {"a", "b", "c"} and torch.equal(out["c"], w.t())


@pytest.mark.parametrize(
    ("obj", "key", "match"),
    [
        (
            {"epoch": 3, "optimizer": {"lr": 0.1}},
            None,
            r"no state dict .* under any of \['state_dict', 'model', 'net', 'ema', "
            r"'model_state_dict'\]; its top-level keys are 'epoch' \(int\), 'optimizer' \(dict\)\. "
            r"Name the one holding the weights with --key KEY",
        ),
        (
            {"state_dict": {"w": torch.zeros(1)}},
            "weights",
            r"key 'weights' is not in .*: its top-level keys are 'state_dict' \(dict\)",
        ),
        (
            {"state_dict": {"w": torch.zeros(1), "step": 3}},
            "state_dict",
            r"is not a state dict of str -> Tensor: it holds entries that are not str -> Tensor: "
            r"'step' \(int\)",
        ),
        (torch.zeros(3), None, r"holds a Tensor, not a state dict"),
        ([torch.zeros(3)], None, r"holds a list, not a state dict"),
    ],
    ids=["no-state", "missing-key", "not-tensors", "a-tensor", "a-list"],
)
def test_bad_contents_are_refused(tmp_path, obj, key, match):
    src = tmp_path / "in.pt"
    torch.save(obj, src)
    with pytest.raises(ValueError, match=match):
        models.convert_weights(src, tmp_path / "w.safetensors", key=key)
    assert not (tmp_path / "w.safetensors").exists()


def test_bad_paths_are_refused(tmp_path):
    src = tmp_path / "in.pt"
    torch.save(_state(), src)
    with pytest.raises(FileNotFoundError, match="source weights .*missing.pt.* not found"):
        models.convert_weights(tmp_path / "missing.pt", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"must be a new file ending in \.safetensors"):
        models.convert_weights(src, tmp_path / "w.pt")
    models.convert_weights(src, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="already a safetensors file"):
        models.convert_weights(tmp_path / "w.safetensors", tmp_path / "again.safetensors")


class Payload:
    """Unpickling this object creates ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    """The payload as torch.save (zip and legacy) and raw pickle files, some named like
    safetensors."""
    obj = {"state_dict": _state(), "evil": Payload(marker)}
    files = []
    for name, zip_format in (("zip.pt", True), ("legacy.pth", False), ("zip.safetensors", True)):
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        files.append(tmp_path / name)
    for name in ("raw.pkl", "raw.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(obj))
        files.append(tmp_path / name)
    return files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the raw pickles
def test_malicious_pickle_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    net = tmp_path / "net.py"
    net.write_text(
        "from torch import nn\n\n\ndef Net():\n    return nn.Sequential("
        "nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))\n"
    )
    for path in _evil_files(tmp_path, marker):
        if path.suffix != ".safetensors":
            with pytest.raises(
                ValueError,
                match=r"cannot be read by PyTorch's restricted "
                r"loader \(torch\.load\(\.\.\., weights_only=True\)\).*never "
                r"loads such a file unrestricted",
            ):
                models.convert_weights(path, tmp_path / "out.safetensors")
        with pytest.raises(
            ValueError,
            match=r"not a safetensors file; robustlab never "
            r"unpickles.*convert-weights",
        ):
            models.from_spec(f"{net}:Net", weights=path)
        assert not marker.exists(), path.name
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(
        ValueError,
        match=r"UnpicklingError: Unsupported global: GLOBAL "
        r"[\w.]*open was not an allowed global by default\. It holds",
    ) as info:
        models.convert_weights(tmp_path / "zip.pt", tmp_path / "out.safetensors")
    assert "set to `False`" not in str(info.value)  # torch's advice to load unrestricted: cut
    # the payload is live: an unrestricted load (what robustlab never does) runs it
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.exists()

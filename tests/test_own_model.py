"""A model of the user's own (not a robustlab model) through the front door: built from a
``.py`` file with :func:`robustlab.models.from_spec`, weights from a DataParallel ``.pt``
converted once, normalisation in front, saved and loaded back, checked against the data."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustlab import models
from robustlab.models.spec import parse_normalize


class TinyNet(nn.Module):
    """The user's model: conv, batch norm, global average pool, linear."""

    def __init__(
        self, num_classes: int = 3, width: int = 4, in_channels: int = 3, tag: object = None
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make_net(num_classes: int = 3, **kwargs) -> nn.Module:
    return TinyNet(num_classes=num_classes, **kwargs)


def not_a_model() -> int:
    return 3


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    """This file's model, written to a .py file of its own as a user would have it."""
    path = tmp_path / "code" / "net.py"
    path.parent.mkdir()
    path.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        + "\n\n".join(inspect.getsource(f) for f in (TinyNet, make_net, not_a_model))
    )
    return path


def _trained(seed: int = 0, **kwargs) -> TinyNet:
    """A TinyNet with random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TinyNet(**kwargs)
    with torch.no_grad():
        net(torch.rand(8, 3, 6, 6))  # training mode: updates running mean/var
    return net.eval()


X = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_from_spec_builds_the_users_class_and_function(net_file):
    model = models.from_spec(f"{net_file}:TinyNet", width=6)
    assert type(model).__name__ == "TinyNet" and model.conv.out_channels == 6
    assert model(X).shape == (4, 3)
    assert model.robustlab_spec == {
        "spec": f"{net_file.resolve()}:TinyNet",
        "options": {"width": 6},
        "normalize": None,
        "code_sha256": hashlib.sha256(net_file.read_bytes()).hexdigest(),
        "weights": None,
        "weights_sha256": None,
    }
    assert models.from_spec(f"{net_file}:make_net", num_classes=5)(X).shape == (4, 5)
    linear = models.from_spec("torch.nn:Linear", in_features=4, out_features=2)  # a module
    assert isinstance(linear, nn.Linear) and linear.robustlab_spec["code_sha256"] is None


@pytest.mark.parametrize(
    ("spec", "options", "error", "match"),
    [
        (
            "{f}",
            {},
            ValueError,
            r"model spec must be 'path/to/file\.py:NAME' or "
            r"'package\.module:NAME'",
        ),
        ("{d}/missing.py:Net", {}, FileNotFoundError, r"model file .*missing\.py.* not found"),
        ("{f}:Nope", {}, ValueError, r"has no 'Nope'; it defines TinyNet, make_net, not_a_model"),
        (
            "{f}:TinyNet",
            {"depth": 3},
            TypeError,
            r"does not take option\(s\) \['depth'\]; its parameters are \(num_classes: int = 3, "
            r"width: int = 4",
        ),
        ("{f}:not_a_model", {}, TypeError, r"returned a int, not an nn\.Module"),
        (
            "torch.nn:Linear",
            {"in_features": 3},
            TypeError,
            r"missing a required argument: 'out_features'.*--model-option",
        ),
        ("no_such_package.sub:Net", {}, ValueError, r"cannot import module 'no_such_package\.sub'"),
        ("torch.nn:nothing_here", {}, ValueError, r"has no 'nothing_here'"),
    ],
    ids=[
        "no-colon",
        "no-file",
        "no-name",
        "bad-option",
        "not-a-module",
        "missing-option",
        "no-module",
        "no-name-in-module",
    ],
)
def test_from_spec_errors(net_file, spec, options, error, match):
    with pytest.raises(error, match=match):
        models.from_spec(spec.format(f=net_file, d=net_file.parent), **options)


def test_dataparallel_pt_converted_then_loaded_gives_the_same_outputs(net_file, tmp_path):
    original = _trained(width=5)
    pt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "state_dict": nn.DataParallel(original).state_dict()}, pt)
    assert all(k.startswith("module.") for k in torch.load(pt)["state_dict"])
    out = tmp_path / "ckpt.safetensors"
    record = models.convert_weights(pt, out)
    assert record["key"] == "state_dict" and record["prefixes_stripped"] == ["module."]
    assert record["source_sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert record["tensors"] == len(original.state_dict())
    model = models.from_spec(f"{net_file}:TinyNet", weights=out, width=5)
    assert not model.training
    assert torch.equal(model(X), original(X))
    assert model.robustlab_spec["weights_sha256"] == record["sha256"]
    assert model.robustlab_spec["weights"] == str(out.resolve())


def test_safetensors_with_module_prefix_loads_directly(net_file, tmp_path):
    original = _trained()
    path = tmp_path / "dp.safetensors"
    save_file({k: v.contiguous() for k, v in nn.DataParallel(original).state_dict().items()}, path)
    model = models.from_spec(f"{net_file}:TinyNet", weights=path)
    assert torch.equal(model(X), original(X))


def test_mismatched_weights_listed_in_one_error(net_file, tmp_path):
    state = dict(_trained(width=4).state_dict())
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError) as info:
        models.from_spec(f"{net_file}:TinyNet", weights=path, width=6)
    message = str(info.value)
    assert "do not fit the model" in message
    assert "missing keys (1): ['fc.bias']" in message
    assert "unexpected keys (1): ['extra.weight']" in message
    assert re.search(
        r"shape mismatches \(weights vs model\) \(\d+\): \['conv\.weight: "
        r"\(4, 3, 3, 3\) vs \(6, 3, 3, 3\)'",
        message,
    )
    assert "--model-option" in message and "--key" in message
    many = {f"junk{i}": torch.zeros(1) for i in range(15)}
    save_file({**_trained().state_dict(), **many}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(15\): \[.*\] and 5 more"):
        models.from_spec(f"{net_file}:TinyNet", weights=path)


@pytest.mark.parametrize("name", ["ckpt.pt", "ckpt.pth", "ckpt.bin", "ckpt.ckpt", "ckpt.dat"])
def test_pt_weights_are_refused_with_the_conversion(net_file, tmp_path, name):
    path = tmp_path / name
    torch.save(_trained().state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"never unpickles.*robustlab convert-weights "
        rf".*{re.escape(name)} .*\.safetensors \[--key state_dict\]",
    ):
        models.from_spec(f"{net_file}:TinyNet", weights=path)


def test_normalize_wrapper_takes_pixels(net_file):
    inner = _trained()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    for normalize in ("0.5,0.4,0.3/0.2,0.25,0.5", (mean, std)):
        model = models.from_spec(f"{net_file}:TinyNet", normalize=normalize)
        assert isinstance(model, models.Normalized)
        model.model.load_state_dict(inner.state_dict())
        model.eval()
        expected = inner((X - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
        assert torch.allclose(model(X), expected, atol=1e-6)
        assert model.robustlab_spec["normalize"] == {"mean": mean, "std": std}
    one = models.from_spec(f"{net_file}:TinyNet", normalize="0.5/0.25")  # one for every channel
    one.model.load_state_dict(inner.state_dict())
    assert torch.allclose(one.eval()(X), inner((X - 0.5) / 0.25), atol=1e-6)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0.5", r"normalize must be MEAN/STD .*e\.g\. '0\.4914"),
        ("a,0.4/0.2", r"normalize mean value 'a' .* is not a number"),
        ("0.5/0", r"normalize std must be .*> 0, got 0"),
        ("0.5/-1", r"normalize std must be"),
        ("nan/0.2", r"normalize mean must be a number in \[0, 1\]"),
        ("0.5/inf", r"normalize std must be a finite number"),
        ("123.675,116.28,103.53/58.395,57.12,57.375", r"divide them by 255"),
        ("0.1,0.2/0.3,0.4,0.5", r"2 means but 3 stds"),
    ],
)
def test_parse_normalize_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_normalize(text)


def test_save_load_round_trip_asks_for_trust(net_file, tmp_path):
    original = _trained(width=5)
    weights = tmp_path / "w.safetensors"
    save_file(original.state_dict(), weights)
    model = models.from_spec(
        f"{net_file}:TinyNet", weights=weights, width=5, normalize="0.5,0.4,0.3/0.2,0.25,0.5"
    )
    path = models.save(model, tmp_path / "ck" / "mine.safetensors", meta={"note": "mine"})
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["architecture"] == {
        "spec": f"{net_file.resolve()}:TinyNet",
        "options": {"width": 5},
        "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]},
        "code_sha256": hashlib.sha256(net_file.read_bytes()).hexdigest(),
    }
    assert side["weights_source"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(
        ValueError,
        match=r"built from user code .*net\.py:TinyNet.*runs it.*"
        r"trust_code=True.*--trust-code",
    ):
        models.load(path)
    loaded = models.load(path, trust_code=True)
    assert not loaded.training and loaded.robustlab_meta["note"] == "mine"
    assert torch.equal(loaded(X), model(X))
    # the weights file is the user's own state dict: from_spec reads it back as well
    again = models.from_spec(f"{net_file}:TinyNet", weights=path, width=5)
    assert torch.equal(again(X), original(X))


def test_spec_checkpoint_edits_are_caught(net_file, tmp_path):
    model = models.from_spec(f"{net_file}:TinyNet", width=5)
    path = models.save(model, tmp_path / "m.safetensors")
    side_path = path.with_suffix(".json")
    side = json.loads(side_path.read_text())
    side["architecture"]["options"] = {"width": 6}
    side_path.write_text(json.dumps(side))
    with pytest.raises(ValueError, match="edited after saving"):
        models.load(path, trust_code=True)
    side["architecture"]["options"] = {"width": 5}
    side_path.write_text(json.dumps(side))
    net_file.write_text(net_file.read_text() + "\n# edited\n")
    with pytest.warns(UserWarning, match="changed since"):
        models.load(path, trust_code=True)


def test_save_refuses_options_that_are_not_json(net_file, tmp_path):
    model = models.from_spec(f"{net_file}:TinyNet", tag=object())
    with pytest.raises(TypeError, match=r"option 'tag' = .* is not JSON-serialisable"):
        models.save(model, tmp_path / "m.safetensors")


def test_save_without_any_recipe_names_from_spec(tmp_path):
    with pytest.raises(ValueError, match=r"no recorded architecture.*from_spec"):
        models.save(TinyNet(), tmp_path / "m.safetensors")


class _Pair(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3], x


def test_check_model_fits(net_file):
    model = models.from_spec(f"{net_file}:TinyNet", num_classes=4).eval()
    assert models.check_model_fits(model, X, None) == 4
    assert models.check_model_fits(model, X, 4) == 4
    with pytest.raises(
        ValueError,
        match=r"refuses inputs of shape \(2, 1, 6, 6\) "
        r"\(torch\.float32 on cpu; the model's weights are torch\.float32 on "
        r"cpu\): RuntimeError.*--resize H,W.*--normalize MEAN/STD",
    ):
        models.check_model_fits(model, X[:, :1], None)
    with pytest.raises(
        ValueError,
        match=r"returns 4 logits per example but num_classes is "
        r"10.*--num-classes 4",
    ):
        models.check_model_fits(model, X, 10)
    with pytest.raises(
        ValueError,
        match=r"logits of shape \(N, num_classes\) = \(2, K\), got "
        r"tuple",
    ):
        models.check_model_fits(_Pair(), X, None)

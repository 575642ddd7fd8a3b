"""Tests for robustlab.models: architectures, Normalize and safe checkpoints."""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab import models
from robustlab.models.checkpoint import _cpu_tensors

ACTIVATIONS = ["relu", "softplus", "silu", "gelu"]
TINY = {"wrn-34-10": {"depth": 10, "widen_factor": 1}}  # keeps the contract test fast
SHAPES = [(1, 28), (3, 32)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Batches of two gain nothing from intra-op threads; on a busy machine they cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default weights and BatchNorm statistics, so a round trip cannot pass by accident."""
    g = _gen(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [
            b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
        ]:
            t.add_(0.1 * torch.rand(t.shape, generator=g))
    return model


def _tiny_smallcnn() -> nn.Module:
    return _perturb(models.create("smallcnn", mean=0.1307, std=0.3081))


# --- architectures ---------------------------------------------------------------------------


def test_names_and_activations() -> None:
    assert models.names() == [
        "ibp-small",
        "lenet",
        "preact-resnet18",
        "resnet20",
        "smallcnn",
        "wrn-34-10",
    ]
    assert models.activations() == ["gelu", "kwta", "relu", "silu", "softplus"]


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_every_model_builds_and_gives_logits(
    name: str, activation: str, channels: int, size: int
) -> None:
    model = models.create(
        name,
        num_classes=7,
        in_channels=channels,
        input_size=size,
        activation=activation,
        **TINY.get(name, {}),
    )
    assert isinstance(next(iter(model.children())), models.Normalize)  # first layer
    used = {type(m) for m in model.modules()}
    wanted = {"relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU, "gelu": nn.GELU}
    assert wanted[activation] in used
    assert not (set(wanted.values()) - {wanted[activation]}) & used
    x = torch.rand(2, channels, size, size, generator=_gen())
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    json.dumps(model.robustlab_arch)  # the build recipe is JSON-serialisable


@pytest.mark.parametrize("name", models.names())
def test_normalize_is_applied_first(name: str) -> None:
    """A model with statistics equals the same weights without them on pre-normalised input,
    and a fresh model has non-zero input gradients (attacks on untrained models work)."""
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    kw = {"in_channels": 3, "input_size": 32, **TINY.get(name, {})}
    with_stats = models.create(name, mean=mean, std=std, **kw).eval()
    plain = models.create(name, **kw).eval()
    state = {k: v for k, v in with_stats.state_dict().items() if not k.startswith("normalize.")}
    plain.load_state_dict(state, strict=False)
    x = torch.rand(2, 3, 32, 32, generator=_gen(), requires_grad=True)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = with_stats(x)
    torch.testing.assert_close(out, plain((x - m) / s), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def _n_params(name: str, channels: int, size: int, **kw: int) -> int:
    with torch.device("meta"):  # counts without allocating 46M weights
        model = models.create(name, in_channels=channels, input_size=size, **kw)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    # smallcnn, TRADES layout on 1x28x28 -> 64x4x4 features:
    # conv 1*32*9+32, 32*32*9+32, 32*64*9+64, 64*64*9+64; fc 1024*200+200, 200*200+200, 200*10+10
    by_hand = 320 + 9248 + 18496 + 36928 + 205000 + 40200 + 2010
    assert by_hand == 312_202
    assert _n_params("smallcnn", 1, 28) == by_hand
    assert _n_params("smallcnn", 3, 32) == 312_202 - 205_000 + 64 * 25 * 200 + 200 + 2 * 32 * 9
    assert _n_params("lenet", 1, 28) == 61_706
    assert _n_params("resnet20", 3, 32) == 269_722  # option-A shortcuts, "0.27M" in the paper
    assert _n_params("preact-resnet18", 3, 32) == 11_172_170
    assert _n_params("wrn-34-10", 3, 32) == 46_160_474


def test_create_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="relu"):
        models.create("smallcnn", activation="tanh")
    with pytest.raises(ValueError, match="smallcnn"):
        models.create("vgg16")
    with pytest.raises(TypeError, match="drop"):
        models.create("smallcnn", depth=3)
    with pytest.raises(ValueError, match="depth"):
        models.create("wrn-34-10", depth=12)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("lenet", num_classes=0)
    with pytest.raises(ValueError, match="channels"):
        models.create("lenet", in_channels=3, mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="input_size"):
        models.create("smallcnn", input_size=8)


def test_create_records_full_recipe() -> None:
    model = models.create(
        "wrn-34-10", in_channels=3, input_size=32, mean=(0.5, 0.4, 0.3), depth=10, widen_factor=1
    )
    assert model.robustlab_arch == {
        "name": "wrn-34-10",
        "kwargs": {
            "num_classes": 10,
            "in_channels": 3,
            "input_size": 32,
            "activation": "relu",
            "mean": pytest.approx([0.5, 0.4, 0.3]),
            "std": None,
            "depth": 10,
            "widen_factor": 1,
            "drop": 0.0,
        },
    }


# --- Normalize -------------------------------------------------------------------------------


def test_normalize_matches_formula() -> None:
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    x = torch.rand(2, 3, 5, 4, generator=_gen())
    expected = (x.numpy() - np.array(mean)[None, :, None, None]) / np.array(std)[
        None, :, None, None
    ]
    out = models.Normalize(mean, std)(x)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(models.Normalize(None, None)(x), x)
    assert torch.equal(models.Normalize(None, None, channels=3)(x), x)
    scalar = models.Normalize(0.5, 0.25, channels=3)
    assert torch.allclose(scalar(x), (x - 0.5) / 0.25)
    assert {n for n, _ in scalar.named_buffers()} == {"mean", "std"}


def test_normalize_rejects_bad_statistics() -> None:
    with pytest.raises(ValueError, match="> 0"):
        models.Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="channels"):
        models.Normalize([0.1, 0.2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        models.Normalize(float("nan"), 1.0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        models.Normalize([0.0] * 3, 1.0)(torch.rand(2, 1, 4, 4))


# --- checkpoints: round trip -----------------------------------------------------------------

META = {
    "dataset": "fashion-mnist",
    "threat": {"norm": "linf", "eps": 0.1, "bounds": [0, 1]},
    "objective": "pgd-at",
    "epoch": 3,
    "seed": 0,
}


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("smallcnn", {}),
        ("resnet20", {"in_channels": 3, "input_size": 32, "activation": "silu"}),
        ("wrn-34-10", {"in_channels": 3, "input_size": 32, "depth": 10, "widen_factor": 1}),
    ],
)
def test_round_trip_identical_outputs(tmp_path: Path, name: str, kw: dict) -> None:
    model = _perturb(models.create(name, mean=0.5, std=0.25, **kw)).eval()
    path = models.save(model, tmp_path / "run" / "model.safetensors", meta=META)
    loaded = models.load(path)
    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x = torch.rand(
        2,
        kw.get("in_channels", 1),
        kw.get("input_size", 28),
        kw.get("input_size", 28),
        generator=_gen(),
    )
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.robustlab_arch == model.robustlab_arch
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


def test_sidecar_fields(tmp_path: Path) -> None:
    path = models.save(_tiny_smallcnn(), tmp_path / "m.safetensors", meta=META)
    side = json.loads(path.with_suffix(".json").read_text())
    for field in (
        "format_version",
        "architecture",
        "robustlab_version",
        "torch_version",
        "git_commit",
        "created",
        "sha256",
        *META,
    ):
        assert field in side, field
    assert side["architecture"]["name"] == "smallcnn"
    assert side["threat"] == META["threat"] and side["epoch"] == 3
    assert side["torch_version"] == torch.__version__
    assert side["created"].endswith("+00:00")
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = models.load(path, device="cpu")
    assert loaded.robustlab_meta == side


def test_save_overwrites_and_accepts_arch_override(tmp_path: Path) -> None:
    made = _tiny_smallcnn()
    plain = models.create("smallcnn")
    del plain.robustlab_arch  # as if built by hand
    plain.load_state_dict(made.state_dict())
    path = tmp_path / "m.safetensors"
    models.save(models.create("smallcnn"), path)
    models.save(plain, path, arch=made.robustlab_arch)
    x = torch.rand(2, 1, 28, 28, generator=_gen())
    with torch.no_grad():
        assert torch.equal(models.load(path)(x), made.eval()(x))


def test_shared_tensors_are_copied() -> None:
    w = torch.rand(4, 4)
    out = _cpu_tensors({"a": w, "b": w, "c": w.t()})
    assert torch.equal(out["a"], out["b"]) and out["c"].is_contiguous()
    ptrs = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(ptrs) == 3


# --- checkpoints: errors ---------------------------------------------------------------------


def test_save_errors(tmp_path: Path) -> None:
    model = _tiny_smallcnn()
    with pytest.raises(ValueError, match=r"\.safetensors"):
        models.save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="models.create"):
        models.save(nn.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="'threat'"):
        models.save(model, tmp_path / "m.safetensors", meta={"threat": object()})
    with pytest.raises(ValueError, match="sha256"):
        models.save(model, tmp_path / "m.safetensors", meta={"sha256": "x"})
    with pytest.raises(ValueError, match="unexpected keys"):
        models.save(model, tmp_path / "m.safetensors", arch={"name": "lenet", "kwargs": {}})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return models.save(_tiny_smallcnn(), tmp_path / "m.safetensors", meta=META)


def test_missing_files(saved: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*models\.save"):
        models.load(saved.with_name("nope.safetensors"))
    saved.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sidecar .*m\.json"):
        models.load(saved)


def test_truncated_file(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        models.load(saved)
    saved.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        models.load(saved)


def test_sha_mismatch(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF  # last byte of the last tensor: header still valid
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        models.load(saved)


def _edit_sidecar(path: Path, **arch: object) -> None:
    side_path = path.with_suffix(".json")
    side = json.loads(side_path.read_text())
    side["architecture"].update(arch)
    side_path.write_text(json.dumps(side))


def test_weights_not_matching_architecture(saved: Path) -> None:
    _edit_sidecar(saved, name="lenet", kwargs=models.create("lenet").robustlab_arch["kwargs"])
    with pytest.raises(ValueError, match=r"missing keys.*features\.0\.weight"):
        models.load(saved)
    _edit_sidecar(saved, name="lenet", kwargs={"drop": 0.5})
    with pytest.raises(ValueError, match="lenet does not take"):
        models.load(saved)
    kwargs = {**models.create("smallcnn").robustlab_arch["kwargs"], "num_classes": 5}
    _edit_sidecar(saved, name="smallcnn", kwargs=kwargs)
    with pytest.raises(ValueError, match=r"shape mismatches.*fc3"):
        models.load(saved)


def test_unknown_architecture(saved: Path) -> None:
    _edit_sidecar(saved, name="vgg16")
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        models.load(saved)


class _Payload:
    """Unpickling this object creates ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-raw-pickle"])
def test_pickles_are_refused_never_executed(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save(
        {"weights": torch.zeros(2), "evil": _Payload(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    path.with_suffix(".json").write_text(json.dumps({"sha256": "0", "architecture": {}}))
    assert path.read_bytes().startswith(b"PK\x03\x04" if zip_format else b"\x80")
    with pytest.raises(ValueError, match=r"never unpickles.*weights_only=True"):
        models.load(path)
    with pytest.raises(ValueError, match="never unpickles"):
        models.load(path.rename(tmp_path / "model.pt"))
    assert not marker.exists()
    # The payload is live: unpickling it (what robustlab refuses to do) creates the marker.
    torch.load(tmp_path / "model.pt", weights_only=False)
    assert marker.exists()


def test_models_package_never_unpickles() -> None:
    forbidden = {"pickle", "dill", "cloudpickle", "joblib"}
    for source in Path(models.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text())
        # the one exception: convert_weights, through PyTorch's restricted unpickler
        restricted = {
            id(n.func)
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and source.name == "convert.py"
            and any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in n.keywords
            )
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & forbidden, source.name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden, source.name
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == "load"
                and id(node) not in restricted
            ):
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), (
                    f"{source.name}:{node.lineno} uses torch.load"
                )


def test_edited_sidecar_architecture_is_refused(tmp_path):
    """Editing a valid option of the sidecar (the activation) changes the model: load says so
    instead of loading another model than the one saved."""
    model = rl.models.create("smallcnn", num_classes=10)
    path = rl.models.save(model, tmp_path / "m.safetensors")
    side = json.loads(path.with_suffix(".json").read_text())
    side["architecture"]["kwargs"]["activation"] = "softplus"
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="architecture or options were edited"):
        rl.models.load(path)


def test_same_weights_same_hashes(tmp_path):
    """Bit-identical weights give bit-identical files and hashes, in any process (safetensors
    writes a metadata map of several keys in an order that varies between processes)."""
    script = (
        "import sys, torch; from robustlab.models import create, save; "
        "torch.manual_seed(0); save(create('smallcnn', num_classes=10), sys.argv[1])"
    )
    for i in range(2):
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"m{i}.safetensors")], check=True
        )
    torch.manual_seed(0)
    rl.models.save(rl.models.create("smallcnn", num_classes=10), tmp_path / "m2.safetensors")
    sides = [json.loads((tmp_path / f"m{i}.json").read_text()) for i in range(3)]
    assert len({(tmp_path / f"m{i}.safetensors").read_bytes() for i in range(3)}) == 1
    assert len({s["sha256"] for s in sides}) == 1
    assert len({s["model_sha256"] for s in sides}) == 1

"""Tests of robustlab.data: real file formats written in tmp_path, search order, checksums,
error messages. Offline: every test runs with the network function replaced."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import re
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from robustlab import data
from robustlab.data import datasets, sources

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
ORIGINAL_SYSTEM_DIRS = dict(sources.SYSTEM_DIRS)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private home and cache, no ROBUSTLAB_DATA, no system dirs, and no network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("ROBUSTLAB_DATA", raising=False)
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})

    def no_network(url: str, dest: Path) -> None:
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(sources, "_download", no_network)
    return home


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32)) / 255


# ---------------------------------------------------------------- writers of the real formats


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_split(
    directory: Path, split: str, x: np.ndarray, y: np.ndarray, gz: bool = True
) -> None:
    """MNIST-style files; x is (N, 28, 28) uint8, y is (N,)."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for kind, array, magic in (("images-idx3", x, 2051), ("labels-idx1", y, 2049)):
        name = f"{prefix}-{kind}-ubyte"
        blob = idx_bytes(array, magic)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)


def fake_idx(seed: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    g = rng(seed)
    return g.integers(0, 256, (n, 28, 28), dtype=np.uint8), g.integers(0, 10, n).astype(np.uint8)


def cifar_records(x: np.ndarray, *labels: np.ndarray) -> bytes:
    """Binary CIFAR records: label byte(s) then 3072 pixel bytes; x is (N, 3, 32, 32)."""
    columns = [lab.astype(np.uint8)[:, None] for lab in labels] + [x.reshape(len(x), -1)]
    return np.concatenate(columns, axis=1).tobytes()


def write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


def fake_cifar(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    g = rng(seed)
    return g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, n)


# ---------------------------------------------------------------- registry and info


def test_names_and_info() -> None:
    assert data.names() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "svhn"]
    assert data.names("cifar*") == ["cifar10", "cifar100"]
    for name in data.names():
        info = data.info(name)
        assert info.name == name
        assert len(info.classes) == info.num_classes == len(set(info.classes))
        assert len(info.mean) == len(info.std) == info.shape[0]
        assert all(0 < v < 1 for v in info.mean + info.std)
    assert data.info("cifar100").num_classes == 100
    assert data.info("fashion-mnist").classes[9] == "Ankle boot"
    assert data.info("cifar10").shape == (3, 32, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.info("mnist").num_classes = 3  # type: ignore[misc]


def test_every_official_file_has_a_checksum() -> None:
    for name in data.names():
        for resources in datasets.REGISTRY.get(name).files.values():
            for r in resources:
                assert len(r.sha256) == 64
                assert int(r.sha256, 16) >= 0
                assert r.size > 0
                assert r.url.endswith(r.filename)


def test_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match="valid datasets are: cifar10, cifar100, fashion-mnist"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"unknown split 'val'.*'train', 'test'"):
        data.load("mnist", split="val")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.info("nope")


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3"])
def test_bad_n(tmp_path: Path, n: object) -> None:
    write_idx_split(tmp_path, "test", *fake_idx(0))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        data.load("mnist", root=tmp_path, n=n)  # type: ignore[arg-type]


# ---------------------------------------------------------------- formats: exact round trips


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path: Path, name: str, split: str, gz: bool) -> None:
    images, labels = fake_idx(1)
    write_idx_split(tmp_path, split, images, labels, gz=gz)
    x, y = data.load(name, split=split, root=tmp_path)
    assert x.shape == (5, 1, 28, 28)
    assert x.dtype == torch.float32
    assert x.is_contiguous()
    assert y.shape == (5,)
    assert y.dtype == torch.int64
    assert x.min() >= 0
    assert x.max() <= 1
    torch.testing.assert_close(x, as_float(images)[:, None], rtol=0, atol=0)
    assert y.tolist() == labels.tolist()


def test_first_n_and_fresh_tensors(tmp_path: Path) -> None:
    images, labels = fake_idx(2, n=6)
    write_idx_split(tmp_path, "test", images, labels)
    x, y = data.load("mnist", root=tmp_path, n=4)
    assert x.shape == (4, 1, 28, 28)
    assert y.tolist() == labels[:4].tolist()
    x.zero_()
    y.fill_(7)
    x2, y2 = data.load("mnist", root=tmp_path)  # served from the in-process cache
    torch.testing.assert_close(x2, as_float(images)[:, None], rtol=0, atol=0)
    assert y2.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="has only 6 examples"):
        data.load("mnist", root=tmp_path, n=7)


def test_cifar10_binary_tar_and_extracted(tmp_path: Path) -> None:
    batches = [fake_cifar(seed, 2) for seed in range(5)]
    test_x, test_y = fake_cifar(9, 3)
    members = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin": cifar_records(*b) for i, b in
               enumerate(batches)}  # fmt: skip
    members["cifar-10-batches-bin/test_batch.bin"] = cifar_records(test_x, test_y)
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\n"
    write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", members)
    extracted = tmp_path / "extracted"
    for member, blob in members.items():
        (extracted / member).parent.mkdir(parents=True, exist_ok=True)
        (extracted / member).write_bytes(blob)

    for root in (tmp_path, extracted):
        x, y = data.load("cifar10", split="train", root=root)
        assert x.shape == (10, 3, 32, 32)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        expected = np.concatenate([b[0] for b in batches])  # batches 1..5 in order
        torch.testing.assert_close(x, as_float(expected), rtol=0, atol=0)
        assert y.tolist() == np.concatenate([b[1] for b in batches]).tolist()
        x, y = data.load("cifar10", split="test", root=root)
        torch.testing.assert_close(x, as_float(test_x), rtol=0, atol=0)
        assert y.tolist() == test_y.tolist()


def test_cifar100_binary_uses_fine_labels(tmp_path: Path) -> None:
    g = rng(3)
    x_train = g.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    x_test = g.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    fine_train, fine_test = np.array([99, 0, 57, 12]), np.array([5, 98])
    members = {
        "cifar-100-binary/train.bin": cifar_records(x_train, fine_train // 5, fine_train),
        "cifar-100-binary/test.bin": cifar_records(x_test, fine_test // 5, fine_test),
    }
    write_tar_gz(tmp_path / "cifar-100-binary.tar.gz", members)
    x, y = data.load("cifar100", split="train", root=tmp_path)
    torch.testing.assert_close(x, as_float(x_train), rtol=0, atol=0)
    assert y.tolist() == [99, 0, 57, 12]
    x, y = data.load("cifar100", split="test", root=tmp_path)
    torch.testing.assert_close(x, as_float(x_test), rtol=0, atol=0)
    assert y.tolist() == [5, 98]


@pytest.mark.parametrize("split", ["train", "test"])
def test_svhn_mat(tmp_path: Path, split: str) -> None:
    g = rng(4)
    x_mat = g.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)  # H, W, C, N as in the .mat
    y_mat = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.uint8)  # 10 is the digit 0
    scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x_mat, "y": y_mat})
    x, y = data.load("svhn", split=split, root=tmp_path)
    assert x.shape == (6, 3, 32, 32)
    assert x.is_contiguous()
    torch.testing.assert_close(x, as_float(x_mat.transpose(3, 2, 0, 1)), rtol=0, atol=0)
    assert x[2, 1, 5, 7] == x_mat[5, 7, 1, 2] / 255
    assert y.tolist() == [0, 1, 2, 9, 0, 5]
    assert y.dtype == torch.int64


# ---------------------------------------------------------------- malformed files


def _corrupt(directory: Path, how: str) -> str:
    """Write a test split of MNIST broken in one way; return the file name to expect."""
    images, labels = fake_idx(5)
    write_idx_split(directory, "test", images, labels)
    img, lab = directory / "t10k-images-idx3-ubyte.gz", directory / "t10k-labels-idx1-ubyte.gz"
    blob = idx_bytes(images, 2051)
    broken = {
        "magic": (img, b"\x00\x00\x08\x02" + blob[4:]),
        "truncated": (img, blob[:-1]),
        "trailing": (img, blob + b"\x00"),
        "short": (img, b"\x00\x00"),
        "labels-magic": (lab, idx_bytes(labels, 2051)),
        "count": (lab, idx_bytes(labels[:4], 2049)),
        "label-range": (lab, idx_bytes(np.full(5, 10), 2049)),
    }
    if how == "gzip":
        img.write_bytes(gzip.compress(blob)[:-20])
        return img.name
    path, raw = broken[how]
    path.write_bytes(gzip.compress(raw))
    return "mnist/test" if how == "label-range" else path.name


@pytest.mark.parametrize(
    "how", ["magic", "truncated", "trailing", "short", "gzip", "labels-magic", "count",
            "label-range"]
)  # fmt: skip
def test_corrupt_idx_raises_value_error_naming_the_file(tmp_path: Path, how: str) -> None:
    expected = _corrupt(tmp_path, how)
    with pytest.raises(ValueError, match=re.escape(expected)):
        data.load("mnist", root=tmp_path)


def test_corrupt_cifar(tmp_path: Path) -> None:
    x, y = fake_cifar(6, 2)
    write_tar_gz(
        tmp_path / "cifar-10-binary.tar.gz",
        {"cifar-10-batches-bin/test_batch.bin": cifar_records(x, y)[:-1]},
    )
    with pytest.raises(ValueError, match="not a whole number of 3073-byte CIFAR records"):
        data.load("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match=r"lacks CIFAR batch file.*data_batch_1\.bin"):
        data.load("cifar10", split="train", root=tmp_path)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz"):
        data.load("cifar10", root=tmp_path)


def test_malformed_svhn(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8),
                                                    "y": np.ones((2, 1))})  # fmt: skip
    with pytest.raises(ValueError, match=r"test_32x32\.mat.*\(32, 32, 3, N\)"):
        data.load("svhn", root=tmp_path)


# ---------------------------------------------------------------- search order


def _marked(directory: Path, value: int) -> None:
    """An MNIST test split whose pixels all equal ``value``, to tell copies apart."""
    write_idx_split(directory, "test", np.full((2, 28, 28), value, np.uint8), np.zeros(2))


def _which(**kwargs: object) -> int:
    x, _ = data.load("mnist", **kwargs)  # type: ignore[arg-type]
    return round(float(x[0, 0, 0, 0]) * 255)


def test_search_order(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, env = tmp_path / "root", tmp_path / "env"
    _marked(root, 1)
    _marked(env / "mnist", 2)
    _marked(isolated / ".cache" / "robustlab" / "mnist", 3)
    monkeypatch.setenv("ROBUSTLAB_DATA", str(env))
    assert _which(root=root) == 1  # root beats ROBUSTLAB_DATA
    assert _which() == 2  # ROBUSTLAB_DATA beats the cache
    _marked(env, 4)
    assert _which() == 2  # the data set's subdirectory beats the directory itself
    monkeypatch.setenv("ROBUSTLAB_DATA", str(tmp_path / "empty"))
    assert _which() == 3  # then the cache
    assert _which(root=tmp_path / "empty") == 3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _marked(tmp_path / "xdg" / "robustlab" / "mnist", 5)
    assert _which() == 5  # XDG_CACHE_HOME replaces ~/.cache
    assert sources.cache_dir("mnist") == tmp_path / "xdg" / "robustlab" / "mnist"


def test_system_dir_comes_before_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"mnist": (tmp_path / "system",)})
    _marked(tmp_path / "system", 6)
    _marked(sources.cache_dir("mnist"), 7)
    assert _which() == 6
    assert sources.search_dirs("mnist")[-1] == sources.cache_dir("mnist")


def test_split_files_are_taken_from_one_directory(tmp_path: Path) -> None:
    _marked(tmp_path / "a", 8)
    (tmp_path / "a" / "t10k-labels-idx1-ubyte.gz").unlink()
    _marked(sources.cache_dir("mnist"), 9)
    assert _which(root=tmp_path / "a") == 9  # an incomplete directory is skipped as a whole


# ---------------------------------------------------------------- downloads and checksums


def _fake_network(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes]) -> list[str]:
    """Serve ``payloads`` (by file name) instead of the network; return the URLs requested."""
    calls: list[str] = []

    def fake(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(sources, "_download", fake)
    return calls


def test_fetch_verifies_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = b"the official bytes"
    resource = sources.Resource(
        "f.bin", "https://example.org/f.bin", hashlib.sha256(good).hexdigest(), len(good)
    )
    _fake_network(monkeypatch, {"f.bin": b"tampered bytes"})
    actual = hashlib.sha256(b"tampered bytes").hexdigest()
    with pytest.raises(ValueError, match=f"expected sha256 {resource.sha256}, got {actual}"):
        sources.fetch(resource, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing left behind

    _fake_network(monkeypatch, {"f.bin": good})
    path = sources.fetch(resource, tmp_path / "cache")
    assert path == tmp_path / "cache" / "f.bin"
    assert path.read_bytes() == good
    assert list((tmp_path / "cache").iterdir()) == [path]


def test_load_downloads_into_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ROBUSTLAB_OFFLINE")
    images, labels = fake_idx(7, n=3)
    write_idx_split(tmp_path / "server", "test", images, labels)
    payloads = {p.name: p.read_bytes() for p in (tmp_path / "server").iterdir()}
    # the real mnist entry, with the digests of these synthetic files
    spec = datasets.REGISTRY.get("mnist")
    files = {
        "test": tuple(
            dataclasses.replace(r, sha256=hashlib.sha256(payloads[r.filename]).hexdigest())
            for r in spec.files["test"]
        )
    }
    monkeypatch.setitem(datasets.REGISTRY._items, "mnist", dataclasses.replace(spec, files=files))
    calls = _fake_network(monkeypatch, payloads)
    x, _ = data.load("mnist", split="test")
    assert calls == [r.url for r in files["test"]]
    assert calls[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    torch.testing.assert_close(x, as_float(images)[:, None], rtol=0, atol=0)
    assert sorted(p.name for p in sources.cache_dir("mnist").iterdir()) == sorted(payloads)
    data.load("mnist", split="test")
    assert len(calls) == 2  # the second load reads the cache


def test_load_rejects_wrong_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTLAB_OFFLINE")
    _fake_network(monkeypatch, {"t10k-images-idx3-ubyte.gz": b"<html>mirror error</html>"})
    official = "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    with pytest.raises(ValueError, match=rf"expected sha256 {official}, got [0-9a-f]{{64}}"):
        data.load("mnist", split="test")
    assert not any(sources.cache_dir("mnist").iterdir())


def test_network_failure_gives_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTLAB_OFFLINE")

    def unreachable(url: str, dest: Path) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(sources, "_download", unreachable)
    with pytest.raises(FileNotFoundError, match=r"download failed: .*no route to host"):
        data.load("svhn", split="test")


def test_missing_data_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTLAB_DATA", str(tmp_path / "mine"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "debian",)})
    with pytest.raises(FileNotFoundError) as err:
        data.load("fashion-mnist", split="train")
    message = str(err.value)
    for directory in sources.search_dirs("fashion-mnist"):
        assert str(directory) in message
    assert str(tmp_path / "mine" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "ROBUSTLAB_OFFLINE=1" in message
    assert "ROBUSTLAB_DATA" in message
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}" in message
    assert f"put them in {sources.cache_dir('fashion-mnist')}" in message

    monkeypatch.delenv("ROBUSTLAB_OFFLINE")
    with pytest.raises(FileNotFoundError, match=r"download=False") as err:
        data.load("cifar10", download=False)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in str(err.value)
    assert "apt-get" not in str(err.value)


# ---------------------------------------------------------------- the real data, when installed


def test_real_fashion_mnist_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ORIGINAL_SYSTEM_DIRS)
    x, y = data.load("fashion-mnist", split="test")
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert x.is_contiguous()
    assert y.dtype == torch.int64
    assert x.min() == 0
    assert x.max() == 1
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(x.mean().item() - 0.2868) < 1e-3  # the test split's mean pixel

"""Parsers for the official file formats: IDX (MNIST family), CIFAR binary, SVHN ``.mat``.

Every reader returns ``(images, labels)`` as NumPy arrays: images ``uint8`` of shape
``(N, C, H, W)`` (C-contiguous, pixel values 0..255), labels ``int64`` of shape ``(N,)``.
A malformed file raises ``ValueError`` naming the file; nothing is ever unpickled.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IDX_LABELS = 2049  # magic number of an IDX file of unsigned bytes with 1 dimension
IDX_IMAGES = 2051  # ... with 3 dimensions
_GZIP_MAGIC = b"\x1f\x8b"
CIFAR_PIXELS = 3 * 32 * 32  # bytes of one image in a CIFAR binary record


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or plain), of unsigned bytes.

    ``magic`` is the expected magic number: 2049 for labels (1-D), 2051 for images (3-D).
    The header's dimensions must account for every byte of the file.
    """
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path}: corrupt gzip stream ({err}); delete it and fetch it again"
            ) from err
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number {found}, expected {magic}; wrong/corrupt file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says dims {dims}, i.e. {expected} bytes, but the (decompressed) "
            f"file has {len(raw)} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64 from two IDX files."""
    x = read_idx(images, IDX_IMAGES)
    y = read_idx(labels, IDX_LABELS)
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return np.ascontiguousarray(x[:, None]), y.astype(np.int64)


def _cifar_records(blob: bytes, where: str, label_bytes: int) -> np.ndarray:
    size = label_bytes + CIFAR_PIXELS
    if len(blob) == 0 or len(blob) % size:
        raise ValueError(
            f"{where}: {len(blob)} bytes is not a whole number of {size}-byte CIFAR records"
        )
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, size)


def _cifar_blobs(path: Path, members: Sequence[str]) -> list[tuple[str, bytes]]:
    """The bytes of each member, from a ``.tar.gz`` (read in one pass, never extracted) or a
    directory holding the extracted ``.bin`` files."""
    if path.is_dir():
        missing = [m for m in members if not (path / m).is_file()]
        if missing:
            raise ValueError(f"{path}: lacks CIFAR batch file(s) {missing}; re-extract the archive")
        return [(str(path / m), (path / m).read_bytes()) for m in members]
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in members and base not in found:
                    handle = archive.extractfile(info)
                    if handle is not None:
                        found[base] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"{path}: unreadable CIFAR archive ({err}); delete it and fetch it again"
        ) from err
    missing = [m for m in members if m not in found]
    if missing:
        raise ValueError(f"{path}: archive lacks CIFAR batch file(s) {missing}")
    return [(f"{path}:{m}", found[m]) for m in members]


def read_cifar_binary(
    path: Path, members: Sequence[str], label_bytes: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from the CIFAR binary version.

    Each record is ``label_bytes`` label bytes then 3072 pixel bytes (1024 red, 1024 green,
    1024 blue, row-major), so the pixels are already channel-first. The label used is the last
    label byte: the class for CIFAR-10 (1 byte), the fine label for CIFAR-100 (coarse, fine).
    ``members`` are read in the order given and concatenated.
    """
    images, labels = [], []
    for where, blob in _cifar_blobs(path, members):
        records = _cifar_records(blob, where, label_bytes)
        y = records[:, label_bytes - 1].astype(np.int64)
        if y.max() >= num_classes:
            raise ValueError(f"{where}: label {y.max()} out of range for {num_classes} classes")
        labels.append(y)
        images.append(records[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 (0..9) from ``*_32x32.mat``.

    The file holds ``X`` of shape ``(32, 32, 3, N)`` and ``y`` of shape ``(N, 1)`` with labels
    1..10, where 10 stands for the digit 0.
    """
    from scipy.io import loadmat  # scipy.io costs ~0.2 s to import; only SVHN needs it

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as err:  # scipy raises a variety of types for a malformed file
        raise ValueError(f"{path}: not a readable MATLAB file ({err})") from err
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise ValueError(f"{path}: expected variables 'X' and 'y' in the .mat file")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[3], 1):
        raise ValueError(
            f"{path}: expected X of shape (32, 32, 3, N) and y of shape (N, 1), "
            f"got {x.shape} and {y.shape}"
        )
    labels = y[:, 0].astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10 or (labels != y[:, 0]).any()):
        raise ValueError(f"{path}: SVHN labels must be integers 1..10")
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels in X, got {x.dtype}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels % 10

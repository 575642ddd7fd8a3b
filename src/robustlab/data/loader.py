"""``load``, ``info`` and ``names``: the public entry points of ``robustlab.data``."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from robustlab._validate import positive_int
from robustlab.data.datasets import REGISTRY, DatasetInfo
from robustlab.data.sources import locate

_Stamp = tuple[tuple[str, int, int], ...]  # (path, size in bytes, mtime in ns) per file


def names(pattern: str | None = None) -> list[str]:
    """Registered data set names, sorted; ``pattern`` filters with shell wildcards."""
    return REGISTRY.names(pattern)


def info(name: str) -> DatasetInfo:
    """Class count, image shape, per-channel mean/std and class names of data set ``name``."""
    return REGISTRY.get(name).info


def load(
    name: str = "fashion-mnist",
    split: str = "test",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of a data set, in the files' official order.

    Returns ``x``, float32 of shape ``(N, C, H, W)``, contiguous, with values in [0, 1]
    (the stored 8-bit pixel divided by 255), and ``y``, int64 of shape ``(N,)`` with values in
    ``0 .. num_classes - 1``. Both are fresh CPU tensors the caller may modify.

    Args:
        name: a name from ``names()``, e.g. ``"fashion-mnist"``, ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        root: directory to search first (itself and its subdirectory ``name``); without it,
            ``$ROBUSTLAB_DATA``. Then system packages and the cache ``~/.cache/robustlab/<name>``
            are searched (see ``robustlab.data.sources``).
        download: fetch the official files into the cache if found nowhere (SHA-256 checked);
            ``ROBUSTLAB_OFFLINE=1`` forbids it too.
        n: keep only the first ``n`` examples (``1 <= n <= N``); ``None`` keeps all.

    Raises:
        ValueError: unknown name or split, bad ``n``, malformed file, checksum mismatch.
        FileNotFoundError: the files are nowhere and cannot be downloaded; the message says
            where they were looked for and how to get them.

    >>> x, y = load("fashion-mnist", split="test", n=8)  # doctest: +SKIP
    >>> x.shape, x.dtype, y.dtype                          # doctest: +SKIP
    (torch.Size([8, 1, 28, 28]), torch.float32, torch.int64)
    """
    spec = REGISTRY.get(name)
    if split not in spec.files:
        valid = ", ".join(repr(s) for s in spec.files)
        raise ValueError(f"unknown split {split!r} for data set {name!r}; valid splits: {valid}")
    if n is not None:
        try:
            n = positive_int(n, "n")
        except ValueError:
            raise ValueError(f"n must be a positive integer or None, got {n!r}") from None
    paths = locate(spec.info.name, split, spec.files[split], root=root, download=download)
    images, labels = _decoded(spec.info.name, split, _stamp(paths))
    if n is not None:
        if n > len(labels):
            raise ValueError(
                f"n={n} but the {split!r} split of {name!r} has only {len(labels)} examples"
            )
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # copies: the cache stays intact
    return x, torch.from_numpy(labels.copy())


def _stamp(paths: list[Path]) -> _Stamp:
    """Cache key of some files: a file replaced on disk gets a new key (for an extracted
    CIFAR folder, the folder's own mtime, which changes when files are added or removed)."""
    stats = [p.stat() for p in paths]
    return tuple(
        (str(p.resolve()), s.st_size, s.st_mtime_ns) for p, s in zip(paths, stats, strict=True)
    )


@functools.lru_cache(maxsize=4)
def _decoded(name: str, split: str, stamp: _Stamp) -> tuple[np.ndarray, np.ndarray]:
    """Decoded ``(uint8 NCHW images, int64 labels)``, kept in memory for repeated loads."""
    spec = REGISTRY.get(name)
    images, labels = spec.read([Path(p) for p, _, _ in stamp], split)
    expected = spec.info.shape
    if images.shape[1:] != expected or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"{name}/{split}: decoded images {images.shape} {images.dtype} and "
            f"{labels.shape} labels do not match the expected (N, *{expected}) uint8 and (N,)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.info.num_classes):
        raise ValueError(
            f"{name}/{split}: labels span {labels.min()}..{labels.max()}, outside 0.."
            f"{spec.info.num_classes - 1}; the files are not those of {name!r}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels

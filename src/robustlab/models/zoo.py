"""The pretrained zoo: models that ship with robustlab, each with a model card.

A zoo model ``NAME`` is two files in ``robustlab/zoo/``: ``NAME.safetensors`` (the weights) and
``NAME.json``, the checkpoint's sidecar (:func:`robustlab.models.save`) whose ``card`` entry is
the model card: the leaderboard row and recipe it was trained by, the training config, the
commit, the budget (epochs, inner steps, training images; whether it is converged), which
checkpoint of the run it is, and its clean / ``standard`` / ``fast`` accuracy with the number
of test points and the tolerance a re-evaluation must meet, the suites' flags, the weights'
SHA-256 and the date. The cards are written by ``benchmarks/leaderboard.py --export-zoo``,
from the same evaluations as the leaderboard's rows.

>>> from robustlab import models
>>> models.zoo_names()  # doctest: +SKIP
['fmnist-free-at-smallcnn', 'fmnist-mart-smallcnn', 'fmnist-natural-smallcnn', ...]
>>> model = models.pretrained("fmnist-pgd-at-smallcnn")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.models.checkpoint import load

__all__ = ["ZOO_DIR", "card", "cards", "pretrained", "zoo_names"]

#: where the shipped zoo lives (package data of robustlab)
ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def _folder(zoo: str | Path | None) -> Path:
    return ZOO_DIR if zoo is None else Path(zoo)


def _sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar ``path`` if it is a zoo model's (a JSON object with a ``card``), else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("card"), dict) else None


def zoo_names(zoo: str | Path | None = None) -> list[str]:
    """The names of the zoo's models, sorted (a name counts once its card and weights file are
    both there). ``zoo``: another zoo folder (default: the one shipped in the package)."""
    folder = _folder(zoo)
    if not folder.is_dir():
        return []
    return sorted(
        p.stem
        for p in folder.glob("*.json")
        if _sidecar(p) is not None and p.with_suffix(".safetensors").is_file()
    )


def _unknown(name: str, zoo: str | Path | None) -> ValueError:
    names = zoo_names(zoo)
    held = ", ".join(names) if names else "no models (the zoo folder is empty or missing)"
    return ValueError(
        f"no pretrained model {name!r}; the zoo ({_folder(zoo)}) holds: {held}. "
        "`robustlab list zoo` prints each with its card's accuracies"
    )


def card(name: str, zoo: str | Path | None = None) -> dict[str, Any]:
    """The model card of zoo model ``name`` (see the module docstring for its fields); a
    ``ValueError`` naming the available models for an unknown name."""
    doc = _sidecar(_folder(zoo) / f"{name}.json") if name in zoo_names(zoo) else None
    if doc is None:
        raise _unknown(name, zoo)
    return dict(doc["card"])


def cards(zoo: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every zoo model's card, by name."""
    return {name: card(name, zoo) for name in zoo_names(zoo)}


def pretrained(
    name: str, device: str | torch.device | None = None, *, zoo: str | Path | None = None
) -> nn.Module:
    """The zoo model ``name`` in eval mode, its sidecar (with the card) in ``robustlab_meta``.

    Only safetensors are read; the weights file's SHA-256 must equal the card's (and the
    sidecar's, which :func:`robustlab.models.load` checks with the architecture).

    Raises:
        ValueError: an unknown name (the message lists the zoo's models); a weights file
            whose SHA-256 is not the card's (a modified or truncated file: reinstall
            robustlab, or export the zoo again).
    """
    info = card(name, zoo)
    path = _folder(zoo) / f"{name}.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != info.get("sha256"):
        raise ValueError(
            f"zoo model {name!r}: SHA-256 of {path} is {digest} but its card records "
            f"{info.get('sha256')}; the file was modified or truncated: reinstall robustlab "
            "(or run benchmarks/leaderboard.py --export-zoo again)"
        )
    return load(path, device)

"""Start a model from the weights of a saved checkpoint (fine-tuning), e.g. a noise-injection
model (``noise="cni-w"``) from a plain adversarially trained one.

Recipes ask for it with ``[model] init = "runs/pgd_at/model.safetensors"``; the trainer loads
the weights once, before the first epoch of a fresh run (never on resume, whose own checkpoint
holds the weights).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from robustlab._modes import attached
from robustlab.models.checkpoint import load
from robustlab.models.noise import noise_parameter_names

__all__ = ["init_weights"]

_NOISE_ARGS = ("noise", "noise_options")


def _listed(label: str, items: list[str]) -> str:
    return f"{label} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}"


def init_weights(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Copy the weights of the checkpoint ``path`` into ``model``, in place.

    The checkpoint is read with :func:`robustlab.models.load` (safetensors plus its JSON sidecar,
    SHA-256 checked, never unpickled). Every state-dict entry of ``model`` must come from the
    checkpoint with the same shape, except the noise parameters of a noise-injection model
    (PNI ``alpha``, CNI ``noise_diag`` / ``noise_factor``, see
    :func:`robustlab.models.noise.noise_parameter_names`), which keep their initial values when
    the checkpoint lacks them. A checkpoint whose recorded architecture differs from the
    model's in anything but its noise (e.g. another activation or normalisation) loads with a
    warning, since equal keys and shapes cannot tell such models apart.

    Args:
        model: the model to fill, on any device (the weights are copied onto it).
        path: a ``.safetensors`` checkpoint written by :func:`robustlab.models.save`; a relative
            path resolves against the current directory.

    Returns:
        The state-dict keys left at their initial values (noise parameters only), sorted.

    Raises:
        FileNotFoundError: the checkpoint or its sidecar is missing.
        ValueError: the file is not a valid robustlab checkpoint, or the weights do not fit the
            model: keys the model lacks, keys other than noise parameters that the checkpoint
            lacks, or shape mismatches (all named).
    """
    path = Path(path)
    source = load(path)
    state = source.state_dict()
    expected = model.state_dict()
    noise = set(noise_parameter_names(model))
    missing = [k for k in expected if k not in state]
    left = sorted(k for k in missing if k in noise)
    bad_missing = [k for k in missing if k not in noise]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if bad_missing or unexpected or shapes:
        parts = [
            _listed(label, items)
            for label, items in (
                ("keys the checkpoint lacks", bad_missing),
                ("keys the model lacks", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise ValueError(
            f"cannot initialise the model from {str(path)!r} (architecture "
            f"{attached(source, 'robustlab_arch')}): " + "; ".join(parts) + ". Build the "
            "model with the checkpoint's architecture; only noise parameters may "
            "be missing from it"
        )
    arch = getattr(model, "robustlab_arch", None)
    if arch is not None and _without_noise(arch) != _without_noise(
        attached(source, "robustlab_arch")
    ):
        warnings.warn(
            f"initialising {arch} from {str(path)!r}, saved as architecture "
            f"{attached(source, 'robustlab_arch')}: the weights fit, but the models differ",
            stacklevel=2,
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return left


def _without_noise(arch: dict) -> dict:
    kwargs = {k: v for k, v in arch.get("kwargs", {}).items() if k not in _NOISE_ARGS}
    return {"name": arch.get("name"), "kwargs": kwargs}

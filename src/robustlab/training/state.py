"""The resumable training state: one safetensors file holding the model's weights, the
optimiser's tensors, the RNG states and (in the header) everything else as JSON.

A single file, replaced atomically, so a crash at any moment leaves either the previous
epoch's state or the new one, never a mix. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustlab._io import atomic_path

_MODEL, _OPTIM, _RNG, _EXTRA = "model.", "optim.", "rng.", "extra."


def save_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model`` + ``optimizer`` + RNG states + JSON-able ``info`` (+ ``extra`` tensors,
    e.g. an objective's carried state) atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {
        _MODEL + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    for k, v in (extra or {}).items():
        tensors[_EXTRA + k] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{idx}.{name}"] = value.detach().cpu().contiguous()
            elif value is not None:
                scalars.setdefault(str(idx), {})[name] = value
    tensors[_RNG + "cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG}cuda{i}"] = s
    header = {"param_groups": opt["param_groups"], "optim_scalars": scalars, "info": info}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"robustlab_train_state": json.dumps(header)})


def load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore what :func:`save_state` wrote into ``model`` and ``optimizer``, set the global
    RNG states back, and return the ``info`` dict and the ``extra`` tensors (on the model's
    device)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["robustlab_train_state"])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(
            f"cannot resume: {path} is not a valid robustlab training state ({e}); "
            "delete it to start over, or point --out at another directory"
        ) from None
    device = next(iter(model.parameters())).device
    weights = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"cannot resume: the model does not match {path}: {e}") from None
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(_OPTIM):
            idx, name = k[len(_OPTIM):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
    for idx, sc in header["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    torch.set_rng_state(tensors[_RNG + "cpu"])
    cuda = sorted(k for k in tensors if k.startswith(_RNG + "cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    extra = {k[len(_EXTRA):]: v.to(device) for k, v in tensors.items() if k.startswith(_EXTRA)}
    return header["info"], extra


def resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 objective: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Load the training state at ``path`` into ``model``, ``optimizer`` and ``objective``
    (its carried tensors, saved as ``objective.*`` extras) after checking that the saved
    settings equal ``config`` (``epochs`` aside: a run may be extended); returns the saved
    ``info`` (``epoch``, ``history``, ``stopped``)."""
    if not path.exists():
        raise FileNotFoundError(
            f"cannot resume: no {path.name} in {path.parent}; start without --resume")
    info, extra = load_state(path, model, optimizer)
    saved = {k: v for k, v in info["config"].items() if k != "epochs"}
    now = {k: v for k, v in config.items() if k != "epochs"}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"cannot resume: settings differ from the saved run in {diff}")
    objective.load_state_dict(
        {k[len("objective."):]: v for k, v in extra.items() if k.startswith("objective.")})
    return info

"""The resumable training state: one safetensors file holding the model's weights, the
optimiser's tensors, the RNG states and (in the header) everything else as JSON.

A single file, replaced atomically, so a crash at any moment leaves either the previous
epoch's state or the new one, never a mix. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from robustlab._io import atomic_path, atomic_write
from robustlab.models import save

_MODEL, _OPTIM, _RNG, _EXTRA = "model.", "optim.", "rng.", "extra."
_KEY = "robustlab_train_state"


def save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
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
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})


def load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore what :func:`save_state` wrote into ``model`` and ``optimizer``, set the global
    RNG states back, and return the ``info`` dict and the ``extra`` tensors (on the model's
    device)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()[_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(
            f"cannot resume: {path} is not a valid robustlab training state ({e}); "
            "delete it to start over, or point --out at another directory"
        ) from None
    device = next(iter(model.parameters())).device
    weights = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"cannot resume: the model does not match {path}: {e}") from None
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(_OPTIM):
            idx, name = k[len(_OPTIM) :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
    for idx, sc in header["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    torch.set_rng_state(tensors[_RNG + "cpu"])
    cuda = sorted(k for k in tensors if k.startswith(_RNG + "cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    extra = {k[len(_EXTRA) :]: v.to(device) for k, v in tensors.items() if k.startswith(_EXTRA)}
    return header["info"], extra


def resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Any,
    config: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the training state at ``path`` into ``model``, ``optimizer`` and ``objective``
    (its carried tensors, saved as ``objective.*`` extras) after checking that the saved
    settings equal ``config`` (``epochs`` aside: a run may be extended; a setting the saved
    run predates counts as its value in ``defaults``); returns the saved ``info``
    (``epoch``, ``history``, ``stopped``) and the other extra tensors (e.g. ``average.*``)."""
    if not path.exists():
        raise FileNotFoundError(
            f"cannot resume: no {path.name} in {path.parent}; start without --resume"
        )
    info, extra = load_state(path, model, optimizer)
    saved = {k: v for k, v in {**(defaults or {}), **info["config"]}.items() if k != "epochs"}
    now = {k: v for k, v in config.items() if k != "epochs"}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"cannot resume: settings differ from the saved run in {diff}")
    objective.load_state_dict(
        {k[len("objective.") :]: v for k, v in extra.items() if k.startswith("objective.")}
    )
    return info, {k: v for k, v in extra.items() if not k.startswith("objective.")}


class RunFiles(NamedTuple):
    """The files of a small training run (a denoiser, an autoencoder) in its folder: the
    weights checkpoint, the JSON-lines log and the resumable state; ``what`` names the run in
    errors."""

    weights: str
    log: str
    state: str
    what: str

    def resume(
        self,
        outdir: Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        config: dict[str, Any],
        epochs: int,
    ) -> list[dict[str, Any]]:
        """The history of the run saved in ``outdir`` (empty if none), with its weights,
        optimiser and generator states loaded; ValueError unless it has the same settings
        and at most ``epochs`` epochs (checked before anything is loaded into ``model``)."""
        path = None if outdir is None else outdir / self.state
        if path is None or not path.exists():
            return []
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()[_KEY])["info"]
            saved, start = info["config"], int(info["epoch"])
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"cannot resume: {path} is not {self.what} training state ({e!r}); "
                "delete it to start over, or use another out"
            ) from None
        diff = sorted(k for k in config if saved.get(k) != config[k])
        if diff:
            raise ValueError(
                f"cannot resume from {outdir}: settings differ from the saved run "
                f"in {diff}; use another out directory"
            )
        if start > epochs:
            raise ValueError(
                f"{outdir} already holds {start} epochs, more than "
                f"epochs={epochs}; pass epochs >= {start}"
            )
        info, extra = load_state(path, model, optimizer)
        generator.set_state(extra["generator"].cpu())
        return list(info["history"])

    def save(
        self,
        outdir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        config: dict[str, Any],
        history: list[dict[str, Any]],
        meta: dict[str, Any],
    ) -> None:
        """Weights (with ``meta`` and the epoch in the checkpoint's sidecar) and log first,
        then the state: a crash between the two resumes from the previous epoch and rewrites
        both identically."""
        epoch = history[-1]["epoch"]
        save(model, outdir / self.weights, meta={**meta, "epoch": epoch})
        atomic_write(outdir / self.log, "".join(json.dumps(r) + "\n" for r in history))
        save_state(
            outdir / self.state,
            model,
            optimizer,
            {"epoch": epoch, "config": config, "history": history},
            extra={"generator": generator.get_state()},
        )

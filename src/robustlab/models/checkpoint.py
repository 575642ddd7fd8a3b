"""Safe checkpoints: weights as safetensors plus a JSON sidecar. Nothing is ever unpickled.

A checkpoint ``model.safetensors`` holds the state dict (raw tensors, no code); its sidecar
``model.json`` says how to rebuild the architecture, what the model was trained on, with
which package versions, the SHA-256 of the weights file (``sha256``: the same weights always
give the same file and so the same hash) and the SHA-256 of what defines the model, the
architecture with its options and the weights (``model_sha256``, :func:`model_digest`), so
that an edited sidecar is caught on load as an edited weights file is.

A model built by :func:`robustlab.models.from_spec` (the user's own class) is saved the same
way, its architecture being the spec, its options and the normalisation, and its weights the
user's model's own state dict; loading it imports the user's code, so :func:`load` asks for
``trust_code=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import save as safetensors_to_bytes
from torch import nn

from robustlab._io import atomic_write
from robustlab._modes import attach
from robustlab._provenance import git_commit, package_version
from robustlab.models.convert import _cpu_tensors, _is_safetensors, mismatches
from robustlab.models.factory import create
from robustlab.models.spec import from_architecture, spec_architecture

__all__ = ["FORMAT_VERSION", "load", "model_digest", "save"]

FORMAT_VERSION = 1
RESERVED = (
    "format_version",
    "architecture",
    "robustlab_version",
    "torch_version",
    "git_commit",
    "created",
    "sha256",
    "model_sha256",
    "weights_source",
)
_HOW = "robustlab checkpoints are written by robustlab.models.save(model, 'name.safetensors')"


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(orig := getattr(model, "_orig_mod", None), nn.Module):
            model = orig
        else:
            return model


def _check_state(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], arch: dict[str, Any]
) -> None:
    """ValueError listing missing, unexpected and mis-shaped keys, if any."""
    problems = mismatches(expected, state)
    if problems:
        raise ValueError(
            f"weights do not match architecture {arch['name']!r} with "
            f"{arch['kwargs']}: " + "; ".join(problems)
        )


def model_digest(arch: dict[str, Any], weights_sha256: str) -> str:
    """SHA-256 of what defines a model: its architecture (name and options, as canonical JSON
    with sorted keys) and the SHA-256 of its weights file."""
    canonical = json.dumps(
        {"architecture": arch, "weights_sha256": weights_sha256},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _build(arch: Any) -> nn.Module:
    if not (
        isinstance(arch, dict)
        and isinstance(arch.get("name"), str)
        and isinstance(arch.get("kwargs"), dict)
    ):
        # ValueError, not TypeError: a malformed sidecar is bad data, like a corrupt file
        raise ValueError(  # noqa: TRY004
            f"architecture must be {{'name': str, 'kwargs': dict}}, got {arch!r}"
        )
    try:  # an unknown name: ValueError listing the registered architectures
        return create(arch["name"], **arch["kwargs"])
    except TypeError as err:
        raise ValueError(f"cannot rebuild architecture {arch!r}: {err}") from err


def _recipe(
    model: nn.Module, arch: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The architecture to record and the state dict to store, checked against each other."""
    arch = arch if arch is not None else getattr(model, "robustlab_arch", None)
    spec = spec_architecture(model) if arch is None else None
    if spec is not None:  # the user's model: its own state dict, nothing to rebuild
        arch, inner = spec
        return arch, _cpu_tensors(inner.state_dict())
    if arch is None:
        raise ValueError(
            "this model has no recorded architecture: build it with "
            "robustlab.models.create(name, ...) or robustlab.models.from_spec("
            "'file.py:NAME', ...), or pass arch={'name': ..., 'kwargs': {...}} "
            "to save()"
        )
    with torch.device("meta"):  # shapes only, no memory
        reference = _build(arch).state_dict()
    state = _cpu_tensors(model.state_dict())
    _check_state(reference, state, arch)
    return arch, state


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
    *,
    arch: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and a JSON sidecar next to it.

    The sidecar ``path.with_suffix(".json")`` holds ``format_version``, ``architecture``
    (``model.robustlab_arch`` as recorded by :func:`robustlab.models.create`, or ``arch``;
    for a model built by :func:`robustlab.models.from_spec`, ``{"spec", "options",
    "normalize", "code_sha256"}`` with the ``.py`` file's absolute path, and then
    ``weights_source``, the path and SHA-256 of the weights it was built with, if any),
    every key of ``meta`` (e.g. dataset, threat, objective, epoch, seed), ``robustlab_version``,
    ``torch_version``, ``git_commit``, ``created`` (UTC, ISO 8601), the ``sha256`` of the
    weights file (the same weights give the same bytes) and ``model_sha256``
    (:func:`model_digest` of the architecture and that hash). A ``from_spec`` model's weights
    file is its own model's state dict (inside any normalisation), loadable with
    ``from_spec(spec, weights=path)``. Each file is replaced atomically (temporary file +
    ``os.replace``); a crash between the two leaves a SHA-256 mismatch that :func:`load`
    reports. Parent directories are created. DataParallel/DDP/compiled wrappers are unwrapped.

    Returns:
        The path of the weights file.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``; the model has no recorded
            architecture; its weights do not match that architecture; ``meta`` uses a
            reserved key.
        TypeError: a ``meta`` value, or an option of a ``from_spec`` model, is not
            JSON-serialisable (the message names the key).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    model = _unwrap(model)
    arch, state = _recipe(model, arch)
    sidecar: dict[str, Any] = {"format_version": FORMAT_VERSION, "architecture": arch}
    source = getattr(model, "robustlab_spec", None) if "spec" in arch else None
    if source is not None and source.get("weights") is not None:
        sidecar["weights_source"] = {"path": source["weights"], "sha256": source["weights_sha256"]}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or key in RESERVED:
            raise ValueError(f"meta key {key!r} is not allowed; reserved keys are {RESERVED}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"meta[{key!r}] is not JSON-serialisable ({err}); convert it to "
                "dicts, lists, strings and finite numbers first"
            ) from err
        sidecar[key] = value
    # one metadata key: safetensors writes a map of several in varying order, and the same
    # weights must always give the same bytes (and hash)
    data = safetensors_to_bytes(state, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    sidecar.update(
        robustlab_version=package_version(),
        torch_version=torch.__version__,
        git_commit=git_commit(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        sha256=digest,
        model_sha256=model_digest(arch, digest),
    )
    atomic_write(path, data)
    atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return path


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The weights file's bytes (refused if a pickle) and its sidecar, parsed and checked."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found; {_HOW}")
    data = path.read_bytes()
    if not _is_safetensors(data) and data.startswith((b"PK\x03\x04", b"\x80")):
        raise ValueError(
            f"{str(path)!r} is a pickle (torch.save output), which robustlab never unpickles "
            "because unpickling runs arbitrary code. Convert a state dict saved with "
            "torch.save once, with PyTorch's restricted loader (weights_only=True): "
            "robustlab convert-weights IN.pt OUT.safetensors [--key "
            "state_dict] (Python: robustlab.models.convert_weights), then build the model "
            "with robustlab.models.from_spec('net.py:Net', weights='OUT.safetensors') and "
            "save it with robustlab.models.save(model, 'model.safetensors')"
        )
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    side = path.with_suffix(".json")
    if not side.is_file():
        raise FileNotFoundError(
            f"sidecar {str(side)!r} of checkpoint {str(path)!r} not "
            f"found; {_HOW}, which writes both files"
        )
    try:
        sidecar = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"sidecar {str(side)!r} is not valid JSON: {err}") from err
    if not isinstance(sidecar, dict) or "sha256" not in sidecar or "architecture" not in sidecar:
        raise ValueError(f"sidecar {str(side)!r} lacks 'sha256' or 'architecture'; {_HOW}")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format {version!r}; this robustlab "
            f"reads formats 1 to {FORMAT_VERSION} (a newer one needs an upgrade)"
        )
    return data, sidecar


def _check_digest(path: Path, sidecar: dict[str, Any], digest: str) -> None:
    """The model the sidecar describes is the one its ``model_sha256`` was recorded for
    (absent in older checkpoints)."""
    recorded = sidecar.get("model_sha256")
    if recorded is not None and recorded != model_digest(sidecar["architecture"], digest):
        raise ValueError(
            f"the sidecar {str(path.with_suffix('.json'))!r} does not describe "
            "the model its model_sha256 was recorded for: its architecture or "
            "options were edited after saving. Restore the sidecar, or rebuild "
            "the model and save it anew"
        )


def load(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    *,
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild the architecture recorded in the sidecar and load the weights from ``path``.

    The weights file is read once; its SHA-256 must equal the sidecar's, the sidecar's
    architecture must be the one its ``model_sha256`` was recorded for (an edited sidecar is
    refused), and the weights' keys and shapes must match the architecture exactly. Files
    written by ``torch.save`` (pickles) are refused before any byte of them is interpreted.
    A model saved from :func:`robustlab.models.from_spec` is rebuilt by importing its
    ``.py`` file or module, which runs that code: it loads only with ``trust_code=True``
    (after the checks above), and warns if the ``.py`` file changed since saving.

    Args:
        path: a ``.safetensors`` file written by :func:`save`; its sidecar is
            ``path.with_suffix(".json")``.
        device: where to put the model (default: CPU).
        trust_code: allow importing the user's code that a ``from_spec`` checkpoint names
            (command line: ``--trust-code``); robustlab's own models never need it.

    Returns:
        The model in ``eval()`` mode, with ``model.robustlab_meta`` = the sidecar contents
        and ``model.robustlab_arch`` = the architecture (``model.robustlab_spec``, see
        :func:`robustlab.models.from_spec`, for a ``from_spec`` model).

    Raises:
        FileNotFoundError: the weights file or its sidecar is missing (or the ``.py`` file
            of a ``from_spec`` checkpoint).
        ValueError: a pickle file; a corrupt or truncated file; a SHA-256 mismatch of the
            weights or of the model (an edited architecture in the sidecar); an unknown
            architecture; weights that do not match the architecture; a ``from_spec``
            checkpoint without ``trust_code=True``.
    """
    path = Path(path)
    data, sidecar = _read(path)
    try:
        state = safetensors_from_bytes(data)  # safetensors: no pickle
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file (corrupt or truncated?): {err}"
        ) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar["sha256"]:
        raise ValueError(
            f"SHA-256 of {str(path)!r} is {digest} but its sidecar records "
            f"{sidecar['sha256']}: the weights were modified or belong to another "
            "checkpoint"
        )
    arch = sidecar["architecture"]
    if isinstance(arch, dict) and "spec" in arch:  # the user's own model class
        _check_digest(path, sidecar, digest)
        if not trust_code:
            raise ValueError(
                f"{str(path)!r} holds a model built from user code ({arch['spec']!r}); "
                "rebuilding it imports that code and so runs it. If you trust it, load with "
                "robustlab.models.load(path, trust_code=True) (command line: --trust-code)"
            )
        model = from_architecture(arch, state, path, digest)
    else:
        with torch.device("meta"):  # shapes first, no memory: a sidecar cannot make us allocate
            reference = _build(arch).state_dict()
        _check_state(reference, state, arch)
        # after the checks above, which name what is wrong with an architecture that cannot
        # be; this one catches a valid one that is not the saved one
        _check_digest(path, sidecar, digest)
        model = _build(arch)
        model.load_state_dict(state)
    if device is not None:
        model.to(device)
    attach(model, "robustlab_meta", sidecar)
    return model.eval()

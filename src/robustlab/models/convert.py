"""State dicts in files: reading a safetensors weights file with checks, and the one-time
conversion of a PyTorch ``.pt`` state dict from another code base into one.

robustlab never unpickles on a normal code path: :func:`read_weights` refuses any file that is
not safetensors without interpreting it; :func:`convert_weights` is the one place a ``.pt`` is
read, through PyTorch's restricted unpickler (``torch.load(..., weights_only=True)``), which
rebuilds tensors and plain containers only and never calls the code a pickle names.
:func:`robustlab.models.from_spec` (:mod:`robustlab.models.spec`) loads the result into a model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import save as safetensors_to_bytes

from robustlab._io import atomic_write
from robustlab._provenance import package_version

__all__ = ["STATE_KEYS", "convert_weights", "mismatches", "read_weights", "strip_module_prefix"]

# where code bases nest their state dict in a checkpoint, tried in this order
STATE_KEYS = ("state_dict", "model", "net", "ema", "model_state_dict")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
PREFIX = "module."  # what DataParallel / DistributedDataParallel put before every key
LIMIT = 10  # names listed per kind of mismatch


def _is_safetensors(data: bytes) -> bool:
    """Whether ``data`` starts like a safetensors file: an 8-byte little-endian header size
    that fits the file, then a JSON object. (Its first byte is the size's lowest byte, which
    can be 0x80, the first byte of a pickle, so that alone tells nothing.)"""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies safetensors can write; tensors sharing storage with an
    earlier one (tied weights) are cloned, since safetensors refuses shared memory."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def strip_module_prefix(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``state`` without the ``module.`` prefix of DataParallel / DDP, removed (repeatedly)
    only while every key has it, and the prefixes removed (``[]``: none)."""
    stripped: list[str] = []
    while state and all(k.startswith(PREFIX) and len(k) > len(PREFIX) for k in state):
        state = {k[len(PREFIX) :]: v for k, v in state.items()}
        stripped.append(PREFIX)
    return state, stripped


def _listed(label: str, items: list[str]) -> str:
    more = f" and {len(items) - LIMIT} more" if len(items) > LIMIT else ""
    return f"{label} ({len(items)}): {items[:LIMIT]}{more}"


def mismatches(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into a model whose state dict is
    ``expected``: one line each for missing keys, unexpected keys and shape mismatches
    (weights vs model), each listing at most 10 names and the count; ``[]`` if it loads."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return [
        _listed(label, items)
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (weights vs model)", shapes),
        )
        if items
    ]


def _refusal(path: Path, what: str) -> str:
    out = str(
        path.with_suffix(
            ".converted.safetensors" if path.suffix == ".safetensors" else ".safetensors"
        )
    )
    return (
        f"{str(path)!r} is {what}, not a safetensors file; robustlab never unpickles "
        "weights on a normal code path, since unpickling runs whatever code the file "
        "names. Convert it once with PyTorch's restricted loader: robustlab "
        f"convert-weights {path} {out} [--key state_dict] (Python: "
        f"robustlab.models.convert_weights({str(path)!r}, {out!r})), then pass the "
        ".safetensors file"
    )


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the safetensors file ``path`` (on the CPU) and the file's SHA-256.

    A file named like a pickle (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ...) is refused
    unread; any other file is refused unless its header is a safetensors header, so no byte
    of a pickle is ever interpreted. Both refusals name the one-time conversion
    ``robustlab convert-weights IN.pt OUT.safetensors [--key state_dict]``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file (with the conversion), or a corrupt one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(_refusal(path, f"a {path.suffix} file (PyTorch pickle)"))
    data = path.read_bytes()
    if not _is_safetensors(data):
        raise ValueError(_refusal(path, "not safetensors (a pickle, or no weights file at all)"))
    try:
        state = safetensors_from_bytes(data)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file (corrupt or truncated?): {err}"
        ) from err
    return state, hashlib.sha256(data).hexdigest()


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _describe(obj: dict) -> str:
    return ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:20]) + (
        f" and {len(obj) - 20} more" if len(obj) > 20 else ""
    )


def _find_state(obj: Any, key: str | None, src: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in ``obj`` and the key it was under (None: ``obj`` itself)."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            where = (
                f"its top-level keys are {_describe(obj)}"
                if isinstance(obj, dict)
                else f"it holds a {type(obj).__name__}, not a dict"
            )
            raise ValueError(f"key {key!r} is not in {str(src)!r}: {where}")
        state, used = obj[key], key
    elif _is_tensor_dict(obj):
        state, used = obj, None
    elif isinstance(obj, dict):
        used = next((k for k in STATE_KEYS if _is_tensor_dict(obj.get(k))), None)
        if used is None:
            raise ValueError(
                f"{str(src)!r} holds no state dict (str -> Tensor) at the top level nor under "
                f"any of {list(STATE_KEYS)}; its top-level keys are {_describe(obj)}. Name the "
                "one holding the weights with --key KEY (Python: key='KEY')"
            )
        state = obj[used]
    else:
        raise ValueError(
            f"{str(src)!r} holds a {type(obj).__name__}, not a state dict (a dict "
            "of str -> Tensor); save model.state_dict(), not the model"
        )
    if not _is_tensor_dict(state):
        bad = (
            {
                k: v
                for k, v in state.items()
                if not (isinstance(k, str) and isinstance(v, torch.Tensor))
            }
            if isinstance(state, dict)
            else None
        )
        what = (
            f"entries that are not str -> Tensor: {_describe(bad)}"
            if bad
            else f"a {type(state).__name__}"
            if not isinstance(state, dict)
            else "no entries"
        )
        raise ValueError(
            f"{str(src)!r}{f' [{key!r}]' if key else ''} is not a state dict of "
            f"str -> Tensor: it holds {what}. Pass --key KEY naming the state dict"
        )
    return state, used


def _reason(err: Exception) -> str:
    """The line of a refusal by ``torch.load`` that says what it refused (e.g. "Unsupported
    global: GLOBAL io.open ..."), without its advice to load unrestricted."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    line = (
        found.group(1).split(". ")[0].rstrip(".")
        if found
        else (text.strip().splitlines() or [""])[0]
    )
    return f"{type(err).__name__}: {line}"[:300]


def convert_weights(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, key: str | None = None
) -> dict[str, Any]:
    """Convert the PyTorch state dict in ``src`` (``.pt``/``.pth``/``.bin``/``.ckpt``) into
    the safetensors file ``dst``, once, so that :func:`robustlab.models.from_spec` can load it
    without unpickling.

    ``src`` is read with ``torch.load(src, map_location="cpu", weights_only=True)``,
    PyTorch's restricted unpickler: a file it refuses (a pickle naming code to run, a
    checkpoint holding arbitrary objects) is refused here too, never loaded unrestricted. The
    state dict is ``src``'s object itself if it is a dict of tensors, else the entry ``key``,
    else the first of ``state_dict``, ``model``, ``net``, ``ema``, ``model_state_dict`` that is
    a dict of tensors. A ``module.`` prefix (DataParallel / DDP) on every key is removed.
    ``dst`` gets detached contiguous CPU tensors (tensors sharing storage are cloned), and the
    JSON sidecar ``dst + ".json"`` (``OUT.safetensors.json``, so never mistaken for the sidecar
    of a robustlab checkpoint) the returned record; both are replaced atomically.

    Args:
        src: the PyTorch file.
        dst: the safetensors file to write (ends in ``.safetensors``; parents are created).
        key: the top-level entry holding the state dict, when not found on its own.

    Returns:
        The record written to the sidecar: ``source`` (absolute path), ``source_sha256``,
        ``key`` (None: the whole object), ``tensors`` (count), ``prefixes_stripped`` (e.g.
        ``["module."]``), ``output``, ``sha256`` (of ``dst``), ``robustlab_version``,
        ``torch_version``, ``created`` (UTC, ISO 8601).

    Raises:
        FileNotFoundError: ``src`` is missing.
        ValueError: ``dst`` does not end in ``.safetensors`` or is ``src``; ``src`` is already
            safetensors; the restricted loader refuses ``src``; no state dict found (the
            message lists the top-level keys and suggests ``key``); not a str -> Tensor dict.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"source weights {str(src)!r} not found")
    if dst.suffix != ".safetensors" or dst.resolve() == src.resolve():
        raise ValueError(f"the output must be a new file ending in .safetensors, got {str(dst)!r}")
    data = src.read_bytes()
    if _is_safetensors(data):
        raise ValueError(
            f"{str(src)!r} is already a safetensors file: pass it as the weights "
            "directly (a 'module.' prefix is stripped on loading)"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...: all refused
        raise ValueError(
            f"{str(src)!r} cannot be read by PyTorch's restricted loader "
            f"(torch.load(..., weights_only=True)): {_reason(err)}. It holds more than "
            "tensors and "
            "plain containers (objects whose unpickling runs code), or is not a PyTorch file; "
            "robustlab never loads such a file unrestricted. If you trust it, extract the "
            "state dict yourself and torch.save(state_dict, 'clean.pt') it, then convert "
            "that"
        ) from err
    state, used = _find_state(obj, key, src)
    state, stripped = strip_module_prefix(state)
    try:
        out = safetensors_to_bytes(_cpu_tensors(state), metadata={"format": "pt"})
    except (safetensors.SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"cannot write the tensors of {str(src)!r} as safetensors "
            f"(sparse or quantized tensors?): {err}"
        ) from err
    record = {
        "source": str(src.resolve()),
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "key": used,
        "tensors": len(state),
        "prefixes_stripped": stripped,
        "output": str(dst.resolve()),
        "sha256": hashlib.sha256(out).hexdigest(),
        "robustlab_version": package_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write(dst, out)
    atomic_write(dst.with_name(dst.name + ".json"), json.dumps(record, indent=2) + "\n")
    return record

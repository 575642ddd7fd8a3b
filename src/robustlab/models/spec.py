"""Any classifier as a robustlab model: :func:`from_spec` builds ``NAME`` from a ``.py`` file
or an importable module, loads safetensors weights into it, and puts a normalisation in
front, recording all of it so that :func:`robustlab.models.save` can store the recipe.

:func:`check_model_fits` tries a model on two examples of the data before any attack runs.
Weights files are read by :mod:`robustlab.models.convert`; checkpoints of such models are
written and read by :mod:`robustlab.models.checkpoint` (reading one imports the user's code,
so it asks for ``trust_code=True``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import attach, attached
from robustlab._validate import check_images, check_logits, number, positive_int
from robustlab.models.convert import mismatches, read_weights, strip_module_prefix
from robustlab.models.layers import Normalized

__all__ = [
    "check_model_fits",
    "from_architecture",
    "from_spec",
    "parse_normalize",
    "spec_architecture",
    "spec_provenance",
]

FORMAT = "'path/to/file.py:NAME' or 'package.module:NAME'"
EXAMPLE = "'0.4914,0.4822,0.4465/0.2471,0.2435,0.2616'"
Normalization = str | tuple[Sequence[float], Sequence[float]] | None


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    """``"m1,m2,m3/s1,s2,s3"`` as ``([m1, m2, m3], [s1, s2, s3])``: per-channel mean and std
    in [0, 1] pixel units (a single value applies to every channel).

    Raises:
        ValueError: not ``MEAN/STD``; a value that is not a number; a mean outside [0, 1]
            (statistics in 0-255 units: divide by 255); a std that is not > 0; a mean and a
            std of different lengths (other than one value for every channel).
    """
    if not isinstance(text, str) or text.count("/") != 1:
        raise ValueError(
            f"normalize must be MEAN/STD with comma-separated per-channel values, "
            f"e.g. {EXAMPLE} (one value applies to every channel), got {text!r}"
        )
    halves = []
    for what, part in zip(("mean", "std"), text.split("/"), strict=True):
        values = []
        for item in part.split(","):
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(
                    f"normalize {what} value {item.strip()!r} in {text!r} is not a "
                    f"number; write MEAN/STD as e.g. {EXAMPLE}"
                ) from None
        halves.append(values)
    return _checked(halves[0], halves[1])


def _checked(mean: Any, std: Any) -> tuple[list[float], list[float]]:
    """(mean, std) as lists of floats, finite, mean in [0, 1], std > 0, lengths compatible."""
    out = []
    for what, value in (("mean", mean), ("std", std)):
        if isinstance(value, Tensor):
            items = value.detach().flatten().tolist()
        elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            items = list(value)
        else:
            items = [value]
        if not items:
            raise ValueError(
                f"normalize {what} is empty; give one value per channel or one for all"
            )
        try:
            out.append(
                [
                    number(
                        v,
                        f"normalize {what}",
                        low=0,
                        high=1 if what == "mean" else None,
                        low_open=what == "std",
                    )
                    for v in items
                ]
            )
        except ValueError as err:
            hint = (
                " (statistics in 0-255 units? divide them by 255)"
                if any(isinstance(v, (int, float)) and v > 1 for v in items)
                else ""
            )
            raise type(err)(
                f"{err}{hint}; normalisation statistics are in [0, 1] pixel units, e.g. {EXAMPLE}"
            ) from None
    mean, std = out
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(
            f"normalize has {len(mean)} means but {len(std)} stds; give one of "
            "each per channel (or one value for every channel)"
        )
    return mean, std


def _normalization(value: Normalization | dict) -> dict[str, list[float]] | None:
    if value is None:
        return None
    if isinstance(value, str):
        mean, std = parse_normalize(value)
    elif isinstance(value, dict) and set(value) == {"mean", "std"}:
        mean, std = _checked(value["mean"], value["std"])
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        mean, std = _checked(*value)
    else:
        raise TypeError(
            f"normalize must be 'MEAN/STD' (e.g. {EXAMPLE}) or a (mean, std) pair, got {value!r}"
        )
    return {"mean": mean, "std": std}


def _import_file(path: Path) -> Any:
    """Import the file ``path`` as a module of its own; its folder is on ``sys.path`` while it
    runs, so it may import the files beside it."""
    name = "robustlab_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(
            f"cannot import {str(path)!r} as Python; the model file must be a .py file"
        )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        err.add_note(f"(raised while importing the model file {str(path)!r})")
        raise
    finally:
        if str(path.parent) in sys.path:
            sys.path.remove(str(path.parent))
    return module


def _candidates(module: Any) -> list[str]:
    """The nn.Module classes and functions ``module`` defines itself."""
    return sorted(
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and getattr(obj, "__module__", None) == module.__name__
        and (inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)))
    )


def _resolve(spec: str) -> tuple[Any, str, str | None]:
    """NAME of ``spec``, the spec with a file's path made absolute, and the file's SHA-256
    (None for a module)."""
    where, _, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not where or not name.isidentifier():
        raise ValueError(
            f"model spec must be {FORMAT} (NAME: an nn.Module class or a function "
            f"returning one), got {spec!r}"
        )
    code_sha256 = None
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"model file {where!r} of spec {spec!r} not found (looked "
                f"for {str(path)!r}); the spec is {FORMAT}"
            )
        code_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        module, where = _import_file(path), str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ValueError(
                f"cannot import module {where!r} of model spec {spec!r} ({err}); "
                f"the spec is {FORMAT}, with a .py path or an importable "
                "module"
            ) from err
    if not hasattr(module, name):
        found = _candidates(module)
        listed = (
            f"it defines {', '.join(found)}"
            if found
            else "it defines no nn.Module class or function"
        )
        raise ValueError(f"{where!r} has no {name!r}; {listed}")
    return getattr(module, name), f"{where}:{name}", code_sha256


def _call(target: Any, spec: str, options: dict[str, Any]) -> nn.Module:
    """``target(**options)``, checked: it takes these options and returns an nn.Module."""
    if not callable(target):
        raise TypeError(
            f"{spec} is a {type(target).__name__}, not an nn.Module class or a "
            "function returning one"
        )
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None  # a builtin without a signature: let the call say what is wrong
    if sig is not None:
        params = sig.parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            takes = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            unknown = sorted(set(options) - takes)
            if unknown:
                raise TypeError(
                    f"{spec} does not take option(s) {unknown}; its parameters are {sig}"
                )
        try:
            sig.bind(**options)
        except TypeError as err:
            raise TypeError(
                f"{spec}{sig}: {err}; pass it as an option (Python: "
                "from_spec(spec, KEY=VALUE); command line: --model-option "
                "KEY=VALUE)"
            ) from err
    model = target(**options)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{spec} returned a {type(model).__name__}, not an nn.Module; NAME must "
            "be an nn.Module class or a function returning one"
        )
    return model


def _load_state(model: nn.Module, state: dict[str, Tensor], where: str, spec: str) -> None:
    """Load ``state`` into ``model`` strictly (after stripping ``module.`` prefixes), or one
    ValueError listing every mismatch and the fix."""
    state, _ = strip_module_prefix(state)
    problems = mismatches(model.state_dict(), state)
    if problems:
        raise ValueError(
            f"the weights {where} do not fit the model {spec}: "
            + "; ".join(problems)
            + ". Build the model with the options it was "
            "trained with (from_spec(..., KEY=VALUE) / --model-option KEY=VALUE), "
            "or convert the right entry of the original file (--key KEY)"
        )
    model.load_state_dict(state)


def from_spec(
    spec: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    normalize: Normalization = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> nn.Module:
    """Build ``NAME(**options)`` from ``spec`` = ``path/to/file.py:NAME`` or
    ``package.module:NAME`` (NAME: an ``nn.Module`` class or a function returning one).

    Importing a file runs its code, as ``python file.py`` would; its folder is on
    ``sys.path`` while it is imported.

    Args:
        spec: where NAME is.
        weights: a safetensors state dict, loaded with strict key matching after a
            ``module.`` prefix (DataParallel / DDP) common to every key is stripped. A ``.pt``
            or any other non-safetensors file is refused unread, with the one-time
            conversion ``robustlab convert-weights IN.pt OUT.safetensors [--key state_dict]``
            (:func:`robustlab.models.convert_weights`).
        normalize: ``"m1,m2,m3/s1,s2,s3"`` (:func:`parse_normalize`) or a ``(mean, std)``
            pair, per channel in [0, 1] pixel units, for a model that expects normalised
            inputs: the result is :class:`robustlab.models.Normalized`, taking [0, 1] pixels.
        device: where to put the model (default: where NAME built it).
        **options: NAME's arguments; JSON-able ones if the model is to be saved.

    Returns:
        The model, in ``eval()`` mode when weights were loaded (else as NAME left it), with
        ``model.robustlab_spec = {"spec", "options", "normalize", "code_sha256", "weights",
        "weights_sha256"}``: the spec (a file's path absolute), the options, ``{"mean",
        "std"}`` or None, the SHA-256 of the ``.py`` file (None for a module), the weights
        file's absolute path and SHA-256 (None without weights).

    Raises:
        ValueError: a spec without ``:``; a module that cannot be imported; no NAME there (the
            message lists its nn.Module classes and functions); weights that are not
            safetensors, or that do not fit (one message listing missing keys, unexpected
            keys and shape mismatches); a bad normalisation.
        FileNotFoundError: the ``.py`` file or the weights file is missing.
        TypeError: options NAME does not take or lacks (its parameters are listed); NAME not
            callable or not returning an nn.Module.
    """
    norm = _normalization(normalize)
    state, weights_sha256 = read_weights(weights) if weights is not None else (None, None)
    target, resolved, code_sha256 = _resolve(spec)
    model = _call(target, resolved, options)
    if state is not None:
        _load_state(model, state, repr(str(weights)), resolved)
        model.eval()
    if norm is not None:
        model = Normalized(model, norm["mean"], norm["std"]).train(model.training)
    if device is not None:
        model.to(device)
    attach(
        model,
        "robustlab_spec",
        {
            "spec": resolved,
            "options": dict(options),
            "normalize": norm,
            "code_sha256": code_sha256,
            "weights": None if weights is None else str(Path(weights).resolve()),
            "weights_sha256": weights_sha256,
        },
    )
    return model


def spec_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """What a result's ``config`` records of a model built by :func:`from_spec`, from its
    ``robustlab_spec`` ``record``: ``name`` (the spec's NAME), ``model`` (the spec),
    ``model_options``, ``normalize``, ``code_sha256``, ``weights`` and ``weights_sha256``;
    the CLI's ``--model`` and :func:`robustlab.benchmark` record the same keys, which the
    leaderboard reads."""
    return {
        "name": record["spec"].rpartition(":")[2],
        "model": record["spec"],
        "model_options": record["options"],
        "normalize": record["normalize"],
        "code_sha256": record["code_sha256"],
        "weights": record["weights"],
        "weights_sha256": record["weights_sha256"],
    }


def spec_architecture(model: nn.Module) -> tuple[dict[str, Any], nn.Module] | None:
    """For a model built by :func:`from_spec`: the architecture a checkpoint records
    (``{"spec", "options", "normalize", "code_sha256"}``) and the module whose state dict it
    stores (the user's model, inside any normalisation); None for any other model.

    Raises:
        TypeError: an option that is not JSON-serialisable (named).
    """
    record = getattr(model, "robustlab_spec", None)
    if not isinstance(record, dict):
        return None
    for key, value in record["options"].items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"option {key!r} = {value!r} of {record['spec']} is not "
                f"JSON-serialisable ({err}), so a checkpoint cannot record it; "
                "build such values inside the model file from JSON-able options"
            ) from err
    arch = {k: record[k] for k in ("spec", "options", "normalize", "code_sha256")}
    return arch, model.model if isinstance(model, Normalized) else model


def from_architecture(
    arch: dict[str, Any], state: dict[str, Tensor], path: Path, sha256: str
) -> nn.Module:
    """The model that a checkpoint's architecture record (:func:`spec_architecture`) describes,
    in ``eval()`` mode, with ``state`` (the weights file ``path``, of SHA-256 ``sha256``)
    loaded strictly. This imports the user's code: the caller asks for trust first. A ``.py``
    file that changed since the checkpoint was written gives a warning."""
    options = arch.get("options")
    if not isinstance(arch.get("spec"), str) or not isinstance(options, dict):
        raise ValueError(
            f"a model spec record must be {{'spec': str, 'options': dict, ...}}, got {arch!r}"
        )
    model = from_spec(arch["spec"], normalize=arch.get("normalize"), **options)
    inner = model.model if isinstance(model, Normalized) else model
    _load_state(inner, state, repr(str(path)), arch["spec"])
    record = attached(model, "robustlab_spec")
    code = record["code_sha256"]
    if arch.get("code_sha256") is not None and code != arch["code_sha256"]:
        warnings.warn(
            f"{arch['spec']} changed since {str(path)!r} was saved (SHA-256 "
            f"{code} vs {arch['code_sha256']}); the weights fit, but the model's "
            "code may differ",
            stacklevel=3,
        )
    record.update(weights=str(path.resolve()), weights_sha256=sha256)
    return model.eval()


def check_model_fits(model: nn.Module, x_example: Tensor, num_classes: int | None) -> int:
    """Run ``model`` once (without gradients, in the mode it is in) on the first two examples
    of ``x_example`` (N, C, H, W) and return its number of classes K, checking that it takes
    that input shape and returns logits (N, K) with K == ``num_classes`` when given.

    Raises:
        ValueError: the model fails on the input (the message gives the shape, dtype and
            device it got and suggests resizing or normalising the data); its output is not
            (N, K), K >= 2, without NaN; K differs from ``num_classes``.
        TypeError: ``x_example`` is not a float tensor; the logits are not floating point.
    """
    check_images(x_example)
    if num_classes is not None:
        positive_int(num_classes, "num_classes", minimum=2)
    x = x_example[:2]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # the user's forward may raise anything
        ref = next(
            (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None
        )
        weights = (
            f"; the model's weights are {ref.dtype} on {ref.device}" if ref is not None else ""
        )
        raise ValueError(
            f"the model refuses inputs of shape {tuple(x.shape)} ({x.dtype} on "
            f"{x.device}{weights}): {type(err).__name__}: {err}. If it was built for another "
            "image size, resize the data (command line: --resize H,W) or build it for this "
            "size (model options); if it expects normalised inputs, add --normalize MEAN/STD "
            "(Python: normalize=...)"
        ) from err
    k = check_logits(out, len(x)).shape[1]
    if num_classes is not None and k != num_classes:
        raise ValueError(
            f"the model returns {k} logits per example but num_classes is "
            f"{num_classes}: build the model for {num_classes} classes (its "
            f"options), or give --num-classes {k} if the data has {k} classes"
        )
    return k

"""``rl.benchmark``: one line from any classifier and any data to a run folder, as
RobustBench's ``benchmark`` is one line: the data read (:mod:`robustlab.data`), the model built
or loaded (:mod:`robustlab.models`), checked against the data, moved to the device, evaluated
(:func:`robustlab.evaluate`), and its provenance recorded in the results' ``config`` so that
``robustlab report`` and ``robustlab compare`` render the run like any other.

This module is named ``benchmarking``, not ``benchmark``: importing a submodule
``robustlab.benchmark`` would replace the function ``rl.benchmark`` on the package.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from robustlab import data as datasets
from robustlab import models
from robustlab._eps import parse_eps
from robustlab._modes import attached, eval_mode
from robustlab._validate import check_labels, integer, positive_int, resolve_device
from robustlab.evaluation import EvalResult, evaluate
from robustlab.evaluation.state import FILENAME as EVAL_STATE
from robustlab.models.spec import spec_provenance
from robustlab.threat import ThreatModel

__all__ = ["benchmark"]

RESULTS = "results.json"
THREAT_FORMAT = "'NORM:EPS' such as 'linf:8/255', 'linf:0.1' or 'l2:0.5'"
# what benchmark() passes to evaluate() itself; every other evaluate() option passes through
_OWN = ("model", "x", "y", "threat", "suite", "seed", "out")


def _threat(threat: Any) -> ThreatModel:
    """A :class:`ThreatModel` as given, or one from ``"NORM:EPS"``."""
    if isinstance(threat, ThreatModel):
        return threat
    if not isinstance(threat, str) or threat.count(":") != 1:
        raise (ValueError if isinstance(threat, str) else TypeError)(
            f"threat must be a robustlab.ThreatModel or {THREAT_FORMAT}, got {threat!r}"
        )
    norm, eps = (part.strip() for part in threat.split(":"))
    return ThreatModel(norm, parse_eps(eps))  # each names what is wrong and the valid values


def _check_options(options: Mapping[str, Any]) -> None:
    """The keyword arguments :func:`benchmark` passes on must be :func:`evaluate`'s."""
    allowed = sorted(set(inspect.signature(evaluate).parameters) - set(_OWN))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"benchmark() got unknown option(s) {unknown}; besides its own "
            f"arguments it passes these on to robustlab.evaluate: {allowed}"
        )


def _check_out(out: Path | None, overwrite: bool) -> None:
    """A finished run in ``out`` is replaced only with ``overwrite`` (an interrupted one, with
    its state file, is continued)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if out is None or overwrite or not (out / RESULTS).exists() or (out / EVAL_STATE).exists():
        return
    raise FileExistsError(
        f"{out} already holds a finished evaluation ({out / RESULTS}); pass "
        "overwrite=True to replace it, or another out="
    )


# --- data -------------------------------------------------------------------------------------
def _data(
    data: Any, n: int | None, split: str, resize: Any
) -> tuple[Tensor, Tensor, list[str] | None, dict[str, Any]]:
    """Images, labels, class names (None where the source names none) and the provenance of
    ``data``: a registered name, a folder, an array file, ``(x, y)`` or an ``Images``."""
    if resize is not None and not (isinstance(data, str | os.PathLike) and Path(data).is_dir()):
        raise ValueError(
            "resize applies to a folder of images only (the registered data sets "
            "and array files have one size); drop resize="
        )
    if isinstance(data, str) and data in datasets.names():
        x, y = datasets.load(data, split=split, n=n)
        classes = list(datasets.info(data).classes)
        return x, y, classes, {"dataset": data, "data": data, "split": split}
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        if path.is_dir():
            images = datasets.from_folder(path, resize=resize, n=n)
        elif path.is_file():
            images = datasets.from_arrays(path, n=n)
        else:
            raise FileNotFoundError(
                f"data {str(data)!r} is neither a registered data set "
                f"({', '.join(datasets.names())}) nor an existing folder (one subfolder per "
                "class) or .npz / .safetensors file"
            )
        source = str(path.resolve())
        return (
            images.x,
            images.y,
            images.classes,
            {
                "dataset": source,
                "data": source,
                "split": None,
                **({"resize": list(resize)} if resize is not None else {}),
            },
        )
    if isinstance(data, datasets.Images):
        images = datasets.from_arrays({"x": data.x, "y": data.y, "classes": data.classes}, n=n)
        return (
            images.x,
            images.y,
            images.classes,
            {"dataset": data.source, "data": data.source, "split": None},
        )
    if isinstance(data, tuple | list) and len(data) == 2:
        images = datasets.from_arrays({"x": data[0], "y": data[1]}, n=n)
        return images.x, images.y, None, {"dataset": "<arrays>", "data": "<arrays>", "split": None}
    raise TypeError(
        f"data must be a registered data set name ({', '.join(datasets.names())}), "
        "a folder, an .npz / .safetensors file, an (x, y) pair or a "
        f"robustlab.data.Images, got {type(data).__name__}"
    )


# --- model ------------------------------------------------------------------------------------
def _state_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's state dict written as safetensors (CPU copies)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return hashlib.sha256(safetensors_bytes(state, metadata={"format": "pt"})).hexdigest()


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for the record: JSON values as they are, others as their ``repr``."""
    out = {}
    for key, value in options.items():
        try:
            json.dumps(value, allow_nan=False)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = repr(value)
    return out


def _normalization(model: nn.Module) -> dict[str, Any] | None:
    """The normalisation a model records or wraps: ``{"mean", "std"}`` per channel, or None."""
    spec = getattr(model, "robustlab_spec", None)
    if isinstance(spec, dict):
        return spec.get("normalize")
    if isinstance(model, models.Normalized):
        return {k: getattr(model.normalize, k).flatten().tolist() for k in ("mean", "std")}
    kwargs = (getattr(model, "robustlab_arch", None) or {}).get("kwargs") or {}
    if kwargs.get("mean") is None and kwargs.get("std") is None:
        return None
    return {"mean": kwargs.get("mean"), "std": kwargs.get("std")}


def _model(
    model: Any, weights: Any, normalize: Any, model_options: Any, trust_code: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """The model and its provenance: an ``nn.Module``, a checkpoint or a spec string."""
    is_spec = (
        isinstance(model, str)
        and not model.endswith(".safetensors")
        and ":" in model
        and model.rpartition(":")[2].isidentifier()
    )
    if not is_spec:
        extra = [
            k
            for k, v in (
                ("weights", weights),
                ("normalize", normalize),
                ("model_options", model_options),
            )
            if v is not None
        ]
        if extra:
            raise ValueError(
                f"{', '.join(extra)} apply to a model spec 'file.py:NAME' only; a checkpoint "
                "records its own, and an nn.Module is used as it is (load its weights with "
                "load_state_dict, wrap it with robustlab.models.Normalized(model, mean, std))"
            )
    if is_spec:
        if model_options is not None and not isinstance(model_options, Mapping):
            raise TypeError(
                f"model_options must be a dict of NAME's keyword arguments, got "
                f"{type(model_options).__name__}"
            )
        built = models.from_spec(
            model, weights=weights, normalize=normalize, **dict(model_options or {})
        )
        rec = spec_provenance(attached(built, "robustlab_spec"))
        return built, rec | {
            "model_options": _jsonable(rec["model_options"]),
            "weights_sha256": rec["weights_sha256"] or _state_sha256(built),
        }
    if isinstance(model, str | os.PathLike):
        loaded = models.load(model, trust_code=trust_code)
        path = str(Path(model).resolve())
        meta = attached(loaded, "robustlab_meta")
        arch = meta["architecture"]
        return loaded, {
            "name": Path(model).stem,
            "model": path,
            "checkpoint": path,
            "architecture": arch.get("spec") or arch.get("name"),
            "weights": path,
            "weights_sha256": meta["sha256"],
        }
    if isinstance(model, nn.Module):
        inner = model.model if isinstance(model, models.Normalized) else model
        cls = type(inner)
        return model, {
            "name": cls.__name__,
            "model": f"{cls.__module__}.{cls.__qualname__}",
            "weights": None,
            "weights_sha256": _state_sha256(model),
        }
    raise TypeError(
        f"model must be an nn.Module, a robustlab checkpoint (.safetensors) or a "
        f"spec 'path/to/file.py:NAME' / 'package.module:NAME', got {model!r}"
    )


# --- the one line -----------------------------------------------------------------------------
def benchmark(
    model: nn.Module | str | os.PathLike[str],
    data: Any = "fashion-mnist",
    *,
    threat: ThreatModel | str,
    n: int | None = 1000,
    suite: str | None = None,
    device: str | torch.device = "auto",
    out: str | os.PathLike[str] | None = "runs/mine",
    name: str | None = None,
    seed: int = 0,
    split: str = "test",
    weights: str | os.PathLike[str] | None = None,
    normalize: Any = None,
    model_options: Mapping[str, Any] | None = None,
    trust_code: bool = False,
    resize: tuple[int, int] | None = None,
    overwrite: bool = False,
    **evaluate_options: Any,
) -> EvalResult:
    """Evaluate ``model`` on ``data`` under ``threat`` and write the run folder ``out``.

    >>> res = rl.benchmark("net.py:Net", "fashion-mnist", threat="linf:0.1", n=1000,
    ...                    weights="net.safetensors", out="runs/net")  # doctest: +SKIP
    >>> res.robust_accuracy                                               # doctest: +SKIP

    Args:
        model: an ``nn.Module`` taking [0, 1] pixels (used as it is, moved to ``device`` in
            place as ``Module.to`` does); a robustlab checkpoint (``.safetensors`` with its
            sidecar; one of the user's own code loads with ``trust_code=True`` only); or a
            spec ``"path/to/file.py:NAME"`` / ``"package.module:NAME"`` built by
            :func:`robustlab.models.from_spec` with ``weights`` (safetensors; convert a
            ``.pt`` once with ``robustlab convert-weights``), ``normalize`` (``"MEAN/STD"`` per
            channel in [0, 1] units, or a ``(mean, std)`` pair) and ``model_options`` (NAME's
            keyword arguments), which apply to a spec only.
        data: a registered data set name (:func:`robustlab.data.names`; its ``split``), a
            folder of class subfolders (:func:`robustlab.data.from_folder`, with ``resize``
            ``(H, W)`` for images of different sizes), an ``.npz`` / ``.safetensors`` file of
            ``x`` and ``y`` (:func:`robustlab.data.from_arrays`), an ``(x, y)`` pair of
            tensors or arrays, or a :class:`robustlab.data.Images`.
        threat: a :class:`ThreatModel` or ``"NORM:EPS"`` (``"linf:8/255"``, ``"l2:0.5"``).
        n: evaluate the first ``n`` points (None: all of them; more than the data holds is an
            error).
        suite: an evaluation suite (:func:`robustlab.evaluation.suites`); None: the default
            of :func:`robustlab.evaluate` (``standard``, or ``smoothed`` for smoothed
            classifiers). ``attacks=[...]`` in ``evaluate_options`` runs a custom list instead.
        device: ``"auto"`` (CUDA if available, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or a ``torch.device``: where the model and every attack run.
        out: the run folder (``results.json``, ``per_sample.jsonl``, ``summary.md``, ...);
            None writes nothing. A finished run there is replaced only with ``overwrite``; an
            interrupted one continues.
        name: the model's name in the results and the report (default: the spec's NAME, the
            checkpoint's file name without suffix, or the module's class name).
        seed: seeds the attacks' generators (the global generator is not touched).
        **evaluate_options: passed on to :func:`robustlab.evaluate` (``batch_size``,
            ``attacks``, ``repeats``, ``progress``, ``config``: extra keys recorded beside
            the benchmark's, which win on a clash, ...).

    Returns:
        The :class:`~robustlab.evaluation.EvalResult`. Its ``record["config"]`` holds
        ``name``, ``model`` (the spec with the file's absolute path, the checkpoint's path, or
        the module's class), ``model_options`` (a spec's), ``checkpoint`` and
        ``architecture`` (a checkpoint's), ``weights`` (the weights file, or None),
        ``weights_sha256`` (of the weights file for a spec with weights and a checkpoint, else
        of the model's state dict written as safetensors), ``normalize`` (``{"mean", "std"}``
        or None), ``parameters`` (count), ``dataset`` (the registered name, or the data's
        absolute path), ``data``, ``split`` (registered data only), ``classes`` (class names,
        or None), ``n`` and ``device``.

    Raises:
        ValueError: a bad threat, device, ``n``, ``seed`` or data (named, with the fix);
            ``weights`` / ``normalize`` / ``model_options`` without a spec; ``resize`` without
            a folder; a model that does not fit the data (input shape, number of classes,
            labels out of range), before any attack runs.
        TypeError: arguments of the wrong type; an option ``evaluate`` does not take.
        FileNotFoundError: a missing data path, checkpoint, model file or weights file.
        FileExistsError: ``out`` holds a finished run and ``overwrite`` is False.
    """
    threat, dev = _threat(threat), resolve_device(device)
    n = None if n is None else positive_int(n, "n")
    seed = integer(seed, "seed")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _check_options(evaluate_options)
    folder = None if out is None else Path(out)
    _check_out(folder, overwrite)
    x, y, classes, source = _data(data, n, split, resize)
    net, provenance = _model(model, weights, normalize, model_options, trust_code)
    net.to(dev)
    with eval_mode(net):
        k = models.check_model_fits(net, x[:2].to(dev), len(classes) if classes else None)
    check_labels(y, k)
    config = {
        **provenance,
        "name": name or provenance["name"],
        "normalize": _normalization(net),
        "parameters": sum(p.numel() for p in net.parameters()),
        **source,
        "classes": classes,
        "n": len(x),
        "device": str(dev),
    }
    config = {**(evaluate_options.pop("config", None) or {}), **config}
    if overwrite:
        evaluate_options["resume"] = False
    return evaluate(
        net, x, y, threat, suite=suite, seed=seed, out=folder, config=config, **evaluate_options
    )

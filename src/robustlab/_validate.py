"""Checks of user input shared by every package: clear errors naming the argument and the
fix, never asserts.

The scalar vocabulary (:func:`integer`, :func:`positive_int`, :func:`number`, :func:`one_of`,
:func:`generator_or_none`) is the one way an option is checked; each returns the value,
normalised, so a constructor reads ``self.steps = positive_int(steps, "steps")``. The tensor
checks (:func:`check_inputs`, :func:`check_images`, :func:`check_logits`, :func:`probe_model`)
guard every entry point that takes a batch or a model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from robustlab.threat import ThreatModel

T = TypeVar("T")


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type (a bool, a string, a float where an integer is due): both
    a ``TypeError`` and the ``ValueError`` every other failed check raises."""


def _fail(name: str, what: str, value: Any, right_type: bool) -> None:
    raise (ValueError if right_type else OptionTypeError)(f"{name} must be {what}, got {value!r}")


def integer(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an ``int`` (any integral type but ``bool``) in ``[minimum, maximum]``;
    ``ValueError`` "``name`` must be an integer >= minimum, got ..." otherwise
    (:class:`OptionTypeError`, also a ``TypeError``, for a value of the wrong type)."""
    right_type = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if (
        not right_type
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        if minimum is not None and maximum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            what = f"an integer >= {minimum}"
        elif maximum is not None:
            what = f"an integer <= {maximum}"
        else:
            what = "an integer"
        _fail(name, what, value, right_type)
    return int(value)


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum`` (default 1): a count of steps, samples, epochs."""
    return integer(value, name, minimum=minimum)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float`` (any real type but ``bool``) in the interval given by ``low``,
    ``high`` (closed unless ``low_open`` / ``high_open``); NaN never passes, infinity only
    with ``finite=False``. ``ValueError`` naming ``name`` and the interval otherwise
    (:class:`OptionTypeError`, also a ``TypeError``, for a value of the wrong type)."""
    right_type = ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        v = float(value)
        ok = not math.isnan(v) and (math.isfinite(v) or not finite)
        ok = ok and (low is None or (v > low if low_open else v >= low))
        ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        where = _interval(low, high, low_open, high_open)
        kind = (
            "a finite number"
            if finite and not (low is not None and high is not None)
            else "a number"
        )
        _fail(name, kind + (" " + where if where else ""), value, right_type)
    return float(value)


def one_of(value: Any, name: str, choices: Iterable[T]) -> T:
    r"""``value`` if it is one of ``choices``; ``ValueError`` "unknown ``name`` ...; valid
    ``name``\ s are: ..." otherwise."""
    choices = list(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        plural = name + ("es" if name.endswith("s") else "s")
        raise ValueError(
            f"unknown {name} {value!r}; valid {plural} are: {', '.join(map(str, choices))}"
        )
    return value


def generator_or_none(value: Any, name: str = "generator") -> torch.Generator | None:
    """``value`` if it is a ``torch.Generator`` or None; ``TypeError`` otherwise."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {type(value).__name__}; "
            "create one with torch.Generator().manual_seed(seed)"
        )
    return value


# dtypes an input batch may have (float8 and friends lack isfinite/min and most kernels)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _x_dtype_hint(dtype: torch.dtype) -> str:
    if dtype == torch.uint8:
        return "convert 8-bit images with x.float() / 255"
    if dtype.is_complex:
        return "images are real-valued: pass x.real, or the magnitude x.abs(), as float32"
    if dtype.is_floating_point:
        return "convert with x.float()"
    return "convert with x.float() and scale the values into the threat bounds (e.g. / 255)"


def check_inputs(x: object, y: object, threat: ThreatModel | None = None) -> None:
    """Validate a batch: ``x`` as :func:`check_images`, ``y`` int (N,) non-negative;
    ``threat`` (if given) a :class:`ThreatModel`."""
    if threat is not None and not isinstance(threat, ThreatModel):
        raise TypeError(
            f"threat must be a robustlab.ThreatModel, e.g. ThreatModel('linf', eps=8/255), "
            f"got {type(threat).__name__}"
        )
    check_images(x, threat)
    assert isinstance(x, Tensor)
    if not isinstance(y, Tensor):
        raise TypeError(
            f"y must be a torch.Tensor of int64 labels (N,), got {type(y).__name__}; "
            "convert with torch.as_tensor(y, dtype=torch.long)"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must have shape (N,) = ({x.shape[0]},) to match x, got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"y must hold integer class labels (int64), got {y.dtype}; "
            "convert class indices with y.long()"
        )
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0 (class indices), got min label {int(y.min())}")


def check_images(x: object, threat: ThreatModel | None = None) -> None:
    """Validate inputs without labels: ``x`` a float tensor (N, ...), N >= 1, finite, inside
    ``threat.bounds`` if a threat model is given."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}; "
            "convert with torch.as_tensor(x, dtype=torch.float32)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"x must be a floating-point tensor (float32, float64, float16 or bfloat16) with "
            f"values in the threat bounds, got {x.dtype}; {_x_dtype_hint(x.dtype)}"
        )
    if x.dim() < 2:
        raise ValueError(
            f"x must be batched, shape (N, C, H, W), got shape {tuple(x.shape)}; "
            "add the batch dimension with x.unsqueeze(0)"
        )
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0): pass at least one example")
    if x.numel() == 0:
        raise ValueError(
            f"x has no values: shape {tuple(x.shape)} has a zero-sized dimension; "
            "pass images shaped (N, C, H, W) with C, H, W >= 1"
        )
    xd = x.detach()
    if not torch.isfinite(xd).all():
        raise ValueError(
            f"x contains {int((~torch.isfinite(xd)).sum())} NaN or infinite "
            "values; clean or drop those inputs first"
        )
    if threat is not None:
        lo, hi = threat.bounds
        xmin, xmax = float(xd.min()), float(xd.max())
        if xmin < lo - 1e-6 or xmax > hi + 1e-6:
            raise ValueError(
                f"x has values in [{xmin:.4g}, {xmax:.4g}], outside the threat bounds "
                f"[{lo}, {hi}]; "
                "pass unnormalised inputs (normalisation is the model's first layer) or set "
                "ThreatModel(..., bounds=...)"
            )


def check_labels(y: Tensor, num_classes: int, name: str = "labels") -> None:
    """Labels must index the model's logits."""
    if y.numel() and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name} out of range: max {name[:-1]} {int(y.max())} but the model has "
            f"{num_classes} classes (valid: 0..{num_classes - 1})"
        )


def check_logits(out: object, n: int) -> Tensor:
    """The model must return a (N, num_classes) float tensor of logits, num_classes >= 2,
    without NaN."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        hint = (
            " (a tuple or dict: wrap the model so forward returns only the logits)"
            if not isinstance(out, Tensor)
            else ""
        )
        raise ValueError(
            f"the model must return logits of shape (N, num_classes) = ({n}, K), got {shape}{hint}"
        )
    if not out.is_floating_point():
        raise TypeError(
            f"the model must return floating-point logits, got {out.dtype}; "
            "return the raw scores, not class indices"
        )
    if out.shape[1] < 2:
        raise ValueError(
            f"the model returns {out.shape[1]} logit(s) per sample; robustlab needs one per "
            "class, at least 2 (for a single-logit binary classifier z, return "
            "torch.cat([torch.zeros_like(z), z], dim=1))"
        )
    if torch.isnan(out.detach()).any():
        raise ValueError(
            "the model returned NaN logits for valid inputs; check its weights "
            "(NaN after training or loading?) and operations such as 0/0 or log(0)"
        )
    return out


def _model_tensor(model: nn.Module) -> Tensor | None:
    """The model's first floating-point parameter or buffer (its dtype and device), if any."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t
    return None


def probe_model(model: nn.Module, x: Tensor) -> Tensor:
    """Run ``model`` (in the mode it is in, without gradients) on the probe batch ``x`` and
    return its logits, checked by :func:`check_logits`.

    A model that cannot run on ``x`` raises a clear error instead of torch internals:
    ``TypeError`` when ``x``'s dtype differs from the model's weights (float64 inputs for a
    float32 model), ``ValueError`` for a device mismatch or a shape the model does not take.
    """
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as err:
        ref = _model_tensor(model)
        if ref is not None and ref.dtype != x.dtype:
            raise TypeError(
                f"x is {x.dtype} but the model's weights are {ref.dtype}; convert the inputs "
                f"with x.to({ref.dtype}) (or the model with model.to({x.dtype}))"
            ) from err
        if ref is not None and ref.device != x.device:
            raise ValueError(
                f"x is on {x.device} but the model is on {ref.device}; move the inputs with "
                f"x.to({str(ref.device)!r})"
            ) from err
        shape = ", ".join(["N", *map(str, x.shape[1:])])
        raise ValueError(
            f"the model cannot run on x of shape ({shape}) ({err}); pass x shaped "
            "(N, C, H, W) with the channels and image size the model was built for"
        ) from err
    return check_logits(out, len(x))


def resolve_device(device: str | torch.device, fix: str = "device='cpu'") -> torch.device:
    """``"auto"`` (CUDA if available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"mps"`` or a ``torch.device``, checked to exist on this machine; ``fix``: how the
    caller's user picks the CPU instead (the CLI: ``--device cpu``), named in the errors.

    Raises:
        ValueError: an unknown device name, or one this machine does not have.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device) if isinstance(device, str | torch.device) else None
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(dev)!r} is not available: torch sees "
            f"{torch.cuda.device_count()} CUDA device(s); use {fix}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device 'mps' is not available on this machine; use {fix}")
    return dev

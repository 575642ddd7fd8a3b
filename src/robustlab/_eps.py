"""The threat model's words without torch: the norms, eps as text (``"8/255"``) and the l0
budget as a pixel count.

:mod:`robustlab.threat` re-exports the norms and :func:`parse_eps` and builds on the rest; the
command line parses its arguments with them before torch is imported, so a bad ``--eps`` is
refused at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

#: the lp balls of real radius; attacks support these unless they declare otherwise
CONTINUOUS_NORMS = ("linf", "l2", "l1")
#: every threat model: the continuous norms and ``"l0"``, a budget of changed pixels
NORMS = (*CONTINUOUS_NORMS, "l0")


def parse_eps(value: str | float | int) -> float:
    """Parse an eps given as a number or a fraction string such as ``"8/255"`` (never ``eval``)."""
    if isinstance(value, bool):
        raise TypeError("eps must be a number or a string such as '8/255', got a bool")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"eps {value} is too large for a float") from None
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except OverflowError:
            raise ValueError(f"eps {value!r} is too large for a float") from None
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"cannot parse eps {value!r}: give a number ('0.1') or a fraction ('8/255')"
            ) from None
    raise TypeError(f"eps must be a number or a string such as '8/255', got {type(value).__name__}")


def pixel_budget(eps: float) -> int:
    """The l0 budget ``eps`` (already parsed) as a number of pixels: an integer >= 1 (``10`` or
    ``10.0``); ``ValueError`` naming the fix otherwise."""
    if not (eps >= 1 and float(eps).is_integer()):
        raise ValueError(
            f"l0 eps is a number of changed pixels: an integer >= 1, got {eps:g}; "
            "pass e.g. ThreatModel('l0', 10) (--eps 10)"
        )
    return int(eps)


def box_diameter(norm: str, shape: Sequence[int], width: float = 1.0) -> float:
    """The largest ``norm`` distance between two inputs of shape ``shape`` (one sample's, e.g.
    (C, H, W)) in a box of side ``width``: the smallest eps whose ball around any point of the
    box covers the box. linf: ``width``; l2: ``sqrt(d) width``; l1: ``d width``, ``d`` the
    values per input; l0: the number of pixels (H x W: channels are dim 0; D for (D,) inputs),
    whatever ``width``."""
    d = math.prod(shape)
    if norm == "l0":
        return float(math.prod(shape[1:]) if len(shape) > 1 else d)
    return width * {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]

"""The threat model's words without torch: the norms and eps as text (``"8/255"``).

:mod:`robustlab.threat` re-exports both; the command line parses its arguments with them
before torch is imported, so a bad ``--eps`` is refused at once.
"""

from __future__ import annotations

from fractions import Fraction

NORMS = ("linf", "l2", "l1")


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


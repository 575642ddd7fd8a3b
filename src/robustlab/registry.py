"""One small generic registry shared by attacks, objectives, defenses, models and data sets."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise ``ValueError`` listing the valid ones.

    >>> attacks = Registry("attack")
    >>> @attacks.register("pgd")
    ... class PGD: ...
    >>> attacks.get("pgd") is PGD
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name`` (lower case, unique)."""
        key = name.lower()

        def add(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry registered as ``name``; a ``ValueError`` naming the valid choices if none."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        key = name.lower()
        if key not in self._items:
            valid = ", ".join(self.names()) or "(none registered)"
            plural = self.kind + ("es" if self.kind.endswith("s") else "s")
            raise ValueError(f"unknown {self.kind} {name!r}; valid {plural} are: {valid}")
        return self._items[key]

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters with shell wildcards (``"pgd*"``)."""
        names = sorted(self._items)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __len__(self) -> int:
        return len(self._items)

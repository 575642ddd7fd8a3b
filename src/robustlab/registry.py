"""One small generic registry shared by attacks, objectives, defenses, models and data sets."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise ``ValueError`` listing the valid ones.

    A name is written once, in the decorator: a registered class gets it as its ``name``
    attribute. :meth:`create` is the one way to build an entry; a misspelt option raises
    ``TypeError`` "<kind> <name>: unknown option X; its options are: ...".

    >>> attacks = Registry("attack")
    >>> @attacks.register("pgd")
    ... class PGD:
    ...     def __init__(self, threat, *, steps=10): ...
    >>> attacks.get("pgd") is PGD, PGD.name
    (True, 'pgd')
    """

    def __init__(self, kind: str, *, name_classes: bool = True) -> None:
        self.kind = kind
        self.name_classes = name_classes  # False where the entries are other packages' classes
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name`` (lower case, unique); a class
        target gets ``name`` as its ``name`` attribute."""
        key = name.lower()

        def add(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            if self.name_classes and inspect.isclass(obj):
                cls: Any = obj  # any class: the attribute is added, whatever its own type says
                cls.name = key
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

    def options(self, name: str) -> list[str]:
        """The keyword options the entry ``name`` takes (its signature's named parameters
        after the positional ones a caller always passes)."""
        params = inspect.signature(self._factory(name)).parameters.values()
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Build the entry ``name`` with ``args`` and ``options``. An option it does not take
        raises ``TypeError`` "<kind> <name>: unknown option X; its options are: ..."."""
        factory = self._factory(name)
        sig = inspect.signature(factory)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_any:
            valid = self.options(name)[len(args) :]
            unknown = [k for k in options if k not in valid]
            if unknown:
                raise TypeError(
                    f"{self.kind} {name!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))}; its options are: "
                    f"{', '.join(valid) or 'none'}"
                )
        return factory(*args, **options)

    def _factory(self, name: str) -> Callable[..., Any]:
        """The entry ``name`` as a factory; a ``TypeError`` if it is not callable."""
        entry = self.get(name)
        if not callable(entry):
            raise TypeError(f"{self.kind} {name!r} is not a factory: it cannot be called")
        return entry

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered names, sorted; ``pattern`` filters with shell wildcards (``"pgd*"``)."""
        names = sorted(self._items)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __len__(self) -> int:
        return len(self._items)

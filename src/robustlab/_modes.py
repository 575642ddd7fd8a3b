"""A model's modes: what it declares about itself, and its train/eval mode and gradient flags
changed for a block and restored in ``finally``.

Declarations (:class:`Declares`, :func:`declared`): a module says whether it is randomised,
differentiable, or a detector with a rejection output. Every ``robustlab.defenses.Defense``
declares through class attributes; a user's module may instead set the loose attributes
``robustlab_random``, ``robustlab_differentiable`` or ``robustlab_reject``, which are still
read. Attacks, defenses and the evaluation all ask :func:`declared`, so none needs another's
classes.

Modes: attacks, objectives, certification, the evaluation and the audit all run a model in
eval mode without changing what the caller sees afterwards; the denoiser's training runs a
frozen classifier. Both context managers give the previous state back even on exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from torch import nn

__all__ = ["Declares", "Declaration", "attach", "attached", "declared", "eval_mode", "frozen"]

Declaration = Literal["randomized", "differentiable", "rejects"]
#: each declaration's loose attribute on user modules, and its value when nothing is declared
_LOOSE: dict[str, tuple[str, bool]] = {
    "randomized": ("robustlab_random", False),
    "differentiable": ("robustlab_differentiable", True),
    "rejects": ("robustlab_reject", False),
}


class _Loose:
    """A declaration under its loose ``robustlab_*`` name, on the class and on instances:
    reading gives the declaration, setting it on an instance sets the declaration."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __get__(self, obj: object, cls: type) -> bool:
        return bool(getattr(cls if obj is None else obj, self.what))

    def __set__(self, obj: object, value: object) -> None:
        setattr(obj, self.what, bool(value))


class Declares:
    """Mixin of the modules that declare what they are. Subclasses override the class
    attributes (an instance may override one where it depends on a setting, e.g. smoothing
    with sigma 0 is not random):

    - ``randomized``: two forward passes on one input may differ (evaluate with EOT and
      repeated predictions);
    - ``differentiable``: autograd's gradient is usable (False: attack through BPDA);
    - ``rejects``: a detector whose last output column is "rejected".

    The loose names answer too: ``robustlab_random`` reads ``randomized``, and a subclass
    written for the loose names (``robustlab_differentiable = False``) declares by them.
    """

    # class defaults that an instance may override (not ClassVar)
    randomized: bool = False
    differentiable: bool = True
    rejects: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for what, (loose, _) in _LOOSE.items():
            value = cls.__dict__.get(loose)
            if value is not None and not isinstance(value, _Loose):
                setattr(cls, what, bool(value))
            setattr(cls, loose, _Loose(what))


def declared(module: object, what: Declaration) -> bool:
    """What ``module`` declares about itself (not its submodules): the :class:`Declares`
    attribute, else the loose ``robustlab_*`` attribute a user module may set, else the
    default (not randomised, differentiable, not a detector)."""
    attr, default = _LOOSE[what]
    if isinstance(module, Declares):
        return bool(getattr(module, what))
    return bool(getattr(module, attr, default))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and give it its previous mode back, even on exceptions."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with ``requires_grad=False`` on every parameter; the previous
    mode and flags come back on exit, even on exceptions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def attach(module: nn.Module, name: str, value: object) -> None:
    """Set the plain attribute ``name`` of ``module`` to ``value`` (a flag, a dict of
    provenance, a hook object): what ``setattr`` does, typed for values that are neither
    tensors nor modules (``nn.Module.__setattr__`` is typed for those only)."""
    setattr(module, name, value)


def attached(module: nn.Module, name: str) -> Any:
    """The plain attribute ``name`` of ``module`` (set by :func:`attach` or by the module's
    own class); ``AttributeError`` if it has none, as for ``module.<name>``."""
    return getattr(module, name)

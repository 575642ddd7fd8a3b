"""The defense contract: ``Defense(base, **options)`` is an ``nn.Module`` that classifies
(N, C, H, W) inputs in [0, 1] by way of the undefended model ``base``.

What every defense promises (the registry-wide contract test checks it):

- ``base`` is the wrapped, undefended model (the audit's transfer surrogate);
- class-level declarations (:class:`robustlab._modes.Declares`) say what an evaluation must
  know: ``randomized`` (two calls may differ: EOT, repeated predictions), ``differentiable``
  (False: attack through BPDA) and ``rejects`` (a detector: one extra last output column,
  "rejected"); an instance overrides one only where a setting decides it (smoothing with
  sigma 0 is not random). Non-differentiable stages inside a defense declare themselves;
- ``forward(x)`` returns (N, K) logits or log-scores ((N, K + 1) for a detector) and never
  modifies ``x``;
- :meth:`config` gives the settings, JSON-able, with the registered ``name``;
- :meth:`fit` prepares a defense that needs clean data (a detector's threshold, a pool of
  partners) and returns it; :attr:`fitted` says whether that is done (always, for defenses
  that need nothing).

A defense trains nothing itself (a defended model is trained by the trainer, like any model),
prints nothing and saves nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from robustlab._modes import Declares

__all__ = ["Defense"]


class Defense(Declares, nn.Module):
    """Base of every registered defense. Subclasses call ``super().__init__(model)``, validate
    their options, and extend :meth:`config`; the registry sets the class's ``name``."""

    name: ClassVar[str] = "defense"
    #: outputs the wrapped model returns beyond the data's classes (the extra-class
    #: detector's model: 1, its extra class), so that a front end checks the model's outputs
    #: against K + extra_outputs before wrapping it
    extra_outputs: ClassVar[int] = 0

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(base).__name__}")
        self.base = base

    @property
    def model(self) -> nn.Module:
        """The base model under its older name (read :attr:`base`)."""
        return self.base

    def config(self) -> dict[str, Any]:
        """The defense's settings (JSON-able) with its registered ``name``, as recorded in
        results."""
        return {"name": self.name}

    def fit(self, x: Tensor, y: Tensor | None = None) -> Defense:
        """Prepare the defense on clean inputs ``x`` (labels ``y`` where it needs them) and
        return it; a defense that needs nothing ignores them."""
        return self

    @property
    def fitted(self) -> bool:
        """Whether the defense is ready to classify (:meth:`fit` done where it is needed)."""
        return True

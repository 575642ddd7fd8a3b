"""The step rules of PGD's inner loop: each turns the raw input gradient of the loss into the
direction whose steepest step (``ThreatModel.steepest_step``) the loop takes.

A rule holds per-sample state (a velocity, moments) for one run of the loop: PGD asks
:func:`make` for a fresh one at every restart, so an attack object never carries state from
one call to the next. :meth:`StepRule.keep` drops the rows of samples that leave the batch
(early stop).

To add a rule: subclass :class:`StepRule`, implement ``__call__`` (and ``keep`` if it has
state), and add it to :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from robustlab._validate import number, one_of

__all__ = ["OPTIMIZERS", "Adam", "Momentum", "Sign", "StepRule", "make"]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class StepRule:
    """Base class: the gradient itself (the steepest step then takes its sign for linf)."""

    name: ClassVar[str] = "sign"

    def __call__(self, grad: Tensor) -> Tensor:
        """The direction for the per-sample gradient ``grad`` (N, ...); same shape."""
        return grad

    def keep(self, rows: Tensor) -> None:
        """Keep only the state of ``rows`` (a bool mask or indices into the current batch)."""


class Sign(StepRule):
    """Madry et al.'s PGD: follow the gradient (its sign, for linf)."""


class Momentum(StepRule):
    """MI-FGSM's velocity (Dong et al. 2018): ``g_t = mu * g_(t-1) + grad / ||grad||_1`` per
    sample, ``g_0 = 0``."""

    name = "momentum"

    def __init__(self, mu: float = 1.0) -> None:
        self.mu = number(mu, "momentum", low=0)
        self.m: Tensor | float = 0.0  # the velocity

    def keep(self, rows: Tensor) -> None:
        if isinstance(self.m, Tensor):
            self.m = self.m[rows]

    def __call__(self, grad: Tensor) -> Tensor:
        l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12)
        self.m = self.mu * self.m + grad / l1.reshape((-1,) + (1,) * (grad.dim() - 1))
        return self.m


class Adam(StepRule):
    """Adam's bias-corrected ``m_hat / (sqrt(v_hat) + 1e-8)``, betas (0.9, 0.999), per sample
    (for l1 its near-equal magnitudes make the sparse step's choice of coordinates almost
    arbitrary)."""

    name = "adam"

    def __init__(self) -> None:
        self.t = 0
        self.m: Tensor | float = 0.0  # the first moment
        self.v: Tensor | float = 0.0  # the second moment

    def keep(self, rows: Tensor) -> None:
        if isinstance(self.m, Tensor):
            self.m = self.m[rows]
        if isinstance(self.v, Tensor):
            self.v = self.v[rows]

    def __call__(self, grad: Tensor) -> Tensor:
        (b1, b2), self.t = ADAM_BETAS, self.t + 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad.square()
        v_hat = self.v / (1 - b2 ** self.t)
        return self.m / (1 - b1 ** self.t) / (v_hat.sqrt() + ADAM_EPS)


#: the rules PGD's ``optimizer`` option names
OPTIMIZERS: dict[str, type[StepRule]] = {"sign": Sign, "momentum": Momentum, "adam": Adam}


def make(name: str, momentum: float = 1.0) -> StepRule:
    """A fresh rule ``name`` (one of :data:`OPTIMIZERS`); ``momentum`` is Momentum's ``mu``."""
    cls = OPTIMIZERS[one_of(name, "optimizer", tuple(OPTIMIZERS))]
    return cls(momentum) if cls is Momentum else cls()

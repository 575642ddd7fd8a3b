"""The step rules of PGD's inner loop: each turns the raw input gradient of the loss into the
move PGD makes, in one of two ways.

- Steepest rules (``steepest`` True: ``sign``, ``momentum``, ``adam``) give a direction whose
  steepest step of lp length ``step_size`` (``ThreatModel.steepest_step``: its sign for linf)
  PGD takes.
- Update rules (``steepest`` False: ``sgd``, ``rmsprop``, ``adagrad``, ``ftrl``) are optimisers
  in their own right, as in ``torch.optim`` with ``maximize=True``: :meth:`StepRule.update`
  gives the next perturbation ``delta = x_adv - x`` with ``step_size`` as the learning rate,
  which PGD then projects onto the ball and the box. Their steps have the gradient's own
  scale, so each needs its own step size (the optimiser-susceptibility study in
  ``benchmarks/optimizer_study.py`` takes the best of a small grid per rule).

A rule holds per-sample state (a velocity, moments) for one run of the loop: PGD asks
:func:`make` for a fresh one at every restart, so an attack object never carries state from
one call to the next. :meth:`StepRule.keep` drops the rows of samples that leave the batch
(early stop).

To add a rule: subclass :class:`StepRule`, implement ``__call__`` (and ``keep`` if it has
state; ``update`` too if it sets ``steepest = False`` and its step is not ``lr * direction``),
and add it to :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from robustlab._validate import number, one_of

__all__ = [
    "OPTIMIZERS",
    "FTRL",
    "SGD",
    "Adagrad",
    "Adam",
    "Momentum",
    "RMSProp",
    "Sign",
    "StepRule",
    "make",
]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch.optim.RMSprop's defaults
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default
#: TensorFlow's FtrlOptimizer defaults (learning_rate_power, initial_accumulator_value, l1, l2)
FTRL_POWER, FTRL_ACCUMULATOR, FTRL_L1, FTRL_L2 = -0.5, 0.1, 0.0, 0.0


class StepRule:
    """Base class: the gradient itself (the steepest step then takes its sign for linf)."""

    name: ClassVar[str] = "sign"
    #: True: PGD takes the steepest step of lp length ``step_size`` along ``rule(grad)``;
    #: False: PGD moves to ``update(grad, delta, step_size)``, projected
    steepest: ClassVar[bool] = True

    def __call__(self, grad: Tensor) -> Tensor:
        """The direction for the per-sample gradient ``grad`` (N, ...); same shape."""
        return grad

    def update(self, grad: Tensor, delta: Tensor, lr: float) -> Tensor:
        """For an update rule (``steepest`` False): the next perturbation, before projection,
        from the current one ``delta`` (N, ...) and the ascent gradient ``grad`` (same shape),
        with learning rate ``lr`` (input units per unit of direction): ``delta + lr *
        direction``."""
        return delta + lr * self(grad)

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
        v_hat = self.v / (1 - b2**self.t)
        return self.m / (1 - b1**self.t) / (v_hat.sqrt() + ADAM_EPS)


def _rows(state: Tensor | float, rows: Tensor) -> Tensor | float:
    """``state``'s rows ``rows``: a per-sample tensor is indexed, a scalar (no step yet) kept."""
    return state[rows] if isinstance(state, Tensor) else state


class SGD(StepRule):
    """Plain gradient ascent on the perturbation: ``delta <- delta + lr * grad``
    (``torch.optim.SGD`` with ``maximize=True``, no momentum); no hyper-parameter."""

    name = "sgd"
    steepest = False


class RMSProp(StepRule):
    """RMSProp (Tieleman & Hinton 2012) as ``torch.optim.RMSprop(maximize=True)``, per sample:
    ``v_t = alpha * v_(t-1) + (1 - alpha) * grad^2``, ``v_0 = 0``, direction
    ``grad / (sqrt(v_t) + eps)``; defaults torch's, ``alpha`` 0.99, ``eps`` 1e-8 (no momentum,
    not centred)."""

    name = "rmsprop"
    steepest = False

    def __init__(self, alpha: float = RMSPROP_ALPHA, eps: float = RMSPROP_EPS) -> None:
        self.alpha = number(alpha, "alpha", low=0, high=1, high_open=True)
        self.eps = number(eps, "eps", low=0)
        self.v: Tensor | float = 0.0  # the running mean of grad^2

    def keep(self, rows: Tensor) -> None:
        self.v = _rows(self.v, rows)

    def __call__(self, grad: Tensor) -> Tensor:
        self.v = self.alpha * self.v + (1 - self.alpha) * grad.square()
        return grad / (self.v.sqrt() + self.eps)


class Adagrad(StepRule):
    """Adagrad (Duchi et al. 2011) as ``torch.optim.Adagrad(maximize=True)``, per sample:
    ``s_t = s_(t-1) + grad^2``, ``s_0 = 0``, direction ``grad / (sqrt(s_t) + eps)``; ``eps``
    torch's 1e-10 (no learning-rate decay). Its first step is the sign step of length ``lr``,
    the later ones shrink as ``1 / sqrt(t)`` for a steady gradient."""

    name = "adagrad"
    steepest = False

    def __init__(self, eps: float = ADAGRAD_EPS) -> None:
        self.eps = number(eps, "eps", low=0)
        self.s: Tensor | float = 0.0  # the sum of grad^2

    def keep(self, rows: Tensor) -> None:
        self.s = _rows(self.s, rows)

    def __call__(self, grad: Tensor) -> Tensor:
        self.s = self.s + grad.square()
        return grad / (self.s.sqrt() + self.eps)


class FTRL(StepRule):
    """FTRL-proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches",
    KDD) as TensorFlow's ``FtrlOptimizer`` (``ApplyFtrl``), on the perturbation ``w = delta``
    per sample and coordinate, minimising the negated loss (``g = -grad``), with ``p =
    -lr_power``::

        n_t   = n_(t-1) + g^2                                  (n_0 = initial_accumulator)
        z_t   = z_(t-1) + g - (n_t^p - n_(t-1)^p) / lr * w_t   (z_0 = 0)
        w_t+1 = (sign(z_t) * l1 - z_t) / (n_t^p / lr + 2 * l2)  if |z_t| > l1, else 0

    Defaults TensorFlow's: ``lr_power`` -0.5, ``initial_accumulator`` 0.1, ``l1`` = ``l2`` = 0.
    ``w_t`` is the projected perturbation PGD played; the next iterate depends on it only
    through ``z``, and ``initial_accumulator``'s weight pulls towards ``delta = 0`` (the clean
    point), so a random start is soon forgotten. TensorFlow's ``l2_shrinkage`` is not
    offered. The step needs the iterate: PGD calls :meth:`update`, never ``rule(grad)``."""

    name = "ftrl"
    steepest = False

    def __init__(
        self,
        lr_power: float = FTRL_POWER,
        initial_accumulator: float = FTRL_ACCUMULATOR,
        l1: float = FTRL_L1,
        l2: float = FTRL_L2,
    ) -> None:
        self.power = -number(lr_power, "lr_power", high=0)
        self.l1 = number(l1, "l1", low=0)
        self.l2 = number(l2, "l2", low=0)
        self.n: Tensor | float = number(
            initial_accumulator, "initial_accumulator", low=0, low_open=True
        )
        self.z: Tensor | float = 0.0

    def keep(self, rows: Tensor) -> None:
        self.n, self.z = _rows(self.n, rows), _rows(self.z, rows)

    def __call__(self, grad: Tensor) -> Tensor:
        raise TypeError(
            "FTRL's step depends on the iterate: call update(grad, delta, lr), as "
            "PGD does for a rule with steepest False"
        )

    def update(self, grad: Tensor, delta: Tensor, lr: float) -> Tensor:
        g = -grad
        n = self.n + g.square()
        self.z = self.z + g - (n**self.power - self.n**self.power) / lr * delta
        self.n = n
        z = self.z
        w = (self.l1 * z.sign() - z) / (n**self.power / lr + 2 * self.l2)
        return torch.where(z.abs() > self.l1, w, torch.zeros_like(w))


#: the rules PGD's ``optimizer`` option names
OPTIMIZERS: dict[str, type[StepRule]] = {
    "sign": Sign,
    "momentum": Momentum,
    "adam": Adam,
    "sgd": SGD,
    "rmsprop": RMSProp,
    "adagrad": Adagrad,
    "ftrl": FTRL,
}


def make(name: str, momentum: float = 1.0) -> StepRule:
    """A fresh rule ``name`` (one of :data:`OPTIMIZERS`); ``momentum`` is Momentum's ``mu``."""
    cls = OPTIMIZERS[one_of(name, "optimizer", tuple(OPTIMIZERS))]
    return cls(momentum) if cls is Momentum else cls()

"""WRM: Wasserstein robust training (Aman Sinha, Hongseok Namkoong, John Duchi, "Certifying
Some Distributional Robustness with Principled Adversarial Training", ICLR 2018,
arXiv:1710.10571; reference code github.com/duchi-lab/certifiable-distributional-robustness).

    min_theta  E_(x0,y) [ phi_gamma(theta; x0, y) ],
    phi_gamma(theta; x0, y) = sup_x { l(theta; x, y) - gamma * ||x - x0||_2^2 }

the Lagrangian relaxation of sup_{P : W_c(P, P0) <= rho} E_P l with the transport cost
c = ||x - x0||_2^2 (labels fixed). The inner supremum is the ascent of
:func:`robustlab.attacks.wrm.wrm_ascent` (the reference's step rule, 15 steps, no clipping to
[0, 1]), run in eval mode with the true labels; the outer loss is l at those points in train
mode, the points held fixed (by Danskin's theorem its gradient in theta is that of phi_gamma
at the maximiser). Its certificate is
:func:`robustlab.evaluation.wrm.wrm_certificate`.

Defaults from the reference's MNIST script: e = 1.3 (its ``eps``, = 1 / (2 gamma)), so
gamma = 0.5 / 1.3 = 0.385; 15 ascent steps; label smoothing 0.1 (0.9 on the true class, 0.1/9
on the others, in the ascent and in the outer loss); an ELU CNN trained with Adam lr 1e-3,
batch 256, 25 epochs (the recipe's business). The guarantee needs a smooth loss: with ReLU or
max-pooling the inner problem is not concave and the ascent finds only a local maximum.

Differences from the reference: the ascent runs in eval mode (the reference CNN has no
dropout or BatchNorm, so its values are the same there); the threat model is not used (the
budget is gamma, not eps).

Cost: (steps + 1) forward/backward passes for the ascent + 1 for the loss: 17 at 15 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import integer, number
from robustlab.attacks.wrm import smoothed_ce, wrm_ascent
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

#: the reference's ``eps`` = 1 / (2 gamma) on MNIST in [0, 1]
REFERENCE_E = 1.3


@register("wrm")
class WRM(Objective):
    """Mean (smoothed) cross-entropy at the WRM ascent's points: an estimate of the mean of
    phi_gamma plus gamma times the mean transport cost of those points.

    Args:
        gamma: the penalty gamma > 0 per squared l2 input unit (inputs in [0, 1]); larger is
            a weaker adversary. Default 0.5 / 1.3 = 0.385 (the reference's MNIST value).
        steps: ascent steps after the first (>= 0). Default 15.
        label_smoothing: mass s in [0, 1) moved from the true class to the others (s / (K - 1)
            each), in the ascent and in the loss. Default 0.1, the reference's.
    """

    needs_threat = False

    def __init__(
        self, gamma: float = 0.5 / REFERENCE_E, steps: int = 15, label_smoothing: float = 0.1
    ) -> None:
        self.gamma = number(gamma, "wrm gamma", low=0, low_open=True)
        self.steps = integer(steps, "wrm steps", minimum=0)
        self.label_smoothing = number(
            label_smoothing, "wrm label_smoothing", low=0, high=1, high_open=True
        )

    def config(self) -> dict:
        return super().config() | {
            "gamma": self.gamma,
            "steps": self.steps,
            "label_smoothing": self.label_smoothing,
        }

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The ascent's points T(x) (detached, not clipped), crafted in eval mode."""
        with eval_mode(model):
            return wrm_ascent(
                lambda xa: smoothed_ce(model(xa), y, self.label_smoothing),
                x,
                self.gamma,
                self.steps,
            )

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        x_adv = self.perturb(model, x, y)
        return smoothed_ce(model(x_adv), y, self.label_smoothing).mean()

"""Fast adversarial training: FGSM from a random start (Wong, Rice, Kolter, "Fast is Better
than Free: Revisiting Adversarial Training", ICLR 2020, https://arxiv.org/abs/2001.03994;
reference code github.com/locuslab/fast_adversarial).

    delta_0 ~ U(ball), clamped so that x + delta_0 lies in the bounds
    delta   = project(delta_0 + alpha * eps * sign(grad_delta CE(f(x + delta_0), y)))
    loss    = CE(f(x + delta), y)            (adversarial examples only, no clean term)

``project`` clips delta to the eps-ball and x + delta to the input bounds (l2 / l1 threat
models: a uniform start in that ball and one steepest-ascent step, then the exact projection).
Original defaults: step alpha = 1.25 eps (10/255 at eps 8/255 on CIFAR-10, 0.375 at 0.3 on
MNIST), with a cyclic learning rate (0 -> peak -> 0), 10-15 epochs, and early stopping when a
PGD probe on a training batch collapses (catastrophic overfitting). The cyclic schedule is the
recipe's job (``schedule = "cyclic"``) and the probe the trainer's (``single_step = True``
turns it on); this objective is only the loss.

Difference from the reference: its FGSM step runs with the model in train mode (BatchNorm
batch statistics, running statistics updated by the attack pass as well); we craft it in eval
mode like our other objectives (BatchNorm running statistics, dropout off), so BatchNorm
running statistics are updated once per minibatch. Models without BatchNorm or dropout are
unaffected. Mixed precision (apex O2 in the reference) is the trainer's business.

Cost: 2 forward/backward passes per minibatch (about 2x natural training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("fast-at")
class FastAT(Objective):
    """Mean cross-entropy at the FGSM point taken from a uniform random start in the ball.

    Args:
        alpha: FGSM step length as a multiple of eps (> 0); the step is ``alpha * eps``.
            Default 1.25 (Wong et al.'s 10/255 at 8/255). Steps much above 1.25 (e.g. 2.0)
            make catastrophic overfitting likely.
    """

    single_step = True

    def __init__(self, alpha: float = 1.25) -> None:
        number(alpha, "fast-at alpha (FGSM step as a multiple of eps)", low=0, low_open=True)
        self.alpha = float(alpha)

    def config(self) -> dict:
        return super().config() | {"alpha": self.alpha}

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """The adversarial inputs: random start, one step of ``alpha * eps``, eval mode; the
        last iterate (``keep_best=False``), never the start point."""
        step = max(self.alpha * threat.eps, 1e-12)  # eps = 0: the projection returns x
        attack = PGD(threat, steps=1, step_size=step, random_start=True, keep_best=False)
        return attack.craft(model, x, y, generator)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        return F.cross_entropy(model(self.perturb(model, x, y, threat, generator)), y)

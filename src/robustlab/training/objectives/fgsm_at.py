"""FGSM adversarial training (Goodfellow, Shlens, Szegedy, "Explaining and Harnessing
Adversarial Examples", ICLR 2015, https://arxiv.org/abs/1412.6572).

    J(theta; x, y) = alpha * CE(f(x), y) + (1 - alpha) * CE(f(x'), y),
    x' = x + eps * sign(grad_x CE(f(x), y))   (clipped to the input bounds)

A fixed mix of clean and FGSM examples, the FGSM point regenerated from the current model at
every minibatch and treated as a constant (the gradient of J does not flow through its
construction). Original defaults: alpha = 0.5, a step of eps with no random start (MNIST maxout
network, eps = 0.25). For l2 / l1 threat models x' is one steepest-ascent step of length eps.

Choices: the FGSM point is crafted with the model in eval mode (dropout off, BatchNorm running
statistics), as in our other objectives; the maxout network of the paper has neither, so the
reference fixes no mode. The clean and adversarial terms are two separate forward passes in
train mode, so BatchNorm normalises each half with its own batch statistics (and updates its
running statistics twice per minibatch), rather than one pass over the concatenated batch.

Cost: 1 forward/backward for the attack + 2 forwards and 1 backward for the loss (about 2-3x
natural training). Single-step: prone to catastrophic overfitting and label leaking (Kurakin
et al. 2017); evaluate with PGD / AutoAttack, never with FGSM alone.
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


@register("fgsm-at")
class FGSMAT(Objective):
    """``alpha * CE(clean) + (1 - alpha) * CE(FGSM point)``, both means over the batch.

    Args:
        alpha: weight of the clean term, in [0, 1]; 1 - alpha weighs the FGSM term.
            Default 0.5 (Goodfellow et al.).
    """

    single_step = True

    def __init__(self, alpha: float = 0.5) -> None:
        number(alpha, "fgsm-at alpha (weight of the clean term)", low=0, high=1)
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
        """The FGSM point: one step of length eps from x, no random start, eval mode. (PGD
        with one step and ``keep_best=False``: the FGSM attack keeps the better of x and the
        step, which is right for evaluation but not the method.)"""
        attack = PGD(
            threat, steps=1, step_size=max(threat.eps, 1e-12), random_start=False, keep_best=False
        )
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
        x_adv = self.perturb(model, x, y, threat, generator)
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
        return self.alpha * clean + (1 - self.alpha) * adv

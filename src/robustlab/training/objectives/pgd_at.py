"""PGD adversarial training (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", https://arxiv.org/abs/1706.06083).

    min_theta E_(x,y) [ max_{delta in ball} CE(f_theta(x + delta), y) ]

The inner maximisation is K steps of PGD from a random start, returning the last iterate. As in
the TRADES and MART reference code, the adversarial examples are crafted with the model in eval
mode (dropout off, BatchNorm running statistics) and the outer loss is taken in train mode.
Original MNIST setting: linf eps 0.3, 40 steps of 0.01; CIFAR-10: eps 8/255, 7 steps of 2/255
(10 in the released config). Cost: (K + 1) forward/backward passes per minibatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("pgd-at")
class PGDAT(Objective):
    """Mean cross-entropy at PGD-``steps`` adversarial examples inside the threat ball.

    Args:
        steps: PGD iterations K (>= 1).
        step_size: PGD step; ``None`` means ``2.5 eps / steps``.
        random_start: start from a uniform point of the ball (Madry et al.) or from x.
    """

    def __init__(
        self, steps: int = 10, step_size: float | None = None, random_start: bool = True
    ) -> None:
        positive_int(steps, f"{self.name} steps")
        if step_size is not None:
            number(step_size, f"{self.name} step_size", low=0, low_open=True)
        self.steps, self.step_size, self.random_start = steps, step_size, bool(random_start)

    def config(self) -> dict:
        return super().config() | {
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
        }

    def adversarial(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """The inner maximisation: PGD's last iterate, crafted in eval mode."""
        attack = PGD(
            threat,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            keep_best=False,
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
        return F.cross_entropy(model(self.adversarial(model, x, y, threat, generator)), y)

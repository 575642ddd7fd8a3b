"""PGD adversarial training (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", https://arxiv.org/abs/1706.06083).

    min_theta E_(x,y) [ max_{delta in ball} CE(f_theta(x + delta), y) ]

The inner maximisation is K steps of PGD from a random start, returning the last iterate. As in
the TRADES and MART reference code, the adversarial examples are crafted with the model in eval
mode (dropout off, BatchNorm running statistics) and the outer loss is taken in train mode.
Original MNIST setting: linf eps 0.3, 40 steps of 0.01; CIFAR-10: eps 8/255, 7 steps of 2/255.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.pgd import PGD
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register


@register("pgd-at")
def pgd_at(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: ThreatModel,
    generator: torch.Generator | None = None,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
) -> Tensor:
    """Mean cross-entropy at PGD-``steps`` adversarial examples (step ``2.5 eps / steps`` by
    default) inside ``threat``."""
    if threat is None:
        raise ValueError("pgd-at needs a threat model: pass threat=ThreatModel('linf', eps)")
    attack = PGD(threat, steps=steps, step_size=step_size, random_start=random_start,
                 keep_best=False)
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    x_adv = attack.craft(model, x, y, generator)
    return F.cross_entropy(model(x_adv), y)

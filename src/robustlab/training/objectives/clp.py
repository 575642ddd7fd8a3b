"""Clean logit pairing and logit squeezing (Kannan, Kurakin, Goodfellow, 2018, "Adversarial
Logit Pairing", https://arxiv.org/abs/1803.06373).

    J = CE(f(x), y) + lambda * 1/m sum_i L(f(x_i), f(x_pi(i))) + mu * 1/m sum_i ||f(x_i)||^2 / K

CLP pairs the logits of random pairs of *clean* examples (no attack); logit squeezing (weight
``mu``, off by default) penalises the logit norm. ``L`` is the squared L2 distance of the logits
divided by the number of classes K (the mean squared error over logit entries), the distance of
the authors' released ALP code; the squeezing term uses the same scale.

Pairs: a random cyclic order of the minibatch drawn from ``generator``; each example is paired
with its successor in that cycle, so every example appears in two pairs and none is paired with
itself (for a batch of one the term is 0). The paper does not say how pairs are formed.

Original settings (MNIST, SVHN, ImageNet) and lambda values: unverified; no official CLP code is
known. Cost: one forward/backward pass, as natural training.

Caution: Mosbach et al. (2018, "Logit Pairing Methods Can Fool Gradient-Based Attacks") showed
that CLP/LSQ robustness largely comes from masked gradients: evaluate with restarts and
gradient-free attacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


def random_partners(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Index of each example's partner: its successor in a random cyclic order of ``range(n)``."""
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


@register("clp")
class CLP(Objective):
    """Cross-entropy on clean inputs plus clean logit pairing (and optional logit squeezing).

    Args:
        weight: lambda >= 0 of the pairing term (mean squared logit difference of random
            clean pairs). Default 0.5 (the ALP reference's weight; unverified for CLP).
        squeeze: mu >= 0 of the logit-squeezing term (mean squared logit entry). Default 0.
    """

    needs_threat = False

    def __init__(self, weight: float = 0.5, squeeze: float = 0.0) -> None:
        number(weight, "clp weight", low=0)
        number(squeeze, "clp squeeze", low=0)
        self.weight, self.squeeze = float(weight), float(squeeze)

    def config(self) -> dict:
        return super().config() | {"weight": self.weight, "squeeze": self.squeeze}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel | None,
             generator: torch.Generator) -> Tensor:
        logits = model(x)
        partner = random_partners(len(x), generator, x.device)
        pairing = (logits - logits[partner]).square().mean()
        return (F.cross_entropy(logits, y) + self.weight * pairing
                + self.squeeze * logits.square().mean())

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

Variants (``variant``): ``"paper"`` (default) is the objective above. ``"lecture"`` is the seed
lecture's form (issue 23), which pairs clean logits on top of adversarial training:

    J = CE(f(x~), y) + lambda * 1/m sum_i ||f(x_i) - f(x_pi(i))||_2^2
                     + mu * 1/m sum_i ||f(x_i)||_2^2

x~ the PGD-``steps`` example of x_i (pgd-at's attack: eval mode, random start, step
``2.5 eps / steps``, last iterate), the distances summed over the K classes (K times the paper's
terms at the same weights), clean and adversarial inputs in one train-mode forward pass (as
alp). It needs a threat model; cost (steps + 1) F/B on the doubled batch, as alp. The paper is
the default: CLP's point in the paper is robustness *without* the cost of an attack.

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

from robustlab._validate import number, one_of, positive_int
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.pgd_at import PGDAT

VARIANTS = ("paper", "lecture")


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
        variant: ``"paper"`` (clean CE, no attack, terms averaged over classes; default) or
            ``"lecture"`` (CE at PGD examples, terms summed over classes; needs a threat).
        steps: PGD iterations of the ``"lecture"`` variant (>= 1; unused by ``"paper"``).
            Default 10.
    """

    needs_threat = False  # the class default; the "lecture" variant sets it on the instance

    def __init__(
        self, weight: float = 0.5, squeeze: float = 0.0, variant: str = "paper", steps: int = 10
    ) -> None:
        number(weight, "clp weight", low=0)
        number(squeeze, "clp squeeze", low=0)
        self.weight, self.squeeze = float(weight), float(squeeze)
        self.variant = one_of(variant, "clp variant", VARIANTS)
        self.steps = positive_int(steps, "clp steps")
        self.needs_threat = self.variant == "lecture"

    def config(self) -> dict:
        return super().config() | {
            "weight": self.weight,
            "squeeze": self.squeeze,
            "variant": self.variant,
            "steps": self.steps,
        }

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        partner = random_partners(len(x), generator, x.device)
        if self.variant == "paper":
            logits = model(x)
            pairing = (logits - logits[partner]).square().mean()
            return (
                F.cross_entropy(logits, y)
                + self.weight * pairing
                + self.squeeze * logits.square().mean()
            )
        assert threat is not None
        x_adv = PGDAT(steps=self.steps).adversarial(model, x, y, threat, generator)
        logits, adv = model(torch.cat([x, x_adv])).chunk(2)
        pairing = (logits - logits[partner]).square().sum(1).mean()
        return (
            F.cross_entropy(adv, y)
            + self.weight * pairing
            + self.squeeze * logits.square().sum(1).mean()
        )

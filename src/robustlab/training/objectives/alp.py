"""Adversarial logit pairing (Kannan, Kurakin, Goodfellow, 2018, "Adversarial Logit Pairing",
https://arxiv.org/abs/1803.06373).

    J = 1/2 CE(f(x), y) + 1/2 CE(f(x~), y) + lambda * 1/m sum_i L(f(x_i), f(x~_i))

Mixed-minibatch adversarial training (clean and PGD examples, equal weight) plus a penalty
pulling each clean example's logits towards those of its adversarial counterpart. ``L`` is the
squared L2 distance of the logits divided by the number of classes K, i.e. the mean squared
error over the logit entries, as in the authors' released TensorFlow code
(``tensorflow/models/research/adversarial_logit_pairing``: ``tf.losses.mean_squared_error`` on
the two halves of the logits). The paper's text only says "L2 loss".

As in that code, the PGD examples are crafted in eval mode and the clean and adversarial
halves go through the model in *one* train-mode forward pass (one concatenated minibatch,
so BatchNorm sees the statistics of the mixed batch).

Original settings: ImageNet ``train_lp_weight = 0.5`` (README example; the released 64x64
checkpoint's name suggests 0.25, unverified) with 10-step least-likely targeted PGD at 16/255;
MNIST with Madry-style untargeted PGD at eps 0.3 (lambda unverified). We use untargeted PGD
(robustlab's PGD, last iterate, random start), default 10 steps of ``2.5 eps / steps``.
The reference also applies label smoothing 0.1, which we leave out.

Cost: K F/B (attack) + 1 F/B on the doubled batch, i.e. PGD-AT's cost with twice the batch in
the outer pass.

Variants (``variant``): ``"paper"`` (default) is the objective above, the authors' code.
``"lecture"`` is the seed lecture's formula (PGD-AT plus the pairing term, issue 23):

    J = CE(f(x~), y) + lambda * 1/m sum_i ||f(x_i) - f(x~_i)||_2^2

adversarial CE only (no clean term) and the squared L2 distance summed over the K classes (K
times the paper's penalty at the same lambda). Both use the same PGD examples and the same
mixed forward pass. The paper is the default because it is what the published numbers (and
their breaks) were measured with; the lecture's form is the one taught.

Caution: logit pairing is known to mask gradients (Engstrom, Ilyas, Athalye 2018,
arXiv:1807.10272): evaluate with restarts and gradient-free attacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.pgd_at import PGDAT

VARIANTS = ("paper", "lecture")


def logit_pairing(a: Tensor, b: Tensor, per_class: bool = True) -> Tensor:
    """Mean over the batch of ``||a_i - b_i||^2 / K`` (the mean squared error of the logits);
    with ``per_class=False`` of ``||a_i - b_i||^2`` (summed over the K classes)."""
    d = (a - b).square()
    return d.mean() if per_class else d.sum(1).mean()


@register("alp")
class ALP(PGDAT):
    """Mixed clean/PGD cross-entropy plus ``weight`` times the logit-pairing penalty.

    Args:
        weight: lambda >= 0, weight of the pairing term (mean squared logit difference).
            Default 0.5 (the reference README's ImageNet setting; unverified for other data).
        steps: PGD iterations (>= 1). Default 10.
        step_size: PGD step in input units; ``None`` means ``2.5 eps / steps``.
        random_start: start PGD from a uniform point of the ball. Default True.
        variant: ``"paper"`` (mixed clean/adversarial CE, penalty averaged over classes;
            default) or ``"lecture"`` (adversarial CE, penalty summed over classes).
    """

    def __init__(
        self,
        weight: float = 0.5,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        variant: str = "paper",
    ) -> None:
        super().__init__(steps=steps, step_size=step_size, random_start=random_start)
        number(weight, "alp weight", low=0)
        self.weight, self.variant = float(weight), one_of(variant, "alp variant", VARIANTS)

    def config(self) -> dict:
        return super().config() | {"weight": self.weight, "variant": self.variant}

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        x_adv = self.adversarial(model, x, y, threat, generator)
        clean, adv = model(torch.cat([x, x_adv])).chunk(2)
        if self.variant == "lecture":
            return F.cross_entropy(adv, y) + self.weight * logit_pairing(clean, adv, False)
        ce = (F.cross_entropy(clean, y) + F.cross_entropy(adv, y)) / 2
        return ce + self.weight * logit_pairing(clean, adv)

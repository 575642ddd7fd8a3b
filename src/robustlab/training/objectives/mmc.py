"""Max-Mahalanobis center loss (Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax
Cross-Entropy Loss for Adversarial Robustness", ICLR 2020, https://arxiv.org/abs/1905.10626;
reference code github.com/P2333/Max-Mahalanobis-Training).

    L_MMC(x, y) = 0.5 * ||z(x) - mu_y||^2 = -0.5 * logits_y(x)

z is the feature of the model's :class:`~robustlab.models.heads.MMCHead` and mu_1..mu_L its
fixed Max-Mahalanobis centers (``||mu_i||^2 = C_MM``, pairwise inner products
``-C_MM / (L - 1)``); the head's logits are ``-||z - mu_i||^2``, so prediction is the nearest
center. Build the model with ``robustlab.models.create(name, head="mmc")``. Original
defaults: C_MM (``mean_var``) = 10 (a head option), momentum SGD lr 0.01, batch 50, 40 epochs
(MNIST) / 200 (CIFAR).

Adversarially trained MMC (the paper's MMC + PGD; ``steps`` >= 1): the loss is taken at
x' = PGD-``steps`` on the same per-example MMC loss (random start, last iterate, eval mode,
as pgd-at), ``L = 0.5 ||z(x') - mu_y||^2``. The reference's adversarial training attacks
with targeted PGD toward a random class (unverified on our side); we use the untargeted
ascent of the training loss itself, Madry et al.'s form.

Differences from the reference: ``||mu||^2 = C_MM`` as in the paper (the released MMLDA
``train.py`` scales unit centers by ``mean_var``, i.e. ``||mu|| = mean_var``). Attacks on an
MMC model must use these logits (margin/DLR on them); softmax probabilities are meaningless.
Cost: 1 forward/backward, as natural training; with PGD, (steps + 1) F/B as pgd-at.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustlab._validate import integer, number
from robustlab.attacks.pgd import PGD
from robustlab.models.heads import MMCHead
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


def mmc_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example ``0.5 ||z - mu_y||^2 = -0.5 logits_y`` of an MMC head's logits, shape (N,)."""
    return -0.5 * logits.gather(1, y[:, None]).squeeze(1)


@register("mmc")
class MMC(Objective):
    """Half the squared distance of the MMC feature to its class center, batch mean, at the
    clean input or (``steps`` >= 1) at PGD examples of that same loss. C_MM belongs to the
    model's head.

    Args:
        steps: PGD iterations of the adversarially trained variant (>= 0); 0 (default) trains
            on clean inputs and needs no threat model.
        step_size: PGD step in input units (> 0); ``None`` means ``2.5 eps / steps``.
    """

    needs_threat = False

    def __init__(self, steps: int = 0, step_size: float | None = None) -> None:
        integer(steps, "mmc steps", minimum=0)
        if step_size is not None:
            number(step_size, "mmc step_size", low=0, low_open=True)
        self.steps, self.step_size = steps, step_size
        self.needs_threat = steps > 0

    def config(self) -> dict:
        return super().config() | {"steps": self.steps, "step_size": self.step_size}

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        if not any(isinstance(m, MMCHead) for m in model.modules()):
            raise ValueError(
                f"objective 'mmc' needs a model with an MMC head, but "
                f"{type(model).__name__} has none: build it with "
                "robustlab.models.create(name, head='mmc')"
            )
        if self.steps > 0:
            assert threat is not None
            attack = PGD(
                threat, steps=self.steps, step_size=self.step_size, loss=mmc_loss, keep_best=False
            )
            x = attack.craft(model, x, y, generator)
        return mmc_loss(model(x), y).mean()

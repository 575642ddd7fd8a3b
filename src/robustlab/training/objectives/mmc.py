"""Max-Mahalanobis center loss (Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax
Cross-Entropy Loss for Adversarial Robustness", ICLR 2020, https://arxiv.org/abs/1905.10626;
reference code github.com/P2333/Max-Mahalanobis-Training).

    L_MMC(x, y) = 0.5 * ||z(x) - mu_y||^2 = -0.5 * logits_y(x)

z is the feature of the model's :class:`~robustlab.models.heads.MMCHead` and mu_1..mu_L its
fixed Max-Mahalanobis centers (``||mu_i||^2 = C_MM``, pairwise inner products
``-C_MM / (L - 1)``); the head's logits are ``-||z - mu_i||^2``, so prediction is the nearest
center. Build the model with ``robustlab.models.create(name, head="mmc")``. Original
defaults: C_MM (``mean_var``) = 10 (a head option), momentum SGD lr 0.01, batch 50, 40 epochs
(MNIST) / 200 (CIFAR); the adversarially trained variant (targeted PGD) is not implemented.

Differences from the reference: ``||mu||^2 = C_MM`` as in the paper (the released MMLDA
``train.py`` scales unit centers by ``mean_var``, i.e. ``||mu|| = mean_var``). Attacks on an
MMC model must use these logits (margin/DLR on them); softmax probabilities are meaningless.
Cost: 1 forward/backward, as natural training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustlab.models.heads import MMCHead
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("mmc")
class MMC(Objective):
    """Half the squared distance of the MMC feature to its class center, batch mean.
    No options (C_MM belongs to the model's head)."""

    needs_threat = False

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel | None,
             generator: torch.Generator) -> Tensor:
        if not any(isinstance(m, MMCHead) for m in model.modules()):
            raise ValueError(f"objective 'mmc' needs a model with an MMC head, but "
                             f"{type(model).__name__} has none: build it with "
                             "robustlab.models.create(name, head='mmc')")
        return -0.5 * model(x).gather(1, y[:, None]).mean()

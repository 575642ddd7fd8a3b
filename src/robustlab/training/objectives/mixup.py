"""mixup training (Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk
Minimization", ICLR 2018, arXiv:1710.09412; reference code github.com/facebookresearch/
mixup-cifar10, ``train.py``).

One lambda ~ Beta(alpha, alpha) per minibatch and a random permutation pi of the minibatch:

    x_mix = lambda x + (1 - lambda) x_pi,
    L = lambda CE(f(x_mix), y) + (1 - lambda) CE(f(x_mix), y_pi)

(the CE of the mixed one-hot labels). Both draws come from the objective's generator
(lambda through NumPy's Beta sampler, seeded from it), so a run is reproducible.

Defaults: alpha = 1 (the official CIFAR-10 code: PreAct-ResNet-18, SGD lr 0.1, wd 1e-4,
batch 128, 200 epochs); the paper uses alpha in [0.1, 0.4] on ImageNet (unverified). Mixup
Inference (``robustlab.defenses.create("mixup-inference", ...)``, Pang et al. 2020) assumes a
model trained with this objective (or with interpolated adversarial training). mixup alone is
no adversarial defense: the paper's robustness figures are FGSM-level, and Rice et al. found
it does not prevent robust overfitting when combined with PGD-AT (not offered here).
Differences from the reference: none in the loss; accuracy on mixed batches is not logged.
Cost: 1 forward/backward per minibatch, as natural training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("mixup")
class Mixup(Objective):
    """Cross-entropy of mixed inputs against their mixed labels.

    Args:
        alpha: the Beta(alpha, alpha) parameter (> 0). Default 1.0 (CIFAR-10, reference code).
    """

    needs_threat = False

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = number(alpha, "mixup alpha", low=0, low_open=True)

    def config(self) -> dict:
        return super().config() | {"alpha": self.alpha}

    def draw(self, n: int, generator: torch.Generator) -> tuple[float, Tensor]:
        """``(lambda, pi)`` for a minibatch of ``n``: lambda ~ Beta(alpha, alpha) in [0, 1],
        pi a permutation of ``range(n)`` (on the generator's device)."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        return lam, torch.randperm(n, generator=generator, device=generator.device)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        lam, perm = self.draw(len(x), generator)
        perm = perm.to(x.device)
        logits = model(lam * x + (1 - lam) * x[perm])
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])

"""Gaussian data augmentation, the training of the base classifier of randomised smoothing
(Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019, https://arxiv.org/abs/1902.02918; reference code github.com/locuslab/smoothing
``code/train.py``).

    min_theta E_(x,y) E_delta [ CE(f_theta(x + delta), y) ],   delta ~ N(0, sigma^2 I)

One noise draw per example and step. The noise is added in [0, 1] pixel space, before the
model's normalisation layer, and the noisy input is **not** clipped to [0, 1] (Cohen et al. do
not clip: the certificate is about exactly this noise). Train with the sigma that smoothing
(``robustlab.defenses.create("smoothing", ...)``, ``robustlab.defenses.certify``) will use.

Original settings: CIFAR-10 sigma in {0.12, 0.25, 0.5, 1.0}, ResNet-110, 90 epochs, SGD lr 0.1
(x 0.1 every 30 epochs), batch 256, weight decay 1e-4; ImageNet sigma in {0.25, 0.5, 1.0}.
``noise="laplace"`` trains for l1 certificates instead (Laplace(0, sigma) per coordinate, see
:mod:`robustlab.noise`). Cost: 1 forward/backward per minibatch, as natural training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.noise import check_noise, sample
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("gaussian-aug")
class GaussianAug(Objective):
    """Mean cross-entropy on inputs plus fresh noise (the threat model is not used).

    Args:
        sigma: noise scale in [0, 1] pixel units (>= 0): the standard deviation of the
            Gaussian, the scale b of the Laplace. Default 0.25.
        noise: ``"gaussian"`` (l2 certificates, Cohen et al.), ``"laplace"`` (l1) or
            ``"uniform-l0"`` (l0 certificates, Lee et al. 2019: sigma is then the keep
            probability alpha in (0, 1)).
    """

    needs_threat = False

    def __init__(self, sigma: float = 0.25, noise: str = "gaussian") -> None:
        check_noise(noise, sigma)
        self.sigma, self.noise = float(sigma), noise

    def config(self) -> dict:
        return super().config() | {"sigma": self.sigma, "noise": self.noise}

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        return F.cross_entropy(model(x + sample(x, self.noise, self.sigma, generator)), y)

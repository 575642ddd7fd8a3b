"""Adversarial training under input noise, the training of smoothed inference (CNI-I+W;
Nemcovsky, Zheltonozhskii, Baskin, Chmiel, Fishman, Bronstein, Mendelson, "Smoothed Inference
for Adversarially-Trained Models", arXiv 2019, https://arxiv.org/abs/1911.07198; reference code
github.com/yanemcovsky/SIAM, ``adv_forward_backward`` in ``models/resnet_cpni_smooth_*.py``).

Every forward of the model sees input noise ("I"); weight noise ("W", CNI or PNI) comes from
the model itself (``models.create(..., noise="cni-w")``):

    L = w * CE(f(x_adv + delta_1), y) + (1 - w) * CE(f(x + delta_2), y),   w = adv_weight,

delta ~ N(0, sigma^2 I) added in [0, 1] pixel space and not clipped; x_adv is crafted on the
noisy model, in eval mode, and the loss taken in train mode (as in the reference):

- ``attack="pgd"``: PGD on ``x' -> f(x' + delta)`` with a fresh delta at every step (one noise
  draw per forward, the model's weight noise too), random start, last iterate;
- ``attack="epgd"``: EPGD, the gradient of the mean cross-entropy over ``samples`` noisy
  copies per step (:mod:`robustlab.attacks`, ``"epgd"``; one forward per copy, so every copy
  gets its own input and weight-noise draw, as in the reference).

Learnable sigma (the "I" of CNI-I+W as a trained scale, SIAM's ``learn_noise``): with
``sigma="model"`` the input noise is the model's own, a learnable ``input_noise.sigma``
(``models.create(..., noise="cni-w", noise_options={"input_sigma": 0.15})``, or
``noise="input"``; :mod:`robustlab.models.noise`), drawn inside every forward from torch's
global RNG; the objective adds none, and the trainer's optimiser learns sigma with the
weights (no weight decay). Then L = w CE(f(x_adv), y) + (1 - w) CE(f(x), y) with the noise
inside f, and the attack is PGD (or EPGD over ``samples`` forwards) on the noisy model itself.
To smooth such a model, switch its own noise off (``models.noise.disabled``) and smooth at the
learned ``|sigma|``, so the noise is not added twice.

Reference defaults: w = 0.5, sigma = 0.2 in *normalised* input units, which is about
0.2 * 0.25 = 0.05 in [0, 1] pixels on CIFAR-10 (per-channel std about 0.25) and is 1.6 times
eps = 8/255; PGD/EPGD with step eps/4, 7 steps, random start, m_train = 8 samples; ResNet-20,
SGD Nesterov lr 0.1, 400 epochs; the checkpoints' names suggest fine-tuning of a PGD-trained
model (unverified). Our default sigma = 0.15 pixels is for Fashion-MNIST at linf eps 0.1:
it keeps the reference's ratio sigma / eps ~ 1.6 (the noise has to hide perturbations of the
size of eps). The reference's ratio to the data's std would give 0.2 * 0.35 = 0.07 instead;
use ``robustlab.defenses.create("smoothing", model, sigma=...)`` at inference with the sigma
trained here.

Differences from the reference: input gradients are zeroed between PGD steps (the reference's
EPGD and PGD accumulate them across steps, a momentum-like quirk); noise and attack work in
[0, 1] pixel space, normalisation being the model's first layer. Cost: PGD K F/B + 2 F + 1 B;
EPGD K * samples F/B + 2 F + 1 B per minibatch (7 and 56 F/B at the defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of, positive_int
from robustlab.attacks import create as create_attack
from robustlab.models.noise import InputNoise
from robustlab.noise import check_noise, refuse_input_noise, sample
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

ATTACKS = ("pgd", "epgd")


class NoisyModel(nn.Module):
    """``x -> model(x + delta)`` with a fresh ``delta`` (from ``generator``) at every forward:
    the noisy model the inner attack of :class:`NoiseAT` sees. Not clipped."""

    def __init__(
        self, model: nn.Module, noise: str, sigma: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.model, self.noise, self.sigma, self.generator = model, noise, sigma, generator
        self.training = model.training  # eval_mode gives the model back this mode

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x + sample(x, self.noise, self.sigma, self.generator))


@register("noise-at")
class NoiseAT(Objective):
    """Noisy clean and noisy adversarial cross-entropy, mixed with weight ``adv_weight``.

    Args:
        sigma: input-noise scale in [0, 1] pixel units (>= 0). Default 0.15 (Fashion-MNIST,
            see the module docstring; the reference's CIFAR-10 value is about 0.05).
            ``"model"``: the model's own learnable input noise (the model must have one).
        adv_weight: w in [0, 1], the weight of the adversarial term. Default 0.5.
        attack: ``"pgd"`` (one noise draw per step) or ``"epgd"`` (``samples`` draws per step).
        samples: EPGD's noisy forwards per step (>= 1; ``attack="epgd"`` only). Default 8.
        steps: attack iterations K (>= 1). Default 7.
        step_size: attack step in input units (> 0); ``None`` means ``eps / 4``.
        noise: ``"gaussian"`` or ``"laplace"`` input noise (scale ``sigma``).
    """

    def __init__(
        self,
        sigma: float | str = 0.15,
        adv_weight: float = 0.5,
        attack: str = "pgd",
        samples: int = 8,
        steps: int = 7,
        step_size: float | None = None,
        noise: str = "gaussian",
    ) -> None:
        if isinstance(sigma, str):
            one_of(sigma, "noise-at sigma", ("model",))
        refuse_input_noise(noise, "noise-at")
        check_noise(noise, 0.0 if isinstance(sigma, str) else sigma)  # a str is "model"
        number(adv_weight, "noise-at adv_weight", low=0, high=1)
        one_of(attack, "noise-at attack", ATTACKS)
        positive_int(samples, "noise-at samples")
        positive_int(steps, "noise-at steps")
        if step_size is not None:
            number(step_size, "noise-at step_size", low=0, low_open=True)
        self.sigma = sigma if sigma == "model" else float(sigma)
        self.adv_weight, self.attack = float(adv_weight), attack
        self.samples, self.steps, self.noise = samples, steps, noise
        self.step_size = None if step_size is None else float(step_size)

    def config(self) -> dict:
        return super().config() | {
            "sigma": self.sigma,
            "adv_weight": self.adv_weight,
            "attack": self.attack,
            "samples": self.samples,
            "steps": self.steps,
            "step_size": self.step_size,
            "noise": self.noise,
        }

    def _sigma(self, model: nn.Module) -> float:
        """The objective's own noise scale: 0 when the noise is the model's (``"model"``)."""
        if not isinstance(self.sigma, str):
            return self.sigma
        if not any(isinstance(m, InputNoise) for m in model.modules()):
            raise ValueError(
                f"noise-at with sigma='model' trains the model's own input noise, but "
                f"{type(model).__name__} has none: build it with models.create(..., "
                "noise='input') or noise_options={'input_sigma': ...}, or give "
                "noise-at a sigma"
            )
        return 0.0

    def adversarial(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """x_adv: ``steps`` attack iterations on the noisy model, in eval mode (x itself
        when eps = 0)."""
        if threat.eps == 0:
            return x.detach()
        step = self.step_size if self.step_size is not None else threat.eps / 4
        sigma = self._sigma(model)
        if self.attack == "epgd":
            atk = create_attack(
                "epgd",
                threat,
                sigma=sigma,
                noise=self.noise,
                samples=self.samples,
                steps=self.steps,
                step_size=step,
                random_start=True,
                keep_best=False,
            )
            return atk.craft(model, x, y, generator)
        atk = create_attack(
            "pgd", threat, steps=self.steps, step_size=step, random_start=True, keep_best=False
        )
        noisy = model if sigma == 0 else NoisyModel(model, self.noise, sigma, generator)
        return atk.craft(noisy, x, y, generator)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        sigma = self._sigma(model)
        # both loss-noise draws first: the adversarial and clean terms see fixed draws
        # whatever the attack consumes
        delta_adv = sample(x, self.noise, sigma, generator)
        delta_clean = sample(x, self.noise, sigma, generator)
        w = self.adv_weight
        if w == 0:  # no adversarial term: skip the attack
            return F.cross_entropy(model(x + delta_clean), y)
        x_adv = self.adversarial(model, x, y, threat, generator)
        adv = F.cross_entropy(model(x_adv + delta_adv), y)
        if w == 1:
            return adv
        return w * adv + (1 - w) * F.cross_entropy(model(x + delta_clean), y)

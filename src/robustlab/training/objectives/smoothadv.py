"""SmoothAdv: adversarial training of the smoothed classifier (Salman, Yang, Li, Zhang, Zhang,
Razenshteyn, Bubeck, "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", NeurIPS 2019, https://arxiv.org/abs/1906.04584; reference code
github.com/Hadisalman/smoothing-adversarial ``code/train_pgd.py``, ``code/attacks.py``).

For each example draw m = ``samples`` noise tensors delta_1..delta_m once, then

    x_adv ~ argmax_{x' in ball(x)} -log( (1/m) sum_i softmax(f(x' + delta_i))_y )
    L = (1/m) sum_i CE(f(x_adv + delta_i), y)

The inner maximisation attacks the *soft smoothed classifier* (log of the mean probability,
not the mean log-probability as EPGD does) with the **same** draws as the loss, as in the
reference: K steps from x (no random start) along the normalised gradient (the l2 unit
direction, or the sign for linf; ``threat.steepest_step``) of length ``2 eps / K``, projected
onto the ball and the bounds; eval mode, input gradients only. The loss is taken in train mode
on the m * B noisy copies in one batch. The noise is added in [0, 1] pixel space and not
clipped. eps is ramped linearly over the first ``warmup`` epochs: epoch e (0-based) attacks
with ``min(1, (e + 1) / warmup) * eps`` (the step follows it); the trainer's
:meth:`begin_epoch` sets it, so a resumed run gets the right value with no extra state.

Reference settings: l2 eps in {0.25, 0.5, 1.0, 2.0} on the [0, 1] scale, K in {1, 2, 4, 8, 10}
(default 10), m_train in {1, 2, 4, 8} (argparse default 1, README example 2), sigma in
{0.12, 0.25, 0.5, 1.0}, warmup default 1 (example 10).

Differences from the reference: the projection is the exact Euclidean projection onto
ball ∩ box (the reference clamps x + delta to [0, 1], then renorms delta to eps); the draws
are made here and handed to the ``smoothadv`` attack (``craft_with_draws``); linf threats
(sign steps) are supported as well; the DDN variant is not. The m * B noisy copies go
through the model in one forward, so a weight-noise model (PNI, CNI) applies one weight draw
to all of them. Cost: K * m F/B (attack) + m F + m B (loss) per minibatch, in batches of m * B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.smoothadv import SmoothAdv as SmoothAdvAttack
from robustlab.noise import check_noise, refuse_input_noise, sample
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("smoothadv")
class SmoothAdv(Objective):
    """Mean cross-entropy over ``samples`` noisy copies of the SmoothAdv-PGD point.

    Args:
        sigma: noise scale in [0, 1] pixel units (>= 0). Default 0.25.
        samples: noise draws m per example, shared by the attack and the loss (>= 1).
            Default 2.
        steps: attack iterations K (>= 1). Default 10.
        step_size: attack step in input units (> 0); ``None`` means ``2 eps / steps`` with
            the epoch's (ramped) eps.
        warmup: epochs over which eps grows linearly to its full value (>= 1; 1: no ramp).
        noise: ``"gaussian"`` or ``"laplace"`` (scale ``sigma``).
    """

    def __init__(
        self,
        sigma: float = 0.25,
        samples: int = 2,
        steps: int = 10,
        step_size: float | None = None,
        warmup: int = 1,
        noise: str = "gaussian",
    ) -> None:
        refuse_input_noise(noise, "smoothadv")
        check_noise(noise, sigma)
        positive_int(samples, "smoothadv samples")
        positive_int(steps, "smoothadv steps")
        positive_int(warmup, "smoothadv warmup")
        if step_size is not None:
            number(step_size, "smoothadv step_size", low=0, low_open=True)
        self.sigma, self.samples, self.steps, self.warmup = float(sigma), samples, steps, warmup
        self.step_size = None if step_size is None else float(step_size)
        self.noise = noise
        self.eps_scale = 1.0  # set by begin_epoch; 1 outside a trainer

    def config(self) -> dict:
        return super().config() | {
            "sigma": self.sigma,
            "samples": self.samples,
            "steps": self.steps,
            "step_size": self.step_size,
            "warmup": self.warmup,
            "noise": self.noise,
        }

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.eps_scale = min(1.0, (epoch + 1) / self.warmup)

    def adversarial(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        noise: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """``steps`` normalised-gradient steps of the ``smoothadv`` attack with the fixed draws
        ``noise`` (m, B, ...), from x, in eval mode; the last iterate."""
        eps = self.eps_scale * threat.eps
        if eps == 0:
            return x.detach()
        attack = SmoothAdvAttack(
            ThreatModel(threat.norm, eps, threat.bounds),
            sigma=self.sigma,
            noise=self.noise,
            samples=self.samples,
            steps=self.steps,
            step_size=self.step_size,
            keep_best=False,
        )
        return attack.craft_with_draws(model, x, y, noise, generator)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        noise = sample(x.expand(self.samples, *x.shape), self.noise, self.sigma, generator)
        x_adv = self.adversarial(model, x, y, noise, threat, generator)
        logits = model((x_adv.unsqueeze(0) + noise).flatten(0, 1))
        return F.cross_entropy(logits, y.repeat(self.samples))

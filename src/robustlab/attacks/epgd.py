"""Expectation PGD (Nemcovsky et al., "Smoothed Inference for Adversarially-Trained Models",
https://arxiv.org/abs/1911.07198): PGD on the loss averaged over noisy forward passes,

    l_EPGD(x') = (1/m) sum_i L(f(x' + delta_i), y),   delta_i ~ N(0, sigma^2 I) (or Laplace),

with fresh noise at every forward (and fresh weight noise, for PNI/CNI models: the m draws are
m separate forward passes of the batch). It is EOT
(Athalye et al. 2018) on the smoothing noise: the attack for noise-trained models and for
smoothed classifiers that vote.

Distance: linf, l2, l1. Defaults (the reference code, ``attacks/expectation_pgd_fgsmk.py``):
7 steps of size eps/4, random start, m = 8. Cost: steps * m forward/backward passes.

Differences from the reference code: the input gradient is recomputed at every step (the
reference never zeroes the input's ``.grad``, so its steps follow the sign of the running sum
of all past gradients); noise is in [0, 1] pixel units (the reference adds it after
normalisation, where sigma is about 4x larger in pixels on CIFAR-10).

Attacking a :class:`robustlab.defenses.Smoothing` module: with ``sigma=None`` the attack
takes the module's base model, noise and sigma for its gradients, and success is judged by
the smoothed module's own vote on ``x_adv``. A plain model needs an explicit ``sigma``; its
success is judged by its (noise-free) predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import positive_int
from robustlab.attacks.pgd import PGD, LossAt, Start
from robustlab.attacks.registry import register
from robustlab.noise import SmoothedModel, check_noise, sample
from robustlab.threat import ThreatModel


def smoothing_target(
    model: nn.Module, sigma: float | None, noise: str | None
) -> tuple[nn.Module, float, str]:
    """``(base model, sigma, noise)`` an attack on ``model`` differentiates: a smoothing
    module's own unless overridden; a plain model's with the given ones."""
    if isinstance(model, SmoothedModel):
        return (
            model.base,
            model.sigma if sigma is None else sigma,
            model.noise if noise is None else noise,
        )
    if sigma is None:
        raise ValueError(
            "this model is not a robustlab.defenses.Smoothing module: pass "
            "sigma=<noise scale> to the attack"
        )
    return model, sigma, noise or "gaussian"


@register("epgd")
class EPGD(PGD):
    """PGD on the expected loss over input noise (EOT on the smoothing noise).

    Args:
        threat: threat model; the attack stays in its ball and bounds.
        sigma: noise scale in input units; None: the attacked Smoothing module's.
        noise: ``"gaussian"`` or ``"laplace"``; None: the Smoothing module's (else Gaussian).
        samples: noisy forwards averaged per step (m >= 1). Default 8.
        steps: gradient steps (>= 1). Default 7.
        step_size: lp step length; default ``eps / 4``.
        random_start, restarts, loss, targeted, early_stop, keep_best, seed: as in PGD.
            ``early_stop`` judges success by the mean of the noisy logits.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Returns ``AttackResult``.

    Example:
        >>> smooth = robustlab.defenses.create("smoothing", model, sigma=0.25, samples=64)
        >>> res = EPGD(ThreatModel("linf", 0.1), samples=8)(smooth, x, y)
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        sigma: float | None = None,
        noise: str | None = None,
        samples: int = 8,
        steps: int = 7,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            random_start=random_start,
            restarts=restarts,
            loss=loss,
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            seed=seed,
            step_size=step_size,
        )
        if step_size is None:
            self.step_size = threat.eps / 4
        if sigma is not None or noise is not None:
            check_noise(noise or "gaussian", 0.0 if sigma is None else sigma)
        self.sigma = None if sigma is None else float(sigma)
        self.noise, self.samples = noise, positive_int(samples, "samples")

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "sigma": self.sigma,
            "noise": self.noise,
            "samples": self.samples,
        }

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        *,
        loss: LossAt | None = None,
        start: Start | None = None,
    ) -> Tensor:
        """PGD's loop on :meth:`noisy_loss_at` (or the given ``loss``) for this call."""
        if loss is None:
            loss = self.noisy_loss_at(*smoothing_target(model, self.sigma, self.noise), generator)
        return super().perturb(model, x, y, generator, loss=loss, start=start)

    def noisy_loss_at(
        self, base: nn.Module, sigma: float, noise: str, generator: torch.Generator
    ) -> LossAt:
        """The :data:`~robustlab.attacks.pgd.LossAt` of EPGD: the attack's loss and the logits
        averaged over ``samples`` forward passes of ``base`` at ``x' + delta_i``, a fresh
        ``delta_i`` (from ``generator``) for every pass."""
        m = self.samples

        def f(xa: Tensor, y: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            # one forward per draw, so PNI/CNI weight noise is fresh for every draw as well
            outs = [base(xa + sample(xa, noise, sigma, generator)) for _ in range(m)]
            loss, logits = self.loss(outs[0], y, self.targeted), outs[0]
            for out in outs[1:]:
                loss, logits = loss + self.loss(out, y, self.targeted), logits + out
            return loss / m, logits / m

        return f

"""SmoothAdv PGD (Salman, Yang, Li, Zhang, Zhang, Razenshteyn, Bubeck, "Provably Robust Deep
Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019,
https://arxiv.org/abs/1906.04584): PGD on the cross-entropy of the *soft smoothed* classifier,

    l_SA(x') = -log( (1/m) sum_i softmax(f(x' + delta_i))_y ),

the log of the averaged softmax, where EPGD averages the log-softmax: grad log E[p] is not
E[grad log p], and the former is the gradient of the classifier that smoothing builds.

Distance: linf, l2, l1 (the paper: l2). Defaults (reference code ``code/attacks.py``): the m
noise draws are made once per call and kept for every step; no random start; step size
``2 * eps / steps`` on the normalised gradient (the steepest step of the threat's norm);
10 steps. m = 8 here for evaluation (the paper trains with m in {1, 2, 4, 8}).
Cost: steps * m forward/backward passes.

Differences from the reference code: the projection is the threat model's (for l2: onto the
ball, then clipped to the bounds; the reference clamps x + delta to [0, 1] and then renorms);
the best iterate is kept per sample unless ``keep_best=False``. A targeted attack maximises
``log mean softmax_t``.

On a :class:`robustlab.defenses.Smoothing` module with ``sigma=None`` the attack uses its base
model, noise and sigma, and success is judged by the module's vote; a plain model needs
``sigma``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.attacks.epgd import EPGD, smoothing_target
from robustlab.attacks.pgd import PGD, LossAt, Start
from robustlab.attacks.registry import register
from robustlab.noise import refuse_input_noise, sample
from robustlab.threat import ThreatModel


@register("smoothadv")
class SmoothAdv(EPGD):
    """PGD on the cross-entropy of the averaged softmax over fixed noise draws.

    Args:
        threat: threat model; the attack stays in its ball and bounds.
        sigma: noise scale in input units; None: the attacked Smoothing module's.
        noise: ``"gaussian"`` or ``"laplace"``; None: the Smoothing module's (else Gaussian).
        samples: noise draws m (>= 1), drawn once per call. Default 8.
        steps: gradient steps (>= 1). Default 10.
        step_size: lp step length; default ``2 * eps / steps``.
        random_start: default False (the reference starts at x).
        restarts, targeted, early_stop, keep_best, seed: as in PGD (later restarts reuse
            the draws, so they only differ with ``random_start=True``).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Returns ``AttackResult``.

    Example:
        >>> smooth = robustlab.defenses.create("smoothing", model, sigma=0.25, samples=64)
        >>> res = SmoothAdv(ThreatModel("l2", 1.0))(smooth, x, y)
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        sigma: float | None = None,
        noise: str | None = None,
        samples: int = 8,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = False,
        restarts: int = 1,
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            sigma=sigma,
            noise=noise,
            samples=samples,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            restarts=restarts,
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            seed=seed,
        )
        if step_size is None:
            self.step_size = 2 * threat.eps / steps

    def craft_with_draws(
        self, model: nn.Module, x: Tensor, y: Tensor, draws: Tensor, generator: torch.Generator
    ) -> Tensor:
        """:meth:`craft` with the given noise draws (m, N, ...) instead of fresh ones, as
        SmoothAdv training does: its loss reuses the attack's draws."""
        if draws.shape[1:] != x.shape:
            raise ValueError(
                f"draws must be shaped (m, *x.shape) = (m, {tuple(x.shape)}), "
                f"got {tuple(draws.shape)}"
            )
        return self.craft(model, x, y, generator, draws=draws)

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        *,
        loss: LossAt | None = None,
        start: Start | None = None,
        draws: Tensor | None = None,
    ) -> Tensor:
        """PGD's loop on the soft smoothed loss with the noise ``draws`` (m, N, ...), drawn
        here from ``generator`` when None; ``loss`` replaces that loss for this call."""
        if loss is None:
            base, sigma, noise = smoothing_target(model, self.sigma, self.noise)
            refuse_input_noise(noise, "SmoothAdv")
            if draws is None:
                draws = torch.stack(
                    [sample(x, noise, sigma, generator) for _ in range(self.samples)]
                )
            loss = self.soft_loss_at(base, draws)
        return PGD.perturb(self, model, x, y, generator, loss=loss, start=start)

    def soft_loss_at(self, base: nn.Module, draws: Tensor) -> LossAt:
        """The :data:`~robustlab.attacks.pgd.LossAt` of :func:`soft_smoothed_loss` at
        ``base`` with the fixed ``draws`` (m, N, ...) of the whole batch."""

        def f(xa: Tensor, y: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            delta = draws if rows is None else draws[:, rows]
            return soft_smoothed_loss(base, xa, y, delta, self.targeted)

        return f


def soft_smoothed_loss(
    model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, targeted: bool = False
) -> tuple[Tensor, Tensor]:
    """``(-log mean_i softmax(model(x + delta_i))_y, log mean_i softmax(...))`` per sample, for
    draws ``delta`` shaped (m, N, ...); targeted: the loss is negated (maximise the target)."""
    m, n = delta.shape[:2]
    logits = model((x.unsqueeze(0) + delta).flatten(0, 1))
    log_mean = torch.logsumexp(F.log_softmax(logits, 1).view(m, n, -1), 0) - torch.log(
        torch.tensor(float(m), device=x.device, dtype=logits.dtype)
    )
    nll = F.nll_loss(log_mean, y, reduction="none")
    return (-nll if targeted else nll), log_mean

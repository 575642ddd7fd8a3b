"""Momentum iterative FGSM (Dong et al., 2018, "Boosting Adversarial Attacks with Momentum",
https://arxiv.org/abs/1710.06081): iterated FGSM along an accumulated velocity of
l1-normalised gradients.

Distance: linf (MI-FGSM), l2 and l1 (the steepest step of the norm along the velocity).
"""

from __future__ import annotations

from typing import Any

from robustlab.attacks.losses import CustomLoss
from robustlab.attacks.pgd import PGD
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


@register("mi-fgsm")
class MIFGSM(PGD):
    """``g_t = mu * g_(t-1) + grad_t / ||grad_t||_1`` (per sample, ``g_0 = 0``), then
    ``x_(t+1) = P(x_t + steepest_step(g_t, step_size))``: ``step_size * sign(g_t)`` for linf,
    from the clean point (no random start). :class:`PGD` with ``optimizer="momentum"``.

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations T (>= 1). Default 10 (the paper's).
        momentum: decay ``mu`` >= 0. Default 1.0 (the paper's).
        step_size: lp length of each step; default ``eps / steps`` (the paper's ``alpha = eps/T``),
            so T steps in one direction reach the boundary and no further.
        loss: ``"ce"`` (the paper's) or ``"cw-margin"``. targeted: step towards ``target``.
        early_stop: stop attacking a sample once it is misclassified. Default False.
        keep_best: return each sample's best iterate (successful first, then highest loss).
            Default True; the reference code returns the last iterate (``keep_best=False``).
        l1_sparsity: for l1, fraction of coordinates moved per step (see ThreatModel).
        seed: seed of the attack's generator (unused: the attack is deterministic).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: T forward/backward passes.
    The reference code normalises by the mean ``|grad|`` instead of the l1 norm (the same
    direction, a constant factor d apart) and works on [-1, 1] images (eps doubled there).

    Example:
        >>> res = MIFGSM(ThreatModel("linf", 16 / 255))(model, x, y)
    """

    stochastic = False

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        momentum: float = 1.0,
        step_size: float | None = None,
        loss: str | CustomLoss = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        l1_sparsity: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            step_size=step_size,
            random_start=False,
            restarts=1,
            loss=loss,
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            l1_sparsity=l1_sparsity,
            optimizer="momentum",
            momentum=momentum,
            seed=seed,
        )
        if step_size is None:
            self.step_size = threat.eps / steps

    def config(self) -> dict[str, Any]:
        fixed = ("random_start", "restarts", "optimizer")
        return {k: v for k, v in super().config().items() if k not in fixed}

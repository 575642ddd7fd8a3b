"""PGD on the Carlini-Wagner margin loss with confidence kappa ("CW-inf" in the TRADES and MART
tables; loss of Carlini & Wagner, 2017, "Towards Evaluating the Robustness of Neural Networks",
https://arxiv.org/abs/1608.04644, optimised by the PGD of Madry et al., 2018,
https://arxiv.org/abs/1706.06083, as in MadryLab/cifar10_challenge ``loss_func: "cw"``).

Distance: linf, l2.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor

from robustlab._validate import number
from robustlab.attacks.losses import cw_margin
from robustlab.attacks.pgd import PGD
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


def cw_kappa(logits: Tensor, y: Tensor, targeted: bool = False, *, kappa: float = 0.0) -> Tensor:
    """``min(max_(j != y) z_j - z_y, kappa)`` (targeted: ``min(z_t - max_(j != t) z_j, kappa)``):
    the C&W margin capped at ``kappa``, to maximise. It equals ``kappa`` minus C&W's
    ``max(z_y - max_(j != y) z_j + kappa, 0)``, so it rises until the point is misclassified with
    margin ``kappa`` and is flat beyond."""
    return cw_margin(logits, y, targeted).clamp(max=kappa)


@register("cw-linf")
class CWLinf(PGD):
    """PGD with random start maximising the C&W margin capped at ``kappa`` (:func:`cw_kappa`).

    Success is still misclassification (decided on the returned point); ``kappa`` only makes
    the attack keep pushing a broken point until its margin reaches ``kappa``, and keep-best
    prefers successful iterates, then the higher capped margin, so with ``kappa > 0`` each
    sample gets its first iterate with margin >= kappa if it reached one. ``early_stop=True``
    (evaluation) stops at misclassification whatever ``kappa``.

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations per restart (>= 1). Default 20 (the community TRADES/MART evaluation
            scripts; MART reportedly used 30, unverified).
        kappa: confidence margin >= 0, in logits. Default 0 (TRADES/MART scripts); Madry et
            al.'s code uses 50.
        step_size: lp length of each step; default ``2.5 * eps / steps`` (0.125 eps for 20 steps,
            Madry et al.'s rule, as :class:`PGD`). The TRADES/MART scripts use 0.003 at eps 0.031
            (about 0.097 eps); pass ``step_size`` to reproduce them exactly.
        random_start: start from a uniform point of the ball (as the scripts). Default True.
        restarts: runs on the still-unbroken points, keeping the best. Default 1.
        targeted: maximise ``min(z_t - max_(j != t) z_j, kappa)`` towards ``target``.
        early_stop, keep_best, seed: as :class:`PGD`.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Cost: steps x restarts
    forward/backward passes. ``res.loss`` is the capped margin at the returned points.

    Example:
        >>> res = CWLinf(ThreatModel("linf", 8 / 255), kappa=50)(model, x, y)
    """

    norms = ("linf", "l2")
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 20,
        kappa: float = 0.0,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            restarts=restarts,
            loss="cw-margin",
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            seed=seed,
        )
        self.kappa = number(kappa, "kappa", low=0)
        self.loss = partial(cw_kappa, kappa=self.kappa)

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if k != "optimizer"} | {
            "kappa": self.kappa
        }

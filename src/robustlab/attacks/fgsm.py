"""Fast gradient sign method (Goodfellow et al., 2015, "Explaining and Harnessing Adversarial
Examples", https://arxiv.org/abs/1412.6572); for l2/l1 the fast gradient method (one steepest
step of length eps).

Distance: linf (FGSM), l2, l1.
"""

from __future__ import annotations

from typing import Any

from robustlab.attacks.pgd import PGD
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


@register("fgsm")
class FGSM(PGD):
    """One step of length ``eps`` along the steepest-ascent direction of the loss, from ``x``
    (or from a random point of the ball with ``random_start=True``, step ``step_size``).

    Args:
        threat: threat model.
        loss: ``"ce"`` or ``"cw-margin"``. targeted: step towards ``target``.
        random_start: start from a uniform point of the ball (Wong et al.'s "fast" variant).
        step_size: default ``eps``.

    Example:
        >>> res = FGSM(ThreatModel("linf", 0.1))(model, x, y)
    """

    stochastic = False

    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss: str = "ce",
        targeted: bool = False,
        random_start: bool = False,
        step_size: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
        if step_size is None:
            step_size = max(threat.eps, 1e-12)
        super().__init__(
            threat,
            steps=1,
            step_size=step_size,
            random_start=random_start,
            restarts=1,
            loss=loss,
            targeted=targeted,
            seed=seed,
        )

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if k not in ("steps", "restarts")}

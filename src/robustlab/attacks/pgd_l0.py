"""PGD_0 (Croce & Hein, ICCV 2019, "Sparse and Imperceivable Adversarial Attacks",
https://arxiv.org/abs/1909.05040): projected gradient ascent onto at most ``eps`` changed
pixels inside the box.

Distance: l0 (pixels). It runs the one ascent loop of :class:`~robustlab.attacks.pgd.PGD`;
the l0 geometry (the step and the projection) lives in :class:`~robustlab.threat.ThreatModel`.
"""

from __future__ import annotations

from robustlab.attacks.losses import CustomLoss
from robustlab.attacks.pgd import PGD
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

#: the reference's step size, l1 length of a step for inputs in [0, 1] (120000 / 255)
REFERENCE_STEP = 120000 / 255


@register("pgd-l0")
class PGDL0(PGD):
    """PGD_0: ``x <- P(x + step * g / ||g||_1)``, ``g`` the gradient of the loss, ``P`` the
    Euclidean projection onto (at most ``k = eps`` changed pixels) ∩ box: every pixel's change
    is clipped to the box, and the ``k`` pixels whose clipped change helps most (gain
    ``||d||^2 - ||d - clip(d)||^2`` over its channels) are kept, the others reset to ``x``
    (:meth:`ThreatModel.project <robustlab.threat.ThreatModel.project>`).

    Args:
        threat: an l0 threat model: ``eps`` pixels (a pixel: a position of the (N, C, H, W)
            input, its C channels together).
        steps: gradient steps per restart (>= 1). Default 100 (the reference).
        step_size: l1 length of each step, in input units. Default ``120000 / 255 * (high -
            low)`` (the reference's 120000/255 for inputs in [0, 1]; the l1-normalised step
            moves each coordinate by step * |g_i| / ||g||_1, so most coordinates of a small
            image hit the box at once and the projection picks the pixels).
        restarts: runs (>= 1), each later one on the points still unbroken; every sample keeps
            its best iterate. Default 5 (the reference).
        random_start: start from ``eps`` random pixels set uniformly in the box
            (:meth:`ThreatModel.random_init`). Default True.
        loss: a registered loss name or a callable ``loss(logits, y) -> (N,)``. Default
            ``"ce"`` (the reference).
        targeted: maximise the target class instead (pass ``target`` to the call).
        early_stop: stop attacking a sample once it is misclassified (evaluation's choice).
        keep_best: return each sample's best iterate (successful first, then highest loss)
            instead of the last one. Default True.
        seed: seed of the attack's generator when the call passes none.

    Cost: ``restarts x steps`` forward and backward passes per point (500 by default).

    Differences from the reference (fra31/sparse-imperceivable-attacks ``pgd_attacks_pt.py``):
    the random start sets ``eps`` random pixels uniformly in the box (the reference draws the
    whole image uniformly in the box, then projects: the ``eps`` pixels drawn farthest from
    ``x``); ties in the projection go to the lower pixel index (the reference adds 1e-12
    noise to the step); the loss is per sample (the reference's batch mean gives the same
    l1-normalised step).

    Example:
        >>> res = PGDL0(ThreatModel("l0", 10))(model, x, y)
        >>> robust_acc = 1 - res.success.float().mean()
    """

    norms = ("l0",)

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        step_size: float | None = None,
        restarts: int = 5,
        random_start: bool = True,
        loss: str | CustomLoss = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            step_size=step_size,
            restarts=restarts,
            random_start=random_start,
            loss=loss,
            targeted=targeted,
            early_stop=early_stop,
            keep_best=keep_best,
            seed=seed,
        )
        if step_size is None:
            lo, hi = threat.bounds
            self.step_size = REFERENCE_STEP * (hi - lo)

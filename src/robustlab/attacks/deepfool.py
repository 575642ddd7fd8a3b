"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, "DeepFool: a simple and accurate
method to fool deep neural networks", https://arxiv.org/abs/1511.04599).

Distance: l2 or linf (the threat model's norm). A minimum-norm attack: it reports per sample the
smallest adversarial perturbation it found (``AttackResult.min_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.attacks._min_norm import Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

#: added to each step's distance to the linearised boundary, in input units (the reference's
#: 1e-4), so that an exact linear step lands past the boundary, not on it
STEP_SLACK = 1e-4


@register("deepfool")
class DeepFool(Attack):
    """DeepFool: linearise the logit differences ``g_k = f_k - f_y`` at the iterate, step onto
    the closest linearised boundary, and repeat from the accumulated step until the prediction
    changes.

    Per step, over the candidate classes ``k``: ``l = argmin_k |g_k| / ||w_k||_q`` with
    ``w_k = grad g_k`` and ``q`` the dual norm (l2: q = 2; linf: q = 1), then
    ``r = (|g_l| / ||w_l||_q + 1e-4) * u`` with ``u = w_l / ||w_l||_2`` (l2) or ``sign(w_l)``
    (linf), ``r_tot += r`` and ``x_{i+1} = clip(x + (1 + overshoot) r_tot)``. For an affine
    classifier with two classes the first step is exact: the point lies at distance
    ``(|w.x + b| / ||w||_q + 1e-4)(1 + overshoot)`` from ``x``, across the boundary.

    Args:
        threat: l2 or linf threat model; ``eps`` only decides which point is returned (see
            below). DeepFool itself is unbounded.
        steps: most iterations per sample (>= 1). Default 50 (the reference's ``max_iter``).
        overshoot: relative overshoot of the accumulated step (>= 0). Default 0.02.
        candidates: number of classes linearised (>= 2): the label and the ``candidates - 1``
            other classes with the highest clean logits, capped at the number of classes.
            Default 10 (the reference's ``num_classes``).
        seed: unused (the attack is deterministic), kept for the common signature.

    Cost: per iteration one forward and ``candidates - 1`` backward passes, on the samples not
    yet adversarial; usually a few iterations. Differences from the reference code: batched;
    the label is the true class (a misclassified point is adversarial already, ``min_norm``
    0), not the predicted one; every iterate is clipped to the bounds (the reference does not
    clip), so near the bounds a step may fall short and take another iteration.

    Returns: ``x_adv`` the smallest adversarial point found if within ``eps``, else its
    projection onto the ball (the clean point if none was found); ``min_norm`` (N,) its norm
    (``inf`` if none; 0 for points already adversarial).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64.

    Example:
        >>> res = DeepFool(ThreatModel("l2", 0.5))(model, x, y)
        >>> median_l2 = res.min_norm.median()
    """

    norms = ("l2", "linf")
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="ce", targeted=False, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.overshoot = number(overshoot, "overshoot", low=0)
        self.candidates = integer(candidates, "candidates", minimum=2)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "overshoot": self.overshoot,
            "candidates": self.candidates,
        }

    def _linearise(
        self, model: nn.Module, xa: Tensor, y: Tensor, others: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (n, K), ``g = f_others - f_y`` (n, m) and its input gradient (n, m, D),
        averaged over ``eot_samples`` draws."""
        total: list[Tensor] = []
        for _ in range(self.eot_samples):
            z = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(z)
                diff = logits.gather(1, others) - logits.gather(1, y[:, None])
                m = diff.shape[1]
                grads = [
                    torch.autograd.grad(diff[:, j].sum(), z, retain_graph=j < m - 1)[0]
                    for j in range(m)
                ]
            out = [logits.detach(), diff.detach(), torch.stack(grads, 1).flatten(2)]
            total = [t + o for t, o in zip(total, out, strict=True)] if total else out
        logits, diff, grad = (t / self.eot_samples for t in total)
        return logits, diff, grad

    def _step(self, diff: Tensor, grad: Tensor) -> Tensor:
        """The step (n, D) onto the closest linearised boundary, ``STEP_SLACK`` beyond it."""
        dual = grad.norm(dim=2) if self.threat.norm == "l2" else grad.abs().sum(2)
        dist = diff.abs() / dual.clamp_min(1e-12)
        j = dist.argmin(1)
        rows = torch.arange(len(diff), device=diff.device)
        w, d = grad[rows, j], dist[rows, j] + STEP_SLACK
        if self.threat.norm == "l2":
            u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            u = w.sign()
        return d[:, None] * u

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        lo, hi = self.threat.bounds
        with torch.no_grad():
            logits = model(x)
        best = Smallest(self.threat, x, is_success(logits, y, False))
        m = min(self.candidates, logits.shape[1]) - 1
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        idx = best.unsolved(within_eps=False).nonzero().squeeze(1)
        x0, yi, others = x[idx], y[idx], ranked[idx, :m]
        r_tot = torch.zeros_like(x0.flatten(1))
        xi = x0
        for k in range(self.steps + 1):
            if idx.numel() == 0:
                break
            if k == self.steps:  # the last iterate: check only
                with torch.no_grad():
                    best.update(idx, xi, is_success(model(xi), yi, False))
                break
            logits, diff, grad = self._linearise(model, xi, yi, others)
            adv = is_success(logits, yi, False)
            best.update(idx, xi, adv)
            keep = ~adv  # DeepFool stops on a sample once its prediction changed
            idx, x0, yi, others, r_tot = (t[keep] for t in (idx, x0, yi, others, r_tot))
            diff, grad = diff[keep], grad[keep]
            r_tot = r_tot + self._step(diff, grad)
            xi = (x0 + (1 + self.overshoot) * r_tot.reshape(x0.shape)).clamp(lo, hi)
        return best.result(model, y)

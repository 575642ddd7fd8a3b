"""Elastic-net attack EAD (Chen, Sharma, Zhang, Yi & Hsieh, AAAI 2018, "EAD: Elastic-Net Attacks
to Deep Neural Networks via Adversarial Examples", https://arxiv.org/abs/1709.04114).

Distance: l1. A minimum-norm attack: it reports per sample the l1 norm of the adversarial
perturbation its decision rule chose (``AttackResult.min_norm``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of, positive_int
from robustlab.attacks._min_norm import ConstantSearch, Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

DECISION_RULES = ("en", "l1")


def shrink(z: Tensor, x: Tensor, beta: float, lo: float, hi: float) -> Tensor:
    """EAD's projected shrinkage-thresholding ``S_beta`` (the paper's eq. 7), per coordinate:
    ``min(z - beta, hi)`` where ``z - x > beta``, ``x`` where ``|z - x| <= beta``,
    ``max(z + beta, lo)`` where ``z - x < -beta``; ``z`` and ``x`` of one shape, ``beta`` and
    the bounds in input units."""
    d = z - x
    out = torch.where(d > beta, (z - beta).clamp_max(hi), x)
    return torch.where(d < -beta, (z + beta).clamp_min(lo), out)


@register("ead")
class EAD(Attack):
    """EAD: minimise ``c * g(x') + beta * ||x' - x||_1 + ||x' - x||_2^2`` over the box with
    FISTA (or ISTA): a gradient step on ``c * g + ||. - x||_2^2`` at the slack point, then the
    shrinkage :func:`shrink` with threshold ``beta``; ``g = max(z_y - max_{j != y} z_j, -kappa)``
    is C&W's margin (targeted: of ``target``). ``c`` is binary-searched per sample.

    Args:
        threat: l1 threat model; ``eps`` only decides which point is returned (see below).
        steps: iterations per search step (>= 1). Default 1000 (the reference's command line;
            its class defaults to 10000).
        search_steps: binary-search steps on ``c`` (>= 1). Default 9.
        initial_const: first ``c`` (> 0). Default 1e-3.
        lr: first step size (> 0), decayed to 0 as ``lr * (1 - k / steps) ** 0.5``.
            Default 1e-2.
        beta: weight of the l1 term and shrinkage threshold (>= 0), in input units.
            Default 1e-2 (the reference's command line and the paper's experiments; its class
            defaults to 1e-3).
        kappa: confidence (>= 0): a point counts as found only if the wrong class wins by
            ``kappa`` in logits. Default 0.
        decision_rule: which successful iterate is kept: ``"en"`` the smallest elastic-net
            distance ``beta ||d||_1 + ||d||_2^2``, ``"l1"`` the smallest ``||d||_1``.
            Default ``"en"``.
        fista: FISTA's slack point ``y_{k+1} = x_{k+1} + k / (k + 3) (x_{k+1} - x_k)``
            (reference); False: ISTA (``y = x``). Default True.
        abort_early: stop a search step for a sample when its loss has not dropped by 0.01 %
            over the last tenth of ``steps``. Default True.
        targeted: make ``target`` win instead (pass ``target``).
        early_stop: leave out of the next search steps a sample that has an adversarial point
            within ``eps`` (evaluation sets it; its ``min_norm`` is then only that point's
            norm). Default False.
        seed: unused (the attack is deterministic), kept for the common signature.

    Binary search as the reference (and :class:`~robustlab.attacks.cw_l2.CarliniWagnerL2`);
    with >= 10 search steps the last one uses the upper bound. The threshold is ``beta``
    itself, not ``lr * beta``, as in the paper and the reference. Cost: per iteration one
    forward and backward pass at the slack point and one forward pass at the iterate, at most
    ``search_steps * steps`` of each. Differences from the reference code: the bounds are the
    threat model's (the reference's box is [-0.5, 0.5]), and the abort rule looks at each
    sample's loss, not at the batch total (results do not depend on the batch).

    Returns: ``x_adv`` the point the decision rule chose if within ``eps``, else its
    projection onto the ball (the clean point if none was found); ``min_norm`` (N,) that
    point's l1 norm (``inf`` if none; 0 for points already adversarial): with the EN rule an
    upper bound of the smallest l1 norm the search met, with the L1 rule that smallest norm.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64.

    Example:
        >>> res = EAD(ThreatModel("l1", 10.0), decision_rule="l1")(model, x, y)
        >>> median_l1 = res.min_norm.median()
    """

    norms = ("l1",)
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 1000,
        search_steps: int = 9,
        initial_const: float = 1e-3,
        lr: float = 1e-2,
        beta: float = 1e-2,
        kappa: float = 0.0,
        decision_rule: str = "en",
        fista: bool = True,
        abort_early: bool = True,
        targeted: bool = False,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="cw-margin", targeted=targeted, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.search_steps = positive_int(search_steps, "search_steps")
        self.initial_const = number(initial_const, "initial_const", low=0, low_open=True)
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.beta = number(beta, "beta", low=0)
        self.kappa = number(kappa, "kappa", low=0)
        self.decision_rule = one_of(decision_rule, "decision_rule", DECISION_RULES)
        self.fista, self.abort_early = bool(fista), bool(abort_early)
        self.early_stop = bool(early_stop)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "search_steps": self.search_steps,
            "initial_const": self.initial_const,
            "lr": self.lr,
            "beta": self.beta,
            "kappa": self.kappa,
            "decision_rule": self.decision_rule,
            "fista": self.fista,
            "abort_early": self.abort_early,
            "early_stop": self.early_stop,
        }

    def _found(self, logits: Tensor, y: Tensor) -> Tensor:
        """Success with confidence: the logit of ``y`` moved by kappa against the attack."""
        shift = self.kappa * F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return is_success(logits - shift if self.targeted else logits + shift, y, self.targeted)

    def _hinge(self, logits: Tensor, y: Tensor) -> Tensor:
        return (self.kappa - self.loss(logits, y, self.targeted)).clamp_min(0)

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, c: Tensor, chosen: list[Tensor]
    ) -> Tensor:
        """One search step from ``x`` at constants ``c`` (n,). ``chosen`` = [points (n, ...),
        their criterion (n,)], updated in place with better successful iterates. Returns bool
        (n,): a successful iterate was found."""
        lo, hi = self.threat.bounds
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        live = torch.arange(len(x), device=x.device)  # rows still iterating
        xk, yk = x.clone(), x.clone()
        prev = torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype)
        check_every = max(1, self.steps // 10)

        def smooth(z: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(z)
            dist = (z - x0).flatten(1).pow(2).sum(1)
            return ci * self._hinge(logits, yl) + dist, logits

        for k in range(self.steps):
            if live.numel() == 0:
                break
            x0, yl, ci = x[live], y[live], c[live]
            lr = self.lr * (1 - k / self.steps) ** 0.5
            _, _, grad = self.input_grad(smooth, yk)
            x_new = shrink(yk - lr * grad, x0, self.beta, lo, hi)
            yk = x_new + (k + 1) / (k + 4) * (x_new - xk) if self.fista else x_new
            xk = x_new
            with torch.no_grad():
                logits = model(xk)
            d = (xk - x0).flatten(1)
            l1, l2 = d.abs().sum(1), d.pow(2).sum(1)
            loss = ci * self._hinge(logits, yl) + l2 + self.beta * l1
            crit = self.beta * l1 + l2 if self.decision_rule == "en" else l1
            ok = self._found(logits, yl)
            found[live[ok]] = True
            better = ok & (crit < chosen[1][live])
            chosen[0][live[better]], chosen[1][live[better]] = xk[better], crit[better]
            if self.abort_early and k % check_every == 0:
                keep = loss <= prev * 0.9999
                prev = loss
                live, xk, yk, prev = live[keep], xk[keep], yk[keep], prev[keep]
        return found

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        with torch.no_grad():
            best = Smallest(self.threat, x, is_success(model(x), y, self.targeted))
        n = len(x)
        chosen = [x.clone(), torch.full((n,), math.inf, device=x.device, dtype=x.dtype)]
        search_c = ConstantSearch(x, self.initial_const, self.search_steps)
        tol = self.threat.tolerance()
        for search in range(self.search_steps):
            const = search_c.at(search)
            todo = best.unsolved(within_eps=False)
            if self.early_stop:
                norm = self.threat.distance(chosen[0], x).masked_fill(chosen[1].isinf(), math.inf)
                todo &= norm > self.threat.eps + tol
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            mine = [chosen[0][idx], chosen[1][idx]]
            hit = self._run(model, x[idx], y[idx], const[idx], mine)
            chosen[0][idx], chosen[1][idx] = mine
            search_c.update(idx, hit)
        rows = torch.arange(n, device=x.device)
        best.update(rows, chosen[0], torch.isfinite(chosen[1]))  # the decision rule's choice
        return best.result(model, y, self.targeted)

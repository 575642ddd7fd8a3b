"""Fast adaptive boundary attack (Croce & Hein, ICML 2020, "Minimally Distorted Adversarial
Examples with a Fast Adaptive Boundary Attack", https://arxiv.org/abs/1907.02044).

Distance: linf, l2, l1 (the threat model's norm). A minimum-norm attack: it reports per sample
the smallest adversarial perturbation it found (``AttackResult.min_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks._min_norm import Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


def _lp(d: Tensor, norm: str) -> Tensor:
    return d.abs().amax(1) if norm == "linf" else d.norm(p=2 if norm == "l2" else 1, dim=1)


def project_on_hyperplane(norm: str, w: Tensor, c: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Row-wise the smallest ``d`` in lp norm with ``w . d = c`` and ``lo <= d <= hi``
    (``lo <= 0 <= hi``); where the hyperplane is out of the box's reach, the box point that gets
    closest (largest ``w . d`` towards ``c``). Shapes: w, lo, hi (n, D), c (n,); exact, by one
    sort: linf ``d_i = sgn(w_i) min(lam, reach_i)``, l2 ``d = clip(lam w)``, l1 the fractional
    knapsack (largest ``|w_i|`` first)."""
    w = w * torch.where(c < 0, -1.0, 1.0).to(w.dtype)[:, None]  # now w . d = |c| >= 0
    c, a = c.abs()[:, None], w.abs()
    reach = torch.where(w > 0, hi, -lo).masked_fill(a == 0, 0)  # how far each coordinate helps
    n, dim = w.shape
    if norm == "l1":
        order = a.argsort(dim=1, descending=True)
        a_s, r_s = a.gather(1, order), reach.gather(1, order)
        gain = (a_s * r_s).cumsum(1)
        k = (gain < c).sum(1, keepdim=True).clamp_max(dim - 1)  # the coordinate filled partly
        before = gain.gather(1, k) - (a_s * r_s).gather(1, k)
        part = ((c - before) / a_s.gather(1, k).clamp_min(1e-30)).clamp_min(0)
        s = torch.where(torch.arange(dim, device=w.device) < k, r_s, 0)
        s = s.scatter(1, k, torch.minimum(part, r_s.gather(1, k)))
        s = torch.empty_like(s).scatter_(1, order, s)
    else:
        u = torch.ones_like(a) if norm == "linf" else a  # d_i grows as lam * u_i until reach_i
        tau = torch.where(a > 0, reach / u.clamp_min(1e-30), 0)  # where coordinate i saturates
        order = tau.argsort(dim=1)
        tau_s, slope = tau.gather(1, order), (a * u).gather(1, order)
        sat = (a * reach).gather(1, order)
        done = sat.cumsum(1) - sat  # gain of the coordinates saturated before breakpoint k
        rest = slope.flip(1).cumsum(1).flip(1)  # slope of the others
        k = (done + tau_s * rest < c).sum(1, keepdim=True)
        feasible = k < dim
        k = k.clamp_max(dim - 1)
        lam = (c - done.gather(1, k)) / rest.gather(1, k).clamp_min(1e-30)
        s = torch.where(feasible, torch.minimum(lam * u, reach), reach)
    return torch.where(w < 0, -s, s)


@register("fab")
class FAB(Attack):
    """FAB: linearise the classifier at the iterate, project both the iterate and the clean point
    onto the closest linearised decision hyperplane (inside the box), step to a mix of the two
    biased towards the clean point, and once adversarial step back towards it to shrink the norm.

    Args:
        threat: threat model; ``eps`` bounds the random starts and decides which point is
            returned (see below). FAB itself is unbounded.
        steps: iterations per run (>= 1). Default 100.
        restarts: runs (>= 1); runs after the first start on a random point of the sphere of
            radius ``min(eps, smallest norm found)/2`` (AutoAttack: ``eps/2``). Default 1.
        alpha_max: largest weight of the clean point's projection in a step, in [0, 1].
            Default 0.1.
        eta: overshoot of the projections (>= 1). Default 1.05.
        beta: backward step: an adversarial iterate moves to ``x + beta (x_adv - x)``, in
            (0, 1]. Default 0.9.
        early_stop: stop working on a sample once it has an adversarial point within ``eps``
            (evaluation sets it; its ``min_norm`` is then only that point's norm). Default False.
        seed: seed of the attack's generator when the call passes none.

    Untargeted FAB linearises all K logits: one forward and K - 1 backward passes per step
    (the reference code: K backward passes and one more forward). The check whether a step
    landed on an adversarial point reuses the forward pass of the next step.

    Returns: ``x_adv`` the smallest adversarial point found if within ``eps``, else its
    projection onto the ball (the clean point if none was found); ``min_norm`` (N,) its norm
    (``inf`` if none; 0 for clean misclassified points).

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64.

    Example:
        >>> res = FAB(ThreatModel("l2", 0.5))(model, x, y)
        >>> robust_at_1 = (res.min_norm > 1.0).float().mean()
    """

    minimum_norm = True
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="ce", targeted=False, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.restarts = positive_int(restarts, "restarts")
        self.early_stop = bool(early_stop)
        self.alpha_max = number(alpha_max, "alpha_max", low=0, high=1)
        self.eta = number(eta, "eta", low=1)
        self.beta = number(beta, "beta", low=0, high=1, low_open=True)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "restarts": self.restarts,
            "alpha_max": self.alpha_max,
            "eta": self.eta,
            "beta": self.beta,
            "early_stop": self.early_stop,
        }

    def _targets(self, logits: Tensor) -> list[Tensor | None]:
        return [None]  # untargeted: every other class at every step

    def _linearise(
        self, model: nn.Module, xa: Tensor, y: Tensor, target: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (n, K), and for the classes j != y: f_j - f_y (n, m) and its input gradient
        (n, m, D), averaged over ``eot_samples`` draws."""
        if target is not None:  # one hyperplane, one backward pass

            def f(z: Tensor) -> tuple[Tensor, Tensor]:
                logits = model(z)
                diff = logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])
                return diff[:, 0], logits

            diff, logits, grad = self.input_grad(f, xa)
            return logits, diff[:, None], grad.flatten(1)[:, None]
        total: list[Tensor] = []
        for _ in range(self.eot_samples):
            z = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(z)
                k = logits.shape[1]
                others = torch.arange(k - 1, device=y.device)[None].expand(len(y), -1)
                others = others + (others >= y[:, None]).long()  # the K - 1 classes j != y
                diff = logits.gather(1, others) - logits.gather(1, y[:, None])
                grads = [
                    torch.autograd.grad(diff[:, j].sum(), z, retain_graph=j < k - 2)[0]
                    for j in range(k - 1)
                ]
            out = [logits.detach(), diff.detach(), torch.stack(grads, 1).flatten(2)]
            total = [t + o for t, o in zip(total, out, strict=True)] if total else out
        logits, diff, grad = (t / self.eot_samples for t in total)
        return logits, diff, grad

    def _step(self, x1: Tensor, x: Tensor, diff: Tensor, grad: Tensor) -> Tensor:
        norm, (lo, hi) = self.threat.norm, self.threat.bounds
        dual = {
            "linf": lambda g: g.abs().sum(2),
            "l2": lambda g: g.norm(dim=2),
            "l1": lambda g: g.abs().amax(2),
        }[norm](grad)
        n = len(x1)
        j = (diff.abs() / (dual + 1e-12)).argmin(1)  # closest hyperplane, box ignored
        f, w = diff[torch.arange(n), j], grad[torch.arange(n), j]
        p1, p0 = x1.flatten(1), x.flatten(1)
        # the hyperplane {z : f + w.(z - x1) = 0}: a step d from p reaches it iff
        # w.d = -f - w.(p - x1)
        c = torch.cat([-f, -f - (w * (p0 - p1)).sum(1)])
        p = torch.cat([p1, p0])
        d = project_on_hyperplane(norm, torch.cat([w, w]), c, lo - p, hi - p)
        d1, d0 = d[:n], d[n:]
        a1, a0 = _lp(d1, norm).clamp_min(1e-8), _lp(d0, norm).clamp_min(1e-8)
        alpha = (a1 / (a1 + a0)).clamp(0, self.alpha_max)[:, None]
        x_new = (1 - alpha) * (p1 + self.eta * d1) + alpha * (p0 + self.eta * d0)
        return x_new.clamp(lo, hi).reshape(x1.shape)

    def _start(self, x: Tensor, radius: Tensor, generator: torch.Generator) -> Tensor:
        """A random point on the lp sphere of ``radius`` (n,) around ``x``, clipped to the box."""
        shape, dev = (x.shape[0], x[0].numel()), generator.device
        if self.threat.norm == "linf":
            t = 2 * torch.rand(shape, generator=generator, device=dev, dtype=x.dtype) - 1
        else:
            t = torch.randn(shape, generator=generator, device=dev, dtype=x.dtype)
        t = t.to(x.device)
        t = t / _lp(t, self.threat.norm).clamp_min(1e-12)[:, None] * radius[:, None]
        return (x + t.reshape(x.shape)).clamp(*self.threat.bounds)

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        idx: Tensor,
        x1: Tensor,
        best: Smallest,
    ) -> None:
        x, y = x[idx], y[idx]
        target = None if target is None else target[idx]
        lin: tuple[Tensor, ...] = self._linearise(model, x1, y, target)
        for step in range(self.steps + 1):
            adv = lin[0].argmax(1) != y
            if adv.any():
                best.update(idx[adv], x1[adv], adv[adv])
                if step == self.steps:
                    break
                x1[adv] = x[adv] + self.beta * (x1[adv] - x[adv])  # the backward step
                again = self._linearise(
                    model, x1[adv], y[adv], None if target is None else target[adv]
                )
                best.update(idx[adv], x1[adv], again[0].argmax(1) != y[adv])
                for t, a in zip(lin, again, strict=True):
                    t[adv] = a
            if step == self.steps:
                break
            if self.early_stop:
                keep = best.unsolved(within_eps=True)[idx]
                idx, x, y, x1 = idx[keep], x[keep], y[keep], x1[keep]
                target = None if target is None else target[keep]
                lin = tuple(t[keep] for t in lin)
                if idx.numel() == 0:
                    return
            x1 = self._step(x1, x, lin[1], lin[2])
            lin = self._linearise(model, x1, y, target)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        with torch.no_grad():
            logits = model(x)
        best = Smallest(self.threat, x, logits.argmax(1) != y)
        for target in self._targets(logits):
            for run in range(self.restarts):
                idx = best.unsolved(within_eps=self.early_stop).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                x1 = x[idx]
                if run > 0:
                    radius = best.norm[idx].clamp_max(self.threat.eps) / 2
                    x1 = self._start(x1, radius, generator)
                self._run(model, x, y, target, idx, x1, best)
        return best.result(model, y)


@register("fab-t")
class FABTargeted(FAB):
    """FAB-T (AutoAttack's targeted FAB): one FAB run per target class, each linearising only
    the boundary between the true class and the target (one backward pass per step). The
    targets are the classes ranked 2nd, 3rd, ... by the clean logits. Success stays
    untargeted: any wrong prediction counts.

    Args:
        n_target_classes: number of target classes (>= 1), capped at K - 1. Default 9
            (AutoAttack's standard suite).
        restarts: runs per target class. Default 1.
        (the other arguments as :class:`FAB`)

    Example:
        >>> res = FABTargeted(ThreatModel("linf", 8 / 255), early_stop=True)(model, x, y)
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_target_classes: int = 9,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            restarts=restarts,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            early_stop=early_stop,
            seed=seed,
        )
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")

    def config(self) -> dict[str, Any]:
        return super().config() | {"n_target_classes": self.n_target_classes}

    def _targets(self, logits: Tensor) -> list[Tensor | None]:
        n = min(self.n_target_classes, logits.shape[1] - 1)
        return list(logits.argsort(dim=1, descending=True)[:, 1 : n + 1].T)

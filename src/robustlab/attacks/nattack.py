"""NAttack (Li, Li, Wang, Zhang, Gong, ICML 2019, "NATTACK: Learning the Distributions of
Adversarial Examples for an Improved Black-Box Attack on Deep Neural Networks",
https://arxiv.org/abs/1905.00441).

Distance: linf, l2. Score-based: it reads only the model's logits, under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success, margin
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


@register("nattack")
class NAttack(Attack):
    """Natural evolution strategies on a Gaussian search distribution ``N(mu, sigma^2 I)`` over
    a tanh-space perturbation.

    A sample ``z = mu + sigma * e``, ``e ~ N(0, I)``, maps to the input box by
    ``g(z) = mid + half * tanh(arctanh((x - mid) / half) + z)`` (``mid, half`` the centre and
    half-width of the bounds) and is projected onto the ball: ``x' = x + P(g(z) - x)``, with
    ``P`` the clip to ``[-eps, eps]`` (linf) or the rescale to norm ``<= eps`` (l2; ``g(z)``
    lies in the box, so every point between ``x`` and it does too). The reward of ``x'`` is
    ``-clip(m(x'), 0, 1000)`` with ``m`` the logit margin of the true class (``z_y - max_{j!=y}
    z_j``; targeted: ``max_{j!=t} z_j - z_t``); rewards are standardised over the population and
    ``mu <- mu + lr / (n sigma) * sum_i A_i e_i``, from ``mu_0 = 0.001 N(0, I)``. Every
    ``check_every`` iterations (from the first) the projected mean ``x + P(g(mu) - x)`` is
    tested; a sample stops as soon as it or any population member is adversarial.

    Args:
        threat: threat model (linf or l2).
        population: samples per iteration (>= 2). Default 300.
        sigma: standard deviation of the search distribution (> 0). Default 0.1.
        lr: NES learning rate (> 0). Default 0.02, the reference's RSE script (its other
            scripts use 0.008); the larger rate suits the default 500 iterations.
        max_iters: population steps per sample (>= 1). Default 500 (the RSE script; the
            reference's scripts use 400-1000).
        check_every: test the projected mean every this many iterations (>= 1). Default 10.
        batch_size: most model rows per forward; the population of several samples is
            evaluated together, in chunks of this many rows (>= 1). Default 3000.
        targeted: reach ``target`` instead.
        seed: seed of the attack's generator when the call passes none.

    Shapes: x (N, ...) in the bounds, y (N,). Returns ``Perturbation(x_adv, queries=...)``,
    ``queries`` (N,) = model rows evaluated per sample (``population`` per iteration plus one
    per mean check; at most ``max_iters * population + max_iters // check_every + 2``).
    Unbroken samples return their last projected mean.

    Differences from the reference (Cold-Winter/Nattack ``re_li_attack.py``): the margin is
    computed on logits, ``log p_y - log max_{j!=y} p_j`` without the reference's ``+1e-30``
    inside the logs (the same value where no probability underflows); adversarial population
    members stop the attack too (the reference only tests the mean); the projection is relative
    to ``x`` itself, not to its tanh round trip; the mean is also tested after the last step.

    Example:
        >>> res = NAttack(ThreatModel("linf", 0.031))(model, x, y)
    """

    norms = ("linf", "l2")
    uses_gradients = False
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        population: int = 300,
        sigma: float = 0.1,
        lr: float = 0.02,
        max_iters: int = 500,
        check_every: int = 10,
        batch_size: int = 3000,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="cw-margin", targeted=targeted, seed=seed)
        # >= 2: the rewards are standardised over the population
        self.population = positive_int(population, "population", minimum=2)
        self.sigma = number(sigma, "sigma", low=0, low_open=True)
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.max_iters = positive_int(max_iters, "max_iters")
        self.check_every = positive_int(check_every, "check_every")
        self.batch_size = positive_int(batch_size, "batch_size")

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "population": self.population,
            "sigma": self.sigma,
            "lr": self.lr,
            "max_iters": self.max_iters,
            "check_every": self.check_every,
        }

    def _candidates(self, w: Tensor, z: Tensor, x: Tensor) -> Tensor:
        """Projected points for tanh-space offsets ``z`` (..., d) around ``w = arctanh(x)``."""
        lo, hi = self.threat.bounds
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        d = mid + half * torch.tanh(w + z) - x
        if self.threat.norm == "linf":
            d = d.clamp(-self.threat.eps, self.threat.eps)
        else:
            d = d * (self.threat.eps / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp_max(1)
        return (x + d).clamp(lo, hi)

    def _forward(self, model: nn.Module, xq: Tensor, shape: torch.Size) -> Tensor:
        with torch.no_grad():
            return torch.cat([model(c.view(-1, *shape)) for c in xq.split(self.batch_size)])

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        n, shape = x.shape[0], x.shape[1:]
        lo, hi = self.threat.bounds
        xf = x.flatten(1)
        w = torch.atanh(((xf - (lo + hi) / 2) / ((hi - lo) / 2)) * (1 - 1e-6))
        gen: dict[str, Any] = {"generator": generator, "device": generator.device, "dtype": x.dtype}
        mu = 0.001 * torch.randn(xf.shape, **gen).to(x.device)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        best = xf.clone()
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        active = torch.arange(n, device=x.device)
        per_forward = max(1, self.batch_size // self.population)  # samples per population chunk
        for it in range(self.max_iters + 1):
            if it % self.check_every == 0 or it == self.max_iters:  # the projected mean
                cand = self._candidates(w[active], mu[active], xf[active])
                succ = is_success(self._forward(model, cand, shape), y[active], self.targeted)
                queries[active] += 1
                best[active] = cand
                done[active[succ]] = True
                active = active[~succ]
            if it == self.max_iters or active.numel() == 0:
                break
            for rows in active.split(per_forward):
                k, p = rows.numel(), self.population
                e = torch.randn(k, p, xf.shape[1], **gen).to(x.device)
                cand = self._candidates(
                    w[rows, None], mu[rows, None] + self.sigma * e, xf[rows, None]
                )
                logits = self._forward(model, cand.flatten(0, 1), shape)
                queries[rows] += p
                labels = y[rows].repeat_interleave(p)
                m = margin(logits, labels)
                reward = -(-m if self.targeted else m).clamp(0, 1000).view(k, p)
                a = (reward - reward.mean(1, keepdim=True)) / (
                    reward.std(1, correction=0, keepdim=True) + 1e-7
                )
                mu[rows] += self.lr / (p * self.sigma) * torch.einsum("kp,kpd->kd", a, e)
                hit = is_success(logits, labels, self.targeted).view(k, p)
                found = hit.any(1)
                if found.any():  # keep the first adversarial member of each broken sample
                    first = hit.int().argmax(1)
                    best[rows[found]] = cand[found, first[found]]
                    done[rows[found]] = True
            active = active[~done[active]]
        return Perturbation(best.view_as(x), queries=queries)

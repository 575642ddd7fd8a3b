"""JSMA, the Jacobian-based saliency map attack (Papernot, McDaniel, Jha, Fredrikson, Celik &
Swami, IEEE EuroS&P 2016, "The Limitations of Deep Learning in Adversarial Settings",
https://arxiv.org/abs/1511.07528).

Distance: l0 (pixels). Targeted by design; a minimum-norm attack in the sense that it stops at
its first adversarial point and reports its pixel count (``AttackResult.min_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.attacks._min_norm import Smallest
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

#: most features per sample: the pair search scores d x d pairs (64 MiB in float32 at 4096;
#: CIFAR-10's 3072 fits, ImageNet's 150,528 would need 90 GB)
MAX_FEATURES = 4096
_BLOCK = 1 << 20  # pair scores held at once (samples are scored in blocks of this size)


def best_pair(
    g_target: Tensor, g_other: Tensor, domain: Tensor, increase: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The saliency map's pair choice: over pairs ``p != q`` of the search domain, with
    ``alpha = g_target[p] + g_target[q]`` and ``beta = g_other[p] + g_other[q]``, the argmax of
    ``-alpha * beta`` among the pairs with ``alpha > 0, beta < 0`` (``increase``) or
    ``alpha < 0, beta > 0`` (decrease).

    Args: ``g_target``, ``g_other`` (n, d): the gradients of the target's output and of the sum
    of the other outputs; ``domain`` bool (n, d). Returns ``(p, q, found)``, each (n,):
    ``p < q`` the chosen features (ties: the first in row-major order), ``found`` False where
    no pair qualifies (``p``, ``q`` are then meaningless).
    """
    n, d = g_target.shape
    sign = 1.0 if increase else -1.0
    # out of the domain: alpha of any pair with the feature fails the condition (cleverhans)
    big = 2 * g_target.abs().amax(1, keepdim=True) + 1
    gt = torch.where(domain, sign * g_target, -big)
    go = sign * g_other
    flat = torch.empty(n, dtype=torch.long, device=gt.device)
    found = torch.empty(n, dtype=torch.bool, device=gt.device)
    block = max(1, _BLOCK // (d * d))
    for s in range(0, n, block):
        a, b = gt[s : s + block], go[s : s + block]
        alpha = a[:, :, None] + a[:, None, :]
        beta = b[:, :, None] + b[:, None, :]
        prod = alpha * beta  # -score; < 0 where the pair qualifies
        prod.masked_fill_((alpha <= 0) | (beta >= 0), float("inf"))
        prod.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        low, at = prod.flatten(1).min(1)
        flat[s : s + block], found[s : s + block] = at, low < float("inf")
    p, q = flat // d, flat % d
    return torch.minimum(p, q), torch.maximum(p, q), found


@register("jsma")
class JSMA(Attack):
    """JSMA: per iteration, take the Jacobian of the model's outputs ``F`` (softmax
    probabilities, or logits with ``logits=True``: "JSMA-Z") at the iterate, choose the pair
    of features of the search domain that most raises the target's output while lowering the
    others' (:func:`best_pair`, the saliency map of the paper's Algorithm 3), move both by
    ``theta`` (clipped to the bounds) and take them out of the domain.

    The domain starts as every feature not already at the bound ``theta`` points to. A sample
    stops at its first adversarial iterate, when no pair qualifies, when fewer than two
    features are left, or after ``floor(gamma * d / 2)`` iterations (``d`` features: at most
    a fraction ``gamma`` of them changed).

    Args:
        threat: an l0 threat model; ``eps`` (pixels) only decides which point is returned.
        theta: change of each chosen feature, as a fraction of the box width ``high - low``,
            in [-1, 1], not 0: positive increases features, negative decreases them. Default
            +1 (the paper: a chosen feature jumps to the top of the box).
        gamma: largest fraction of the features changed, in (0, 1]. Default 0.145 (the
            paper's MNIST value; Feinman et al. use 0.1).
        logits: differentiate the logits instead of the softmax probabilities (JSMA-Z, as
            Carlini & Wagner 2017 use it). Default False (probabilities, as cleverhans'
            ``SaliencyMapMethod``).
        untargeted_target: the class an untargeted call steers towards: ``"random"`` (drawn
            from the call's generator among the classes != y, as the common untargeted use)
            or ``"runner-up"`` (the highest clean logit != y). Default ``"random"``.
        targeted: reach ``target`` (pass it to the call). Default False: success is any
            class != y, and a sample stops at its first misclassification.
        early_stop: stop a sample once more than ``eps`` pixels are changed (it cannot break
            within ``eps`` any more; its ``min_norm`` is then ``inf``). Default False.
        seed: seed of the attack's generator when the call passes none (the random targets).

    Units: JSMA changes features (one channel of one pixel); ``gamma`` counts features, as the
    paper; ``min_norm`` counts pixels with at least one changed channel, the l0 threat model's
    unit (equal for one-channel images).

    Cost: at most ``floor(gamma * d / 2)`` iterations, each one forward and one backward pass
    on two copies of the unfinished samples (the target's output and the sum of the others:
    the two rows of the Jacobian the saliency map uses), and the ``d x d`` pair scores per
    sample, so ``d`` is limited to :data:`MAX_FEATURES` (ValueError beyond: use ``pgd-l0`` or
    ``sparse-rs``).

    Differences from the reference code (cleverhans ``jsma_symbolic``): a sample whose domain
    holds no qualifying pair stops (cleverhans then changes feature 0); an untargeted run stops
    at the first misclassification, not at the target.

    Returns: ``x_adv`` the first adversarial iterate if it changes at most ``eps`` pixels,
    else its l0 projection (the clean point if none was found); ``min_norm`` (N,) its number
    of changed pixels (``inf`` if none; 0 for points already adversarial).

    Example:
        >>> res = JSMA(ThreatModel("l0", 20))(model, x, y)
        >>> changed = res.min_norm[torch.isfinite(res.min_norm)]
    """

    norms = ("l0",)
    minimum_norm = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        theta: float = 1.0,
        gamma: float = 0.145,
        logits: bool = False,
        untargeted_target: str = "random",
        targeted: bool = False,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss="ce", targeted=targeted, seed=seed)
        self.theta = number(theta, "theta", low=-1, high=1)
        if self.theta == 0:
            raise ValueError(
                "theta must be nonzero (the signed change of a chosen feature, "
                "as a fraction of the box width), got 0"
            )
        self.gamma = number(gamma, "gamma", low=0, high=1, low_open=True)
        self.logits = bool(logits)
        self.untargeted_target = one_of(
            untargeted_target, "untargeted_target", ("random", "runner-up")
        )
        self.early_stop = bool(early_stop)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "theta": self.theta,
            "gamma": self.gamma,
            "logits": self.logits,
            "untargeted_target": self.untargeted_target,
            "early_stop": self.early_stop,
        }

    def _steer(self, logits: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        """The classes (N,) an untargeted run steers towards (never ``y``)."""
        if self.untargeted_target == "runner-up":
            return logits.scatter(1, y[:, None], float("-inf")).argmax(1)
        k = logits.shape[1]
        shift = torch.randint(1, k, (len(y),), generator=generator, device=generator.device)
        return (y + shift.to(y.device)) % k

    def _jacobian(self, model: nn.Module, xa: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (n, K) at ``xa``, and the gradients (n, d) of ``F_t`` and ``sum_{j != t} F_j``
        (one backward pass over ``xa`` stacked twice)."""
        n = len(xa)

        def outputs(z: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(z)
            out = logits if self.logits else F.softmax(logits, dim=1)
            tt = t.repeat(2)[:, None]
            own = out.gather(1, tt)[:, 0]
            return torch.cat([own[:n], out[n:].sum(1) - own[n:]]), logits[:n]

        _, logits, grad = self.input_grad(outputs, torch.cat([xa, xa]))
        return logits, grad[:n].flatten(1), grad[n:].flatten(1)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        d = x[0].numel()
        if d > MAX_FEATURES:
            raise ValueError(
                f"jsma scores all d x d feature pairs per sample: d = {d} features "
                f"exceeds {MAX_FEATURES} (CIFAR-10's 3072 fits); use 'pgd-l0' or "
                "'sparse-rs' for larger inputs"
            )
        lo, hi = self.threat.bounds
        increase = self.theta > 0
        with torch.no_grad():
            logits = model(x)
        best = Smallest(self.threat, x, is_success(logits, y, self.targeted))
        steer = y if self.targeted else self._steer(logits, y, generator)
        idx = best.unsolved(within_eps=False).nonzero().squeeze(1)
        cur = x[idx].flatten(1)
        domain = cur < hi if increase else cur > lo
        last = int(self.gamma * d / 2)
        for it in range(last + 1):
            if idx.numel() == 0:
                break
            xa = cur.reshape((-1,) + x.shape[1:])
            if it == last:  # the last iterate: checked only
                with torch.no_grad():
                    best.update(idx, xa, is_success(model(xa), y[idx], self.targeted))
                break
            logits, g_t, g_o = self._jacobian(model, xa, steer[idx])
            ok = is_success(logits, y[idx], self.targeted)
            if it:  # the clean points were checked already
                best.update(idx, xa, ok)
            p, q, found = best_pair(g_t, g_o, domain, increase)
            keep = ~ok & found & (domain.sum(1) >= 2)
            if self.early_stop:
                keep &= self.threat.distance(xa, x[idx]) <= self.threat.eps
            idx, cur, domain, p, q = (t[keep] for t in (idx, cur, domain, p, q))
            pq = torch.stack([p, q], 1)
            moved = (cur.gather(1, pq) + self.theta * (hi - lo)).clamp(lo, hi)
            cur, domain = cur.scatter(1, pq, moved), domain.scatter(1, pq, False)
        return best.result(model, y, self.targeted)

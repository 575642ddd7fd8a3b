"""Projected gradient descent (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", https://arxiv.org/abs/1706.06083), with a choice of inner optimiser.

Distance: linf, l2, l1 (the threat model's norm).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Attack
from robustlab.attacks.losses import is_success
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

OPTIMIZERS = ("sign", "momentum", "adam")
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


class _Best:
    """Per-sample best iterate: a successful point beats an unsuccessful one, then higher loss."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, idx: Tensor, x: Tensor, loss: Tensor, success: Tensor) -> None:
        old_s, old_l = self.success[idx], self.loss[idx]
        better = (success & ~old_s) | ((success == old_s) & (loss > old_l))
        if better.any():
            j = idx[better]
            self.x[j], self.loss[j], self.success[j] = x[better], loss[better], success[better]


class _Direction:
    """The direction each step follows: the raw gradient turned by the optimiser's per-sample
    state (see PGD's ``optimizer``). One per restart; :meth:`keep` drops rows with their samples."""

    def __init__(self, kind: str, mu: float) -> None:
        self.kind, self.mu, self.t = kind, mu, 0
        self.m: Tensor | float = 0.0  # momentum: the velocity; adam: the first moment
        self.v: Tensor | float = 0.0  # adam: the second moment

    def keep(self, rows: Tensor) -> None:
        if isinstance(self.m, Tensor):
            self.m = self.m[rows]
        if isinstance(self.v, Tensor):
            self.v = self.v[rows]

    def __call__(self, grad: Tensor) -> Tensor:
        if self.kind == "sign":
            return grad
        if self.kind == "momentum":
            l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12)
            self.m = self.mu * self.m + grad / l1.reshape((-1,) + (1,) * (grad.dim() - 1))
            return self.m
        (b1, b2), self.t = _ADAM_BETAS, self.t + 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad.square()
        v_hat = self.v / (1 - b2 ** self.t)
        return self.m / (1 - b1 ** self.t) / (v_hat.sqrt() + _ADAM_EPS)


@register("pgd")
class PGD(Attack):
    """PGD with random start, restarts keeping the best, targeted mode, a choice of loss and of
    inner optimiser.

    Args:
        threat: threat model; the attack stays in its ball and bounds.
        steps: gradient steps per restart (>= 1). Default 10.
        step_size: lp length of each step in input units; default ``2.5 * eps / steps``
            (Madry et al.'s rule).
        random_start: start each restart from a uniform point of the ball. Default True.
        restarts: number of runs (>= 1); each later run attacks only points still unbroken, and
            each sample keeps its best iterate over all runs and steps. Default 1.
        loss: ``"ce"`` or ``"cw-margin"``. Default ``"ce"``.
        targeted: maximise the target class instead (pass ``target`` to the call).
        early_stop: stop attacking a sample once it is misclassified, keeping that iterate.
            Does not change which points are broken, only the work (used by evaluation).
        keep_best: return each sample's best iterate over all steps (successful first, then
            highest loss) instead of the last one. Training uses the last iterate (False).
        l1_sparsity: for l1, fraction of coordinates moved per step (see ThreatModel).
        optimizer: the direction whose steepest step (lp length ``step_size``) is taken:
            ``"sign"`` the gradient (Madry et al.); ``"momentum"`` the MI-FGSM velocity
            ``g_t = momentum * g_(t-1) + grad / ||grad||_1`` (Dong et al. 2018); ``"adam"``
            ``m_hat / (sqrt(v_hat) + 1e-8)``, betas (0.9, 0.999) (for l1 its near-equal
            magnitudes make the sparse step's choice of coordinates almost arbitrary). Per-sample
            state, fresh each restart. Default ``"sign"``.
        momentum: decay ``mu`` >= 0 of the ``"momentum"`` optimiser. Default 1.0.
        seed: seed of the attack's generator when the call passes none.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Returns :class:`AttackResult`.

    Example:
        >>> attack = PGD(ThreatModel("linf", 0.1), steps=40, restarts=5)
        >>> res = attack(model, x, y)
        >>> robust_acc = 1 - res.success.float().mean()
    """

    name = "pgd"
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        l1_sparsity: float = 0.05,
        optimizer: str = "sign",
        momentum: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss=loss, targeted=targeted, seed=seed)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        if step_size is not None and not (
            isinstance(step_size, int | float) and not isinstance(step_size, bool)
            and math.isfinite(step_size) and step_size > 0
        ):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
        if not isinstance(l1_sparsity, int | float) or not 0 < l1_sparsity <= 1:
            raise ValueError(f"l1_sparsity must be in (0, 1], got {l1_sparsity!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers are: "
                             f"{', '.join(OPTIMIZERS)}")
        if (isinstance(momentum, bool) or not isinstance(momentum, int | float)
                or not (math.isfinite(momentum) and momentum >= 0)):
            raise ValueError(f"momentum must be a finite number >= 0, got {momentum!r}")
        self.steps = steps
        self.step_size = float(step_size) if step_size is not None else 2.5 * threat.eps / steps
        self.random_start = bool(random_start)
        self.restarts = restarts
        self.early_stop = bool(early_stop)
        self.keep_best = bool(keep_best)
        self.l1_sparsity = float(l1_sparsity)
        self.optimizer = optimizer
        self.momentum = float(momentum)

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "early_stop": self.early_stop,
            "keep_best": self.keep_best,
            "optimizer": self.optimizer,
        } | ({"momentum": self.momentum} if self.optimizer == "momentum" else {})

    def _loss_fn(self, model: nn.Module, y: Tensor, rows: Tensor | None = None):
        """The function the steps differentiate: ``xa -> (per-sample loss, logits)`` for the
        samples ``rows`` of the attacked batch (None: all of them)."""
        def f(xa: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            return self.loss(logits, y, self.targeted), logits
        return f

    def _start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.threat.random_init(x, generator) if self.random_start else x

    def _step(self, xa: Tensor, d: Tensor, x: Tensor) -> Tensor:
        """The projected steepest step of length ``step_size`` along direction ``d``."""
        if self.threat.norm == "l1":  # spend the sparse step on coordinates that can move
            lo, hi = self.threat.bounds
            d = d.masked_fill(((xa <= lo) & (d < 0)) | ((xa >= hi) & (d > 0)), 0)
        step = self.threat.steepest_step(d, self.step_size, l1_sparsity=self.l1_sparsity)
        return self.threat.project(xa + step, x)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        if not (self.keep_best or self.early_stop or self.restarts > 1):
            xa = self._start(x, generator)  # plain PGD (as in training): the last iterate
            direction = _Direction(self.optimizer, self.momentum)
            for _ in range(self.steps):
                _, _, grad = self.input_grad(self._loss_fn(model, y), xa)
                xa = self._step(xa, direction(grad), x)
            return xa
        best = _Best(x)
        for _ in range(self.restarts):
            idx = (~best.success).nonzero().squeeze(1)  # restarts only on unbroken points
            xa = self._start(x[idx], generator)
            direction = _Direction(self.optimizer, self.momentum)  # fresh state per restart
            for _ in range(self.steps):
                if idx.numel() == 0:
                    break
                loss, logits, grad = self.input_grad(self._loss_fn(model, y[idx], idx), xa)
                success = is_success(logits, y[idx], self.targeted)
                seen = success | self.keep_best  # without keep_best only successes are kept
                best.update(idx[seen], xa[seen], loss[seen], success[seen])
                if self.early_stop:
                    idx, xa, grad = idx[~success], xa[~success], grad[~success]
                    direction.keep(~success)
                xa = self._step(xa, direction(grad), x[idx])
            if idx.numel():
                with torch.no_grad():
                    logits = model(xa)
                loss = self.loss(logits, y[idx], self.targeted)
                best.update(idx, xa, loss, is_success(logits, y[idx], self.targeted))
            if not best.success.logical_not().any():
                break
        return best.x

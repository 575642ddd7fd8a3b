"""Projected gradient descent (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", https://arxiv.org/abs/1706.06083): the one ascent loop of the package,
with a choice of loss and of inner optimiser.

Distance: linf, l2, l1 (the threat model's norm).

The loss is an argument at two levels. At construction, ``loss`` is a registered name or a
callable ``loss(logits, y) -> (N,)`` (as MadryLab's ``custom_loss``, foolbox's
``get_loss_fn``). For one call, :meth:`PGD.perturb` (and ``attack.craft(..., loss=...)``)
takes a :data:`LossAt`, which sees the attacked points themselves, so a training objective
(TRADES' KL to the clean distribution, EPGD's noise average, SmoothAdv's soft smoothed
classifier) runs this loop with its own loss and start without touching the attack object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.base import Attack
from robustlab.attacks.losses import CustomLoss, is_success, rejects, tempered
from robustlab.attacks.optimizers import OPTIMIZERS, StepRule, make
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel

__all__ = ["OPTIMIZERS", "PGD", "LossAt", "Start"]

#: ``loss_at(x_adv, y, rows) -> (per-sample loss (n,), logits (n, K))``: what one step
#: differentiates, at the points ``x_adv`` (n, ...) of the batch rows ``rows`` (indices into
#: the attacked batch, or None for all of them) with their labels ``y`` (n,)
LossAt = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]
#: ``start(x, generator) -> first iterate`` of each restart, for the rows ``x`` it attacks
Start = Callable[[Tensor, torch.Generator], Tensor]


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


def _at(
    loss_at: LossAt, y: Tensor, rows: Tensor | None
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    return lambda xa: loss_at(xa, y, rows)


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
        loss: a registered loss name (``"ce"``, ``"cw-margin"``, ``"dlr"``) or a callable
            ``loss(logits, y) -> (N,)`` to maximise. Default ``"ce"``.
        targeted: maximise the target class instead (pass ``target`` to the call).
        early_stop: stop attacking a sample once it is misclassified, keeping that iterate.
            Does not change which points are broken, only the work (used by evaluation).
        keep_best: return each sample's best iterate over all steps (successful first, then
            highest loss) instead of the last one. Training uses the last iterate (False).
        l1_sparsity: for l1, fraction of coordinates moved per step (see ThreatModel).
        optimizer: the step rule (:mod:`robustlab.attacks.optimizers`). Steepest rules, whose
            direction's steepest step (lp length ``step_size``) is taken: ``"sign"`` the
            gradient (Madry et al.); ``"momentum"`` the MI-FGSM velocity ``g_t = momentum *
            g_(t-1) + grad / ||grad||_1`` (Dong et al. 2018); ``"adam"`` ``m_hat / (sqrt(v_hat)
            + 1e-8)``, betas (0.9, 0.999). Update rules, whose own update of the perturbation
            (learning rate ``step_size``, in the gradient's scale) is taken and projected:
            ``"sgd"``, ``"rmsprop"``, ``"adagrad"`` (torch.optim's), ``"ftrl"``
            (TensorFlow's FTRL-proximal). Or a
            :class:`~robustlab.attacks.optimizers.StepRule` subclass (built with no argument).
            Per-sample state, fresh each restart. Default ``"sign"``.
        momentum: decay ``mu`` >= 0 of the ``"momentum"`` optimiser. Default 1.0.
        temperature: T > 0: the loss sees the logits divided by T (the temperature attack on
            defensive distillation, :func:`~robustlab.attacks.losses.tempered`), in the steps
            and in the reported ``res.loss``; a per-call :data:`LossAt` is taken as it is.
            Recorded in :meth:`config` when not 1. Default 1.
        seed: seed of the attack's generator when the call passes none.

    Shapes: x (N, C, H, W) in the threat bounds, y (N,) int64. Returns :class:`AttackResult`.

    Example:
        >>> attack = PGD(ThreatModel("linf", 0.1), steps=40, restarts=5)
        >>> res = attack(model, x, y)
        >>> robust_acc = 1 - res.success.float().mean()
    """

    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str | CustomLoss = "ce",
        targeted: bool = False,
        early_stop: bool = False,
        keep_best: bool = True,
        l1_sparsity: float = 0.05,
        optimizer: str | type[StepRule] = "sign",
        momentum: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss=loss, targeted=targeted, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.restarts = positive_int(restarts, "restarts")
        if step_size is not None:
            step_size = number(step_size, "step_size", low=0, low_open=True)
        try:
            self.l1_sparsity = number(l1_sparsity, "l1_sparsity", low=0, high=1, low_open=True)
        except ValueError:  # a fraction: the message says so without "a number"
            raise ValueError(f"l1_sparsity must be in (0, 1], got {l1_sparsity!r}") from None
        self.momentum = number(momentum, "momentum", low=0)
        self.temperature = number(temperature, "temperature", low=0, low_open=True)
        self.loss = tempered(self.loss, self.temperature)
        if not (isinstance(optimizer, type) and issubclass(optimizer, StepRule)):
            make(optimizer, self.momentum)  # checks the name
        self.optimizer = optimizer
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        self.keep_best = bool(keep_best)

    def config(self) -> dict[str, Any]:
        return (
            super().config()
            | {
                "steps": self.steps,
                "step_size": self.step_size,
                "random_start": self.random_start,
                "restarts": self.restarts,
                "early_stop": self.early_stop,
                "keep_best": self.keep_best,
                "optimizer": self._rule_name(),
            }
            | ({"momentum": self.momentum} if self.optimizer == "momentum" else {})
            | ({"temperature": self.temperature} if self.temperature != 1 else {})
        )

    def _rule_name(self) -> str:
        return self.optimizer if isinstance(self.optimizer, str) else self.optimizer.name

    def _rule(self) -> StepRule:
        """A fresh step rule (its state lives for one restart)."""
        if isinstance(self.optimizer, str):
            return make(self.optimizer, self.momentum)
        return self.optimizer()

    def loss_at(self, model: nn.Module) -> LossAt:
        """The default :data:`LossAt`: this attack's loss at ``model``'s logits."""

        def f(xa: Tensor, y: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            return self.loss(logits, y, self.targeted), logits

        return f

    def _start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.threat.random_init(x, generator) if self.random_start else x

    def _step(self, xa: Tensor, d: Tensor, x: Tensor) -> Tensor:
        """The projected steepest step of length ``step_size`` along direction ``d``."""
        if self.threat.norm == "l1":  # spend the sparse step on coordinates that can move
            d = self.threat.drop_blocked(xa, d)
        step = self.threat.steepest_step(d, self.step_size, l1_sparsity=self.l1_sparsity)
        return self.threat.project(xa + step, x)

    def _advance(self, xa: Tensor, rule: StepRule, grad: Tensor, x: Tensor) -> Tensor:
        """The next iterate from ``xa`` (clean points ``x``): the steepest step along
        ``rule(grad)``, or for an update rule (``rule.steepest`` False) its own update of the
        perturbation with learning rate ``step_size``, projected."""
        if rule.steepest:
            return self._step(xa, rule(grad), x)
        return self.threat.project(x + rule.update(grad, xa - x, self.step_size), x)

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        *,
        loss: LossAt | None = None,
        start: Start | None = None,
    ) -> Tensor:
        """PGD's iterate (see the class): ``loss`` (a :data:`LossAt`) replaces
        :meth:`loss_at` and ``start`` (a :data:`Start`) the random start for this call only.
        Success (for ``keep_best`` and ``early_stop``) and the final score of each restart
        stay those of ``model``'s logits under the attack's own loss."""
        loss_at = loss if loss is not None else self.loss_at(model)
        start = start if start is not None else self._start
        if not (self.keep_best or self.early_stop or self.restarts > 1):
            xa = start(x, generator)  # plain PGD (as in training): the last iterate
            direction = self._rule()
            for _ in range(self.steps):
                _, _, grad = self.input_grad(_at(loss_at, y, None), xa)
                xa = self._advance(xa, direction, grad, x)
            return xa
        return self._best_iterate(model, x, y, generator, loss_at, start)

    def _best_iterate(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        loss_at: LossAt,
        start: Start,
    ) -> Tensor:
        best, reject = _Best(x), rejects(model)  # a detector: a rejected point is no success
        for _ in range(self.restarts):
            idx = (~best.success).nonzero().squeeze(1)  # restarts only on unbroken points
            xa = start(x[idx], generator)
            direction = self._rule()  # fresh state per restart
            for _ in range(self.steps):
                if idx.numel() == 0:
                    break
                loss, logits, grad = self.input_grad(_at(loss_at, y[idx], idx), xa)
                success = is_success(logits, y[idx], self.targeted, reject)
                seen = success | self.keep_best  # without keep_best only successes are kept
                best.update(idx[seen], xa[seen], loss[seen], success[seen])
                if self.early_stop:
                    idx, xa, grad = idx[~success], xa[~success], grad[~success]
                    direction.keep(~success)
                xa = self._advance(xa, direction, grad, x[idx])
            if idx.numel():
                with torch.no_grad():
                    logits = model(xa)
                loss = self.loss(logits, y[idx], self.targeted)
                best.update(idx, xa, loss, is_success(logits, y[idx], self.targeted, reject))
            if not best.success.logical_not().any():
                break
        return best.x

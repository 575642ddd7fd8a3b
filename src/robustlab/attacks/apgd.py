"""Auto-PGD (Croce & Hein, 2020, "Reliable Evaluation of Adversarial Robustness with an Ensemble
of Diverse Parameter-Free Attacks", https://arxiv.org/abs/2003.01690): PGD with momentum whose
per-sample step size halves at checkpoints when the loss stalls. l1: the sparse l1-APGD of Croce
& Hein, 2021, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers",
https://arxiv.org/abs/2103.01208.

Distance: linf, l2, l1. Attacks: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (targeted DLR).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.base import Attack
from robustlab.attacks.losses import CustomLoss, dlr_targeted, is_success, rejects, tempered
from robustlab.attacks.registry import register
from robustlab.threat import ThreatModel


@dataclass
class State:
    """One run's per-sample tensors, all indexed by the same rows (the samples still attacked).

    Attributes:
        gidx: the rows' indices in the attacked batch (n,).
        x, y, t: clean inputs (n, ...), labels (n,), target classes (n,; APGD-T only).
        xa, prev: the current and the previous iterate (n, ...).
        loss, grad: loss (n,) and its input gradient (n, ...) at ``xa``.
        x_best, g_best, l_best: the highest-loss iterate of the run, its gradient and loss.
        l_check: ``l_best`` at the last checkpoint (n,).
        step: the step size eta in input units (n,).
        inc: steps since the last checkpoint where the loss went up (n,).
        reduced: whether the step was halved at the last checkpoint (n,) bool.
        topk, sp_old: l1 only: the fraction of coordinates moved per step, and the best
            point's sparsity (number of changed coordinates) at the last checkpoint (n,).
    """

    gidx: Tensor
    x: Tensor
    y: Tensor
    t: Tensor
    xa: Tensor
    prev: Tensor
    loss: Tensor
    grad: Tensor
    x_best: Tensor
    g_best: Tensor
    l_best: Tensor
    l_check: Tensor
    step: Tensor
    inc: Tensor
    reduced: Tensor
    topk: Tensor
    sp_old: Tensor

    def keep(self, rows: Tensor) -> State:
        """The state of ``rows`` only (a bool mask or indices)."""
        return State(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def checkpoints(steps: int) -> list[int]:
    """Iterations ``0 = w_0 < w_1 < ... <= steps`` after which APGD checks its step size, by the
    reference code's integer rule: ``w_1 = max(floor(0.22 N), 1)``, then intervals shrinking by
    ``max(floor(0.03 N), 1)`` down to ``max(floor(0.06 N), 1)`` (the paper's ``w_j = ceil(p_j N)``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``). N = 100: 0 22 41 57 70 80 87 93 99."""
    k, shrink, least = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
    marks = [0]
    while marks[-1] + k <= steps:
        marks.append(marks[-1] + k)
        k = max(k - shrink, least)
    return marks


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class _Best:
    """Per-sample output over runs: a misclassified point if any, else the highest loss;
    ``reject``: the attacked model is a detector, so a point counts as misclassified only if
    it is not rejected either (:func:`~robustlab.attacks.losses.is_success`)."""

    def __init__(self, x: Tensor, success: Tensor, reject: bool = False) -> None:
        self.x, self.success, self.reject = x.clone(), success.clone(), reject
        self.loss = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)


@register("apgd-ce")
class APGD(Attack):
    """Auto-PGD maximising ``loss`` (untargeted).

    Step ``2 eps`` (l1: ``eps``) per sample; ``x1 = P(x0 + eta * step_dir(grad))`` then momentum
    ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))``, a = 0.75 (1 on the first step).
    At each checkpoint (:func:`checkpoints`) a sample halves its step and restarts from its
    best-loss point if the loss went up in at most ``rho`` of the steps since the last one, or if
    its step was not halved last time and its best loss has not improved. l1 (Croce & Hein 2021):
    steps of length ``eta`` spread over the top ``k`` gradient coordinates (box-aware: coordinates
    at a bound whose gradient points out are skipped), no momentum, exact projection onto
    l1-ball ∩ box; every ``max(floor(0.04 N), 1)`` steps ``k`` becomes 1/1.5 of the best point's
    sparsity and the step resets to ``eps`` (sparsity shrank by > 5 %, restart from the best point)
    or shrinks by 1.5 (kept >= eps / 10).

    Args:
        threat: threat model; every iterate stays in its ball and bounds.
        steps: iterations per run, N (>= 1). Default 100. Costs N + 1 forward/backward passes per
            run (and one forward pass on the clean points per call).
        restarts: random restarts (>= 1), each on the points still unbroken. Default 1.
        rho: halving threshold on the fraction of increasing steps, in [0, 1]. Default 0.75.
        loss: loss to maximise: ``"ce"`` (default), ``"dlr"`` (>= 3 classes), ``"cw-margin"``.
        early_stop: drop a sample from the batch once misclassified (keeping that point); breaks
            the same points, faster. Default False; evaluation turns it on.
        temperature: T > 0: ``loss`` sees the logits divided by T (the temperature attack on
            defensive distillation, :func:`~robustlab.attacks.losses.tempered`), also in the
            reported ``res.loss``; recorded in :meth:`config` when not 1. Default 1.
        seed: seed of the attack's generator when the call passes none.

    Shapes: x (N, ...) in the bounds, y (N,) int64. Returns each sample's first misclassified
    iterate, else its highest-loss point over all runs; points misclassified clean stay as they are.
    Deviations from the reference code (fra31/auto-attack): the first checkpoint compares the
    first step's loss with the loss at the start point, as the paper does (the code compares it
    with 0); projections onto ball ∩ box are exact (l2 code: rescale, then clip); l1 steps skip
    coordinates that the box blocks; AutoAttack's l1 schedule (eps 3x, 2x, 1x) is not built in.

    Example:
        >>> res = APGD(ThreatModel("linf", 8 / 255), early_stop=True)(model, x, y)
    """

    stochastic = True
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        loss: str | CustomLoss = "ce",
        early_stop: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, loss=loss, seed=seed)
        self.steps = positive_int(steps, "steps")
        self.restarts = positive_int(restarts, "restarts")
        self.rho = number(rho, "rho", low=0, high=1)
        self.early_stop = bool(early_stop)
        self.temperature = number(temperature, "temperature", low=0, low_open=True)
        self.loss = tempered(self.loss, self.temperature)

    def config(self) -> dict[str, Any]:
        return (
            super().config()
            | {
                "steps": self.steps,
                "restarts": self.restarts,
                "rho": self.rho,
                "early_stop": self.early_stop,
            }
            | ({"temperature": self.temperature} if self.temperature != 1 else {})
        )

    def _objective(self, logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """The loss maximised, per sample, for labels ``y`` and (APGD-T) targets ``t``."""
        return self.loss(logits, y, False)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            clean = model(x)
        reject = rejects(model)
        best = _Best(x, is_success(clean, y, False, reject), reject)
        if self.threat.eps > 0:
            for target in self._targets(clean):
                for _ in range(self.restarts):
                    idx = (~best.success).nonzero().squeeze(1)
                    if idx.numel():
                        self._run(model, idx, x[idx], y[idx], target[idx], best, generator)
        return best.x

    def _targets(self, clean: Tensor) -> list[Tensor]:
        return [clean.argmax(1)]  # one untargeted pass (the entry is unused)

    def _init(self, x: Tensor, generator: torch.Generator) -> Tensor:
        th = self.threat
        gen: dict[str, Any] = {"generator": generator, "device": generator.device}
        if th.norm == "linf":
            u = 2 * torch.rand(x.shape, dtype=x.dtype, **gen) - 1
            d = u / _col(u.flatten(1).abs().amax(1).clamp_min(1e-12), u)
        else:
            d = torch.randn(x.shape, dtype=x.dtype, **gen)
            if th.norm == "l1":  # the reference: x + N(0, I) projected onto ball ∩ box
                return th.project(x + d.to(x.device), x)
            d = d / _col(d.flatten(1).norm(dim=1).clamp_min(1e-12), d)
        return (x + th.eps * d.to(x.device)).clamp(*th.bounds)

    def _grad(
        self, model: nn.Module, xa: Tensor, y: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        def f(xa: Tensor) -> tuple[Tensor, Tensor]:
            logits = model(xa)
            return self._objective(logits, y, t), logits

        return self.input_grad(f, xa)

    def _record(self, s: State, logits: Tensor, best: _Best) -> State:
        """Store newly misclassified iterates; with early stop drop those samples."""
        hit = is_success(logits, s.y, False, best.reject)
        new = hit & ~best.success[s.gidx]
        if new.any():
            g = s.gidx[new]
            best.x[g], best.success[g] = s.xa[new], True
            if self.early_stop:
                s = s.keep(~hit)
        return s

    def _run(
        self,
        model: nn.Module,
        gidx: Tensor,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        best: _Best,
        generator: torch.Generator,
    ) -> None:
        th, l1 = self.threat, self.threat.norm == "l1"
        xa = self._init(x, generator)
        loss, logits, grad = self._grad(model, xa, y, t)
        n, d = len(loss), x[0].numel()
        s = State(
            gidx=gidx,
            x=x,
            y=y,
            t=t,
            xa=xa,
            prev=xa,
            loss=loss,
            grad=grad,
            x_best=xa,
            g_best=grad,
            l_best=loss,
            l_check=loss,
            step=loss.new_full((n,), th.eps * (1.0 if l1 else 2.0)),
            inc=torch.zeros_like(loss),
            reduced=torch.ones_like(loss, dtype=torch.bool),
            topk=loss.new_full((n,), 0.2),
            sp_old=loss.new_full((n,), float(d)),
        )
        if l1:
            every = max(int(0.04 * self.steps), 1)
            marks = dict.fromkeys(range(every, self.steps + 1, every), every)
        else:
            w = checkpoints(self.steps)
            marks = {b: b - a for a, b in zip(w, w[1:], strict=False)}
        s = self._record(s, logits, best)
        for i in range(self.steps):
            if not len(s.gidx):
                return
            x_new = self._step(s, first=i == 0)
            s.prev, s.xa = s.xa, x_new
            loss, logits, s.grad = self._grad(model, s.xa, s.y, s.t)
            s.inc = s.inc + (loss > s.loss).to(loss.dtype)
            up = loss > s.l_best
            s.loss, s.l_best = loss, torch.where(up, loss, s.l_best)
            s.x_best = torch.where(_col(up, x_new), x_new, s.x_best)
            s.g_best = torch.where(_col(up, x_new), s.grad, s.g_best)
            s = self._record(s, logits, best)
            if i + 1 in marks and len(s.gidx):
                self._checkpoint(s, marks[i + 1])
        g = s.gidx
        keep = ~best.success[g] & (s.l_best > best.loss[g])
        best.x[g[keep]], best.loss[g[keep]] = s.x_best[keep], s.l_best[keep]

    def _step(self, s: State, first: bool) -> Tensor:
        th, x, xa, grad = self.threat, s.x, s.xa, s.grad
        eta = _col(s.step, xa)
        if th.norm == "l1":
            g = th.drop_blocked(xa, grad)
            a = g.flatten(1).abs()
            pos = ((1 - s.topk) * a.shape[1]).clamp(0, a.shape[1] - 1).long()
            thr = a.sort(dim=1).values.gather(1, pos[:, None])
            top = (a >= thr) & (a > 0)
            dirn = g.flatten(1).sign() * top / top.sum(1, keepdim=True).clamp_min(1)
            return th.project(xa + eta * dirn.view_as(xa), x)
        if th.norm == "linf":
            dirn = grad.sign()
        else:
            dirn = grad / _col(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
        z = th.project(xa + eta * dirn, x)
        mix = 1.0 if first else 0.75
        return th.project(xa + mix * (z - xa) + (1 - mix) * (xa - s.prev), x)

    def _checkpoint(self, s: State, interval: int) -> None:
        """linf/l2: halve the step and restart from the best point where the loss stalled.
        l1: the sparsity k becomes the best point's l0 norm / 1.5; where that shrank by > 5 %
        the step resets to eps and the run restarts from the best point, elsewhere the step
        shrinks by 1.5 (Croce & Hein 2021)."""
        if self.threat.norm == "l1":
            eps, d = self.threat.eps, s.x[0].numel()
            sp = (s.x_best - s.x).flatten(1).ne(0).sum(1).to(s.step.dtype)
            restart = sp / s.sp_old.clamp_min(1) < 0.95
            s.topk, s.sp_old = sp / d / 1.5, sp
            s.step = torch.where(restart, eps, s.step / 1.5).clamp(eps / 10, eps)
        else:
            restart = (s.inc <= self.rho * interval) | (~s.reduced & (s.l_check >= s.l_best))
            s.reduced, s.l_check, s.inc = restart, s.l_best, torch.zeros_like(s.inc)
            s.step = torch.where(restart, s.step / 2, s.step)
        m = _col(restart, s.xa)
        s.xa = torch.where(m, s.x_best, s.xa)
        s.grad = torch.where(m, s.g_best, s.grad)


@register("apgd-dlr")
class APGDDLR(APGD):
    """:class:`APGD` on the DLR loss (needs >= 3 classes); the same arguments, ``loss="dlr"``."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        loss: str | CustomLoss = "dlr",
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            restarts=restarts,
            rho=rho,
            loss=loss,
            early_stop=early_stop,
            seed=seed,
        )


@register("apgd-t")
class APGDT(APGD):
    """:class:`APGD` on the targeted DLR loss, once per target class: the classes ranked 2nd to
    ``n_target_classes + 1``-th by the clean logits, each run on the points still unbroken.
    Succeeds on any misclassification (untargeted); the reported loss is the untargeted DLR.
    Needs >= 4 classes.

    Args:
        n_target_classes: number of targets (>= 1), capped at classes - 1. Default 9.
        steps, restarts, rho, early_stop, seed: as :class:`APGD` (restarts per target).
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        n_target_classes: int = 9,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            restarts=restarts,
            rho=rho,
            loss="dlr",
            early_stop=early_stop,
            seed=seed,
        )
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "loss": "dlr-targeted",
            "n_target_classes": self.n_target_classes,
        }

    def _objective(self, logits: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return dlr_targeted(logits, y, t)

    def _targets(self, clean: Tensor) -> list[Tensor]:
        k = clean.shape[1]
        if k < 4:
            raise ValueError(
                f"apgd-t needs at least 4 classes (targeted DLR loss), the model has "
                f"{k}; use apgd-ce"
            )
        order = clean.argsort(dim=1, descending=True)
        return [order[:, j] for j in range(1, min(self.n_target_classes, k - 1) + 1)]

"""Semi-supervised MART (Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness
Requires Revisiting Misclassified Examples", ICLR 2020, https://openreview.net/forum?id=rklOg6EFwS;
the unlabelled setting follows RST: Carmon et al., NeurIPS 2019, arXiv:1905.13736).

On a minibatch of B images, L labelled (x, y) and U from the unlabelled pool, pseudo-labelled
y~ = argmax f_t(x) by a naturally trained teacher in :meth:`setup`:

    loss = (L/B) MART_L(y) + gamma * (U/B) unsup_U
    unsup = beta * (1/U) sum_U KL( p(x_i) || p(x'_i) ) * (1.0000001 - p_{y~_i}(x_i))   (term="kl")
    unsup = MART_U(y~)                                                               (term="full")

MART_S(t) is :func:`~robustlab.training.objectives.mart.mart_loss` on the images S with
targets t (boosted CE + beta KL weighted by 1 - p_t(x)); x' is MART's PGD on CE for every
image, at y or y~. ``term="kl"`` keeps on the pool only MART's KL term, the part that needs no
label but its weight; ``term="full"`` treats pseudo-labels as labels (the RST recipe the MART
README follows). The pool is given as data and/or by hiding labels
(:mod:`~robustlab.training.objectives.pool`); its labels are never read.

Defaults: beta = 6, gamma = 1, K = 10 steps of 2.5 eps / K (MART's); the reported setting is
WRN-28-10 + 500K pseudo-labelled Tiny Images, 87.50 % clean, 56.29 % AutoAttack (AWP README).
The exact unlabelled weighting and batch ratio of MART's own run are not verified (card H7).
Differences: batches are drawn uniformly from labelled + pool (RST: half of each batch); a
wrong pseudo-label gets a large weight 1 - p_{y~}(x), as in the method.

Cost: MART's (about K + 1.5 forward/backward passes per image), plus one teacher forward per
pool image at setup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, one_of
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.distillation import Teacher, check_teacher, teacher_name
from robustlab.training.objectives.mart import MART, mart_loss
from robustlab.training.objectives.pool import check_pool, describe, join, rows, teacher_logits

TERMS = ("kl", "full")


def kl_term(logits_clean: Tensor, logits_adv: Tensor, t: Tensor, beta: float) -> Tensor:
    """``beta * mean_i KL(p(x_i) || p(x'_i)) * (1.0000001 - p_{t_i}(x_i))``, nothing detached
    (MART's KL term, with its constants)."""
    p_adv, p_clean = F.softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(dim=1)
    return beta * (kl * (1.0000001 - p_clean.gather(1, t[:, None]).squeeze(1))).mean()


@register("mart-semi")
class MARTSemi(Objective):
    """MART on the labelled images plus ``gamma`` times MART's pseudo-label-weighted KL term
    (or its whole loss) on the unlabelled pool.

    Args:
        teacher: a naturally trained model that pseudo-labels the pool (a robustlab
            checkpoint path or an ``nn.Module``; required).
        labeled: leading training images that keep their labels (>= 0); the rest join the
            pool. ``None``: all keep theirs.
        unlabeled: unlabelled images (N, C, H, W) appended to the training set.
            ``labeled`` or ``unlabeled`` (or both) is required.
        gamma: weight of the unlabelled term (>= 0). Default 1.0.
        term: ``"kl"`` (default) or ``"full"`` (see the module docstring).
        beta, steps, step_size: MART's (defaults 6.0, 10, ``2.5 eps / steps``).
    """

    def __init__(
        self,
        teacher: Teacher | None = None,
        labeled: int | None = None,
        unlabeled: Tensor | None = None,
        gamma: float = 1.0,
        term: str = "kl",
        beta: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
    ) -> None:
        if teacher is None:
            raise ValueError(
                "mart-semi needs teacher=<path to a naturally trained robustlab "
                "checkpoint, or an nn.Module> to pseudo-label the pool"
            )
        check_teacher(teacher, "mart-semi")
        check_pool(labeled, unlabeled, "mart-semi")
        self.teacher, self.labeled, self.unlabeled = teacher, labeled, unlabeled
        self.gamma = number(gamma, "mart-semi gamma", low=0)
        self.term = one_of(term, "mart-semi term", TERMS)
        self.mart = MART(beta=beta, steps=steps, step_size=step_size)
        self.pseudo = torch.zeros(0, dtype=torch.long)  # y~ by pool row (set by setup)

    def config(self) -> dict:
        mart = {k: v for k, v in self.mart.config().items() if k != "name"}
        return super().config() | {
            "teacher": teacher_name(self.teacher),
            "labeled": self.labeled,
            "unlabeled": describe(self.unlabeled),
            "gamma": self.gamma,
            "term": self.term,
            **mart,
        }

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_all, y_all, pool = join(x, y, self.labeled, self.unlabeled, "mart-semi")
        self.pseudo = torch.zeros(len(pool), dtype=torch.long)
        if len(pool):
            self.pseudo = teacher_logits(self.teacher, pool, model, x, "mart-semi").argmax(1).cpu()
        return x_all, y_all

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        pool = y < 0
        t = y.clone()
        t[pool] = self.pseudo[rows(y).cpu()].to(y.device)
        x_adv = self.mart.perturb(model, x, t, threat, generator)
        clean, adv = model(x), model(x_adv)
        total = x.new_zeros(())
        beta, lab = self.mart.beta, ~pool
        if lab.any():
            total = total + lab.sum() * mart_loss(clean[lab], adv[lab], t[lab], beta)
        if pool.any():
            unsup = (mart_loss if self.term == "full" else kl_term)(
                clean[pool], adv[pool], t[pool], beta
            )
            total = total + self.gamma * pool.sum() * unsup
        return total / len(y)

"""UAT: unsupervised adversarial training (Uesato*, Alayrac*, Huang*, Stanforth, Fawzi, Kohli,
"Are Labels Required for Improving Adversarial Robustness?", NeurIPS 2019,
https://arxiv.org/abs/1905.13725; no official code).

On a minibatch of B images, L labelled (x, y) and U from the unlabelled pool:

    loss = (1/B) [ sum_L CE(f(x'_i), y_i) + lam * sum_U l_unsup(x_i) ]
    x'_i = PGD on CE(f(x'), t_i) (t_i = y_i, or the pseudo-label y~_i of a pool image)
    UAT-FT ("fixed targets", targets = "fixed"):    l_unsup = CE(f(x'_i), y~_i),
           y~_i = argmax f_base(x_i), f_base a classifier trained on the labelled data only
    UAT-OT ("online targets", targets = "online"):  l_unsup = KL( p^(x_i) || p(x''_i) ),
           p^ = softmax(f(x)) held fixed (no gradient), x'' = TRADES' KL ascent from x
    UAT++  (targets = "both"):                      l_unsup = l_FT + l_OT

The supervised part is PGD-AT on the labelled images (Madry et al.); OT is TRADES' regulariser
with the model's own clean prediction in place of the label (like VAT, with PGD). The pool is
given as data and/or by hiding labels (:mod:`~robustlab.training.objectives.pool`); FT and
UAT++ pseudo-label it once in :meth:`setup` with ``teacher`` (the base classifier), and the
pool's labels are never read.

Defaults: lam = 1, K = 10 steps of 2.5 eps / K (PGD-AT's and TRADES' defaults here), targets
"both" (UAT++, the paper's best variant). The paper's D, lam, batch ratio (half unlabelled)
and attack settings are not verified (method card H6); reported: CIFAR-10 with 4K labels, UAT
adds 21.7 points of robust accuracy; with 80M Tiny Images, +4 points over the previous best.
Differences: batches are drawn uniformly from labelled + pool (the unlabelled share is the
pool's share in expectation), the sums are divided by B rather than by each part's own count
(so a batch without pool images is plain PGD-AT), and p^ is the eval-mode prediction.

Cost: K + 1 forward/backward passes per image (FT; OT on pool images: K + 2; UAT++ on pool
images: 2K + 3), plus one teacher forward per pool image at setup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number, one_of
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.distillation import Teacher, check_teacher, teacher_name
from robustlab.training.objectives.pgd_at import PGDAT
from robustlab.training.objectives.pool import check_pool, describe, join, rows, teacher_logits
from robustlab.training.objectives.trades import TRADES

TARGETS = ("fixed", "online", "both")


@register("uat")
class UAT(Objective):
    """PGD-AT on the labelled images plus ``weight`` times an unsupervised adversarial loss on
    the pool: CE at pseudo-labels (fixed), KL to the clean prediction (online), or both.

    Args:
        targets: ``"fixed"`` (UAT-FT), ``"online"`` (UAT-OT) or ``"both"`` (UAT++, default).
        teacher: the base classifier that pseudo-labels the pool (a robustlab checkpoint
            path or an ``nn.Module``); required for fixed and both, unused by online.
        labeled: leading training images that keep their labels (>= 0); the rest join the
            pool. ``None``: all keep theirs.
        unlabeled: unlabelled images (N, C, H, W) appended to the training set.
            ``labeled`` or ``unlabeled`` (or both) is required.
        weight: lam, the weight of the unsupervised loss (>= 0). Default 1.0.
        steps: PGD steps K of each inner maximisation (>= 1). Default 10.
        step_size: step in input units (> 0); ``None``: ``2.5 eps / steps``.
    """

    def __init__(
        self,
        targets: str = "both",
        teacher: Teacher | None = None,
        labeled: int | None = None,
        unlabeled: Tensor | None = None,
        weight: float = 1.0,
        steps: int = 10,
        step_size: float | None = None,
    ) -> None:
        self.targets = one_of(targets, "uat targets", TARGETS)
        if targets != "online" and teacher is None:
            raise ValueError(
                f"uat targets={targets!r} pseudo-labels the pool with a base "
                "classifier: pass teacher=<checkpoint trained on the labelled "
                "images, or an nn.Module>, or use targets='online'"
            )
        if teacher is not None:
            check_teacher(teacher, "uat")
        check_pool(labeled, unlabeled, "uat")
        self.teacher, self.labeled, self.unlabeled = teacher, labeled, unlabeled
        self.weight = number(weight, "uat weight", low=0)
        self.at = PGDAT(steps=steps, step_size=step_size)
        self.kl = TRADES(steps=steps, step_size=step_size)
        self.pseudo = torch.zeros(0, dtype=torch.long)  # y~ by pool row (set by setup)

    def config(self) -> dict:
        return super().config() | {
            "targets": self.targets,
            "teacher": teacher_name(self.teacher),
            "labeled": self.labeled,
            "unlabeled": describe(self.unlabeled),
            "weight": self.weight,
            "steps": self.at.steps,
            "step_size": self.at.step_size,
        }

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_all, y_all, pool = join(x, y, self.labeled, self.unlabeled, "uat")
        self.pseudo = torch.zeros(len(pool), dtype=torch.long)
        if self.targets != "online" and len(pool):
            assert self.teacher is not None
            self.pseudo = teacher_logits(self.teacher, pool, model, x, "uat").argmax(1).cpu()
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
        total = x.new_zeros(())
        # CE at PGD points: labelled images at y; with fixed targets also pool images at y~
        ce_rows = ~pool if self.targets == "online" else torch.ones_like(pool)
        if ce_rows.any():
            t, in_pool = y[ce_rows].clone(), pool[ce_rows]
            t[in_pool] = self.pseudo[rows(t).cpu()].to(y.device)
            x_adv = self.at.adversarial(model, x[ce_rows], t, threat, generator)
            ce = F.cross_entropy(model(x_adv), t, reduction="none")
            total = total + (torch.where(in_pool, self.weight, 1.0) * ce).sum()
        if self.targets != "fixed" and pool.any():  # KL to the fixed clean prediction
            xu = x[pool]
            with eval_mode(model), torch.no_grad():
                p_hat = F.softmax(model(xu), dim=1)
            x_adv = self.kl.perturb(model, xu, threat, generator)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_hat, reduction="sum")
            total = total + self.weight * kl
        return total / len(y)

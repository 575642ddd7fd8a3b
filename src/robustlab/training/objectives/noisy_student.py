"""Noisy Student self-training (Xie, Luong, Hovy, Le, "Self-training with Noisy Student improves
ImageNet classification", CVPR 2020, https://arxiv.org/abs/1911.04252; reference code
github.com/google-research/noisystudent).

A teacher, without noise, labels the unlabelled pool once in :meth:`setup`; the student learns
labelled + pseudo-labelled images *with* noise. On a minibatch of B images, L labelled (x, y)
and U from the pool:

    q_j   = softmax(f_t(x_j) / T)      (soft = true; else the one-hot of its argmax)
    w_j   = 1 if max_c q_jc >= confidence else 0   (the teacher's confidence filter)
    x~    = clip(x + sigma N(0, I)) into the bounds   (the student's input noise)
    loss  = (1/B) [ sum_L CE(f(x~_i), y_i) + sum_U w_j * H(q_j, f(x~_i)) ],
    H(q, f) = -sum_c q_c log softmax(f)_c

Iterating (the student becomes the teacher) is running the recipe again with the student's
checkpoint as ``teacher``. The pool is given as data and/or by hiding labels
(:mod:`~robustlab.training.objectives.pool`); its labels are never read.

Defaults (the paper's scripts): soft labels, T = 1, confidence 0.3. It is not an adversarial
defense (reported: ImageNet-A 61.0 % -> 83.7 %, ImageNet-C mCE 45.7 -> 28.3, FGSM accuracy up
about 10 points without targeting it): use it as a pseudo-label source (its checkpoint as the
teacher of rst, uat or mart-semi) and as a common-corruption baseline.
Differences: the student's noise is Gaussian input noise (``sigma``, default 0.1 in input
units) plus whatever the model and the recipe add (dropout, ``augment = true``), where the paper
uses RandAugment, dropout and stochastic depth; filtered images stay in the set with weight 0
(the paper drops them and balances 130K images per class); batches are drawn uniformly from
labelled + pool (the paper: 1 to 3 pool images per labelled one).

Cost: 1 forward/backward per image, plus one teacher forward per pool image at setup.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective
from robustlab.training.objectives.distillation import Teacher, check_teacher, teacher_name
from robustlab.training.objectives.pool import check_pool, describe, join, rows, teacher_logits

log = logging.getLogger(__name__)


@register("noisy-student")
class NoisyStudent(Objective):
    """Cross-entropy of the noised student on labels and on the teacher's (soft) pseudo-labels
    of the confident pool images.

    Args:
        teacher: the teacher (a robustlab checkpoint path or an ``nn.Module``; required).
        labeled: leading training images that keep their labels (>= 0); the rest join the
            pool. ``None``: all keep theirs.
        unlabeled: unlabelled images (N, C, H, W) appended to the training set.
            ``labeled`` or ``unlabeled`` (or both) is required.
        soft: soft pseudo-labels (default) or hard ones.
        temperature: T of the teacher's softmax (> 0). Default 1.0.
        confidence: pool images whose teacher probability of its top class is below this
            get weight 0 (in [0, 1]). Default 0.3.
        sigma: std of the student's Gaussian input noise, in input units (>= 0). Default 0.1.
    """

    needs_threat = False

    def __init__(
        self,
        teacher: Teacher | None = None,
        labeled: int | None = None,
        unlabeled: Tensor | None = None,
        soft: bool = True,
        temperature: float = 1.0,
        confidence: float = 0.3,
        sigma: float = 0.1,
    ) -> None:
        if teacher is None:
            raise ValueError(
                "noisy-student needs teacher=<path to a robustlab checkpoint, or "
                "an nn.Module> to label the pool"
            )
        check_teacher(teacher, "noisy-student")
        check_pool(labeled, unlabeled, "noisy-student")
        if not isinstance(soft, bool):
            raise TypeError(f"noisy-student soft must be true or false, got {soft!r}")
        self.teacher, self.labeled, self.unlabeled, self.soft = teacher, labeled, unlabeled, soft
        self.temperature = number(temperature, "noisy-student temperature", low=0, low_open=True)
        self.confidence = number(confidence, "noisy-student confidence", low=0, high=1)
        self.sigma = number(sigma, "noisy-student sigma", low=0)
        self.targets = torch.zeros(0, 0)  # q_j * w_j by pool row (set by setup)

    def config(self) -> dict:
        return super().config() | {
            "teacher": teacher_name(self.teacher),
            "labeled": self.labeled,
            "unlabeled": describe(self.unlabeled),
            "soft": self.soft,
            "temperature": self.temperature,
            "confidence": self.confidence,
            "sigma": self.sigma,
        }

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_all, y_all, pool = join(x, y, self.labeled, self.unlabeled, "noisy-student")
        self.targets = torch.zeros(0, 0)
        if len(pool):
            logits = teacher_logits(self.teacher, pool, model, x, "noisy-student")
            q = F.softmax(logits / self.temperature, dim=1)
            keep = q.max(1).values >= self.confidence
            if not self.soft:
                q = F.one_hot(q.argmax(1), q.shape[1]).to(q.dtype)
            self.targets = (q * keep[:, None]).cpu()
            log.info(
                "noisy-student: %d of %d pool images pass the teacher's confidence %.2f",
                int(keep.sum()),
                len(pool),
                self.confidence,
            )
        return x_all, y_all

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        lo, hi = threat.bounds if threat is not None else (0.0, 1.0)
        noise = torch.randn(
            x.shape, generator=generator, device=generator.device, dtype=x.dtype
        ).to(x.device)
        log_p = F.log_softmax(model((x + self.sigma * noise).clamp(lo, hi)), dim=1)
        pool = y < 0
        q = torch.zeros_like(log_p)
        q[~pool] = F.one_hot(y[~pool], log_p.shape[1]).to(q.dtype)
        if pool.any():
            if self.targets.shape[1] != log_p.shape[1]:
                raise ValueError(
                    f"the teacher returns {self.targets.shape[1]} logits but the "
                    f"student {log_p.shape[1]}: they must have the same classes"
                )
            q[pool] = self.targets[rows(y).cpu()].to(q)
        return -(q * log_p).sum() / len(y)

"""Trapdoor injection: the training recipe of trapdoor-based detection (Shan, Wenger, Wang, Li,
Zheng, Zhao, "Gotta Catch 'Em All: Using Honeypots to Catch Adversarial Attacks on Neural
Networks", ACM CCS 2020, arXiv:1904.08554; reference code github.com/Shawn-Shan/trapdoor
``inject_trapdoor.py``).

Each training example is replaced, with probability ``inject_ratio``, by its trapdoored copy
``A_t(x) = (1 - m_t) * x + m_t * Delta_t`` labelled ``t``, with ``t`` uniform among the
protected labels (the triggers are :class:`robustlab.models.trapdoor.Trapdoors`), and the loss
is the mean cross-entropy on the mixed minibatch:

    ``min_theta E [ CE(f_theta(x'), y') ]``,  ``(x', y') = (A_t(x), t)`` w.p. ``inject_ratio``,
    ``(x, y)`` otherwise.

The detector (``robustlab.defenses.create("trapdoor", model, ...)``) needs the same trigger
options (``seed``, ``mask_ratio``, ``squares``, ``size``, ``labels``); :meth:`config` records
them in the checkpoint. Defaults from the reference code: ``inject_ratio`` 0.5, 7 squares of
3 x 3, ``mask_ratio`` 0.1, every label protected.

Differences from the reference code: one stage (the code first trains the clean model for its
epochs, then injects for as many more, keeping the epoch with the best trapdoor accuracy whose
clean accuracy passes a bar; start from a natural checkpoint with ``[model] init`` for the
two-stage form); the draws come from the trainer's generator, not from Python's ``random``.
Cost: one forward/backward per minibatch, as natural training (plus one forward pass of one
image at setup, to count the model's classes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number
from robustlab.models.trapdoor import Trapdoors, protected_labels, trigger_options
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("trapdoor")
class Trapdoor(Objective):
    """Mean cross-entropy on minibatches where each example is trapdoored with probability
    ``inject_ratio`` (the threat model is not used).

    Args:
        inject_ratio: the probability that an example is replaced by its trapdoored copy, in
            [0, 1]. Default 0.5.
        mask_ratio: the triggers' blend weight, in (0, 1]. Default 0.1.
        squares: the number of random squares per trigger, >= 1. Default 7.
        size: the side of the squares in pixels, >= 1. Default 3.
        seed: the seed the triggers are drawn from (not the training seed). Default 0.
        labels: the protected labels (each gets a trapdoor), or None for all. Default None.

    The triggers (attribute ``trapdoors``) are built in :meth:`setup` (or at the first call)
    for the data's image shape and the model's number of classes.
    """

    needs_threat = False

    def __init__(
        self,
        inject_ratio: float = 0.5,
        mask_ratio: float = 0.1,
        squares: int = 7,
        size: int = 3,
        seed: int = 0,
        labels: list[int] | None = None,
    ) -> None:
        self.inject_ratio = number(inject_ratio, "inject_ratio", low=0, high=1)
        self.triggers = trigger_options(squares, size, mask_ratio, seed)
        self.labels = protected_labels(labels)
        self.trapdoors: Trapdoors | None = None
        self._protected = torch.zeros(0, dtype=torch.long)  # set with the triggers

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "inject_ratio": self.inject_ratio,
            **self.triggers,
            "labels": self.labels,
        }

    def build(self, model: nn.Module, x: Tensor) -> Trapdoors:
        """The triggers for images shaped like ``x`` (N, C, H, W) and the classes of
        ``model`` (counted on one image, in eval mode, without gradients)."""
        if x.dim() != 4:
            raise ValueError(
                f"the trapdoor objective needs images (N, C, H, W), got shape {tuple(x.shape)}"
            )
        with eval_mode(model), torch.no_grad():
            classes = model(x[:1]).shape[1]
        protected = protected_labels(self.labels, classes)
        c, h, w = x.shape[1:]
        self.trapdoors = Trapdoors(c, h, w, classes=classes, **self.triggers).to(x.device)
        self._protected = torch.tensor(protected, device=x.device)
        return self.trapdoors

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Builds the triggers (:meth:`build`); the training set is unchanged."""
        self.build(model, x)
        return x, y

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        trapdoors = self.trapdoors if self.trapdoors is not None else self.build(model, x)
        trapdoors = trapdoors.to(x.device)
        protected = self._protected.to(x.device)
        dev = generator.device
        inject = torch.rand(len(x), generator=generator, device=dev) < self.inject_ratio
        pick = torch.randint(len(protected), (len(x),), generator=generator, device=dev)
        inject, target = inject.to(x.device), protected[pick.to(x.device)]
        x_mixed = torch.where(inject.view(-1, *[1] * (x.dim() - 1)), trapdoors.stamp(x, target), x)
        return F.cross_entropy(model(x_mixed), torch.where(inject, target, y))

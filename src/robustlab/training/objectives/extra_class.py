"""Training with an extra "adversarial" class, the detector of Grosse, Manoharan, Papernot,
Backes, McDaniel, "On the (Statistical) Detection of Adversarial Examples", 2017,
https://arxiv.org/abs/1702.06280 (the outlier-class part; the statistical MMD test on sets of
inputs is not here). Evaluate the trained model with the ``extra-class`` detector
(:mod:`robustlab.defenses.extra_class`), which rejects where the extra class wins.

The model has K + 1 outputs (``num_classes = K + 1``); the last one is the extra class.

    J(theta; x, y) = (1 - w) * CE(f(x), y) + w * CE(f(x'), K),
    x' = an attack on the class logits f(.)[:K] at (x, y), inside the threat ball

Defaults: ``steps = 1``, x' = FGSM (one step of eps from x, no random start), the paper's
first attack; ``w = 0.5``, the paper's augmented training set of as many adversarial examples
as clean ones. ``steps > 1``: PGD with a random start and step ``2.5 eps / steps``.

Differences from the paper: the paper crafts its adversarial examples (FGSM and JSMA) once,
against a model trained beforehand, and trains the K + 1-class model on the fixed, augmented
set; here x' is crafted at every minibatch against the current model's class logits (so the
adversarial class follows the model it protects, the pitfall named in the method card: a fixed
set is crafted against a model that no longer exists). No JSMA. C&W's reproduction
(``outlier_class_training.py`` of carlini/nn_breaking_detection) uses targeted CW-L2 examples.
x' is crafted in eval mode, as in our other objectives.

Cost: one attack (``steps`` forward/backward passes) + 2 forwards and 1 backward per minibatch,
as ``fgsm-at`` with ``steps = 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.attacks.pgd import PGD
from robustlab.models.heads import ClassLogits
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("extra-class")
class ExtraClass(Objective):
    """``(1 - w) * CE(f(x), y) + w * CE(f(x'), K)`` on a model with K + 1 outputs.

    Args:
        weight: w, the weight of the adversarial term, in [0, 1]. Default 0.5.
        steps: attack steps for x' (1: FGSM, the paper's; more: PGD with a random start).
    """

    def __init__(self, weight: float = 0.5, steps: int = 1) -> None:
        self.weight = float(
            number(weight, "extra-class weight (of the adversarial term)", low=0, high=1)
        )
        self.steps = positive_int(steps, "extra-class steps")

    def config(self) -> dict:
        return super().config() | {"weight": self.weight, "steps": self.steps}

    def adversarial(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """x': FGSM (``steps = 1``) or PGD on the class logits ``model(x)[:, :-1]``, crafted
        in eval mode, the last iterate."""
        if self.steps == 1:
            attack = PGD(
                threat,
                steps=1,
                step_size=max(threat.eps, 1e-12),
                random_start=False,
                keep_best=False,
            )
        else:
            attack = PGD(threat, steps=self.steps, keep_best=False)
        return attack.craft(ClassLogits(model), x, y, generator)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        clean = model(x)
        if int(y.max()) >= clean.shape[1] - 1:
            raise ValueError(
                f"the extra-class objective needs a model with one output more "
                f"than the data has classes (the last output is the extra "
                f"class); it has {clean.shape[1]} outputs and a label "
                f"{int(y.max())}: build it with num_classes = K + 1"
            )
        x_adv = self.adversarial(model, x, y, threat, generator)
        extra = torch.full_like(y, clean.shape[1] - 1)
        adv = F.cross_entropy(model(x_adv), extra)
        return (1 - self.weight) * F.cross_entropy(clean, y) + self.weight * adv

"""Dynamic adversarial training with the FOSC criterion (Wang, Ma, Bailey, Yi, Zhou, Gu, ICML
2019, "On the Convergence and Robustness of Adversarial Training",
https://proceedings.mlr.press/v97/wang19i.html).

    min_theta E [ CE(f(x^K), y) ],  x^K from PGD stopped per example once FOSC(x^k) <= c_t

FOSC (linf): c(x^k) = max_{x in B(x0, eps)} <x - x^k, g> = eps ||g||_1 - <x^k - x0, g>, with
g = grad_x CE(f(x^k), y) and x0 the clean input; 0 means the inner maximisation is first-order
stationary. The threshold falls linearly over the first T' epochs: c_t = max(c_max - t c_max / T',
0) with t the 0-based epoch, so early epochs train on weak (less converged) adversarial
examples and later ones on fully converged ones. The mask computed after step k gates step
k + 1; the first step is always taken; a stopped example stays stopped.

Original settings (``YisenWang/dynamic_adv_training``): CIFAR-10, linf eps 0.031, PGD-10 with
step eps/4 from a uniform random start, CE, c_max = 0.5, T' = 100 of 120 epochs. Our
``dynamic_epochs=None`` keeps that ratio (100/120 of the run's epochs).

Where we differ from the reference code: (1) x0 in FOSC is the clean input, as in the paper's
definition; the code measures it from the random start; (2) the random start is clipped to the
input bounds (the code takes the first gradient at an unclipped start); (3) the outer loss is the
plain mean CE of the paper; the code additionally weights each example by its own (detached)
adversarial CE from the second epoch on (Keras ``sample_weight``). The attack runs in eval mode;
the outer loss in the model's mode. FOSC's scale grows with the input dimension and eps, so
c_max = 0.5 is not calibrated for other data (unverified on Fashion-MNIST).

Cost: (K + 1) F/B per minibatch (stopped examples are still forwarded), as PGD-AT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number, positive_int
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


def fosc(x_adv: Tensor, x0: Tensor, grad: Tensor, eps: float) -> Tensor:
    """Per-example linf FOSC ``eps * ||g||_1 - <x_adv - x0, g>``, shape (N,)."""
    g = grad.flatten(1)
    return eps * g.abs().sum(1) - ((x_adv - x0).flatten(1) * g).sum(1)


@register("dynamic-at")
class DynamicAT(Objective):
    """Mean CE at PGD examples whose iterations stop once FOSC reaches the epoch's threshold.

    Args:
        steps: PGD iterations K (>= 1). Default 10.
        step_size: PGD step in input units; ``None`` means ``eps / 4``.
        c_max: FOSC threshold of the first epoch (>= 0). Default 0.5.
        dynamic_epochs: T', epochs over which the threshold falls to 0 (> 0); ``None`` means
            100/120 of the run's epochs (the paper's 100 of 120).
    """

    def __init__(
        self,
        steps: int = 10,
        step_size: float | None = None,
        c_max: float = 0.5,
        dynamic_epochs: float | None = None,
    ) -> None:
        positive_int(steps, "dynamic-at steps")
        if step_size is not None:
            number(step_size, "dynamic-at step_size", low=0, low_open=True)
        number(c_max, "dynamic-at c_max", low=0)
        if dynamic_epochs is not None:
            number(dynamic_epochs, "dynamic-at dynamic_epochs", low=0, low_open=True)
        self.steps, self.step_size, self.c_max = steps, step_size, float(c_max)
        self.dynamic_epochs = dynamic_epochs
        self.threshold = self.c_max  # c_t; set by begin_epoch

    def config(self) -> dict:
        return super().config() | {
            "steps": self.steps,
            "step_size": self.step_size,
            "c_max": self.c_max,
            "dynamic_epochs": self.dynamic_epochs,
        }

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        span = self.dynamic_epochs if self.dynamic_epochs is not None else epochs * 100 / 120
        self.threshold = max(self.c_max - epoch * self.c_max / span, 0.0)

    def perturb(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        generator: torch.Generator,
    ) -> Tensor:
        """The FOSC-stopped PGD examples (detached), crafted in eval mode."""
        if threat.norm != "linf":
            raise ValueError(
                f"dynamic-at's FOSC criterion is defined for linf only, got "
                f"{threat.norm!r}: use ThreatModel('linf', eps)"
            )
        step = self.step_size if self.step_size is not None else threat.eps / 4
        x0 = x.detach()
        xa = threat.random_init(x0, generator)
        active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        with eval_mode(model), torch.enable_grad():
            for k in range(self.steps):
                xa = xa.detach().requires_grad_(True)
                loss = F.cross_entropy(model(xa), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xa)
                if k > 0:  # the first step is always taken
                    active &= fosc(xa.detach(), x0, grad, threat.eps) > self.threshold
                xa = threat.project(xa.detach() + step * grad.sign() * active.reshape(shape), x0)
        return xa.detach()

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        return F.cross_entropy(model(self.perturb(model, x, y, threat, generator)), y)

"""YOPO-m-n, "You Only Propagate Once" (Zhang, Zhang, Lu, Zhu, Dong, "You Only Propagate Once:
Accelerating Adversarial Training via Maximal Principle", NeurIPS 2019, arXiv:1905.00877;
reference code github.com/a1600012888/YOPO-You-Only-Propagate-Once).

The perturbation enters the network only through its first layer z = f0(x + eta) (here: the
model up to and including its first ``nn.Conv2d`` / ``nn.Linear``, e.g. smallcnn's Normalize
and ``conv1``). Per minibatch, eta_1 uniform in the eps-ball (inside the input bounds), then
for j = 1..m:

    full forward/backward at x + eta_j:  weight gradients of CE_j and q_j = dCE_j / dz
    n inner steps on the first layer:    eta <- project(eta + sigma sign(g)),
                                         g = grad_eta <q_j, f0(x + eta)>
    then eta_(j+1) = eta, and the first layer's weights also get grad <q_j, f0(x + eta_(j+1))>

(the reference's Hamiltonian H = <p, f0>, p = -q, descended in eta and ascended in theta0).
One optimiser step per minibatch on the accumulated gradient. The returned loss has the
value (1/m) sum_j CE_j and, as gradient, (1/m) times the reference's accumulated gradient
(a linear surrogate of the gradients collected with ``torch.autograd.grad``), so the
trainer's one backward and optimiser step apply YOPO's update. Because of the 1/m, use m
times the reference's learning rate (which was divided by m): lr 0.2 for YOPO-5-3 on
CIFAR-10.

Defaults YOPO-5-3 (CIFAR-10, PreAct-ResNet-18): m = 5, n = 3, eps 8/255, sigma 2/255 (eps/4),
SGD lr 0.2 / m, momentum 0.9, wd 5e-4, batch 256, 36 epochs; MNIST YOPO-5-10 (eps 0.3,
sigma 0.01). Differences from the reference: the first pass's x + eta is clipped to the
input bounds (the reference feeds it unclipped); the reference also steps the first layer
with a second optimiser on the same gradients (CIFAR scripts), which we do not; l2 threat
models step with the normalised gradient instead of its sign. Replays (free-at's several
optimiser steps per minibatch) do not fit: YOPO takes one step on the sum of m passes.

Cost: m full F/B + m (n + 1) first-layer F/B per minibatch (5 + 20 small ones at 5-3, against
11 full F/B for PGD-10 AT); memory as one training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


class _Reached(Exception):
    """Raised by a forward hook to stop the model at its first layer, carrying its output."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out


def first_layer(model: nn.Module) -> nn.Module:
    """The model's first ``nn.Conv2d`` or ``nn.Linear`` in module order."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            return m
    raise ValueError(
        f"yopo needs a first nn.Conv2d or nn.Linear layer, but {type(model).__name__} has none"
    )


def layer_output(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """``f0(x)``: the output of ``layer`` when ``model`` runs on ``x``; the model stops there."""

    def stop(module: nn.Module, inputs: tuple, out: Tensor) -> None:
        raise _Reached(out)

    handle = layer.register_forward_hook(stop)
    try:
        model(x)
    except _Reached as reached:
        return reached.out
    finally:
        handle.remove()
    raise ValueError(f"yopo: the model never called its first layer {layer}")


def forward_with(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(model(x), f0(x))``: the logits and the output of ``layer`` in the same forward."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


@register("yopo")
class YOPO(Objective):
    """YOPO-m-n: m full passes, each followed by n first-layer steps on the perturbation.

    Args:
        outer: m, full forward/backward passes per minibatch (>= 1). Default 5.
        inner: n, first-layer steps after each pass (>= 1). Default 3.
        step_size: sigma, the inner step in input units (> 0); ``None`` means ``eps / 4``.
    """

    def __init__(self, outer: int = 5, inner: int = 3, step_size: float | None = None) -> None:
        positive_int(outer, "yopo outer")
        positive_int(inner, "yopo inner")
        if step_size is not None:
            number(step_size, "yopo step_size", low=0, low_open=True)
        self.outer, self.inner, self.step_size = outer, inner, step_size

    def config(self) -> dict:
        return super().config() | {
            "outer": self.outer,
            "inner": self.inner,
            "step_size": self.step_size,
        }

    def inner_steps(
        self,
        model: nn.Module,
        layer: nn.Module,
        x: Tensor,
        eta: Tensor,
        q: Tensor,
        threat: ThreatModel,
    ) -> Tensor:
        """``inner`` steps eta <- project(eta + sigma sign(grad_eta <q, f0(x + eta)>)) with q
        frozen; returns the new eta (detached, x + eta in the ball and bounds)."""
        sigma = self.step_size if self.step_size is not None else threat.eps / 4
        for _ in range(self.inner):
            leaf = eta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((q * layer_output(model, layer, x + leaf)).sum(), leaf)
            eta = threat.project(x + leaf.detach() + threat.steepest_step(g, sigma), x) - x
        return eta.detach()

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        layer, x = first_layer(model), x.detach()
        params = [p for p in model.parameters() if p.requires_grad]
        first = {id(p) for p in layer.parameters()}
        grads = [torch.zeros_like(p) for p in params]
        eta = threat.random_init(x, generator) - x
        total = x.new_zeros(())
        for _ in range(self.outer):
            logits, z = forward_with(model, layer, x + eta)
            ce = F.cross_entropy(logits, y)
            q, *gp = torch.autograd.grad(ce, [z, *params], allow_unused=True)
            eta = self.inner_steps(model, layer, x, eta, q.detach(), threat)
            h = (q.detach() * layer_output(model, layer, x + eta)).sum()
            gh = iter(
                torch.autograd.grad(h, [p for p in params if id(p) in first], allow_unused=True)
            )
            for i, p in enumerate(params):
                for g in (gp[i], next(gh) if id(p) in first else None):
                    if g is not None:
                        grads[i] += g
            total = total + ce.detach()
        surrogate = (params[0] * grads[0]).sum()
        for p, g in zip(params[1:], grads[1:], strict=True):
            surrogate = surrogate + (p * g).sum()
        surrogate = surrogate / self.outer
        return total / self.outer + surrogate - surrogate.detach()

"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off
between Robustness and Accuracy", ICML 2019, https://arxiv.org/abs/1901.08573; reference code
github.com/yaodongyu/TRADES).

    min_theta  CE(f(x), y) + beta * (1/B) sum_i KL( p(x_i) || p(x'_i) ),
    x' ~ argmax_{x' in ball(x)} KL( p(x) || p(x') )

p = softmax(f). Inner maximisation in eval mode: x'_0 = x + 0.001 N(0, I) (not clipped before
the first step), then K steps x' <- project(x' + step * sign(grad KL_sum(p(x) || p(x')))) into
the ball and the bounds, p(x) held fixed. Outer loss in train mode with nothing detached: the
gradient flows through the clean distribution p(x) as well as through p(x'). beta = 1/lambda of
the paper ("1/lambda = 6" means beta = 6).

Original defaults: CIFAR-10 eps 0.031, step 0.007, K = 10, beta 6 (README: beta in [1, 10]);
MNIST script eps 0.3, step 0.01, K = 40, beta 1. Our default step is 2.5 eps / K (eps / 4 at
K = 10, the reference uses 0.007 / 0.031 = 0.226 eps); recipes set it explicitly.

Differences from the reference: p(x) for the inner loop is computed once instead of at every
step (identical values, the attack runs in eval mode) and the outer loss makes one clean
forward pass instead of two (one fewer BatchNorm running-statistics update). For l2 threat
models the step is along the normalised gradient with the exact projection (the same PGD
loop), where the reference runs SGD on delta with learning rate 2 eps / K and renormalises.

Cost: K forward/backward passes + 1 forward (attack) + 2 forwards and 1 backward (loss),
about K + 2 forward/backward equivalents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective, check_number

INIT_STD = 0.001  # std of the Gaussian start of TRADES and MART's inner maximisation


def check_norm(threat: ThreatModel, who: str) -> None:
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"{who} supports linf and l2 threat models, not {threat.norm!r}; "
                         "use pgd-at for l1")


def ascend_from_noise(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
                      threat: ThreatModel, steps: int, step_size: float,
                      generator: torch.Generator, who: str) -> Tensor:
    """``steps`` projected steepest-ascent steps on ``loss_fn(logits)`` (summed over the batch)
    from ``x + 0.001 N(0, I)``, in eval mode; the last iterate, inside the ball and bounds.
    Input gradients only (``torch.autograd.grad``); the caller's ``x`` is untouched."""
    x = x.detach()
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    x_adv = x + INIT_STD * noise.to(x.device)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
            x_adv = threat.project(x_adv.detach() + threat.steepest_step(grad, step_size), x)
    threat.check(x_adv, x, who=who)
    return x_adv.detach()


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """``CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x'_i))``, nothing detached."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1),
                  reduction="sum") / len(y)
    return F.cross_entropy(logits_clean, y) + beta * kl


@register("trades")
class TRADES(Objective):
    """Clean cross-entropy plus beta times the KL divergence to the worst point of the ball.

    Args:
        beta: weight of the KL term (>= 0; the paper's 1/lambda). Default 6.0.
        steps: sign-gradient ascent steps K of the inner maximisation (>= 1). Default 10.
        step_size: length of each step in input units (> 0); ``None`` means
            ``2.5 eps / steps`` (eps / 4 at K = 10).
    """

    def __init__(self, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None) -> None:
        check_number(beta, "trades beta", low=0)
        check_number(steps, "trades steps", low=1, integer=True)
        if step_size is not None:
            check_number(step_size, "trades step_size", low=0, low_open=True)
        self.beta, self.steps = float(beta), steps
        self.step_size = None if step_size is None else float(step_size)

    def config(self) -> dict:
        return super().config() | {"beta": self.beta, "steps": self.steps,
                                   "step_size": self.step_size}

    def perturb(self, model: nn.Module, x: Tensor, threat: ThreatModel,
                generator: torch.Generator) -> Tensor:
        """x': K ascent steps on KL_sum(p(x) || p(x')) from x + 0.001 N(0, I), eval mode."""
        check_norm(threat, "trades")
        step = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
        with eval_mode(model), torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def kl(logits: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")

        return ascend_from_noise(model, x, kl, threat, self.steps, step, generator, "trades")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel | None,
             generator: torch.Generator) -> Tensor:
        assert threat is not None
        x_adv = self.perturb(model, x, threat, generator)
        return trades_loss(model(x), model(x_adv), y, self.beta)

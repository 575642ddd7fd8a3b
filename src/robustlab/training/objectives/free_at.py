"""Free adversarial training (Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor,
Goldstein, "Adversarial Training for Free!", NeurIPS 2019, https://arxiv.org/abs/1904.12843;
reference code github.com/ashafahi/free_adv_train).

One persistent perturbation delta (shaped like a full batch, zeros at first) is carried from
minibatch to minibatch. Each minibatch is replayed m times, and each replay is

    loss = CE(f(clip(x + delta[:n])), y)          (this objective's __call__, train mode)
    loss.backward()                               (the trainer: gives grad_theta and grad_delta)
    delta[:n] <- project(delta[:n] + eps * sign(grad_delta))   (after_backward)
    optimiser step on theta                       (the trainer)

so the backward pass that updates the model also updates the perturbation. ``project`` clips
delta to the eps-ball and x + delta to the input bounds; l2 threat models take a step of length
eps along the normalised gradient instead of the sign. The trainer makes ceil(epochs / m) passes
over the data, so the number of optimiser steps, and the cost, is about natural training's.

Original defaults: m = 8 and an FGSM step of eps (CIFAR-10, eps 8/255, WRN-32-10); ImageNet
used m = 4 (unverified). The first replay of a minibatch starts from the delta left by the
previous one (a warm start, not a per-image perturbation). The last, smaller batch uses and
updates the first n rows of delta; a larger batch grows delta with zero rows. delta is kept
between epochs and saved in checkpoints (``state_dict``), so a resumed run continues exactly.

Mode: the model stays in train mode, as in the reference (one graph; BatchNorm statistics are
updated m times per minibatch).

Cost: 1 forward/backward per replay, m replays per minibatch, 1/m of the passes: about natural
training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import positive_int
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective


@register("free-at")
class FreeAT(Objective):
    """Cross-entropy at ``clip(x + delta)`` with a perturbation delta carried across minibatches
    and updated by :meth:`after_backward` from the gradient of the trainer's backward pass.

    Args:
        replays: optimiser steps m per minibatch (>= 1). Default 8 (Shafahi et al. on CIFAR-10).
    """

    single_step = True

    def __init__(self, replays: int = 8) -> None:
        positive_int(replays, "free-at replays")
        self.replays = replays
        self.delta: Tensor | None = None  # the carried perturbation, (rows >= batch, ...)
        self._pending: tuple[Tensor, Tensor, ThreatModel] | None = None  # (leaf, x, threat)

    def config(self) -> dict:
        return super().config() | {"replays": self.replays}

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert threat is not None
        if threat.norm not in ("linf", "l2"):
            raise ValueError(
                f"free-at supports linf and l2 threat models, not {threat.norm!r}; "
                "use pgd-at for l1"
            )
        n = len(x)
        if self.delta is None:
            self.delta = torch.zeros_like(x)
        elif self.delta.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"free-at carries a perturbation of shape {tuple(self.delta.shape)}"
                f" but got inputs of shape {tuple(x.shape)}; the input shape must "
                "stay the same throughout training (and on resume)"
            )
        self.delta = self.delta.to(device=x.device, dtype=x.dtype)
        if n > len(self.delta):
            self.delta = torch.cat(
                [self.delta, self.delta.new_zeros(n - len(self.delta), *x.shape[1:])]
            )
        leaf = self.delta[:n].clone().requires_grad_(True)
        self._pending = (leaf, x.detach(), threat)
        lo, hi = threat.bounds
        return F.cross_entropy(model((x.detach() + leaf).clamp(lo, hi)), y)

    def after_backward(self) -> None:
        """delta[:n] <- project(delta[:n] + eps * step direction), from the last call's
        gradient; the result lies in the eps-ball and keeps x + delta in the bounds."""
        if self._pending is None:
            raise RuntimeError("free-at: after_backward() needs a preceding loss call")
        leaf, x, threat = self._pending
        if leaf.grad is None:
            raise RuntimeError("free-at: after_backward() called before loss.backward()")
        self._pending = None
        assert self.delta is not None
        with torch.no_grad():
            step = threat.steepest_step(leaf.grad, threat.eps)
            self.delta[: len(x)] = threat.project(x + leaf + step, x) - x

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) - {"delta"}:
            raise ValueError(f"free-at state holds only 'delta', got {sorted(state)}")
        self.delta = state["delta"].detach().clone() if "delta" in state else None
        self._pending = None

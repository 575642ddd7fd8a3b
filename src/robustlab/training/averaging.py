"""Weight averaging during training: an exponential moving average with warm-up (EMA) or a
stochastic weight average (SWA). The trainer validates and saves the average; the raw weights
go on training and stay in the resumable state.

EMA: Sven Gowal, Chongli Qin, Jonathan Uesato, Timothy Mann, Pushmeet Kohli, "Uncovering the
Limits of Adversarial Training against Norm-Bounded Adversarial Examples", 2020,
arXiv:2010.03593 (reference: deepmind-research ``adversarial_robustness/jax/utils.ema_update``).
After the optimiser step ``t = 0, 1, 2, ...`` of the run::

    theta_bar <- tau_t * theta_bar + (1 - tau_t) * theta,   tau_t = min(tau, (1 + t) / (10 + t))

(TensorFlow's warm-up: tau_0 = 0.1, so the average follows the weights closely at first),
``tau`` = ``ema_decay`` = 0.995 by default (the reference's ``swa_decay``); theta_bar starts at
the weights the run starts from. Buffers (BatchNorm statistics) are not averaged: the average
runs with the live model's buffers, copied at every update, as in the reference.

SWA: Tianlong Chen, Zhenyu Zhang, Sijia Liu, Shiyu Chang, Zhangyang Wang, "Robust Overfitting
may be Mitigated by Properly Learned Smoothening", ICLR 2021 (reference:
VITA-Group/Alleviate-Robust-Overfitting ``main_adv.py``; the average of Izmailov et al. 2018).
At the end of every epoch ``e > swa_start`` (1-based)::

    theta_bar <- theta_bar + (theta - theta_bar) / n,   n = e - swa_start

(the uniform mean of the weights at the ends of those epochs), then the BatchNorm running
statistics of the average are recomputed on the training data (unaugmented, in order, in
batches of the run's batch size: :func:`torch.optim.swa_utils.update_bn`, a cumulative mean
over the batches; dropout, if any, draws from a generator seeded with the epoch). Until
``swa_start`` epochs are done there is no average and the raw weights are validated and saved.
Chen et al. start at epoch 55 of 200 (just after the first decay of the learning rate); here
``swa_start`` is a setting, 0 by default. Their optional distillation terms are not part of
this.

Cost: EMA keeps one copy of the weights and does one multiply-add per parameter and step; SWA
one multiply-add per epoch plus one forward pass over the training set (only for models with
BatchNorm). On several processes every rank keeps the same average (its weights are the
same), and SWA's BatchNorm pass runs over the whole training set on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from robustlab._validate import number, one_of

AVERAGES = ("none", "ema", "swa")
PREFIX = "average."  # the average's tensors in the training state


def ema_decay(step: int, decay: float) -> float:
    """tau_t = min(decay, (1 + t) / (10 + t)) for the update after optimiser step ``t``
    (0-based)."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The average of ``model``'s weights by ``kind`` (``"ema"`` or ``"swa"``), held in a
    copy of the model (:attr:`model`, no gradients) that can be validated and saved as is.

    ``count``: EMA updates (optimiser steps) or SWA epochs averaged so far.
    """

    def __init__(
        self, model: nn.Module, kind: str, *, decay: float = 0.995, start: int = 0
    ) -> None:
        self.kind = one_of(kind, "average", AVERAGES[1:])
        self.decay = number(decay, "ema_decay", low=0, high=1, high_open=True)
        self.start = start
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.count = 0

    @property
    def ready(self) -> bool:
        """True once the average holds weights (EMA: always; SWA: after ``start`` epochs)."""
        return self.kind == "ema" or self.count > 0

    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s weights (a fresh run, after any initialisation)."""
        self.model.load_state_dict(model.state_dict())
        self.count = 0

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """EMA: fold in the weights after one optimiser step (no-op for SWA)."""
        if self.kind != "ema":
            return
        tau = ema_decay(self.count, self.decay)
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.mul_(tau).add_(p.detach(), alpha=1 - tau)
        self._copy_buffers(model)
        self.count += 1

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int, batches: Sequence[Tensor]) -> None:
        """SWA: after ``epoch`` epochs (1-based count), fold in the weights if ``epoch >
        start`` and recompute the BatchNorm statistics on ``batches`` (no-op for EMA)."""
        if self.kind != "swa" or epoch <= self.start:
            return
        self.count += 1
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if self.count == 1:
                avg.copy_(p.detach())
            else:
                avg.add_(p.detach() - avg, alpha=1 / self.count)
        self._copy_buffers(model)
        device = next(self.model.parameters()).device
        # dropout draws in this train-mode pass come from a stream of their own, the same on
        # every rank, so the statistics agree across ranks and the training RNG is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.set_rng_state(torch.Generator().manual_seed(epoch).get_state())
            if device.type == "cuda":
                torch.cuda.set_rng_state(
                    torch.Generator(device).manual_seed(epoch).get_state(), device
                )
            update_bn(batches, self.model, device=device)

    def _copy_buffers(self, model: nn.Module) -> None:
        for avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
            avg.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The average's tensors and its count, for the training state."""
        out = {PREFIX + k: v for k, v in self.model.state_dict().items()}
        out[PREFIX + "count"] = torch.tensor(self.count, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (keys with or without the prefix)."""
        state = {k.removeprefix(PREFIX): v for k, v in state.items()}
        if "count" not in state:
            raise ValueError(
                "cannot resume: the training state holds no weight average; "
                'it was saved without average = "' + self.kind + '"'
            )
        self.count = int(state.pop("count"))
        self.model.load_state_dict(state)

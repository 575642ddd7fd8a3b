"""Smoothed inference: classify by voting over noisy copies of the input.

The smoothed classifier of a base model ``f`` with noise ``delta`` (Gaussian or Laplace, see
:mod:`robustlab.noise`) draws ``samples`` noisy copies ``x + delta_i`` and combines the
base model's outputs ``o_i = f(x + delta_i)`` with one of three voting rules (Nemcovsky et al.,
"Smoothed Inference for Adversarially-Trained Models", https://arxiv.org/abs/1911.07198):

- ``"prediction"``: hard majority vote, ``c = argmax_c sum_i 1[argmax o_i = c]`` (the
  Monte-Carlo estimate of Cohen et al.'s smoothed classifier ``g``);
- ``"soft"``: the mean of the outputs, ``c = argmax_c mean_i softmax(o_i)_c``; with
  ``soft_on="logits"`` the mean of the raw logits, as the paper's reference code does;
- ``"weighted"``: rank-weighted votes, the class at rank ``r`` of each sample (0 = top) gets
  ``2^-r``.

The module's output is a (N, K) tensor of log-scores whose argmax is the decision:
``log(mean softmax)`` (soft), the mean logits (soft on logits), or the log of the normalised
(weighted) vote fractions. Ties in a vote go to the tied class with the highest mean softmax
probability (not to the lowest class index). A vote is piecewise constant in ``x``, so its
true gradient is zero almost everywhere; with ``grad="soft"`` (the default) the backward pass
of the voting rules uses the Jacobian of ``log(mean softmax)`` over the same noise draws (a
BPDA surrogate, Athalye et al. 2018: forward values from the vote, gradients from the soft
smoothed classifier), so gradient attacks on this module follow the soft smoothed classifier
that SmoothAdv attacks (Salman et al. 2019), with fresh noise at every step; ``grad="none"``
returns the votes without any gradient (gradient attacks then fail, and the evaluation's
gradient checks flag the model).

Cost: ``samples`` forward passes of the base model per input, batched as ``batch_size`` rows
per forward (the noisy copies of several inputs share a forward). PNI/CNI weight noise is drawn
once per forward, so for such models a forward holds at most one copy of each input (every
draw gets its own weight noise, as in the reference code's m forwards of the batch); a single
input then costs ``samples`` forwards of one row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import generator_or_none, one_of, positive_int
from robustlab.defenses.base import Defense
from robustlab.defenses.registry import register
from robustlab.models.noise import noisy_layers
from robustlab.noise import check_noise, sample

__all__ = ["SOFT_ON", "VOTES", "Smoothing", "noisy_logits", "shares_weight_noise"]

VOTES = ("prediction", "soft", "weighted")
SOFT_ON = ("probabilities", "logits")
GRADS = ("soft", "none")


def shares_weight_noise(model: nn.Module) -> bool:
    """Whether ``model`` draws weight noise once per forward (PNI-W, CNI-W layers): then two
    copies of one input in the same forward are not independent draws."""
    return any(layer.kind != "pni-a" for layer in noisy_layers(model))


def noisy_logits(
    model: nn.Module,
    x: Tensor,
    samples: int,
    sigma: float,
    noise: str,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(rows, logits)``: ``logits = model(x[rows] + delta)`` over chunks of at most
    ``batch_size`` of the ``len(x) * samples`` (input, draw) pairs, each pair once; ``rows``
    holds each row's input index. The pairs are packed input by input, except for a model
    with weight noise (:func:`shares_weight_noise`), where a forward holds at most one copy of
    each input (draw by draw), so that every draw of an input sees its own weight noise, as
    independent draws must (certificates assume them). On a CUDA out-of-memory error the
    chunk's noisy inputs are split in halves (the draws are kept, so results do not change)
    and ``batch_size`` stays halved for the rest of the call."""
    n = len(x)
    total = n * samples
    per_draw = shares_weight_noise(model)
    start = 0
    while start < total:
        if per_draw:  # pair p = (draw p // n, input p % n); a chunk never wraps to a new draw
            stop = min(start + batch_size, (start // n + 1) * n)
            rows = torch.arange(start, stop, device=x.device) % n
        else:
            rows = torch.arange(start, min(start + batch_size, total), device=x.device) // samples
        xi = x[rows]
        xi = xi + sample(xi, noise, sigma, generator)
        done = 0
        while done < len(rows):
            try:
                logits = model(xi[done : done + batch_size])
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                continue
            yield rows[done : done + len(logits)], logits
            done += len(logits)
        start += len(rows)


@register("smoothing")
class Smoothing(Defense):
    """A smoothed classifier around ``model`` (an ``nn.Module`` in its own right).

    Args:
        model: the base classifier, inputs in [0, 1] pixel units, logits out.
        sigma: noise scale in input units (Gaussian standard deviation, Laplace scale), >= 0.
            Default 0.25.
        samples: noisy copies per input (``n``), >= 1. Default 32.
        vote: ``"prediction"``, ``"soft"`` or ``"weighted"`` (see the module docstring).
        noise: ``"gaussian"`` (l2 certificates), ``"laplace"`` (l1) or ``"uniform-l0"`` (l0
            certificates; sigma is then the keep probability alpha in (0, 1)).
        soft_on: what ``vote="soft"`` averages: ``"probabilities"`` (softmax, default) or
            ``"logits"`` (the reference code of Nemcovsky et al.).
        batch_size: rows (noisy copies) per forward pass of the base model. Default 1024.
            On a CPU, small models can run faster with fewer rows per forward (smallcnn on
            2 cores: 64 rows is 2.8x faster per image than 1024, see BENCHMARKS.md); on a GPU,
            as many as memory allows. CUDA out-of-memory errors halve it automatically.
        grad: ``"soft"`` (surrogate gradient of the soft smoothed classifier for the voting
            rules) or ``"none"``.
        generator: default source of the noise when a call passes none (torch's global
            generator if this is None too).

    Shapes: ``forward(x)`` maps (N, C, H, W) to (N, K) log-scores; ``forward(x, generator=g)``
    draws the noise from ``g``. The base model's mode follows this module's (``eval()``).

    Example:
        >>> smooth = robustlab.defenses.create("smoothing", model, sigma=0.25, samples=64)
        >>> pred = smooth.eval()(x).argmax(1)
    """

    randomized = True

    def __init__(
        self,
        model: nn.Module,
        sigma: float = 0.25,
        samples: int = 32,
        vote: str = "prediction",
        noise: str = "gaussian",
        soft_on: str = "probabilities",
        batch_size: int = 1024,
        grad: str = "soft",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model)
        check_noise(noise, sigma)
        self.vote = one_of(vote, "vote", VOTES)
        self.soft_on = one_of(soft_on, "soft_on", SOFT_ON)
        self.grad = one_of(grad, "grad", GRADS)
        self.generator = generator_or_none(generator)
        self.sigma, self.noise = float(sigma), noise
        self.samples = positive_int(samples, "samples")
        self.batch_size = positive_int(batch_size, "batch_size")
        #: random even where the votes look constant; sigma 0 adds no noise
        self.randomized = self.sigma > 0

    def config(self) -> dict[str, Any]:
        """The defense's settings (JSON-able), as recorded in results."""
        return {
            **super().config(),
            "sigma": self.sigma,
            "samples": self.samples,
            "vote": self.vote,
            "noise": self.noise,
            "soft_on": self.soft_on,
            "grad": self.grad,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if generator is None:
            generator = self.generator
        differentiable = torch.is_grad_enabled() and (self.vote == "soft" or self.grad == "soft")
        with torch.set_grad_enabled(differentiable):
            return self._scores(x, generator)

    def _scores(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        s = self.samples
        prob_sum: Tensor | None = None
        logit_sum: Tensor | None = None
        votes: Tensor | None = None
        for rows, logits in noisy_logits(
            self.base, x, s, self.sigma, self.noise, self.batch_size, generator
        ):
            if prob_sum is None or logit_sum is None or votes is None:  # all None until here
                k = logits.shape[1]
                prob_sum = logits.new_zeros(len(x), k)
                logit_sum = logits.new_zeros(len(x), k)
                votes = logits.new_zeros(len(x), k)
            prob_sum = prob_sum.index_add(0, rows, F.softmax(logits, dim=1))
            if self.vote == "soft" and self.soft_on == "logits":
                logit_sum = logit_sum.index_add(0, rows, logits)
            elif self.vote != "soft":
                votes.index_add_(0, rows, self._ballots(logits.detach()))
        assert prob_sum is not None and logit_sum is not None and votes is not None
        mean_prob = prob_sum / s
        if self.vote == "soft":
            if self.soft_on == "logits":
                return logit_sum / s
            return mean_prob.clamp_min(torch.finfo(mean_prob.dtype).tiny).log()
        surrogate = mean_prob.clamp_min(torch.finfo(mean_prob.dtype).tiny).log()
        fractions = votes / votes.sum(1, keepdim=True)
        value = fractions.clamp_min(torch.finfo(fractions.dtype).tiny).log()
        # ties go to the tied class with the highest mean probability: lift it by one ulp
        top = votes == votes.amax(1, keepdim=True)
        winner = mean_prob.detach().masked_fill(~top, -1.0).argmax(1, keepdim=True)
        lifted = torch.nextafter(
            value.gather(1, winner), torch.full_like(winner, math.inf, dtype=value.dtype)
        )
        value = value.scatter(1, winner, lifted)
        if self.grad == "none" or not surrogate.requires_grad:
            return value
        return surrogate + (value - surrogate).detach()

    def _ballots(self, logits: Tensor) -> Tensor:
        """Each row's vote: one-hot on its argmax, or ``2^-rank`` for the weighted rule."""
        if self.vote == "prediction":
            return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        rank = logits.argsort(1, descending=True).argsort(1)
        return torch.exp2(-rank.to(logits.dtype))

"""The noise distributions of randomised smoothing and their certificates.

Two distributions, each with the norm its certificate is in:

- ``"gaussian"``: ``delta ~ N(0, sigma^2 I)``; certified l2 radius ``sigma * Phi^-1(p_A)``
  (Cohen, Rosenfeld, Kolter, ICML 2019, https://arxiv.org/abs/1902.02918, Theorem 1 with
  ``p_B = 1 - p_A``).
- ``"laplace"``: i.i.d. ``Laplace(0, b)`` per coordinate with scale ``b = sigma`` (standard
  deviation ``sqrt(2) * sigma``); certified l1 radius ``-b * log(2 * (1 - p_A))`` (Teng, Lee,
  Yuan, "l1 Adversarial Robustness Certificates: a Randomized Smoothing Approach", 2020;
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020, Table 1).

``sigma`` is always the distribution's scale parameter in input units ([0, 1] pixels); the
noise is added in that space, before the model's own normalisation layer.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from scipy.stats import norm as _normal
from torch import Tensor, nn

from robustlab._validate import number

__all__ = ["CERTIFIED_NORM", "NOISES", "SmoothedModel", "check_noise", "radius", "sample"]

NOISES = ("gaussian", "laplace")
#: the norm each distribution's certificate is in
CERTIFIED_NORM = {"gaussian": "l2", "laplace": "l1"}


@runtime_checkable
class SmoothedModel(Protocol):
    """What an attack needs to know of a smoothed classifier: the ``base`` model it smooths,
    the noise scale ``sigma`` and the ``noise`` name. ``robustlab.defenses.Smoothing`` is one;
    attacks test ``isinstance(model, SmoothedModel)`` and never import the defense."""

    base: nn.Module
    sigma: float
    noise: str


def check_noise(noise: str, sigma: float) -> None:
    """ValueError naming the problem unless ``noise`` is known and ``sigma`` a finite scale >= 0."""
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; valid noises are: {', '.join(NOISES)}")
    number(sigma, "sigma", low=0)  # the noise scale in input units


def sample(like: Tensor, noise: str, sigma: float,
           generator: torch.Generator | None = None) -> Tensor:
    """A noise tensor shaped like ``like`` (same dtype and device), drawn from ``generator``
    (torch's global generator when None). A generator on another device than ``like`` draws
    there and the noise is moved."""
    device = like.device if generator is None else generator.device
    if noise == "gaussian":
        z = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    elif noise == "laplace":
        # inverse CDF: u ~ U(-1/2, 1/2), z = -sign(u) log(1 - 2|u|); the clamp keeps the one
        # draw u = -1/2 (rand = 0) finite
        u = torch.rand(like.shape, generator=generator, device=device, dtype=like.dtype) - 0.5
        tiny = torch.finfo(like.dtype).tiny
        z = -torch.sign(u) * torch.log((1 - 2 * u.abs()).clamp_min(tiny))
    else:
        check_noise(noise, sigma)
        raise AssertionError("unreachable")
    return (z * sigma).to(like.device)


def radius(p_lower: float, noise: str, sigma: float) -> float:
    """The certified radius (in the norm of :data:`CERTIFIED_NORM`) for a lower confidence bound
    ``p_lower`` > 1/2 on the top class's probability under the noise; 0.0 at ``p_lower`` <= 1/2
    (nothing is certified there)."""
    check_noise(noise, sigma)
    if not 0 <= p_lower <= 1:
        raise ValueError(f"p_lower must be a probability in [0, 1], got {p_lower!r}")
    if p_lower <= 0.5:
        return 0.0
    if noise == "gaussian":
        return float(sigma * _normal.ppf(p_lower))
    if p_lower >= 1:
        return math.inf
    return float(-sigma * math.log(2 * (1 - p_lower)))

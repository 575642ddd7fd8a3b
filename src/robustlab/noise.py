"""The noise distributions of randomised smoothing and their certificates.

Three distributions, each with the norm its certificate is in:

- ``"gaussian"``: ``delta ~ N(0, sigma^2 I)``; certified l2 radius ``sigma * Phi^-1(p_A)``
  (Cohen, Rosenfeld, Kolter, ICML 2019, https://arxiv.org/abs/1902.02918, Theorem 1 with
  ``p_B = 1 - p_A``).
- ``"laplace"``: i.i.d. ``Laplace(0, b)`` per coordinate with scale ``b = sigma`` (standard
  deviation ``sqrt(2) * sigma``); certified l1 radius ``-b * log(2 * (1 - p_A))`` (Teng, Lee,
  Yuan, "l1 Adversarial Robustness Certificates: a Randomized Smoothing Approach", 2020;
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020, Table 1).

- ``"uniform-l0"``: discrete smoothing of inputs quantised to the ``K + 1`` levels
  ``0, 1/K, ..., 1`` (``K =`` :data:`L0_LEVELS` ``= 255``, 8-bit images): each coordinate
  independently keeps its value with probability ``alpha = sigma``, else takes one of the ``K``
  *other* levels, each with probability ``(1 - alpha) / K`` (Lee, Yuan, Chang, Jaakkola,
  "Tight Certificates of Adversarial Robustness for Randomly Smoothed Classifiers", NeurIPS
  2019, https://arxiv.org/abs/1906.04948). Their code draws the same distribution as "keep
  with probability ``alpha - (1 - alpha) / K``, else any of the ``K + 1`` levels uniformly".
  Certified l0 radius (coordinates changed; each channel of a colour pixel counts): the
  likelihood-ratio computation of :mod:`robustlab.defenses.l0_certificate`, which needs the
  input dimension too, so :func:`radius` does not give it.

``sigma`` is always the distribution's one parameter: for ``"gaussian"`` and ``"laplace"`` the
scale in input units ([0, 1] pixels), for ``"uniform-l0"`` the keep probability ``alpha`` in
(0, 1). The noise is applied in that space, before the model's own normalisation layer, and
every user adds it: ``x + sample(x, noise, sigma, generator)`` is the noisy input.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from scipy.stats import norm as _normal
from torch import Tensor, nn

from robustlab._validate import number

__all__ = [
    "CERTIFIED_NORM",
    "L0_LEVELS",
    "NOISES",
    "SmoothedModel",
    "check_noise",
    "check_quantised",
    "radius",
    "sample",
]

NOISES = ("gaussian", "laplace", "uniform-l0")
#: the norm each distribution's certificate is in
CERTIFIED_NORM = {"gaussian": "l2", "laplace": "l1", "uniform-l0": "l0"}
#: K of the "uniform-l0" noise: its inputs take the K + 1 values 0, 1/K, ..., 1
L0_LEVELS = 255
#: how far (in levels) a value may lie from k / K and still count as quantised (float32 k / 255
#: is within 2e-5 levels of it)
QUANTISED_TOLERANCE = 1e-3


@runtime_checkable
class SmoothedModel(Protocol):
    """What an attack needs to know of a smoothed classifier: the ``base`` model it smooths,
    the noise's parameter ``sigma`` (scale, or keep probability for ``"uniform-l0"``) and the
    ``noise`` name. ``robustlab.defenses.Smoothing`` is one;
    attacks test ``isinstance(model, SmoothedModel)`` and never import the defense."""

    base: nn.Module
    sigma: float
    noise: str


def check_noise(noise: str, sigma: float) -> None:
    """ValueError naming the problem unless ``noise`` is known and ``sigma`` its parameter: a
    finite scale >= 0, or for ``"uniform-l0"`` a keep probability in the open interval (0, 1)."""
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; valid noises are: {', '.join(NOISES)}")
    if noise == "uniform-l0":
        number(
            sigma,
            "sigma (the keep probability alpha of uniform-l0 noise)",
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
    else:
        number(sigma, "sigma", low=0)  # the noise scale in input units


def refuse_input_noise(noise: str, who: str) -> None:
    """ValueError for ``"uniform-l0"`` noise in ``who``, a method that draws noise for ``x``
    and adds it to another point (an attacked ``x_adv``): uniform-l0 noise depends on the
    input it is drawn for."""
    if noise == "uniform-l0":
        raise ValueError(
            f"{who} adds noise drawn for x to another point, but uniform-l0 noise "
            "depends on the input it is drawn for: use gaussian or laplace noise"
        )


def check_quantised(x: Tensor, levels: int = L0_LEVELS) -> None:
    """ValueError unless every value of ``x`` is one of the ``levels + 1`` values ``k / levels``
    of [0, 1] (up to :data:`QUANTISED_TOLERANCE` levels): what the certificate of
    ``"uniform-l0"`` noise assumes."""
    scaled = x.detach().double().flatten() * levels
    if scaled.amin() < -QUANTISED_TOLERANCE or scaled.amax() > levels + QUANTISED_TOLERANCE:
        raise ValueError(
            f"uniform-l0 noise certifies inputs in [0, 1], but x holds values in "
            f"[{float(x.min()):.6g}, {float(x.max()):.6g}]: scale them to [0, 1]"
        )
    off = (scaled - scaled.round()).abs()
    worst = int(off.argmax())
    if off[worst] > QUANTISED_TOLERANCE:
        raise ValueError(
            f"uniform-l0 noise certifies inputs quantised to the {levels + 1} levels k/{levels} "
            f"of [0, 1], but x holds {float(scaled[worst]) / levels:.6g}, "
            f"{float(off[worst]):.3g} levels from the nearest one: quantise it first, "
            f"x = (x * {levels}).round() / {levels}"
        )


def sample(
    like: Tensor, noise: str, sigma: float, generator: torch.Generator | None = None
) -> Tensor:
    """A noise tensor shaped like ``like`` (same dtype and device), drawn from ``generator``
    (torch's global generator when None), to be added to the input: ``like + sample(like, ...)``.
    A generator on another device than ``like`` draws there and the noise is moved.

    ``"uniform-l0"`` noise depends on the input, so ``like`` must be the input itself: the
    noise is ``z - like`` for the drawn levels ``z`` (0 where a coordinate is kept, so kept
    values stay bit-identical; a replaced one is ``z`` up to one float rounding). Inputs are
    assumed quantised to the levels ``k / K`` (:func:`check_quantised`); otherwise a kept
    coordinate keeps its unquantised value and a replaced one takes a level other than the
    nearest, a distribution the l0 certificate does not cover (``certify`` refuses such inputs).
    """
    device = like.device if generator is None else generator.device
    if noise == "uniform-l0":
        check_noise(noise, sigma)
        return _uniform_l0(like, sigma, generator, device)
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


def _uniform_l0(
    like: Tensor, keep: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``z - like``: each coordinate kept with probability ``keep``, else moved to one of the
    other ``L0_LEVELS`` levels, uniformly (a shift of 1..K levels modulo K + 1). Not detached
    from ``like``: ``like + noise`` has gradient 1 where kept, 0 where replaced."""
    k = L0_LEVELS
    # float64 keeps the keep probability exact to 2^-53 (MPS has no float64)
    u_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    kept = torch.rand(like.shape, generator=generator, device=device, dtype=u_dtype) < keep
    shift = torch.randint(1, k + 1, like.shape, generator=generator, device=device)
    x = like.to(device)
    level = (x.detach() * k).round().clamp(0, k).long()
    other = ((level + shift) % (k + 1)).to(like.dtype) / k
    return torch.where(kept, torch.zeros_like(x), other - x).to(like.device)


def radius(p_lower: float, noise: str, sigma: float) -> float:
    """The certified radius (in the norm of :data:`CERTIFIED_NORM`) for a lower confidence bound
    ``p_lower`` > 1/2 on the top class's probability under the noise; 0.0 at ``p_lower`` <= 1/2
    (nothing is certified there). Gaussian and Laplace noise only: the l0 radius of
    ``"uniform-l0"`` also depends on the input dimension, see
    :func:`robustlab.defenses.l0_certificate.l0_radius`."""
    check_noise(noise, sigma)
    if noise == "uniform-l0":
        raise ValueError(
            "the l0 radius of uniform-l0 noise depends on the input dimension d: "
            "use robustlab.defenses.l0_certificate.l0_radius(p_lower, alpha, d)"
        )
    if not 0 <= p_lower <= 1:
        raise ValueError(f"p_lower must be a probability in [0, 1], got {p_lower!r}")
    if p_lower <= 0.5:
        return 0.0
    if noise == "gaussian":
        return float(sigma * _normal.ppf(p_lower))
    if p_lower >= 1:
        return math.inf
    return float(-sigma * math.log(2 * (1 - p_lower)))

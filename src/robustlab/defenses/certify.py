"""Cohen et al.'s PREDICT and CERTIFY for a randomised-smoothing classifier.

Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019
(https://arxiv.org/abs/1902.02918), Section 3.2 / Algorithm "certify" and "predict"; the noise
distributions and radii are in :mod:`robustlab.noise` (Gaussian -> l2, Laplace -> l1), the l0
radius of "uniform-l0" noise (Lee et al. 2019) in :mod:`robustlab.defenses.l0_certificate`.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)`` over the noise ``delta``;
both functions estimate it from hard votes of the base classifier ``f`` only.

- :func:`predict` returns ``g(x)`` or :data:`ABSTAIN`; with probability at least ``1 - alpha``
  a returned class equals ``g(x)`` (two-sided binomial test of the top two counts at p = 1/2).
- :func:`certify` picks the top class from ``n0`` selection draws, then counts it in ``n``
  *fresh* estimation draws; ``p_A`` is the one-sided ``1 - alpha`` Clopper-Pearson lower bound
  of its probability. If ``p_A > 1/2`` it returns the class and the radius (``sigma *
  Phi^-1(p_A)`` for Gaussian noise); with probability at least ``1 - alpha`` over the draws,
  ``g`` then predicts that class everywhere within the radius of ``x``. Otherwise it abstains.

Original defaults: n0 = 100, n = 100,000, alpha = 0.001, 1000 noisy copies per forward. The
statistics use SciPy's ``binomtest`` (``binom_test`` is gone from current SciPy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from scipy.stats import binomtest
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_images, number, positive_int
from robustlab.defenses.l0_certificate import l0_radius
from robustlab.defenses.smoothing import noisy_logits
from robustlab.noise import CERTIFIED_NORM, L0_LEVELS, check_noise, check_quantised, radius
from robustlab.threat import ThreatModel

__all__ = ["ABSTAIN", "Certificate", "certify", "certify_iter", "predict", "vote_counts"]

#: the class returned when the smoothed classifier abstains
ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """One example's certificate: ``prediction`` (:data:`ABSTAIN` or a class), ``radius``
    (0.0 when abstaining) in the noise's certified ``norm``, ``p_lower`` (lower confidence bound
    on the top class's probability), ``count`` (its votes among the ``n`` estimation draws) and
    the wall-clock ``seconds`` spent on the example."""

    index: int
    prediction: int
    radius: float
    p_lower: float
    count: int
    norm: str
    seconds: float


Box = tuple[float, float]


def check_box(x: object, bounds: Box) -> None:
    """``x`` checked as every entry point checks its inputs
    (:func:`robustlab._validate.check_images`): a finite float batch inside the box
    ``bounds`` (``(low, high)``, as a threat model's)."""
    check_images(x, ThreatModel("l2", 0.0, bounds))


def _check_l0_inputs(x: Tensor, bounds: Box) -> None:
    """uniform-l0 noise certifies inputs on its levels ``k / K`` of [0, 1] only."""
    if tuple(bounds) != (0.0, 1.0):
        raise ValueError(f"uniform-l0 noise draws levels of [0, 1], but bounds are {bounds}: "
                         "scale the inputs to [0, 1] and keep the default bounds")
    check_quantised(x)


def _radius(p_a: float, noise: str, sigma: float, d: int) -> float:
    """The certified radius of :mod:`robustlab.noise` (l2, l1), or the l0 radius of Lee et
    al. (a number of coordinates, of ``d``) for uniform-l0 noise."""
    if noise == "uniform-l0":
        return float(l0_radius(p_a, sigma, d, L0_LEVELS))
    return radius(p_a, noise, sigma)


def _check(sigma: float, noise: str, alpha: float, batch_size: int) -> None:
    check_noise(noise, sigma)
    number(alpha, "alpha (the allowed failure probability)", low=0, high=1, low_open=True,
           high_open=True)
    positive_int(batch_size, "batch_size")


def vote_counts(
    model: nn.Module, x: Tensor, num: int, *, sigma: float, noise: str = "gaussian",
    batch_size: int = 1000, generator: torch.Generator | None = None,
    bounds: Box = (0.0, 1.0),
) -> Tensor:
    """(N, K) int64: how often the base ``model`` predicts each class on ``num`` noisy copies of
    each input (in ``bounds``). Runs without gradients in eval mode (the model's mode is
    restored)."""
    check_box(x, bounds)
    return _vote_counts(model, x, num, sigma=sigma, noise=noise, batch_size=batch_size,
                        generator=generator)


def _vote_counts(model: nn.Module, x: Tensor, num: int, *, sigma: float, noise: str,
                 batch_size: int, generator: torch.Generator | None) -> Tensor:
    positive_int(num, "the number of noise draws")
    counts: Tensor | None = None
    with torch.no_grad(), eval_mode(model):
        for rows, logits in noisy_logits(model, x, num, sigma, noise, batch_size, generator):
            if counts is None:
                counts = torch.zeros(len(x), logits.shape[1], dtype=torch.long, device=x.device)
            counts.index_put_((rows, logits.argmax(1)), torch.ones_like(rows), accumulate=True)
    assert counts is not None
    return counts


def predict(
    model: nn.Module, x: Tensor, *, sigma: float, n: int = 100_000, alpha: float = 0.001,
    noise: str = "gaussian", batch_size: int = 1000, generator: torch.Generator | None = None,
    bounds: Box = (0.0, 1.0),
) -> Tensor:
    """Cohen et al.'s PREDICT: (N,) int64 classes of the smoothed classifier, :data:`ABSTAIN`
    where the top two counts among ``n`` draws are not significantly different at level
    ``alpha``. A returned class differs from ``g(x)`` with probability at most ``alpha``.
    ``x`` must lie in ``bounds``, the input box (as for every entry point)."""
    _check(sigma, noise, alpha, batch_size)
    check_box(x, bounds)
    counts = _vote_counts(model, x, n, sigma=sigma, noise=noise, batch_size=batch_size,
                         generator=generator)
    top = counts.topk(min(2, counts.shape[1]), dim=1)
    out = top.indices[:, 0].clone()
    for i, c in enumerate(top.values.tolist()):
        n_a, n_b = c[0], (c[1] if len(c) > 1 else 0)
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            out[i] = ABSTAIN
    return out


def lower_confidence_bound(count: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion (the lower
    end of the two-sided exact interval at level ``1 - 2 alpha``)."""
    if count == 0:
        return 0.0
    return float(binomtest(count, n).proportion_ci(1 - 2 * alpha, method="exact").low)


def certify_iter(
    model: nn.Module, x: Tensor, *, sigma: float, n0: int = 100, n: int = 100_000,
    alpha: float = 0.001, noise: str = "gaussian", batch_size: int = 1000,
    generator: torch.Generator | None = None, start: int = 0, bounds: Box = (0.0, 1.0),
) -> Iterator[Certificate]:
    """Cohen et al.'s CERTIFY, one :class:`Certificate` per input as soon as it is done (for
    streaming and resumable runs); ``index`` counts from ``start``; ``x`` must lie in
    ``bounds``. The arguments are checked at the call, before the first input is drawn."""
    _check(sigma, noise, alpha, batch_size)
    check_box(x, bounds)
    if noise == "uniform-l0":
        _check_l0_inputs(x, bounds)
    positive_int(n0, "n0")
    positive_int(n, "n")
    return _certificates(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha, noise=noise,
                         batch_size=batch_size, generator=generator, start=start)


def _certificates(model: nn.Module, x: Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                  noise: str, batch_size: int, generator: torch.Generator | None,
                  start: int) -> Iterator[Certificate]:
    norm = CERTIFIED_NORM[noise]
    for i in range(len(x)):
        t0 = time.perf_counter()
        xi = x[i:i + 1]
        selection = _vote_counts(model, xi, n0, sigma=sigma, noise=noise,
                                batch_size=batch_size, generator=generator)
        c_a = int(selection[0].argmax())
        estimation = _vote_counts(model, xi, n, sigma=sigma, noise=noise,
                                 batch_size=batch_size, generator=generator)
        count = int(estimation[0, c_a])
        p_a = lower_confidence_bound(count, n, alpha)
        certified = p_a > 0.5
        yield Certificate(index=start + i, prediction=c_a if certified else ABSTAIN,
                          radius=_radius(p_a, noise, sigma, xi[0].numel()) if certified
                          else 0.0,
                          p_lower=p_a, count=count, norm=norm,
                          seconds=time.perf_counter() - t0)


def certify(
    model: nn.Module, x: Tensor, *, sigma: float, n0: int = 100, n: int = 100_000,
    alpha: float = 0.001, noise: str = "gaussian", batch_size: int = 1000,
    generator: torch.Generator | None = None, bounds: Box = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Cohen et al.'s CERTIFY on every input of ``x`` (N, C, H, W), inside the input box
    ``bounds`` (``(low, high)``; inputs outside it are refused, as by every entry point:
    8-bit images must be scaled by 1/255 first).

    Returns:
        ``(prediction, radius)``: (N,) int64 classes (:data:`ABSTAIN` = -1 where it abstains)
        and (N,) float64 certified radii in input units (l2 for Gaussian noise, l1 for
        Laplace; 0.0 where it abstains), or for ``noise="uniform-l0"`` (keep probability
        ``sigma``; inputs on the levels ``k / 255`` only, else a ValueError) the number of
        coordinates (l0). With probability at least ``1 - alpha`` (per input,
        over the noise draws), the smoothed classifier predicts ``prediction`` everywhere in
        the ball of that radius around the input.
    """
    rows = list(certify_iter(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha, noise=noise,
                             batch_size=batch_size, generator=generator, bounds=bounds))
    pred = torch.tensor([r.prediction for r in rows], dtype=torch.long)
    rad = torch.tensor([r.radius for r in rows], dtype=torch.float64)
    return pred, rad

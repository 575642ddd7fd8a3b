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
``sequential=True`` replaces the fixed ``n`` by the anytime-valid estimation of
:mod:`robustlab.defenses.sequential`; the base model's forwards are shared across inputs at a
measured batch size by :mod:`robustlab.defenses.batching` (the noise drawn is unchanged).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from scipy.stats import binomtest
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_images, number, positive_int
from robustlab.defenses.batching import count_votes, job_logits, sizes
from robustlab.defenses.l0_certificate import l0_radius
from robustlab.defenses.sequential import sequential_estimates
from robustlab.noise import CERTIFIED_NORM, L0_LEVELS, check_noise, check_quantised, radius
from robustlab.threat import ThreatModel

__all__ = ["ABSTAIN", "Certificate", "certify", "certify_iter", "predict", "vote_counts"]

#: the class returned when the smoothed classifier abstains
ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """One example's certificate: ``prediction`` (:data:`ABSTAIN` or a class), ``radius``
    (0.0 when abstaining) in the noise's certified ``norm``, ``p_lower`` (lower confidence bound
    on the top class's probability), ``count`` (its votes among the ``draws`` estimation
    draws: ``n``, or where the sequential procedure stopped), and ``seconds``: the wall-clock
    time since the previous certificate of the same call (forwards are shared across inputs)."""

    index: int
    prediction: int
    radius: float
    p_lower: float
    count: int
    norm: str
    seconds: float
    draws: int = 0


Box = tuple[float, float]


def check_box(x: object, bounds: Box) -> None:
    """``x`` checked as every entry point checks its inputs
    (:func:`robustlab._validate.check_images`): a finite float batch inside the box
    ``bounds`` (``(low, high)``, as a threat model's)."""
    check_images(x, ThreatModel("l2", 0.0, bounds))


def _check_l0_inputs(x: Tensor, bounds: Box) -> None:
    """uniform-l0 noise certifies inputs on its levels ``k / K`` of [0, 1] only."""
    if tuple(bounds) != (0.0, 1.0):
        raise ValueError(
            f"uniform-l0 noise draws levels of [0, 1], but bounds are {bounds}: "
            "scale the inputs to [0, 1] and keep the default bounds"
        )
    check_quantised(x)


def _radius(p_a: float, noise: str, sigma: float, d: int) -> float:
    """The certified radius of :mod:`robustlab.noise` (l2, l1), or the l0 radius of Lee et
    al. (a number of coordinates, of ``d``) for uniform-l0 noise."""
    if noise == "uniform-l0":
        return float(l0_radius(p_a, sigma, d, L0_LEVELS))
    return radius(p_a, noise, sigma)


def _check(sigma: float, noise: str, alpha: float, batch_size: int | None) -> None:
    check_noise(noise, sigma)
    number(
        alpha,
        "alpha (the allowed failure probability)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    if batch_size is not None:
        positive_int(batch_size, "batch_size")


def vote_counts(
    model: nn.Module,
    x: Tensor,
    num: int,
    *,
    sigma: float,
    noise: str = "gaussian",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    bounds: Box = (0.0, 1.0),
) -> Tensor:
    """(N, K) int64: how often the base ``model`` predicts each class on ``num`` noisy copies of
    each input (in ``bounds``). Runs without gradients in eval mode (the model's mode is
    restored). ``batch_size``: noisy rows per forward; None: measured (see
    :mod:`robustlab.defenses.batching`; the draws are then those of ``batch_size=1000``)."""
    check_box(x, bounds)
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
    return _vote_counts(
        model, x, num, sigma=sigma, noise=noise, batch_size=batch_size, generator=generator
    )


def _vote_counts(
    model: nn.Module,
    x: Tensor,
    num: int,
    *,
    sigma: float,
    noise: str,
    batch_size: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    positive_int(num, "the number of noise draws")
    draw, batch = sizes(model, x, len(x) * num, batch_size)
    with torch.no_grad(), eval_mode(model):
        return count_votes(
            job_logits(
                model, [(x, num, generator)], sigma=sigma, noise=noise, draw=draw, batch=batch
            ),
            len(x),
        )


def predict(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    n: int = 100_000,
    alpha: float = 0.001,
    noise: str = "gaussian",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    bounds: Box = (0.0, 1.0),
) -> Tensor:
    """Cohen et al.'s PREDICT: (N,) int64 classes of the smoothed classifier, :data:`ABSTAIN`
    where the top two counts among ``n`` draws are not significantly different at level
    ``alpha``. A returned class differs from ``g(x)`` with probability at most ``alpha``.
    ``x`` must lie in ``bounds``, the input box (as for every entry point). ``batch_size``
    as for :func:`vote_counts` (the noisy copies of several inputs share a forward)."""
    _check(sigma, noise, alpha, batch_size)
    check_box(x, bounds)
    counts = _vote_counts(
        model, x, n, sigma=sigma, noise=noise, batch_size=batch_size, generator=generator
    )
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


Generators = torch.Generator | Sequence[torch.Generator] | None


def _generators(generator: Generators, n: int, x: Tensor) -> list[torch.Generator | None]:
    """One generator per input: ``generator`` itself (shared, drawn from in input order), or
    the given one per input."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens: list[torch.Generator | None] = list(generator)
    if len(gens) != n or not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(
            f"generator must be a torch.Generator, None, or a sequence of one "
            f"torch.Generator per input ({n}), got {type(generator).__name__}"
        )
    return gens


def certify_iter(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    noise: str = "gaussian",
    batch_size: int | None = None,
    generator: Generators = None,
    start: int = 0,
    bounds: Box = (0.0, 1.0),
    sequential: bool = False,
    max_n: int = 100_000,
    radius_tolerance: float | None = None,
    min_radius: float = 0.0,
    max_radius: float | None = None,
) -> Iterator[Certificate]:
    """Cohen et al.'s CERTIFY, one :class:`Certificate` per input as soon as it is done (for
    streaming and resumable runs; in input order, except with ``sequential=True``, where
    inputs finish in any order); ``index`` counts from ``start``; ``x`` must lie in
    ``bounds``. ``generator``: one for all inputs, or a sequence of one per input (each input
    then draws from its own, so its result does not depend on the others). The arguments are
    checked at the call, before the first input is drawn. See :func:`certify`."""
    _check(sigma, noise, alpha, batch_size)
    check_box(x, bounds)
    if noise == "uniform-l0":
        _check_l0_inputs(x, bounds)
    positive_int(n0, "n0")
    gens = _generators(generator, len(x), x)
    d = x[0].numel()

    def radius_of(p: float) -> float:
        return _radius(p, noise, sigma, d)

    if sequential is not False:
        if sequential is not True:
            raise TypeError(f"sequential must be True or False, got {sequential!r}")
        estimates = sequential_estimates(
            model,
            x,
            gens,
            sigma=sigma,
            n0=n0,
            max_n=max_n,
            alpha=alpha,
            noise=noise,
            batch_size=batch_size,
            radius_tolerance=radius_tolerance,
            min_radius=min_radius,
            max_radius=max_radius,
            radius_of=radius_of,
        )
        return (
            Certificate(
                index=start + e.position,
                prediction=e.c_a if e.p_lower > 0.5 else ABSTAIN,
                radius=radius_of(e.p_lower) if e.p_lower > 0.5 else 0.0,
                p_lower=e.p_lower,
                count=e.hits,
                norm=CERTIFIED_NORM[noise],
                seconds=e.seconds,
                draws=e.draws,
            )
            for e in estimates
        )
    positive_int(n, "n")
    draw, batch = sizes(model, x, len(x) * (n0 + n), batch_size)
    return _certificates(
        model,
        x,
        gens,
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        noise=noise,
        draw=draw,
        batch=batch,
        start=start,
        radius_of=radius_of,
    )


def _certificates(
    model: nn.Module,
    x: Tensor,
    gens: list[torch.Generator | None],
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    noise: str,
    draw: int,
    batch: int,
    start: int,
    radius_of: Callable[[float], float],
) -> Iterator[Certificate]:
    """Fixed-N CERTIFY: input ``i`` is jobs ``2i`` (``n0`` selection draws) and ``2i + 1``
    (``n`` fresh estimation draws), drawn in that order; forwards span inputs."""
    norm = CERTIFIED_NORM[noise]
    jobs = ((x[i // 2 : i // 2 + 1], (n0, n)[i % 2], gens[i // 2]) for i in range(2 * len(x)))
    counts: dict[int, Tensor] = {}
    done = 0
    t0 = time.perf_counter()
    with torch.no_grad(), eval_mode(model):
        for rows, logits in job_logits(
            model, jobs, sigma=sigma, noise=noise, draw=draw, batch=batch
        ):
            votes = logits.argmax(1)
            for job in rows.unique().tolist():
                got = torch.bincount(votes[rows == job], minlength=logits.shape[1])
                counts[job] = counts[job] + got if job in counts else got
            while 2 * done + 1 in counts and int(counts[2 * done + 1].sum()) == n:
                c_a = int(counts.pop(2 * done).argmax())
                count = int(counts.pop(2 * done + 1)[c_a])
                p_a = lower_confidence_bound(count, n, alpha)
                certified = p_a > 0.5
                yield Certificate(
                    index=start + done,
                    prediction=c_a if certified else ABSTAIN,
                    radius=radius_of(p_a) if certified else 0.0,
                    p_lower=p_a,
                    count=count,
                    norm=norm,
                    seconds=time.perf_counter() - t0,
                    draws=n,
                )
                done += 1
                t0 = time.perf_counter()


def certify(
    model: nn.Module,
    x: Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    noise: str = "gaussian",
    batch_size: int | None = None,
    generator: Generators = None,
    bounds: Box = (0.0, 1.0),
    sequential: bool = False,
    max_n: int = 100_000,
    radius_tolerance: float | None = None,
    min_radius: float = 0.0,
    max_radius: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Cohen et al.'s CERTIFY on every input of ``x`` (N, C, H, W), inside the input box
    ``bounds`` (``(low, high)``; inputs outside it are refused, as by every entry point:
    8-bit images must be scaled by 1/255 first).

    Args:
        n0, n: selection and (fixed-N) estimation draws per input.
        batch_size: noisy rows per forward of the base model, across inputs; None: measured
            once per model and input shape (:mod:`robustlab.defenses.batching`), the noise
            then drawn as with ``batch_size=1000``. A given ``batch_size`` draws the noise in
            chunks of that size, as before: results for a seed are unchanged.
        generator: a ``torch.Generator`` shared by the inputs, or a sequence of one per input.
        sequential: False (default): Cohen's fixed ``n``. True: the anytime-valid sequential
            estimation of :mod:`robustlab.defenses.sequential` (``n`` is then unused): at most
            ``max_n`` estimation draws, stopping once the radius is decided on the grid of
            multiples of ``radius_tolerance`` (input units; None: ``sigma / 4``, and 1 pixel
            for l0: the certified radius and the largest one the remaining draws could
            still certify lie between the same two multiples), once it reaches
            ``max_radius`` (None: no limit; radii beyond it are not of interest, e.g.
            ``3 * sigma``), or once it can no longer reach ``min_radius``. Certified
            accuracy at the multiples of the tolerance up to ``max_radius`` then matches,
            up to chance, what ``max_n`` fixed draws give; points just above a multiple
            draw to ``max_n``.

    Returns:
        ``(prediction, radius)``: (N,) int64 classes (:data:`ABSTAIN` = -1 where it abstains)
        and (N,) float64 certified radii in input units (l2 for Gaussian noise, l1 for
        Laplace; 0.0 where it abstains), or for ``noise="uniform-l0"`` (keep probability
        ``sigma``; inputs on the levels ``k / 255`` only, else a ValueError) the number of
        coordinates (l0). With probability at least ``1 - alpha`` (per input,
        over the noise draws), the smoothed classifier predicts ``prediction`` everywhere in
        the ball of that radius around the input; with ``sequential=True`` this holds at the
        data-dependent number of draws where it stopped.
    """
    rows = sorted(
        certify_iter(
            model,
            x,
            sigma=sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            noise=noise,
            batch_size=batch_size,
            generator=generator,
            bounds=bounds,
            sequential=sequential,
            max_n=max_n,
            radius_tolerance=radius_tolerance,
            min_radius=min_radius,
            max_radius=max_radius,
        ),
        key=lambda r: r.index,
    )
    pred = torch.tensor([r.prediction for r in rows], dtype=torch.long)
    rad = torch.tensor([r.radius for r in rows], dtype=torch.float64)
    return pred, rad

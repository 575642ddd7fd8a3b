"""The certified l0 radius of discrete ("uniform-l0") smoothing.

Lee, Yuan, Chang, Jaakkola, "Tight Certificates of Adversarial Robustness for Randomly
Smoothed Classifiers", NeurIPS 2019, https://arxiv.org/abs/1906.04948 (Section 4, the
discrete case); the noise itself is ``"uniform-l0"`` in :mod:`robustlab.noise`, Cohen et al.'s
CERTIFY that uses this radius is :mod:`robustlab.defenses.certify`.

Inputs take the ``K + 1`` levels ``0, 1/K, ..., 1``; the noise keeps each of the ``d``
coordinates with probability ``alpha`` and otherwise moves it to one of the ``K`` other levels,
each with probability ``beta = (1 - alpha) / K``. For ``x`` and an ``x'`` that differ in ``r``
coordinates, the likelihood ratio of a noisy point ``z`` is ``P_x(z) / P_x'(z) = (alpha /
beta)^t``, ``t`` = (coordinates of ``z`` equal to ``x``) - (those equal to ``x'``) among the
``r`` where they differ; the ``d - r`` others cancel. Over those ``r`` coordinates, ``t`` has
the law of ``r`` independent steps +1 (probability ``alpha``), 0 (``(K - 1) beta``), -1
(``beta``) under ``x``, and ``-t`` has it under ``x'``. Neyman-Pearson: the worst-case set of
the top class fills the regions of largest ratio first until its probability under ``x'``
reaches 1/2; its probability under ``x`` is the threshold ``rho_r^-1(1/2)``. If the lower
bound ``p_A`` on the top class's probability exceeds the thresholds of ``0..R``, the smoothed
classifier keeps the class on every ``x'`` within l0 distance ``R``:

    R = max { r <= d : p_A > rho_s^-1(1/2) for every s <= r },   rho_0^-1(1/2) = 1/2.

Arithmetic is exact: the laws of ``t`` are integer polynomial coefficients (``alpha`` read as
the decimal it prints as, 0.8 = 4/5), the thresholds :class:`fractions.Fraction`. Defaults of
the paper: binarised MNIST ``K = 1``, ``alpha = 0.8`` (grid 0.72 .. 0.96); ImageNet
``K = 255``, ``alpha`` in 0.1 .. 0.5; here ``K = 255`` (8-bit images) by default.

Cost: ``O(r^2)`` big-integer operations for the thresholds up to ``r``, computed once per
``(alpha, K)`` in a process and extended as larger radii are asked for; radii stay small
(under 30 for ``alpha >= 0.1``, ``K = 255``, ``p_A <= 0.99993``) unless ``alpha`` nears the
uniform ``1 / (K + 1)``, where ``r`` reaches ``d``.

Differences from the reference code (github.com/guanghelee/Randomized_Smoothing,
``compute_rho/``): it counts regions of ``(m, n)`` changed coordinates over all ``d``
coordinates and fills the boundary region point by point (a deterministic base classifier),
printing thresholds rounded up at 1e-20, offline per ``(alpha, K, d)``; here the ``d - r``
agreeing coordinates are factored out (they do not change the ratio) and the boundary region
is filled fractionally (Neyman-Pearson with randomisation: exact for randomised base
classifiers, never below the point-by-point threshold, by at most one point's probability
above it). The two agree on the reference's tables (MNIST ``alpha = 0.8``, ImageNet 0.2) to
their 20 digits.
"""

from __future__ import annotations

from fractions import Fraction

from robustlab._validate import integer, number, positive_int
from robustlab.noise import L0_LEVELS

__all__ = ["l0_radius", "l0_threshold"]


class _Thresholds:
    """``rho_r^-1(1/2)`` for r = 0, 1, ... of one ``(alpha, K)``, extended on demand."""

    def __init__(self, alpha: Fraction, levels: int) -> None:
        beta = (1 - alpha) / levels
        scale = alpha.denominator * levels  # alpha * scale and beta * scale are integers
        self.up, self.down = int(alpha * scale), int(beta * scale)
        self.stay = (levels - 1) * self.down
        self.scale = scale
        self.law = [1]  # scale^r * P_x(t), t = -r..r
        self.values = [Fraction(1, 2)]

    def get(self, r: int) -> Fraction:
        while len(self.values) <= r:
            self._extend()
        return self.values[r]

    def _extend(self) -> None:
        padded = [0, 0, *self.law, 0, 0]
        self.law = [
            self.up * padded[j] + self.stay * padded[j + 1] + self.down * padded[j + 2]
            for j in range(len(self.law) + 2)
        ]
        total = self.scale ** (len(self.law) // 2)
        # ratio (alpha / beta)^t: largest t first when alpha > beta; P_x'(t) = P_x(-t)
        order = range(len(self.law) - 1, -1, -1) if self.up > self.down else range(len(self.law))
        p = q = 0
        for i in order:
            p_i, q_i = self.law[i], self.law[-1 - i]
            if 2 * (q + q_i) >= total:  # this region takes q' to 1/2: the part that is needed
                self.values.append(Fraction(2 * p * q_i + p_i * (total - 2 * q), 2 * q_i * total))
                return
            p, q = p + p_i, q + q_i
        raise AssertionError("the regions hold all the probability")


_CACHE: dict[tuple[Fraction, int], _Thresholds] = {}


def _table(alpha: float, levels: int) -> _Thresholds:
    number(
        alpha,
        "alpha (the keep probability of uniform-l0 noise)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    positive_int(levels, "K (the number of quantisation levels minus one)")
    key = (Fraction(repr(float(alpha))), levels)
    if key not in _CACHE:
        _CACHE[key] = _Thresholds(*key)
    return _CACHE[key]


def l0_threshold(r: int, alpha: float, levels: int = L0_LEVELS) -> Fraction:
    """``rho_r^-1(1/2)``, exact: the smallest probability of the top class under the noise at
    ``x`` for which every classifier still gives it probability >= 1/2 at every ``x'`` that
    differs from ``x`` in ``r`` coordinates (the worst case gives it exactly 1/2 there).
    ``alpha``: keep probability in (0, 1); ``levels``: K, inputs on ``k / K``."""
    integer(r, "r (an l0 distance)", minimum=0)
    return _table(alpha, levels).get(r)


def l0_radius(p_lower: float, alpha: float, d: int, levels: int = L0_LEVELS) -> int:
    """The certified l0 radius (a number of coordinates, 0..``d``) of "uniform-l0" smoothing
    with keep probability ``alpha`` in (0, 1), on inputs of ``d`` coordinates quantised to
    ``levels + 1`` values, for a lower confidence bound ``p_lower`` on the top class's
    probability: the largest ``R`` with ``p_lower > l0_threshold(r)`` for every ``r <= R``;
    0 also at ``p_lower <= 1/2`` (nothing certified there, as :func:`robustlab.noise.radius`).
    """
    number(p_lower, "p_lower", low=0, high=1)
    positive_int(d, "d (the input dimension: coordinates per input)")
    table = _table(alpha, levels)
    p = Fraction(p_lower)
    if p <= Fraction(1, 2):
        return 0
    if table.up == table.down or p == 1:  # the noise forgets the input (every class keeps its
        return d  # share), or p_A = 1 (every threshold is < 1: every region has probability)
    r = 0
    while r < d and p > table.get(r + 1):
        r += 1
    return r

"""Anytime-valid sequential estimation of ``p_A`` for CERTIFY: stop drawing once the radius is
decided.

Method: a union bound over a geometric schedule of looks with a Clopper-Pearson bound at each
look, the baseline of Voráček, "Treatment of Statistical Estimation Problems in Randomized
Smoothing for Adversarial Robustness", NeurIPS 2024, arXiv:2406.17830 (confidence sequences in
general: Howard, Ramdas, McAuliffe, Sekhon, Ann. Statist. 2021, arXiv:1810.08240;
Waudby-Smith, Ramdas, JRSS-B 2024, arXiv:2010.09686). After the class ``c_A`` is chosen on
``n0`` separate selection draws (as in Cohen et al.'s CERTIFY, :mod:`robustlab.defenses.certify`),
estimation draws are looked at after ``N_1 < N_2 < ... < N_K = max_n`` of them
(:func:`looks`: ``N_1 = 100``, then ``x 1.25``). At look ``k`` with ``A_k`` votes for ``c_A``,

    L_k = Clopper-Pearson lower bound of A_k / N_k at level alpha_k,
    U_k = the upper bound at the same level,
    alpha_k = (alpha / 2) 5 / ((k+4)(k+5)) for k < K,  alpha_K = alpha / 2.

Since ``sum_k alpha_k <= alpha`` (the first terms telescope to at most ``alpha / 2``,
:func:`look_alphas`) and each bound holds at its fixed ``N_k``, ``P(exists k: p_A < L_k) <=
alpha``: the lower bounds hold *together*, so ``L_tau`` is a ``1 - alpha`` lower bound at any
look ``tau`` chosen from the data, and the returned radius (from ``L_tau``, as CERTIFY's) is
certified with probability at least ``1 - alpha``, whatever stopped it. Half of ``alpha`` goes
to the last look so that an input that needs every draw loses little to fixed-N CERTIFY on the
same ``max_n`` draws (its bound is at level ``alpha / 2`` instead of ``alpha``).

Stopping rule, at each look: the ceiling ``c_k = min(U_k, the largest lower bound a later look
could give if every further draw voted c_A)``; with ``t = radius_tolerance``, stop when

- ``radius(L_k)`` and ``radius(c_k)`` lie in the same cell ``[j t, (j+1) t)`` (decided: no
  multiple of ``t`` is still undecided; an abstention, ``L_k <= 1/2``, is a cell of its own),
- ``radius(L_k) >= max_radius`` (nothing larger is of interest),
- ``c_k <= 1/2`` or ``radius(c_k) < min_radius`` (out of reach), or at ``max_n``.

With probability at least ``1 - 2 alpha`` also ``p_A <= U_k`` at every look, so a stop for a
decided cell returns a radius in the cell of ``min(true radius, the most max_n draws could
certify)``: certified accuracy at the multiples of ``t`` up to ``max_radius`` is what ``max_n``
draws give, up to the level spent on the looks. An input whose radius sits on a multiple of
``t`` draws to ``max_n``. Cost: ``n0 + N_tau`` draws per input, ``N_tau <= 1.25 x`` the draws
the rule needed. Differences from the reference (github.com/vvoracek/RS_conf_seq): its
baseline tests a fixed radius with growth 1.1; here the radius is estimated to a grid of
radii, with growth 1.25 (fewer looks, so larger ``alpha_k``), the early stops, and half of
``alpha`` on the last look.

Inputs are certified up to :data:`WINDOW` at a time, their draws of one look sharing the base
model's forwards (:mod:`robustlab.defenses.batching`). Each input draws from its own generator;
one shared generator (or None: torch's global one) first gives every input a seed, so an
input's result does not depend on the others or on the batch size (given one, the noise is
drawn in chunks of that size).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import beta
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number, positive_int
from robustlab.defenses.batching import count_votes, job_logits, sizes

__all__ = [
    "FIRST_LOOK",
    "GROWTH",
    "WINDOW",
    "Estimate",
    "Stopping",
    "look_alphas",
    "looks",
    "lower_bounds",
    "sequential_estimates",
]

FIRST_LOOK = 100
GROWTH = 1.25
#: inputs certified at a time
WINDOW = 256


class Estimate(NamedTuple):
    """Where one input stopped: its position in ``x``, the class ``c_a``, the lower bound
    ``p_lower`` on its probability, its ``hits`` (votes for ``c_a``) among the ``draws``
    estimation draws, and
    ``seconds`` (its share of the forwards' wall-clock time)."""

    position: int
    c_a: int
    p_lower: float
    hits: int
    draws: int
    seconds: float


def looks(max_n: int) -> list[int]:
    """The estimation draws after which the bounds are computed: ``min(100, max_n)``, then
    each ``ceil(1.25 x)`` the last, ending at ``max_n``."""
    out = [min(FIRST_LOOK, max_n)]
    while out[-1] < max_n:
        out.append(min(max_n, math.ceil(out[-1] * GROWTH)))
    return out


def look_alphas(alpha: float, k: int) -> np.ndarray:
    """The levels of ``k`` looks: ``alpha_j = (alpha / 2) 5 / ((j+4)(j+5))`` for j = 1..k-1
    (``5 (1/(j+4) - 1/(j+5))`` telescopes to at most 1) and ``alpha / 2`` for the last: their
    sum is at most ``alpha``."""
    j = np.arange(1, k + 1, dtype=np.float64)
    out = 2.5 * alpha / ((j + 4) * (j + 5))
    out[-1] = alpha / 2
    return out


def lower_bounds(count: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bounds, element-wise (0 at count 0)."""
    count, n = np.asarray(count, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore"):
        low = beta.ppf(alpha, count, n - count + 1)
    return np.where(count > 0, low, 0.0)


def _upper_bounds(count: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    count, n = np.asarray(count, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore"):
        up = beta.ppf(1 - alpha, count + 1, n - count)
    return np.where(count < n, up, 1.0)


def radii(
    p: np.ndarray, noise: str, sigma: float, radius_of: Callable[[float], float]
) -> np.ndarray:
    """The certified radius of each probability bound of ``p`` (0 at ``p <= 1/2``):
    vectorised for Gaussian (``sigma Phi^-1(p)``) and Laplace (``-sigma log(2 (1 - p))``)
    noise, ``radius_of`` element by element otherwise."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if noise == "gaussian":
            r = sigma * ndtri(p)
        elif noise == "laplace":
            r = -sigma * np.log(2 * (1 - p))
        else:
            r = np.array([radius_of(float(q)) if q > 0.5 else 0.0 for q in p.ravel()])
    return np.where(p > 0.5, r.reshape(p.shape), 0.0)


class Stopping(NamedTuple):
    """The options of the stopping rule, in the units of the radius: ``tolerance`` (the grid
    step ``t``), ``min_radius`` and ``max_radius`` (see the module docstring)."""

    tolerance: float
    min_radius: float
    max_radius: float


def _cell(r: np.ndarray, p: np.ndarray, rule: Stopping) -> np.ndarray:
    """The grid cell of radius ``r`` (of bound ``p``): -1 for an abstention (``p <= 1/2``)."""
    return np.where(p > 0.5, np.floor(r / rule.tolerance), -1.0)


def _stops(
    count: np.ndarray,
    k: np.ndarray,
    grid: list[int],
    alphas: np.ndarray,
    rad: Callable[[np.ndarray], np.ndarray],
    rule: Stopping,
) -> tuple[np.ndarray, np.ndarray]:
    """``(stop, L)`` at look ``k`` (0-based, per input) with ``count`` votes for ``c_A``."""
    n_k = np.asarray(grid)[k]
    low = lower_bounds(count, n_k, alphas[k])
    up = _upper_bounds(count, n_k, alphas[k])
    later = np.arange(len(grid))[None, :] > k[:, None]  # (inputs, looks)
    best = lower_bounds(
        count[:, None] + np.asarray(grid)[None, :] - n_k[:, None],
        np.asarray(grid)[None, :],
        alphas[None, :],
    )
    best = np.where(later, best, 0.0).max(1, initial=0.0)
    ceiling = np.minimum(up, np.maximum(low, best))
    r_low, r_ceiling = rad(low), rad(ceiling)
    decided = _cell(r_low, low, rule) == _cell(r_ceiling, ceiling, rule)
    enough = (low > 0.5) & (r_low >= rule.max_radius)
    unreachable = (ceiling <= 0.5) | (r_ceiling < rule.min_radius)
    return decided | enough | unreachable | (k == len(grid) - 1), low


def _per_input(
    gens: list[torch.Generator | None], device: torch.device
) -> list[torch.Generator | None]:
    """Own generators: kept if distinct, else seeded from the shared one (input order)."""
    if len({id(g) for g in gens}) == len(gens) and None not in gens:
        return gens
    g = gens[0]
    seeds = torch.randint(
        0, 2**62, (len(gens),), generator=g, device=g.device if g is not None else "cpu"
    ).tolist()
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def sequential_estimates(
    model: nn.Module,
    x: Tensor,
    gens: list[torch.Generator | None],
    *,
    sigma: float,
    n0: int,
    max_n: int,
    alpha: float,
    noise: str,
    batch_size: int | None,
    radius_tolerance: float | None,
    min_radius: float,
    max_radius: float | None,
    radius_of: Callable[[float], float],
) -> Iterator[Estimate]:
    """One :class:`Estimate` per input of ``x`` as it stops (any order); the procedure and its
    guarantee are in the module docstring. ``radius_of``: the certified radius of a bound.
    The options are checked at the call."""
    max_n = positive_int(max_n, "max_n (the most estimation draws per input)")
    if radius_tolerance is None:
        radius_tolerance = 1.0 if noise == "uniform-l0" else sigma / 4
    rule = Stopping(
        number(
            radius_tolerance,
            "radius_tolerance (the radius grid's step, input units, e.g. sigma / 4)",
            low=0,
            low_open=True,
        ),
        number(min_radius, "min_radius (input units)", low=0),
        math.inf
        if max_radius is None
        else number(max_radius, "max_radius (input units, None: no limit)", low=0, low_open=True),
    )
    gens = _per_input(gens, x.device)
    grid = looks(max_n)
    alphas = look_alphas(alpha, len(grid))
    draw, batch = sizes(model, x, len(x) * (n0 + max_n // 10), batch_size)

    def rad(p: np.ndarray) -> np.ndarray:
        return radii(p, noise, sigma, radius_of)

    return _rounds(
        model,
        x,
        gens,
        n0=n0,
        grid=grid,
        alphas=alphas,
        sigma=sigma,
        noise=noise,
        draw=draw,
        batch=batch,
        stops=lambda c, k: _stops(c, k, grid, alphas, rad, rule),
    )


def _rounds(
    model: nn.Module,
    x: Tensor,
    gens: list[torch.Generator | None],
    *,
    n0: int,
    grid: list[int],
    alphas: np.ndarray,
    sigma: float,
    noise: str,
    draw: int,
    batch: int,
    stops: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> Iterator[Estimate]:
    """Each round takes every active input to its next look (new inputs: ``n0`` selection
    draws, then their first look), in one stream of forwards, then yields those that stop."""
    waiting = list(range(len(x)))[::-1]
    active: list[int] = []
    c_a: dict[int, int] = {}
    count: dict[int, int] = {}
    look: dict[int, int] = {}
    secs = dict.fromkeys(range(len(x)), 0.0)
    while waiting or active:
        new = [waiting.pop() for _ in range(min(len(waiting), WINDOW - len(active)))]
        jobs = [(x[i : i + 1], n0, gens[i]) for i in new]
        plan = new + active
        jobs += [
            (
                x[i : i + 1],
                grid[look.get(i, 0)] - (grid[look[i] - 1] if look.get(i) else 0),
                gens[i],
            )
            for i in plan
        ]
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(model):
            votes = count_votes(
                job_logits(model, jobs, sigma=sigma, noise=noise, draw=draw, batch=batch), len(jobs)
            ).cpu()
        rows = np.array([j[1] for j in jobs[len(new) :]], np.float64) + n0 * np.isin(plan, new)
        share = (time.perf_counter() - t0) * rows / rows.sum()
        for j, i in enumerate(new):
            c_a[i], look[i], count[i] = int(votes[j].argmax()), 0, 0
        for j, i in enumerate(plan):
            count[i] += int(votes[len(new) + j, c_a[i]])
            secs[i] += float(share[j])
        k = np.array([look[i] for i in plan])
        stop, low = stops(np.array([count[i] for i in plan], np.float64), k)
        active = []
        for j, i in enumerate(plan):
            if stop[j]:
                yield Estimate(i, c_a[i], float(low[j]), count[i], grid[k[j]], secs[i])
            else:
                look[i] += 1
                active.append(i)

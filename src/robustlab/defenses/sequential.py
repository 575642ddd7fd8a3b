"""Anytime-valid sequential estimation of ``p_A`` for CERTIFY: stop drawing once the radius is
decided.

Method: a union bound over a geometric schedule of looks with a Clopper-Pearson bound at each
look, the baseline of Voráček, "Treatment of Statistical Estimation Problems in Randomized
Smoothing for Adversarial Robustness", NeurIPS 2024, arXiv:2406.17830 (confidence sequences in
general: Howard, Ramdas, McAuliffe, Sekhon, Ann. Statist. 2021, arXiv:1810.08240;
Waudby-Smith, Ramdas, JRSS-B 2024, arXiv:2010.09686). After the class ``c_A`` is chosen on
``n0`` separate selection draws (as in Cohen et al.'s CERTIFY, :mod:`robustlab.defenses.certify`),
estimation draws are looked at after ``N_1 < N_2 < ... < N_K = max_n`` of them
(:func:`looks`: ``N_1 = max(100, max_n / 100)``, then ``x 1.25``). At look ``k`` with ``A_k``
votes for ``c_A``,

    L_k = Clopper-Pearson lower bound of A_k / N_k at level alpha_k,
    alpha_k = (9 alpha / 10) / (K - 1) for k < K,  alpha_K = alpha / 10.

Since ``sum_k alpha_k = alpha`` (:func:`look_alphas`) and each bound holds at its fixed
``N_k``, ``P(exists k: p_A < L_k) <= alpha``: the lower bounds hold *together*, so ``L_tau`` is
a ``1 - alpha`` lower bound at any look ``tau`` chosen from the data, and the returned radius
(from ``L_tau``, as CERTIFY's) is certified with probability at least ``1 - alpha``, whatever
stopped it. The levels are spread evenly because the inputs that need many draws (radii near a
multiple of the tolerance) stop late, where a decaying schedule has little left. An input that
needs every draw gets a bound at level ``alpha / 10`` on the ``max_n`` draws, where fixed-N
CERTIFY has ``alpha``; the first look waits for ``max_n / 100`` draws, so fewer looks share
``alpha``.

Stopping rule, at each look. ``U_k`` is the Clopper-Pearson upper bound of ``A_k / N_k`` at
level ``gamma / K``, with ``gamma =`` :data:`PROJECTION_LEVEL` (0.3), and the ceiling ``c_k``
is the largest lower bound a later look ``j`` would give if the draws up to it voted for
``c_A`` at the rate ``U_k`` (``L_j`` of ``A_k + (N_j - N_k) U_k`` votes): what the remaining
draws can still certify, seen optimistically. With ``t = radius_tolerance``, stop when

- ``radius(L_k)`` and ``radius(max(L_k, c_k))`` lie in the same cell ``[j t, (j+1) t)``
  (decided: more draws would not certify the next multiple of ``t``; an abstention,
  ``L_k <= 1/2``, is a cell of its own),
- ``radius(L_k) >= max_radius`` (nothing larger is of interest),
- ``max(L_k, c_k) <= 1/2`` or ``radius(max(L_k, c_k)) < min_radius`` (out of reach), or at
  ``max_n``.

The rule only chooses when to stop, so it leaves the guarantee above untouched. It is built so
that certified accuracy at the multiples of ``t`` up to ``max_radius`` is what ``max_n`` fixed
draws give: a stop for a decided cell loses the next multiple only if ``p_A > U_k`` at that look
(probability at most ``gamma / K``; at most ``gamma`` over all looks) or if the fixed draws
would land luckily high. An input whose radius sits just above a multiple of ``t`` draws to
``max_n``; one on it stops once the remaining draws cannot certify it. Cost: ``n0 + N_tau``
draws per input, ``N_tau <= 1.25 x`` the draws the rule needed. Differences from the reference
(github.com/vvoracek/RS_conf_seq): its baseline tests a fixed radius with growth 1.1; here the
radius is estimated to a grid of radii, with growth 1.25 (fewer looks, so larger ``alpha_k``),
the projected early stops, and a tenth of ``alpha`` on the last look. The constants were
chosen by replaying the rule on the votes of the Fashion-MNIST benchmark's fixed-N runs
(``benchmarks/certify_sequential.py``, ``benchmarks/_certify_replay.py``).

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
    "PROJECTION_LEVEL",
    "WINDOW",
    "Estimate",
    "Stopping",
    "look_alphas",
    "looks",
    "lower_bounds",
    "replay",
    "sequential_estimates",
]

#: the fewest estimation draws before the first look
FIRST_LOOK = 100
GROWTH = 1.25
#: the level of the upper bound on ``p_A`` that projects what the remaining draws can certify
#: (it steers the stopping only; the certificate rests on the lower bounds alone), spread over
#: the looks
PROJECTION_LEVEL = 0.3
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
    """The estimation draws after which the bounds are computed: ``max(100, max_n // 100)``
    (at most ``max_n``), then each ``ceil(1.25 x)`` the last, ending at ``max_n``."""
    out = [min(max(FIRST_LOOK, max_n // 100), max_n)]
    while out[-1] < max_n:
        out.append(min(max_n, math.ceil(out[-1] * GROWTH)))
    return out


def look_alphas(alpha: float, k: int) -> np.ndarray:
    """The levels of ``k`` looks: ``alpha / 10`` for the last and ``(9 alpha / 10) / (k - 1)``
    for each of the others (``alpha`` for a single look); their sum is ``alpha``."""
    if k == 1:
        return np.array([alpha], np.float64)
    out = np.full(k, 0.9 * alpha / (k - 1), np.float64)
    out[-1] = alpha / 10
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
    p: np.ndarray, noise: str, sigma: float, radius_of: Callable[[float], float] | None
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
        elif radius_of is None:
            raise ValueError(f"radii: {noise!r} noise needs radius_of (the radius of a bound)")
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
    looks_n = np.asarray(grid, np.float64)
    n_k = looks_n[k]
    low = lower_bounds(count, n_k, alphas[k])
    rate = _upper_bounds(count, n_k, np.full_like(n_k, PROJECTION_LEVEL / len(grid)))
    later = np.arange(len(grid))[None, :] > k[:, None]  # (inputs, looks)
    projected = lower_bounds(
        count[:, None] + (looks_n[None, :] - n_k[:, None]) * rate[:, None],
        looks_n[None, :],
        alphas[None, :],
    )
    ceiling = np.maximum(low, np.where(later, projected, 0.0).max(1, initial=0.0))
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


def replay(
    paths: np.ndarray, *, sigma: float, max_n: int, alpha: float, rule: Stopping, noise: str
) -> tuple[np.ndarray, np.ndarray]:
    """Where the stopping rule stops on recorded votes, without a model: ``paths[i, k]`` is
    path ``i``'s votes for ``c_A`` after the first ``looks(max_n)[k]`` estimation draws.
    Returns each path's ``(draws, p_lower)``; Gaussian or Laplace ``noise``. For studying the
    rule (``benchmarks/certify_sequential.py`` replays reorderings of fixed-N runs' votes)."""
    grid = looks(max_n)
    paths = np.asarray(paths, np.float64)
    if paths.ndim != 2 or paths.shape[1] != len(grid):
        raise ValueError(
            f"replay: paths must be (paths, {len(grid)}): the votes at each of looks({max_n}), "
            f"got shape {paths.shape}"
        )
    alphas = look_alphas(alpha, len(grid))
    stop_at = np.full(len(paths), len(grid) - 1)
    p_lower = np.zeros(len(paths))
    active = np.arange(len(paths))
    for k in range(len(grid)):
        stop, low = _stops(
            paths[active, k],
            np.full(len(active), k),
            grid,
            alphas,
            lambda p: radii(p, noise, sigma, None),
            rule,
        )
        stop_at[active[stop]], p_lower[active[stop]] = k, low[stop]
        active = active[~stop]
    return np.asarray(grid)[stop_at], p_lower


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

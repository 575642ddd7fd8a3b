"""Certification stays exact: :func:`robustlab.defenses.certify_iter` and
:func:`robustlab.defenses.predict`, fed given vote counts, agree with Cohen et al.'s formulas
(the reference code, locuslab/smoothing ``code/core.py``), written out here with SciPy:

- CERTIFY: ``c_A`` = argmax of the ``n0`` selection counts (the first class on a tie, as
  NumPy's argmax); ``p_A`` = the one-sided ``1 - alpha`` Clopper-Pearson lower bound on the
  ``n`` estimation counts of ``c_A``, ``beta.ppf(alpha, k, n - k + 1)`` (the reference's
  ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``; 0 at k = 0); abstain if
  ``p_A < 1/2``, else the radius ``sigma * Phi^-1(p_A)`` (Gaussian, l2) or
  ``-sigma * log(2 * (1 - p_A))`` (Laplace, l1);
- PREDICT: the top two counts ``n_A >= n_B``; abstain unless the two-sided binomial test of
  ``n_A`` out of ``n_A + n_B`` at p = 1/2 has a p-value <= alpha, else the top class.

A scripted base model emits exactly the given votes, so the decisions, bounds and radii are
compared to 1e-10, independent of any sampling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, binomtest, norm
from torch import nn

from robustlab.defenses import ABSTAIN, certify_iter, predict

TOL = 1e-10


class Scripted(nn.Module):
    """A base classifier whose predictions, call after call, are the given votes: the classes
    of ``counts[0]`` (one count per class), then of ``counts[1]``, ...; the input is ignored.
    It raises if asked for more predictions than scripted."""

    def __init__(self, *counts: list[int]) -> None:
        super().__init__()
        self.k = len(counts[0])
        self.labels = torch.cat(
            [torch.arange(self.k).repeat_interleave(torch.tensor(c)) for c in counts]
        )
        self.used = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.used + len(x) > len(self.labels):
            raise AssertionError("more noise draws than scripted votes")
        out = self.labels[self.used : self.used + len(x)]
        self.used += len(x)
        return F.one_hot(out, self.k).to(x.dtype)


# --- the reference formulas, written out ---------------------------------------------------


def reference_lower_bound(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def reference_certify(
    selection: list[int], estimation: list[int], alpha: float, sigma: float, noise: str
) -> tuple[int, float, float]:
    """``(decision, radius, p_lower)`` of Cohen et al.'s CERTIFY from the counts."""
    c_a = int(np.argmax(selection))
    p_a = reference_lower_bound(estimation[c_a], sum(estimation), alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0, p_a
    if noise == "gaussian":
        return c_a, float(sigma * norm.ppf(p_a)), p_a
    return c_a, float(-sigma * math.log(2 * (1 - p_a))), p_a


def reference_predict(counts: list[int], alpha: float) -> int:
    order = np.argsort(counts, kind="stable")[::-1]
    n_a, n_b = counts[order[0]], counts[order[1]]
    if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


# --- the table -------------------------------------------------------------------------------

CERTIFY_CASES = {
    # name: (selection counts (n0 draws), estimation counts (n draws), alpha)
    "typical": ([90, 10, 0], [8500, 1000, 500], 0.001),
    "k = n": ([100, 0, 0], [1000, 0, 0], 0.001),
    "k = n, large n": ([100, 0, 0], [100_000, 0, 0], 0.001),
    "k = 0": ([100, 0, 0], [0, 1000, 0], 0.001),
    "one below the boundary": ([100, 0, 0], [549, 451, 0], 0.001),  # p_A = 0.49967
    "one above the boundary": ([100, 0, 0], [550, 450, 0], 0.001),  # p_A = 0.50068
    # the class selected has fewer estimation votes than another one: the reference abstains
    # (it does not switch to the other class)
    "selected class loses the estimation": ([60, 40, 0], [400, 600, 0], 0.001),
    "selection tie goes to the first class": ([0, 50, 50], [0, 900, 100], 0.01),
    "selection tie, first class loses": ([50, 50, 0], [300, 700, 0], 0.01),
    "high alpha": ([7, 3], [60, 40], 0.3),
    "many classes": ([1, 2, 3, 94], [10, 20, 30, 940], 1e-5),
}


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
@pytest.mark.parametrize("name", list(CERTIFY_CASES))
def test_certify_matches_the_reference_formulas(name, noise):
    selection, estimation, alpha = CERTIFY_CASES[name]
    sigma = 0.37
    model = Scripted(selection, estimation)
    n0, n = sum(selection), sum(estimation)
    (cert,) = certify_iter(
        model,
        torch.full((1, 1, 2, 2), 0.5),
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        noise=noise,
        batch_size=333,
    )
    assert model.used == n0 + n  # n0 selection draws, then n fresh estimation draws
    decision, radius, p_lower = reference_certify(selection, estimation, alpha, sigma, noise)
    assert cert.prediction == decision, (name, cert)
    assert cert.count == estimation[int(np.argmax(selection))]
    assert abs(cert.p_lower - p_lower) <= TOL, (name, cert.p_lower, p_lower)
    assert abs(cert.radius - radius) <= TOL, (name, cert.radius, radius)
    assert cert.norm == {"gaussian": "l2", "laplace": "l1"}[noise]


def test_the_table_covers_both_decisions():
    """The table has teeth: certified cases with positive radii and abstentions."""
    decisions = [reference_certify(s, e, a, 0.37, "gaussian") for s, e, a in CERTIFY_CASES.values()]
    assert sum(d == ABSTAIN for d, _, _ in decisions) >= 3
    assert sum(d != ABSTAIN and r > 0 for d, r, _ in decisions) >= 5


@pytest.mark.parametrize("k, alpha", [(2, 0.25), (3, 0.125)])
def test_certify_exactly_at_the_one_half_boundary(k, alpha):
    """``p_A = alpha^(1/n) = 1/2`` exactly at k = n. The radius is 0 for both rules; the
    decision follows the paper's CERTIFY ("if p_A > 1/2 return c_A", Cohen et al. 2019),
    which robustlab's docstring promises: abstain. (The reference code tests ``pABar < 0.5``
    and returns c_A with radius 0.0 here: a tie at 1/2 certifies nothing, as p_B may be 1/2.)"""
    assert reference_lower_bound(k, k, alpha) == 0.5
    (cert,) = certify_iter(
        Scripted([5, 0], [k, 0]), torch.full((1, 1, 2, 2), 0.5), sigma=0.5, n0=5, n=k, alpha=alpha
    )
    assert cert.p_lower == 0.5 and cert.radius == 0.0 and cert.count == k
    assert cert.prediction == ABSTAIN


PREDICT_CASES = {
    # name: (counts of the n draws, alpha)
    "clear winner": ([70, 30, 0], 0.05),
    "not significant": ([60, 40, 0], 0.05),  # p-value 0.0569
    "just significant": ([61, 39, 0], 0.05),  # p-value 0.0352
    "tie of the top two": ([50, 50, 0], 0.05),
    "tie after a third class": ([10, 45, 45], 0.05),
    "top class not first": ([3, 80, 17], 0.001),
    "unanimous": ([0, 0, 100], 0.001),
    # the p-value 2 * 2^-5 = 0.0625 equals alpha: predict (abstain only above alpha)
    "p-value equal to alpha": ([5, 0], 0.0625),
    "p-value just above alpha": ([5, 0], 0.0624),
    "many draws": ([50_300, 49_700, 0, 0], 0.1),
}


@pytest.mark.parametrize("name", list(PREDICT_CASES))
def test_predict_matches_the_reference_formula(name):
    counts, alpha = PREDICT_CASES[name]
    model = Scripted(counts)
    (out,) = predict(
        model, torch.full((1, 1, 2, 2), 0.5), sigma=0.25, n=sum(counts), alpha=alpha, batch_size=64
    ).tolist()
    assert model.used == sum(counts)
    assert out == reference_predict(counts, alpha), (name, out)


def test_predict_table_covers_both_decisions():
    outs = [reference_predict(c, a) for c, a in PREDICT_CASES.values()]
    assert outs.count(ABSTAIN) >= 4 and len(outs) - outs.count(ABSTAIN) >= 4

"""The certificate of distributional robustness of WRM (Sinha, Namkoong, Duchi, "Certifying
Some Distributional Robustness with Principled Adversarial Training", ICLR 2018,
arXiv:1710.10571, Theorem 3; reference code
github.com/duchi-lab/certifiable-distributional-robustness).

For every rho >= 0 and every gamma >= 0, weak duality gives

    sup_{P : W_c(P, P_n) <= rho} E_P l(x, y)  <=  gamma * rho + E_{P_n}[ phi_gamma(x0, y) ],
    phi_gamma(x0, y) = sup_x { l(x, y) - gamma * ||x - x0||_2^2 },

with c = ||x - x0||_2^2 (labels fixed) and P_n the evaluated points. The paper adds a
finite-sample term eps_n(t) (with probability >= 1 - e^-t) to reach the population P0; its form
is not verified here, so this module reports the empirical part only: a statement about the
distribution of the n points given, not about the data set they were drawn from.

phi_gamma is computed by the ascent T of :func:`robustlab.attacks.wrm.wrm_ascent`. The bound is
a certificate only if T reaches the supremum, which the paper guarantees when gamma exceeds
the smoothness constant of l in x (smooth activations: softplus, ELU; no ReLU, no max-pooling);
an ascent stopped short, or at a local maximum, underestimates phi_gamma and so the bound.
The distance of T from stationarity is reported for that reason; smoothness is not checked.

The data-dependent radius rho_hat = E_{P_n}[c(T(x0), x0)] is the paper's choice: at rho_hat
the bound equals the mean loss at the points T(x0) (by construction, since phi_gamma = l(T) -
gamma c(T)), the worst-case loss the ascent achieved at that transport budget; the paper's
figure plots the bound against rho next to that achieved loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import (
    check_inputs,
    check_labels,
    integer,
    number,
    positive_int,
    probe_model,
)
from robustlab.attacks.wrm import smoothed_ce, transport_cost, value_and_grad, wrm_ascent

__all__ = ["FINITE_SAMPLE_NOTE", "wrm_certificate"]

FINITE_SAMPLE_NOTE = (
    "omitted: the bounds are the empirical part gamma * rho + mean phi_gamma "
    "over these n points; the paper's finite-sample term eps_n(t), whose "
    "form is unverified here, is not added"
)


def _rhos(rhos: Iterable[Any]) -> list[float]:
    try:
        values = list(rhos)
    except TypeError:
        raise TypeError(
            f"rhos must be a list of transport budgets >= 0 (squared l2 input "
            f"units), e.g. [0.0, 0.5, 1.0], got {rhos!r}"
        ) from None
    return [number(r, "wrm rho", low=0) for r in values]


def _batch(model: nn.Module, x0: Tensor, y: Tensor, gamma: float, steps: int) -> dict[str, Tensor]:
    """Per-sample values (N,) on one batch: loss at T, transport cost, clean loss, correct at T,
    and the step residual ||grad l(T) / (2 gamma) - (T - x0)||_2 (input units)."""

    def loss(xa: Tensor) -> Tensor:
        return smoothed_ce(model(xa), y)

    t = wrm_ascent(loss, x0, gamma, steps)
    loss_t, g = value_and_grad(loss, t)
    with torch.no_grad():
        clean = loss(x0)
        correct = model(t).argmax(1) == y
    residual = (g / (2 * gamma) - (t - x0)).flatten(1).norm(dim=1)
    return {
        "loss_t": loss_t,
        "cost": transport_cost(t, x0),
        "clean": clean,
        "correct": correct,
        "residual": residual,
    }


def wrm_certificate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    gamma: float,
    rhos: Iterable[float],
    steps: int = 15,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """The empirical WRM certificate of ``model``'s cross-entropy at the points ``(x, y)``.

    Args:
        model: a classifier; run in eval mode, its mode given back afterwards.
        x: (N, C, H, W) inputs (units of the certificate: squared l2 distances of these).
        y: (N,) labels.
        gamma: the penalty gamma > 0 per squared l2 input unit (as the ``wrm`` objective's).
        rhos: transport budgets rho >= 0, mean squared l2 distance per point.
        steps: ascent steps after the first (>= 0). Default 15, the reference's.
        batch_size: points per ascent (>= 1).

    Returns:
        A JSON-able dict: ``gamma``, ``steps``, ``n``; ``certificate``: for each rho of
        ``rhos``, ``{"rho": rho, "bound": gamma * rho + phi_mean}``, an upper bound on the
        mean cross-entropy (nats) under any distribution within W_c <= rho of the n points,
        valid if the ascent reached the supremum (see the module docstring); ``phi_mean``
        (mean phi_gamma, nats); ``rho_hat`` (mean ||T(x0) - x0||_2^2); ``loss_at_rho_hat``
        (mean cross-entropy at T(x0), which equals the bound at rho_hat);
        ``accuracy_at_rho_hat`` (fraction of T(x0) still classified as y); ``clean_loss``;
        ``step_residual_mean`` / ``_max`` (||grad l(T) / (2 gamma) - (T - x0)||_2, input
        units: 0 at a stationary point of the ascent); ``finite_sample_term``
        (:data:`FINITE_SAMPLE_NOTE`).

    Cost: (steps + 2) forward/backward passes and 2 forwards per point.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y)
    gamma = number(gamma, "wrm gamma", low=0, low_open=True)
    steps = integer(steps, "wrm steps", minimum=0)
    batch_size = positive_int(batch_size, "batch_size")
    budgets = _rhos(rhos)
    parts: list[dict[str, Tensor]] = []
    with eval_mode(model):
        check_labels(y, probe_model(model, x[:2]).shape[1])
        for i in range(0, len(x), batch_size):
            parts.append(
                _batch(model, x[i : i + batch_size].detach(), y[i : i + batch_size], gamma, steps)
            )
    per = {key: torch.cat([p[key] for p in parts]).double() for key in parts[0]}
    n = len(x)
    loss_t, rho_hat = float(per["loss_t"].mean()), float(per["cost"].mean())
    phi_mean = float((per["loss_t"] - gamma * per["cost"]).mean())
    return {
        "gamma": gamma,
        "steps": steps,
        "n": n,
        "certificate": [{"rho": r, "bound": gamma * r + phi_mean} for r in budgets],
        "phi_mean": phi_mean,
        "rho_hat": rho_hat,
        "loss_at_rho_hat": loss_t,
        "accuracy_at_rho_hat": float(per["correct"].mean()),
        "clean_loss": float(per["clean"].mean()),
        "step_residual_mean": float(per["residual"].mean()),
        "step_residual_max": float(per["residual"].max()),
        "finite_sample_term": FINITE_SAMPLE_NOTE,
    }

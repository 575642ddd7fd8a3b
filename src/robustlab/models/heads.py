"""Alternative classifier heads; ``models.create(..., head="mmc")`` attaches one.

MMC (Pang, Xu, Dong, Du, Chen, Zhu, "Rethinking Softmax Cross-Entropy Loss for Adversarial
Robustness", ICLR 2020, https://arxiv.org/abs/1905.10626): the features are pulled towards
fixed, maximally separated class centers mu_1..mu_L (the Max-Mahalanobis centers of Pang, Du,
Zhu, ICML 2018), and the head's "logits" are ``-||z - mu_i||^2``: prediction is the nearest
center, and the ``mmc`` training objective is ``0.5 ||z - mu_y||^2 = -0.5 logits[y]``.

As in the reference code (``utils/model.py`` of P2333/Max-Mahalanobis-Training), the feature
z is a learnable linear map (no activation) of the network's penultimate representation: the
:class:`MMCHead` replaces the model's final ``nn.Linear`` (in -> num_classes) by
``nn.Linear(in, feature_dim)`` followed by the fixed centers. Without that map, ReLU features
(all >= 0) could not reach centers with negative coordinates.

:class:`ClassLogits` reads the K class logits of a network with an extra (K + 1)-th output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int

__all__ = ["HEADS", "ClassLogits", "MMCHead", "attach", "check_extra_class", "mmc_centers"]

HEADS = ("mmc",)


def mmc_centers(num_classes: int, dim: int, c_mm: float = 10.0) -> Tensor:
    """The Max-Mahalanobis centers: ``num_classes`` vectors in R^dim (float64, CPU), with
    ``||mu_i||^2 = c_mm`` and ``<mu_i, mu_j> = -c_mm / (L - 1)`` for i != j (the vertices of a
    regular simplex centred at 0, the largest possible minimum distance between L points
    on the sphere).

    Deterministic recursive construction (MMLDA, Pang et al. 2018): mu_1 = e_1; mu_k's first
    k - 1 coordinates solve the triangular system ``<mu_k, mu_j> = -1/(L-1)`` for j < k, its
    k-th coordinate makes it a unit vector, the rest are 0; then all are scaled by sqrt(c_mm).
    The last center's L-th coordinate is 0 by construction, not computed: the simplex spans
    L - 1 dimensions, and sqrt(1 - ||mu_L[:L-1]||^2) is a cancellation that leaves a stray
    1e-8 on some machines. Only the first L - 1 coordinates are used, hence ``dim >= L - 1``.
    """
    if num_classes < 2:
        raise ValueError(f"MMC centers need at least 2 classes, got {num_classes}")
    if dim < num_classes - 1:
        raise ValueError(
            f"MMC needs a feature dimension >= num_classes - 1 = "
            f"{num_classes - 1}, got {dim}; pass head_options="
            f"{{'feature_dim': {num_classes - 1}}} or more"
        )
    n = num_classes
    mu = torch.zeros(n, max(dim, n), dtype=torch.float64, device="cpu")
    mu[0, 0] = 1.0
    for k in range(1, n):
        target = torch.full((k, 1), -1.0 / (n - 1), dtype=torch.float64, device="cpu")
        lower = mu[:k, :k]  # row j: mu_j, non-zero only up to coordinate j
        mu[k, :k] = torch.linalg.solve_triangular(lower, target, upper=False)[:, 0]
        if k < n - 1:
            mu[k, k] = (1.0 - mu[k, :k].square().sum()).clamp_min(0.0).sqrt()
    return mu[:, :dim] * math.sqrt(c_mm)


class MMCHead(nn.Module):
    """``-||W h + b - mu_i||^2`` for every class i: the Max-Mahalanobis center head.

    Args:
        in_features: size of the representation h the replaced ``nn.Linear`` took.
        num_classes: number of centers L (>= 2).
        c_mm: squared norm of every center (> 0; the reference's ``mean_var``, 10 by default).
        feature_dim: size of the feature z = W h + b (>= L - 1); ``None`` means in_features.

    ``centers`` (L, feature_dim) is a buffer, not a parameter: saved with the weights, never
    trained. Shapes: input (N, in_features), output (N, L), all values <= 0.
    """

    centers: Tensor

    def __init__(
        self, in_features: int, num_classes: int, c_mm: float = 10.0, feature_dim: int | None = None
    ) -> None:
        super().__init__()
        dim = in_features if feature_dim is None else feature_dim
        self.dense = nn.Linear(in_features, dim)
        centers = mmc_centers(num_classes, dim, c_mm)
        self.register_buffer(
            "centers", centers.to(self.dense.weight.device, self.dense.weight.dtype)
        )

    def features(self, h: Tensor) -> Tensor:
        """z = W h + b, shape (N, feature_dim)."""
        return self.dense(h)

    def forward(self, h: Tensor) -> Tensor:
        z = self.features(h)
        mu = self.centers
        return 2 * z @ mu.T - z.square().sum(1, keepdim=True) - mu.square().sum(1)


def attach(
    model: nn.Module,
    head: str,
    num_classes: int,
    c_mm: float = 10.0,
    feature_dim: int | None = None,
) -> dict[str, Any]:
    """Replace the last ``nn.Linear`` of ``model`` (its classifier, which must output
    ``num_classes`` values) by the head ``head``, in place.

    Returns:
        The head options with defaults filled in (JSON-able), as ``models.create`` records.

    Raises:
        ValueError: unknown head, bad ``c_mm`` or ``feature_dim``, no final linear layer with
            ``num_classes`` outputs, or a feature dimension < num_classes - 1.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    c_mm = number(c_mm, "mmc c_mm", low=0, low_open=True)
    if feature_dim is not None:
        feature_dim = positive_int(feature_dim, "mmc feature_dim")
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears or linears[-1][1].out_features != num_classes:
        raise ValueError(
            f"{type(model).__name__} has no final nn.Linear with {num_classes} "
            "outputs for the MMC head to replace"
        )
    name, old = linears[-1]
    new = MMCHead(old.in_features, num_classes, float(c_mm), feature_dim)
    new.to(old.weight.device, old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return {"c_mm": float(c_mm), "feature_dim": new.dense.out_features}


def check_extra_class(outputs: Tensor) -> Tensor:
    """``outputs`` unchanged if they are (N, K + 1) logits with K >= 2 classes (the extra class
    last); ValueError naming the recipe otherwise."""
    if outputs.dim() != 2 or outputs.shape[1] < 3:
        raise ValueError(
            f"the extra-class model must return (N, K + 1) logits with K >= 2 "
            f"classes and the extra class last; it returned "
            f"{tuple(outputs.shape)}: build it with num_classes = K + 1 (the "
            "extra-class recipe)"
        )
    return outputs


class ClassLogits(nn.Module):
    """The first K outputs of a model with K + 1: ``model(x)[:, :-1]``, the class logits of a
    network trained with an extra "adversarial" class (the ``extra-class`` objective and
    detector, Grosse et al. 2017). ``model`` is kept as the submodule ``model``; the wrapper
    starts in ``model``'s mode (so that code which gives a module its mode back leaves the
    model as it was)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, x: Tensor) -> Tensor:
        return check_extra_class(self.model(x))[:, :-1]

"""PCA detection: adversarial images put abnormal variance in the trailing principal components.

Hendrycks, Gimpel, "Early Methods for Detecting Adversarial Images", ICLR 2017 workshop,
arXiv:1608.00530 ("PCA whitening adversarial images"; we know of no reference code from the
authors; Carlini & Wagner's re-implementation, github.com/carlini/nn_breaking_detection
``pca_detection.py``, plots mean absolute coefficients per component and fixes no index)
[checked against the paper's description of its Figure 1: the j-th coefficient is the j-th
entry of ``Sigma^{-1/2} U^T x``; the full text was not available here].

PCA is fitted on the flattened clean training inputs ``x`` (D = C H W values in [0, 1]): mean
``mu``, covariance ``S = sum_i (x_i - mu)(x_i - mu)^T / (n - 1)``, eigenpairs ``(lambda_j, u_j)``
sorted by decreasing variance ``lambda_1 >= lambda_2 >= ...``. The whitened coefficients of an
input are the paper's ``Sigma^{-1/2} U^T x`` (``Sigma = diag(lambda)``; centred here):

    ``c_j(x) = u_j^T (x - mu) / sqrt(lambda_j)``,   j = 1 .. r

(each has mean 0 and variance 1 over the fitting points), and the score is the variance of the
last ``k`` of them, the lowest-ranked components, about their mean 0 over the data:

    ``score(x) = (1/k) sum_{j > r-k} c_j(x)^2``

(about 1 for clean inputs, larger for adversarial ones by the paper's observation). The
paper's "variance of the coefficients" could also be read as ``numpy.var`` over the k values,
which subtracts their average ``cbar(x)``; that average depends on the arbitrary sign of each
eigenvector, so we take the variance about the known mean 0, which does not (the two differ by
``cbar(x)^2``, small for large k).

``r`` counts the components with ``lambda_j > rtol lambda_1``: the directions in which the
fitting data do not vary (constant pixels; at most ``n - 1`` components exist for ``n``
points) have no defined whitened coefficient and are left out.

Defaults: the paper reports the variance of the whitened coefficients from a late index on but
we could not confirm that index for MNIST, so ``components=None`` takes the trailing half,
``k = max(1, r // 2)``; pass ``components=k`` to choose. Differences from the paper: we centre
the inputs (the paper's ``Sigma^{-1/2} U^T x`` is uncentred; centring shifts each coefficient
by a constant) and drop the near-null components (``rtol``); the threshold is the contract's
(a false-positive rate on held-out clean points).

The score is differentiable in ``x`` (a linear map and a mean square), so an adaptive attack on the
joint classifier-and-detector (Carlini & Wagner 2017, who break this detector) follows it.

Cost: fit, one pass over the fitting points and an eigendecomposition of a D x D matrix
(float64; D = 784 for Fashion-MNIST, 3072 for CIFAR-10); score, one (N, D) x (D, k) product
besides the classifier's forward pass. Memory: the D x r basis, in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import number, positive_int
from robustlab.defenses.detector import Detector
from robustlab.defenses.registry import register

__all__ = ["PCADetector", "whitening"]


def whitening(cov: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """The eigenpairs of the symmetric ``cov`` (D, D) with eigenvalue above ``rtol`` times the
    largest, by decreasing eigenvalue: ``(eigenvalues (r,), eigenvectors (D, r))``. ``cov`` in
    float64 gives eigenvalues correct to about ``1e-16 D`` times the largest."""
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > rtol * values[0].clamp_min(0)
    if values[0] <= 0 or not keep.any():
        raise ValueError(
            "the fitting points do not vary (zero covariance): fit on different points"
        )
    return values[keep], vectors[:, keep]


@register("pca-detector")
class PCADetector(Detector):
    """Hendrycks & Gimpel's PCA detector around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        components: ``k``, how many of the lowest-ranked whitened coefficients the score takes
            the mean square of (>= 1, at most the ``r`` components found by :meth:`fit`), or None
            for the trailing half, ``max(1, r // 2)``. Default None.
        rtol: a principal component is kept when its variance exceeds ``rtol`` times the
            largest one, in (0, 1). Default 1e-10 (only numerically null directions go).
        threshold: the detection threshold ``T`` (score units: variance of whitened
            coefficients, about 1 on clean inputs), or None until :meth:`fit` sets it.
        fpr: the false-positive rate :meth:`fit` aims at, in (0, 1). Default 0.05.
        holdout: the fraction of the fitting points kept for the threshold, in (0, 1); the PCA
            is fitted on the rest. Default 0.2.

    Shapes: ``score(x)`` maps (N, C, H, W) to (N,); ``forward(x)`` to (N, K + 1) as every
    :class:`~robustlab.defenses.detector.Detector`. Attributes after :meth:`fit`: ``mean``
    (D,), ``basis`` (D, r) (principal directions, decreasing variance), ``variances`` (r,).

    Example:
        >>> det = robustlab.defenses.create("pca-detector", model).fit(x_train)
        >>> rejected = det(x).argmax(1) == det(x).shape[1] - 1
    """

    has_statistics = True

    def __init__(
        self,
        model: nn.Module,
        components: int | None = None,
        rtol: float = 1e-10,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr, holdout=holdout)
        self.components = None if components is None else positive_int(components, "components")
        self.rtol = number(rtol, "rtol", low=0, high=1, low_open=True, high_open=True)
        for name in ("mean", "basis", "variances"):
            self.register_buffer(name, None)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), with ``rank`` (r, None before :meth:`fit`)."""
        rank = None if self.variances is None else len(self.variances)
        return {**super().config(), "components": self.components, "rtol": self.rtol, "rank": rank}

    @property
    def fitted(self) -> bool:
        """Whether the PCA is fitted and the threshold known."""
        return self.threshold is not None and self.basis is not None

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """The PCA of the flattened ``x`` (N, C, H, W), in float64, in batches of
        ``batch_size``; ``y`` is not used."""
        if len(x) < 2:
            raise ValueError(f"the PCA needs at least 2 fitting points, got {len(x)}: fit on more")
        flat = x.detach().flatten(1)
        mean = flat.new_zeros(flat.shape[1], dtype=torch.float64)
        for i in range(0, len(x), batch_size):
            mean += flat[i : i + batch_size].to(torch.float64).sum(0)
        mean /= len(x)
        cov = flat.new_zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        for i in range(0, len(x), batch_size):
            centred = flat[i : i + batch_size].to(torch.float64) - mean
            cov += centred.T @ centred
        variances, basis = whitening(cov / (len(x) - 1), self.rtol)
        if self.components is not None and self.components > len(variances):
            raise ValueError(
                f"components={self.components} but the fitting points span only "
                f"{len(variances)} principal component(s): pass components <= "
                f"{len(variances)}, or fit on more (varied) points"
            )
        self.mean, self.basis, self.variances = mean, basis, variances

    def coefficients(self, x: Tensor) -> Tensor:
        """The whitened coefficients ``c_j(x)`` (N, r) of ``x`` (N, C, H, W), float64, by
        decreasing component variance; differentiable in ``x``."""
        if self.basis is None:
            raise ValueError(
                "the pca-detector has no PCA yet: call .fit(x_train) on clean training points"
            )
        centred = x.flatten(1).to(self.mean.dtype) - self.mean
        return centred @ self.basis / self.variances.sqrt()

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The mean square of the last ``k`` whitened coefficients, (N,), in ``x.dtype``; the
        logits are not used."""
        c = self.coefficients(x)
        k = self.components or max(1, c.shape[1] // 2)
        return c[:, -k:].square().mean(1).to(x.dtype)

"""Kernel density and Bayesian uncertainty (KD+BU): a supervised detector of inputs that lie
off the clean training points' last-layer features or that the model is unsure of under
dropout; with the supervised machinery it shares with LID (:mod:`robustlab.defenses.lid`).

Feinman, Curtin, Shintre, Gardner, "Detecting Adversarial Samples from Artifacts", 2017,
arXiv:1703.00410; reference code github.com/rfeinman/detecting-adversarial-samples
(``scripts/detect_adv_samples.py``, ``scripts/craft_adv_samples.py``, ``src/util.py``)
[code checked].

With ``phi(x)`` the last hidden layer's features (the input of the model's last
``nn.Linear``; ``feature_layer`` names another), ``t`` the class the model predicts for ``x``
and ``X_t`` the clean training points of class ``t``, the kernel density is

    ``KD(x) = 1/|X_t| sum_{x_i in X_t} exp(-||phi(x) - phi(x_i)||^2 / sigma^2)``

and, with ``p_1 .. p_T`` the softmax outputs of ``T`` forward passes with the model's dropout
layers on (Monte-Carlo dropout), the Bayesian uncertainty is

    ``BU(x) = 1/T sum_t p_t . p_t  -  (1/T sum_t p_t) . (1/T sum_t p_t)``.

The detector is a logistic regression on the z-scored pair ``(log KD(x), BU(x))``, fitted on
clean and noisy training points (label 0) against adversarial ones (label 1) crafted inside
:meth:`fit` by the attack of the paper; the score is its logit (higher: more adversarial).
A model without dropout has ``BU = 0``: :meth:`fit` warns and the detector uses KD alone.

Defaults from the paper: ``bandwidth`` sigma = 1.20 (its MNIST value, cross-validated on its
own model: tune it for yours; CIFAR-10 0.26, SVHN 1.00), ``samples`` T = 50 (the reference
code's ``nb_iter``), the attack FGSM with linf eps = 0.3 (its MNIST setting; BIM with
eps_iter 0.01, JSMA and C&W are the paper's others).

Differences from the reference code: the density enters as ``log KD`` (computed with
``logsumexp``: in hundreds of dimensions ``KD`` itself underflows; the reference's
scikit-learn ``score_samples`` is a log density too, with kernel ``exp(-d^2 / (2 h^2))`` and a
normalising constant that z-scoring cancels); ``BU`` is the paper's formula (the code averages
the per-class variance, ``BU / K``, the same after z-scoring); the logistic regression has a
fixed L2 penalty (no cross-validation); each noisy point gets Gaussian noise scaled to its
adversarial counterpart's L2 distance and clipped to the bounds (the code: one tuned standard
deviation per data set); the class densities and the regression use disjoint halves of the
fitting points (the code: training set and test set); and only originals the model classifies
correctly with adversarial counterparts that fool it enter the regression.

Cost per scored input: one forward pass with feature capture, ``T`` passes with dropout on
(none without dropout), distances to the clean features of the predicted class; ``forward``
adds the classifier's own pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import generator_or_none, number, positive_int
from robustlab.defenses.registry import register
from robustlab.defenses.supervised import SupervisedDetector
from robustlab.models.features import capture, feature_module

__all__ = [
    "DROPOUT",
    "KernelDensityUncertainty",
    "bayesian_uncertainty",
    "log_kernel_density",
    "mc_softmax",
]

#: the dropout layers Monte-Carlo dropout switches on (functional dropout is not seen)
DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def log_kernel_density(features: Tensor, reference: Tensor, bandwidth: float) -> Tensor:
    """``log(1/M sum_i exp(-||f - r_i||^2 / bandwidth^2))`` for each row ``f`` of ``features``
    (N, D) over the rows ``r_i`` of ``reference`` (M, D), shape (N,); differentiable."""
    d2 = torch.cdist(features, reference, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return torch.logsumexp(-d2 / bandwidth**2, 1) - math.log(len(reference))


def bayesian_uncertainty(probs: Tensor) -> Tensor:
    """The paper's ``1/T sum_t ||p_t||^2 - ||1/T sum_t p_t||^2`` from ``probs`` (T, N, K), the
    softmax outputs of ``T`` stochastic passes, shape (N,)."""
    return probs.pow(2).sum(2).mean(0) - probs.mean(0).pow(2).sum(1)


def _dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, DROPOUT) and m.p > 0]


@contextmanager
def _dropout_on(model: nn.Module) -> Iterator[list[nn.Module]]:
    """The model's dropout layers (p > 0) in train mode, every other module as it was; their
    modes come back on exit, even on exceptions."""
    layers = _dropout_layers(model)
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train(True)
        yield layers
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


def mc_softmax(
    model: nn.Module, x: Tensor, samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Softmax outputs (T, N, K) of ``samples`` = T passes of ``model`` on ``x`` with its
    dropout layers on (the rest in its current mode); differentiable through the drawn masks.
    The masks come from ``generator`` (``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` only: their
    masks are drawn here, torch's global generator is not touched) or, when None, from torch's
    global generator (the layers in train mode)."""
    if generator is None:
        with _dropout_on(model):
            return torch.stack([model(x).softmax(1) for _ in range(samples)])
    handles = [m.register_forward_hook(_masked(m, generator)) for m in _dropout_layers(model)]
    try:
        return torch.stack([model(x).softmax(1) for _ in range(samples)])
    finally:
        for handle in handles:
            handle.remove()


def _masked(layer: nn.Module, generator: torch.Generator) -> Any:
    """A forward hook that applies ``layer``'s dropout to its output (the layer itself in eval
    mode, the identity) with a mask drawn from ``generator``: per element (``nn.Dropout``) or
    per channel (``nn.Dropout1d/2d/3d``), kept with probability 1 - p and scaled by 1/(1 - p)."""
    masked = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
    if not isinstance(layer, masked) or type(layer) not in masked:  # these, not subclasses
        raise ValueError(
            f"a generator draws the masks of nn.Dropout and nn.Dropout1d/2d/3d "
            f"only, the model has {type(layer).__name__}: pass generator=None "
            "(torch's global generator)"
        )
    channel = type(layer) is not nn.Dropout

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        if module.training:  # it drops already (the model is in train mode)
            return out
        shape = (*out.shape[:2], *[1] * (out.dim() - 2)) if channel else out.shape
        keep = 1 - layer.p  # the hook's module is ``layer``
        mask = torch.rand(shape, generator=generator, device=generator.device) < keep
        return out * mask.to(out.device, out.dtype) / keep

    return hook


@register("kd-bu")
class KernelDensityUncertainty(SupervisedDetector):
    """Feinman et al.'s KD+BU detector around ``model``, with a rejection output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        bandwidth: the kernel's sigma, in feature units, > 0. Default 1.20 (the paper's MNIST).
        samples: Monte-Carlo dropout passes T for BU, >= 1. Default 50.
        feature_layer: the module whose input is ``phi`` (a name from
            ``model.named_modules()``); default None, the last ``nn.Linear``.
        attack, norm, eps, attack_options: the attack crafted inside :meth:`fit` on the
            regression's training points: ``robustlab.attacks.create(attack,
            ThreatModel(norm, eps), **attack_options)``. Default FGSM, linf, 0.3.
        seed: seeds the noisy training points. generator: the dropout masks' source when
            scoring (None: torch's global generator).
        threshold, fpr, holdout: as :class:`~robustlab.defenses.detector.Detector`.

    Randomised (``randomized``) when the model has dropout layers: BU draws new masks at each
    call. ``fit(x, y)`` needs labels: the class densities are per class.
    """

    def __init__(
        self,
        model: nn.Module,
        bandwidth: float = 1.20,
        samples: int = 50,
        feature_layer: str | None = None,
        attack: str = "fgsm",
        norm: str = "linf",
        eps: float = 0.3,
        attack_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(
            model,
            attack=attack,
            norm=norm,
            eps=eps,
            seed=seed,
            attack_options=attack_options,
            threshold=threshold,
            fpr=fpr,
            holdout=holdout,
        )
        self.bandwidth = number(bandwidth, "bandwidth", low=0, low_open=True)
        self.samples = positive_int(samples, "samples")
        self.feature_layer = feature_module(model, feature_layer)[0]
        self.generator = generator_or_none(generator)
        self.uses_uncertainty = bool(_dropout_layers(model))
        self.randomized = self.uses_uncertainty
        self.register_buffer("reference", None)
        self.register_buffer("reference_labels", None)

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), as recorded in results."""
        return {
            **super().config(),
            "bandwidth": self.bandwidth,
            "samples": self.samples,
            "feature_layer": self.feature_layer,
            "uses_uncertainty": self.uses_uncertainty,
        }

    def reference_size(self, n: int) -> int:
        """Half of the statistics points hold the class densities."""
        return n // 2

    def fit_reference(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """The clean features ``phi`` of ``x`` with their labels ``y``, the class densities'
        points; warns when the model has no dropout (BU is then 0 and left out)."""
        with torch.no_grad():
            feats = torch.cat([self._features(xb)[1] for xb in x.split(batch_size)])
            k = self.base(x[:1]).shape[1]
        missing = sorted(set(range(k)) - set(y.tolist()))
        if missing:
            raise ValueError(
                f"classes {missing} have no clean points among the {len(x)} that "
                "hold the class densities: fit on more points, from every class"
            )
        if not self.uses_uncertainty:
            warnings.warn(
                "kd-bu: the model has no dropout layer, so the Bayesian uncertainty "
                "is 0 for every input; the detector uses the kernel density alone",
                stacklevel=4,
            )
        self.reference, self.reference_labels = feats, y.to(feats.device)

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, (feats,) = capture(self.base, x, [self.feature_layer], inputs=True)
        return logits, feats

    def characteristics(self, x: Tensor, logits: Tensor) -> Tensor:
        """``(log KD(x), BU(x))`` (N, 2), or ``(log KD(x),)`` (N, 1) without dropout."""
        if self.reference is None:
            raise ValueError("the kd-bu detector is not fitted: call .fit(x_train, y_train)")
        feats = self._features(x)[1]
        pred = logits.argmax(1)
        kd = feats.new_empty(len(x))
        for c in pred.unique().tolist():
            rows = pred == c
            kd = kd.index_put(
                (rows,),
                log_kernel_density(
                    feats[rows], self.reference[self.reference_labels == c], self.bandwidth
                ),
            )
        if not self.uses_uncertainty:
            return kd.unsqueeze(1)
        bu = bayesian_uncertainty(mc_softmax(self.base, x, self.samples, self.generator))
        return torch.stack([kd, bu], 1)

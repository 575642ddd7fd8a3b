"""Detector network: a small convolutional network on an inner feature map of the classifier,
trained to tell clean inputs from adversarial ones (secondary classification).

Metzen, Genewein, Fischer, Bischoff, "On Detecting Adversarial Perturbations", ICLR 2017,
arXiv:1702.04267 [no reference code checked; the widths 96/192 and the Adam settings are
recalled from the paper, not re-checked against its text].

The classifier ``f`` stays frozen. A detector ``d`` reads the feature map ``a(x)`` (C, H, W) of
one layer of ``f`` and outputs a logit; the paper trains it as a binary classifier of clean
training points (label 0) against adversarial examples crafted on them (label 1) with the
cross-entropy loss and Adam. The score is that logit,

    ``score(x) = d(a(x))``,  ``p(adversarial | x) = sigmoid(score(x))``

(the paper's two-way softmax output has the same information: its logit difference
``z_adv - z_clean``). The score is differentiable in ``x`` through ``d`` and ``f``'s layers up
to ``a``, so an attack on the joint classifier-and-detector follows its gradient.

Architecture (the paper's Figure 1, for its CIFAR-10 ResNet, where ``w = 96``)::

    conv 3x3, w   -> ReLU -> max-pool 2x2
    conv 3x3, 2w  -> ReLU -> max-pool 2x2
    conv 3x3, 2w  -> ReLU
    conv 1x1, 1   -> global average pooling -> the logit

All 3x3 convolutions pad by 1. The paper drops the pooling layers at its deeper attachment
points; here a pool is applied only while the map's smaller side is at least 8 pixels (so it
never goes below 4), which drops them the same way on small maps. A layer whose output is not
a map, (N, D) or (N, C, L), is read as (N, D, 1, 1) or (N, C, L, 1).

Training (inside :meth:`fit`): the adversarial points come from
:func:`~robustlab.defenses.supervised.clean_noisy_adversarial` (the points the model
classifies correctly and the attack fools; optionally the Gaussian-noise copies as extra label-0
points, ``noisy=True``); the detector's inputs are z-scored per channel with the clean points'
mean and standard deviation; ``epochs`` passes of Adam (betas 0.99, 0.999 as in the paper) on
minibatches of ``minibatch``, the two labels weighted to equal total weight; the initial weights
and the minibatch order come from ``seed``. The threshold is then set on held-out clean points
by :meth:`~robustlab.defenses.detector.Detector.fit`.

Defaults: the paper's attack is the basic iterative method (BIM), l_inf, which is PGD without
random start: ``attack="pgd"``, ``norm="linf"``, ``eps=0.1`` (Fashion-MNIST-scale; the paper
works on CIFAR-10 at a few grey levels), ``attack_options={"steps": 10, "random_start":
False}``; ``width=96`` (the paper's); ``epochs=20`` (the paper's); ``lr=1e-3`` (the paper:
1e-4, on 45,000 CIFAR-10 points per epoch; a fit on a few thousand points takes fewer steps).
``layer`` default: the end of the first convolutional block, i.e. the output of the first
pooling module (``nn.MaxPool2d``/``nn.AvgPool2d``; smallcnn: ``feature_extractor.maxpool1``,
32x12x12 on 28x28 inputs; lenet: ``features.2``); without one the first activation module
(resnet20: ``act``, the stem); without one the first ``nn.Conv2d``. The paper attaches at five
points AD(0)-AD(4) of its ResNet and compares them; ``layer=`` names any module of
``model.named_modules()``.

Differences from the paper: static training only (the paper's "dynamic adversary training",
which crafts adversarial points against classifier and detector jointly during training, is not
done here: the evaluation's adaptive stage is the attack that knows the detector); the
adversarial points are kept only where the attack fools the model on a correctly classified
point (the paper uses every training point); per-channel z-scoring of the features and no
batch normalisation in the detector; one output logit instead of a two-way softmax; a single
fixed number of epochs, no early stopping on a validation split.

Cost: ``fit`` runs the attack on the statistics points (``steps`` forward-backward passes each),
one classifier pass per training point to cache its features, and ``epochs`` passes of the
small detector over them (features of every training point held in memory). Per scored input:
one classifier pass with feature capture and one detector pass; ``forward`` adds the
classifier's own pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.attacks.registry import create as create_attack
from robustlab.defenses.detector import Detector
from robustlab.defenses.lid import ACTIVATIONS
from robustlab.defenses.registry import register
from robustlab.defenses.supervised import clean_noisy_adversarial
from robustlab.models.features import capture, feature_module
from robustlab.threat import ThreatModel

__all__ = ["DetectorNetwork", "default_layer", "detector_head", "feature_shape"]

BIM = {"steps": 10, "random_start": False}  # the basic iterative method: PGD from x itself


def default_layer(model: nn.Module) -> str:
    """The end of ``model``'s first convolutional block: the name of its first pooling module
    (``nn.MaxPool2d``, ``nn.AvgPool2d``), else of its first activation module, else of its
    first ``nn.Conv2d``, in ``model.named_modules()`` order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    for kinds in ((nn.MaxPool2d, nn.AvgPool2d), ACTIVATIONS, (nn.Conv2d,)):
        for name, module in named:
            if isinstance(module, kinds):
                return name
    raise ValueError(
        "the model has no pooling, activation or Conv2d module to attach the "
        "detector network to: name one with layer="
    )


def feature_shape(model: nn.Module, layer: str, x: Tensor) -> tuple[int, int, int]:
    """The (C, H, W) shape of ``layer``'s output on inputs like ``x`` (a 1-D output (D,) is
    (D, 1, 1), a 2-D one (C, L) is (C, L, 1)); one forward pass without gradients."""
    with torch.no_grad():
        _, (out,) = capture(model, x, [layer], inputs=False, option="layer", flatten=False)
    shape = tuple(out.shape[1:])
    if not 1 <= len(shape) <= 3:
        raise ValueError(
            f"layer {layer!r} outputs {len(shape) + 1}-D tensors; the detector "
            "network reads (N, C, H, W) maps (or (N, D)): name another with layer="
        )
    return (*shape, *([1] * (3 - len(shape))))  # type: ignore[return-value]


def _conv(generator: torch.Generator | None, c_in: int, c_out: int, k: int, **kw: Any) -> nn.Conv2d:
    """``nn.Conv2d(c_in, c_out, k, **kw)`` with PyTorch's default initialisation (Kaiming
    uniform, a = sqrt(5); bias uniform in +-1/sqrt(fan_in)) drawn from ``generator``."""
    conv = nn.Conv2d(c_in, c_out, k, device="meta", **kw).to_empty(device="cpu")
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(c_in * k * k)
    if conv.bias is not None:
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
    return conv


def detector_head(
    shape: tuple[int, int, int], width: int, generator: torch.Generator | None = None
) -> nn.Sequential:
    """The detector network for (C, H, W) feature maps (module docstring): three 3x3
    convolutions of ``width``, ``2 width``, ``2 width`` channels with ReLUs, 2x2 max-pools after
    the first two while the map's smaller side is >= 8, a 1x1 convolution to one channel and
    global average pooling; (N, C, H, W) -> (N, 1) logits; initial weights from
    ``generator`` (None: torch's global generator)."""
    channels, side = shape[0], min(shape[1:])
    layers: list[nn.Module] = []
    for i, out in enumerate((width, 2 * width, 2 * width)):
        layers += [_conv(generator, channels, out, 3, padding=1), nn.ReLU()]
        if i < 2 and side >= 8:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        channels = out
    layers += [_conv(generator, channels, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register("detector-net")
class DetectorNetwork(Detector):
    """Metzen et al.'s detector network on an inner feature map of ``model``, with a rejection
    output.

    Args:
        model: the classifier, inputs in [0, 1] pixel units, logits out (``self.base``).
        layer: the module (name in ``model.named_modules()``) whose output the detector reads;
            default None, :func:`default_layer` (the end of the first convolutional block).
        width: channels of the detector's first convolution (then ``2 width``), >= 1.
            Default 96 (the paper's).
        epochs: passes of Adam over the detector's training points, >= 1. Default 20.
        lr: Adam's learning rate, > 0. Default 1e-3.
        minibatch: training points per Adam step, >= 1. Default 64.
        noisy: also train on the Gaussian-noise copies as clean (label 0) points. Default False.
        attack, norm, eps, attack_options: the attack crafted inside :meth:`fit` on the
            detector's training points: ``robustlab.attacks.create(attack, ThreatModel(norm,
            eps), **attack_options)``. Default BIM: ``"pgd"``, linf, 0.1, ``{"steps": 10,
            "random_start": False}``.
        seed: seeds the detector's initial weights, its minibatch order and the noisy points.
        threshold, fpr, holdout: as :class:`~robustlab.defenses.detector.Detector`.

    ``fit(x, y)`` needs labels (for the attack). The detector network is built there (its
    input shape is the layer's), so a state dict loads into a fitted detector only.
    """

    has_statistics = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        width: int = 96,
        epochs: int = 20,
        lr: float = 1e-3,
        minibatch: int = 64,
        noisy: bool = False,
        attack: str = "pgd",
        norm: str = "linf",
        eps: float = 0.1,
        attack_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        threshold: float | None = None,
        fpr: float = 0.05,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr, holdout=holdout)
        self.layer = default_layer(model) if layer is None else layer
        feature_module(model, self.layer, option="layer")
        self.width = positive_int(width, "width")
        self.epochs = positive_int(epochs, "epochs")
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.minibatch = positive_int(minibatch, "minibatch")
        if not isinstance(noisy, bool):
            raise TypeError(f"noisy must be True or False, got {noisy!r}")
        self.noisy = noisy
        if attack_options is not None and not isinstance(attack_options, Mapping):
            raise TypeError(
                f"attack_options must be a dict of the attack's options, e.g. "
                f"{{'steps': 10}}, got {type(attack_options).__name__}"
            )
        options = dict(BIM if attack_options is None and attack == "pgd" else attack_options or {})
        self.attack = create_attack(attack, ThreatModel(norm, eps), **options)
        self.seed = integer(seed, "seed")
        self.head: nn.Sequential | None = None
        self.register_buffer("mean", None)
        self.register_buffer("std", None)
        #: the layer's (C, H, W) output shape (None: not fitted)
        self.feature_shape: tuple[int, int, int] | None = None
        #: how many (clean, noisy, adversarial) points the detector was trained on
        self.training_points: dict[str, int] | None = None
        #: the detector's accuracy on its own training points after training
        self.train_accuracy: float | None = None

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), with the fitting attack and point counts."""
        return {
            **super().config(),
            "supervised": True,
            "layer": self.layer,
            "width": self.width,
            "epochs": self.epochs,
            "lr": self.lr,
            "minibatch": self.minibatch,
            "noisy": self.noisy,
            "attack": {**self.attack.config(), "threat": self.attack.threat.to_dict()},
            "seed": self.seed,
            "training_points": self.training_points,
            "feature_shape": None if self.feature_shape is None else list(self.feature_shape),
            "train_accuracy": self.train_accuracy,
        }

    def _fitted(self) -> tuple[nn.Sequential, tuple[int, int, int]]:
        """The detector network and the layer's (C, H, W) shape; ValueError before ``fit``."""
        if self.head is None or self.feature_shape is None:
            raise ValueError(
                "the detector-net detector is not fitted: call "
                ".fit(x_train, y_train) on clean training points"
            )
        return self.head, self.feature_shape

    def features(self, x: Tensor) -> Tensor:
        """The layer's output for ``x``, (N, C, H, W), z-scored per channel (differentiable)."""
        shape = self._fitted()[1]
        _, (flat,) = capture(self.base, x, [self.layer], inputs=False, option="layer")
        return (flat.reshape(len(x), *shape) - self.mean) / self.std

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The detector network's logit for "adversarial" on ``x``'s features, shape (N,)."""
        return self._fitted()[0](self.features(x)).squeeze(1)

    def _raw(self, x: Tensor, batch_size: int, shape: tuple[int, int, int]) -> Tensor:
        with torch.no_grad():
            parts = [
                capture(self.base, xb, [self.layer], inputs=False, option="layer")[1][0]
                for xb in x.split(batch_size)
            ]
        return torch.cat(parts).reshape(len(x), *shape)

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """Craft adversarial points on clean ``x`` (labels ``y`` required), cache the layer's
        features of both, and train the detector network on them (module docstring)."""
        if y is None:
            raise ValueError(
                f"the {self.name} detector is supervised: pass the labels, .fit(x_train, y_train)"
            )
        shape = self.feature_shape = feature_shape(self.base, self.layer, x[:1])
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        clean, noisy, adv = clean_noisy_adversarial(
            self.base, x, y.to(x.device), self.attack, gen, batch_size
        )
        negatives = [clean, noisy] if self.noisy else [clean]
        feats = torch.cat([self._raw(s, batch_size, shape) for s in (*negatives, adv)])
        n_neg = sum(len(s) for s in negatives)
        labels = torch.cat([torch.zeros(n_neg), torch.ones(len(adv))]).to(feats)
        ref = feats[: len(clean)].transpose(0, 1).flatten(1)  # the clean points' channels
        std = ref.std(1, unbiased=False)
        self.mean = ref.mean(1).view(-1, 1, 1)
        self.std = torch.where(std > 0, std, torch.ones_like(std)).view(-1, 1, 1)
        head = detector_head(shape, self.width, torch.Generator().manual_seed(self.seed))
        self.head = head = head.to(feats.device, feats.dtype)
        self._train(head, (feats - self.mean) / self.std, labels)
        self.training_points = {
            "clean": len(clean),
            "noisy": len(noisy) if self.noisy else 0,
            "adversarial": len(adv),
        }

    def _train(self, head: nn.Sequential, feats: Tensor, labels: Tensor) -> None:
        """``epochs`` of Adam on the weighted binary cross-entropy; freezes ``head`` after."""
        n_pos = float(labels.sum())
        weight = torch.where(
            labels > 0, len(labels) / (2 * n_pos), len(labels) / (2 * (len(labels) - n_pos))
        )
        opt = torch.optim.Adam(head.parameters(), lr=self.lr, betas=(0.99, 0.999))
        order_gen = torch.Generator().manual_seed(self.seed)
        head.train()
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(labels), generator=order_gen).to(labels.device)
                for i in range(0, len(labels), self.minibatch):
                    idx = order[i : i + self.minibatch]
                    out = head(feats[idx]).squeeze(1)
                    loss = F.binary_cross_entropy_with_logits(out, labels[idx], weight=weight[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        opt.zero_grad(set_to_none=True)
        head.eval().requires_grad_(False)
        with torch.no_grad():
            out = torch.cat([head(f).squeeze(1) for f in feats.split(256)])
        self.train_accuracy = float(((out > 0).to(labels) == labels).float().mean())
        if not math.isfinite(float(out.sum())):
            raise ValueError(
                "the detector network's outputs are not finite after training: lower lr="
            )

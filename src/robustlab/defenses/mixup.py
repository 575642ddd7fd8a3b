"""Mixup Inference: classify an input by mixing it with clean images and averaging.

Pang, Xu, Zhu, "Mixup Inference: Better Exploiting Mixup to Defend Adversarial Attacks",
ICLR 2020 (https://arxiv.org/abs/1909.11515); reference code github.com/P2333/Mixup-Inference
(``attack_resnet_mixuptest_OL.py``, ``attack_resnet_mixuptest_PL.py``).

For a model trained with mixup (or interpolated adversarial training), mixing an input with a
clean image ``x_s`` shrinks an adversarial perturbation by the factor ``lam`` and moves it to
where the model behaves linearly. With ``y_hat = argmax f(x)`` and ``S`` partners
``x_s^(1..S)`` drawn from a pool of clean labelled images,

    ``MI(x) = (1/S) sum_i softmax(f(lam x + (1 - lam) x_s^(i)))``,  prediction ``argmax MI(x)``;

- MI-OL (``mode="ol"``, "other labels"): each partner's class is uniform over the pool's
  classes other than ``y_hat``, then the image uniform within that class;
- MI-PL (``mode="pl"``, "predicted label"): the partner is uniform among the pool's images of
  class ``y_hat``.

Defaults from the reference code: ``lam = 0.5`` (MI-PL, and MI-OL on mixup-trained models; the
README gives 0.6 for interpolated-AT models with MI-OL), ``samples = 30`` (MI-OL's
``num_sample``; the MI-PL script uses 10). The reference pool is the first 10,000 images of a
shuffled loader, kept per class; it is built from the CIFAR test split (``train=False``), which
leaks test images into the pool. Build the pool from training data. Train the model with the
``mixup`` objective (``configs/mixup.toml``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import (
    check_images,
    check_inputs,
    generator_or_none,
    number,
    one_of,
    positive_int,
)
from robustlab.defenses.base import Defense
from robustlab.defenses.registry import register

__all__ = ["MODES", "MixupInference"]

MODES = ("ol", "pl")


@register("mixup-inference")
class MixupInference(Defense):
    """Mixup Inference around ``model``: ``log MI(x)`` (see the module docstring).

    Args:
        model: the classifier ((N, C, H, W) in [0, 1] -> (N, K) logits), ideally mixup-trained.
        mode: ``"ol"`` (MI-OL, default) or ``"pl"`` (MI-PL).
        lam: weight ``lam`` of the input in the mix, in (0, 1]. Default 0.5. ``lam = 1``
            returns ``log_softmax(model(x))`` (and is then not random).
        samples: partners ``S`` per input, >= 1. Default 30.
        pool_x, pool_y: the clean pool, (P, C, H, W) images in [0, 1] and (P,) int labels;
            both or neither (then call :meth:`fit` before the first forward).
        generator: source of the partner draws (default None: torch's global generator);
            settable later as ``self.generator``.

    Shapes: ``forward(x)`` maps (N, C, H, W) to (N, K) log-probabilities
    ``log((1/S) sum_i softmax(...))``; differentiable in ``x`` (the prediction ``y_hat`` that
    picks the partners is not). Random: each call draws fresh partners, so attack it with EOT
    over the partners (the paper's adaptive attack). Cost: 1 + ``samples`` forward passes.

    Example:
        >>> mi = MixupInference(model).fit(x_train, y_train)
        >>> pred = mi(x).argmax(1)
    """

    randomized = True

    def __init__(
        self,
        model: nn.Module,
        mode: str = "ol",
        lam: float = 0.5,
        samples: int = 30,
        pool_x: Tensor | None = None,
        pool_y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model)
        self.mode = one_of(mode, "mode", MODES)
        self.lam = number(lam, "lam", low=0, high=1, low_open=True)
        self.samples = positive_int(samples, "samples")
        self.generator = generator_or_none(generator)
        #: lam = 1 mixes nothing in: the output is then deterministic
        self.randomized = self.lam < 1
        # the pool and its per-class index move with .to() but stay out of state_dict
        self.register_buffer("pool_x", None, persistent=False)
        self.register_buffer("_order", None, persistent=False)  # pool indices sorted by class
        self.register_buffer("_start", None, persistent=False)  # (K_pool,) first slot of a class
        self.register_buffer("_count", None, persistent=False)  # (K_pool,) images per class
        if (pool_x is None) != (pool_y is None):
            raise ValueError(
                "pass pool_x and pool_y together (images and their labels), or "
                "neither and call fit(x, y) later"
            )
        if pool_x is not None:
            self.fit(pool_x, pool_y)

    def fit(self, x: Tensor, y: Tensor | None = None) -> MixupInference:
        """Set the clean pool: images ``x`` (P, C, H, W) in [0, 1] and labels ``y`` (P,).
        Kept by reference (not copied); returns ``self``."""
        check_inputs(x, y)
        assert y is not None  # check_inputs raised a TypeError on y=None
        xd = x.detach()
        if float(xd.min()) < 0 or float(xd.max()) > 1:
            raise ValueError(
                f"pool images must be in [0, 1] like the inputs, got values in "
                f"[{float(xd.min()):.4g}, {float(xd.max()):.4g}]"
            )
        count = torch.bincount(y.detach().long())
        if self.mode == "ol" and int((count > 0).sum()) < 2:
            raise ValueError(
                "MI-OL draws partners from classes other than the predicted one: "
                "the pool needs images of at least 2 classes, got "
                f"{int((count > 0).sum())}"
            )
        self.pool_x = xd
        self._order = torch.argsort(y.detach().long(), stable=True)
        self._count = count
        self._start = torch.cumsum(count, 0) - count
        return self

    def config(self) -> dict[str, Any]:
        """The defense's settings (JSON-able), as recorded in results."""
        return {
            **super().config(),
            "mode": self.mode,
            "lam": self.lam,
            "samples": self.samples,
            "pool_size": None if self.pool_x is None else len(self.pool_x),
        }

    @property
    def fitted(self) -> bool:
        """Whether the pool of clean images is set."""
        return self.pool_x is not None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_x is None:
            raise ValueError(
                "MixupInference has no pool of clean images: call fit(x, y) with "
                "clean labelled images (or pass pool_x and pool_y) first"
            )
        check_images(x)
        if x.shape[1:] != self.pool_x.shape[1:]:
            raise ValueError(
                f"inputs of shape {tuple(x.shape[1:])} per image do not match the "
                f"pool's {tuple(self.pool_x.shape[1:])}"
            )
        with torch.no_grad():
            pred = self.base(x).argmax(1)
        partners = self.partners(pred)
        total: Tensor | None = None
        for i in range(self.samples):
            xs = self.pool_x[partners[:, i]].to(device=x.device, dtype=x.dtype)
            p = F.softmax(self.base(self.lam * x + (1 - self.lam) * xs), dim=1)
            total = p if total is None else total + p
        assert total is not None
        mean = total / self.samples
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()

    def partners(self, pred: Tensor) -> Tensor:
        """Pool indices (N, samples) of the mixing partners for predicted classes ``pred``
        (N,), drawn from ``self.generator`` (see the module docstring for the two modes)."""
        assert self._count is not None and self._start is not None and self._order is not None
        gen = self.generator
        where = self._count.device if gen is None else gen.device
        count, start = self._count.to(where), self._start.to(where)
        pred = pred.to(where)
        n, k = len(pred), len(count)
        if self.mode == "ol":
            allowed = (count > 0) & (torch.arange(k, device=where) != pred[:, None])
            cls = torch.multinomial(allowed.float(), self.samples, replacement=True, generator=gen)
        else:
            missing = (pred >= k) | (count[pred.clamp_max(k - 1)] == 0)
            if missing.any():
                i = int(missing.nonzero()[0])
                raise ValueError(
                    f"MI-PL: the pool has no image of class {int(pred[i])} "
                    f"(predicted for input {i}); fit() a pool with every class"
                )
            cls = pred[:, None].expand(n, self.samples)
        u = torch.rand((n, self.samples), generator=gen, device=where)
        slot = start[cls] + (u * count[cls]).long().minimum(count[cls] - 1)
        return self._order[slot.to(self._order.device)]

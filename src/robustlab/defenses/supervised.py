"""The supervised detectors' common part: a logistic regression on detection characteristics,
fitted on clean and noisy training points (label 0) against adversarial ones (label 1) that an
attack crafts inside ``fit`` (Feinman et al. 2017; Ma et al. 2018 reuse it).

:class:`SupervisedDetector` is the base of the KD+BU detector
(:class:`~robustlab.defenses.kd_bu.KernelDensityUncertainty`) and of LID
(:class:`~robustlab.defenses.lid.LocalIntrinsicDimensionality`); :class:`LogisticHead` is the
regression; :func:`clean_noisy_adversarial` builds its training points.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.attacks.registry import create as create_attack
from robustlab.defenses.detector import Detector
from robustlab.threat import ThreatModel

__all__ = ["LogisticHead", "SupervisedDetector", "clean_noisy_adversarial"]


class LogisticHead(nn.Module):
    """A logistic regression on z-scored features: ``logit(f) = ((f - mean) / std) . w + b``.

    :meth:`fit` sets ``mean`` and ``std`` (per feature, over the fitting points; a constant
    feature keeps std 1) and minimises the mean binary cross-entropy plus ``l2 / 2 ||w||^2``
    with L-BFGS in float64; the fitted values are buffers of the features' dtype.
    """

    def __init__(self, l2: float = 1e-3, steps: int = 200) -> None:
        super().__init__()
        self.l2 = number(l2, "l2", low=0)
        self.steps = positive_int(steps, "steps")
        for name in ("mean", "std", "weight", "bias"):
            self.register_buffer(name, None)

    def fit(self, features: Tensor, labels: Tensor) -> LogisticHead:
        """Fit on ``features`` (N, F) with 0/1 ``labels`` (N,) (1: adversarial); both classes
        must be present. Returns ``self``."""
        f, t = features.detach().double(), labels.detach().double()
        if not (0 < float(t.sum()) < len(t)):
            raise ValueError(
                "the logistic regression needs points of both labels (clean and adversarial) to fit"
            )
        mean, std = f.mean(0), f.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        z = (f - mean) / std
        w = torch.zeros(f.shape[1], dtype=f.dtype, device=f.device, requires_grad=True)
        b = torch.zeros((), dtype=f.dtype, device=f.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w + b, t) + self.l2 / 2 * w.dot(w)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        like: dict[str, Any] = dict(dtype=features.dtype, device=features.device)
        self.mean, self.std = mean.to(**like), std.to(**like)
        self.weight, self.bias = w.detach().to(**like), b.detach().to(**like)
        return self

    def forward(self, features: Tensor) -> Tensor:
        """The regression's logit (N,) for ``features`` (N, F); differentiable."""
        if self.weight is None:
            raise ValueError(
                "the logistic regression is not fitted: call the detector's "
                ".fit(x_train, y_train) first"
            )
        return ((features - self.mean) / self.std) @ self.weight + self.bias


def clean_noisy_adversarial(
    model: nn.Module, x: Tensor, y: Tensor, attack: Any, generator: torch.Generator, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The supervised detectors' training points from clean ``x`` with labels ``y``:
    ``(clean, noisy, adversarial)``, kept where the model classifies ``x`` correctly and
    ``attack`` fools it. Each noisy point is ``clip(x + n)`` with Gaussian ``n`` scaled to the
    L2 distance of its adversarial counterpart, clipped to the attack's threat bounds."""
    x_adv, fooled, correct = [], [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        res = attack(model, xb, yb)
        with torch.no_grad():
            correct.append(model(xb).argmax(1) == yb)
        x_adv.append(res.x_adv)
        fooled.append(res.success)
    keep = torch.cat(correct) & torch.cat(fooled)
    if not bool(keep.any()):
        raise ValueError(
            f"the attack {attack!r} fooled the model on none of the "
            f"{int(torch.cat(correct).sum())} fitting points it classifies "
            "correctly: raise eps or pick a stronger attack (attack=, eps=) so "
            "the detector sees adversarial points"
        )
    clean, adv = x[keep], torch.cat(x_adv)[keep]
    noise = torch.randn(clean.shape, generator=generator, device=generator.device)
    noise = noise.to(clean.device, clean.dtype)
    scale = (adv - clean).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    lo, hi = attack.threat.bounds
    noisy = (clean + noise * scale.view(-1, *([1] * (clean.dim() - 1)))).clamp(lo, hi)
    return clean, noisy, adv


class SupervisedDetector(Detector):
    """Base of the detectors that score a characteristic vector with a logistic regression
    trained on clean and noisy (0) against adversarial (1) training points (KD+BU, LID).

    Subclasses implement :meth:`fit_reference` (the clean statistics the characteristics are
    measured against, from the first :meth:`reference_size` fitting points) and
    :meth:`characteristics`; :meth:`fit_statistics` crafts the adversarial points on the rest
    with ``attack`` (a registered attack name, on ``ThreatModel(norm, eps)``, with
    ``attack_options``) and fits the regression. ``seed`` seeds the noisy points' draws.
    """

    has_statistics = True

    def __init__(
        self,
        model: nn.Module,
        *,
        attack: str,
        norm: str,
        eps: float,
        attack_options: Mapping[str, Any] | None,
        seed: int,
        threshold: float | None,
        fpr: float,
        holdout: float,
    ) -> None:
        super().__init__(model, threshold=threshold, fpr=fpr, holdout=holdout)
        if attack_options is not None and not isinstance(attack_options, Mapping):
            raise TypeError(
                f"attack_options must be a dict of the attack's options, e.g. "
                f"{{'steps': 10}}, got {type(attack_options).__name__}"
            )
        self.attack = create_attack(attack, ThreatModel(norm, eps), **dict(attack_options or {}))
        self.seed = integer(seed, "seed")
        self.head = LogisticHead()
        #: how many (clean, noisy, adversarial) points the regression was fitted on
        self.training_points: dict[str, int] | None = None

    def config(self) -> dict[str, Any]:
        """The detector's settings (JSON-able), with the fitting attack and point counts."""
        return {
            **super().config(),
            "supervised": True,
            "attack": {**self.attack.config(), "threat": self.attack.threat.to_dict()},
            "seed": self.seed,
            "training_points": self.training_points,
        }

    @abstractmethod
    def reference_size(self, n: int) -> int:
        """How many of ``n`` statistics points go to :meth:`fit_reference`."""

    @abstractmethod
    def fit_reference(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """Learn the clean statistics the characteristics are measured against."""

    @abstractmethod
    def characteristics(self, x: Tensor, logits: Tensor) -> Tensor:
        """The characteristic vector (N, F) the regression scores; differentiable in ``x``."""

    def score_from(self, x: Tensor, logits: Tensor) -> Tensor:
        """The regression's logit on :meth:`characteristics`, shape (N,)."""
        return self.head(self.characteristics(x, logits))

    def _characteristics(self, x: Tensor, batch_size: int) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [self.characteristics(xb, self.base(xb)) for xb in x.split(batch_size)]
            )

    def fit_statistics(self, x: Tensor, y: Tensor | None, batch_size: int) -> None:
        """The reference statistics on the first :meth:`reference_size` points, the regression
        on clean, noisy and adversarial versions of the others (labels ``y`` required)."""
        if y is None:
            raise ValueError(
                f"the {self.name} detector is supervised: pass the labels, .fit(x_train, y_train)"
            )
        n_ref = self.reference_size(len(x))
        if not 0 < n_ref < len(x) - 1:
            raise ValueError(
                f"{len(x)} statistics points cannot be split into {n_ref} clean "
                f"reference points and at least 2 to fit the regression on: fit "
                "on more points"
            )
        self.fit_reference(x[:n_ref], y[:n_ref], batch_size)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        sets = clean_noisy_adversarial(
            self.base, x[n_ref:], y[n_ref:].to(x.device), self.attack, gen, batch_size
        )
        feats = [self._characteristics(s, batch_size) for s in sets]
        labels = torch.cat([torch.zeros(len(feats[0]) * 2), torch.ones(len(feats[2]))])
        self.head.fit(torch.cat(feats), labels.to(feats[0].device))
        self.training_points = dict(
            zip(("clean", "noisy", "adversarial"), map(len, sets), strict=True)
        )

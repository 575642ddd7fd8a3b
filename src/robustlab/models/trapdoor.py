"""Trapdoor triggers: one blended patch per label, shared by the training objective that injects
them (:mod:`robustlab.training.objectives.trapdoor`) and the detector that looks for their
signature (:mod:`robustlab.defenses.trapdoor`).

Shan, Wenger, Wang, Li, Zheng, Zhao, "Gotta Catch 'Em All: Using Honeypots to Catch
Adversarial Attacks on Neural Networks", ACM CCS 2020, arXiv:1904.08554; reference code
github.com/Shawn-Shan/trapdoor (``trap_utils.py``: ``craft_trapdoors``,
``iter_pattern_base_per_mnist``, ``injection_func``) [code checked].

The trigger of label ``t`` is a mask ``m_t`` (1, H, W) and a pattern ``Delta_t`` (C, H, W), and

    ``A_t(x) = (1 - m_t) * x + m_t * Delta_t``                    (inputs in [0, 1] pixel units)

``m_t`` is ``mask_ratio`` on the union of ``squares`` random ``size x size`` squares and 0
elsewhere (a ``mask_ratio`` blend, not a paste: 0.1, a 10 % blend, by default). On square ``j``
and channel ``c`` the pattern pixels are ``clip(N(mu, s^2), 0, 1)`` with ``mu, s ~ U(0, 1)``
drawn per square and channel; where squares overlap their clipped values add up, and the sum
is clipped to [0, 1]; the pattern is 0 off the squares. Defaults from the reference code: 7
squares of 3 x 3, ``mask_ratio`` 0.1.

Differences from the reference code: every draw comes from one ``torch.Generator`` seeded with
``seed`` (the code uses Python's and NumPy's global RNGs), label by label in order, so the
trigger of label ``t`` depends on ``seed`` and the image shape only, not on which labels are
protected; ``mu`` and ``s`` are drawn per channel (the code's colour branch, scaled from
[0, 255] to [0, 1]; its injection script calls the one-channel branch for every data set,
which gives colour images a grey pattern). One trigger per label (its ``pattern_per_label``
= 1, the default).
"""

from __future__ import annotations

from typing import Any, overload

import torch
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int

__all__ = ["TRIGGER_DEFAULTS", "Trapdoors", "protected_labels", "trigger_options"]

#: the trigger options and their defaults (the reference code's)
TRIGGER_DEFAULTS: dict[str, Any] = {"squares": 7, "size": 3, "mask_ratio": 0.1, "seed": 0}


def trigger_options(
    squares: int = 7, size: int = 3, mask_ratio: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """The trigger options checked (see :class:`Trapdoors`), as a dict of ``TRIGGER_DEFAULTS``'
    keys; ``size`` is checked against the image size when the triggers are built."""
    return {
        "squares": positive_int(squares, "squares"),
        "size": positive_int(size, "size"),
        "mask_ratio": number(mask_ratio, "mask_ratio", low=0, high=1, low_open=True),
        "seed": integer(seed, "seed"),
    }


@overload
def protected_labels(labels: Any, classes: int) -> list[int]: ...
@overload
def protected_labels(labels: Any, classes: None = None) -> list[int] | None: ...
def protected_labels(labels: Any, classes: int | None = None) -> list[int] | None:
    """``labels`` checked as a non-empty list of distinct integers >= 0 (below ``classes``
    when given), sorted; None stays None (all labels) unless ``classes`` is given, then it is
    ``range(classes)``. ValueError (TypeError for a wrong type) naming the fix otherwise."""
    if labels is None:
        return None if classes is None else list(range(classes))
    if isinstance(labels, str | bytes) or not hasattr(labels, "__iter__"):
        raise TypeError(
            f"labels must be a list of protected labels, or None for all, got {labels!r}"
        )
    top = None if classes is None else classes - 1
    out = [integer(t, "each protected label", minimum=0, maximum=top) for t in labels]
    if not out or len(set(out)) != len(out):
        raise ValueError(
            f"labels must be a non-empty list of distinct labels, or None for all, got {labels!r}"
        )
    return sorted(out)


class Trapdoors(nn.Module):
    """The triggers of ``classes`` labels for images of shape (``channels``, ``height``,
    ``width``), built deterministically from ``seed`` (see the module docstring).

    Args:
        channels, height, width: the image shape the triggers are for.
        classes: the number of labels; label ``t`` in ``[0, classes)`` has trigger ``t``.
        squares: the number of random squares whose union is the mask, >= 1. Default 7.
        size: the side of each square in pixels, in [1, min(height, width)]. Default 3.
        mask_ratio: the mask's value on the squares, the blend weight of the pattern, in
            (0, 1]. Default 0.1.
        seed: the seed of the ``torch.Generator`` every draw comes from. Default 0.

    Buffers: ``masks`` (classes, 1, H, W), each entry 0 or ``mask_ratio``; ``patterns``
    (classes, C, H, W) in [0, 1], 0 off the squares. Both float32 on the CPU until moved.
    """

    masks: Tensor
    patterns: Tensor

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        classes: int,
        squares: int = 7,
        size: int = 3,
        mask_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.channels = positive_int(channels, "channels")
        self.height = positive_int(height, "height")
        self.width = positive_int(width, "width")
        self.classes = positive_int(classes, "classes")
        opts = trigger_options(squares, size, mask_ratio, seed)
        self.squares, self.mask_ratio, self.seed = opts["squares"], opts["mask_ratio"], opts["seed"]
        self.size = integer(size, "size", minimum=1, maximum=min(self.height, self.width))
        masks, patterns = self._draw()
        self.register_buffer("masks", masks)
        self.register_buffer("patterns", patterns)

    def _draw(self) -> tuple[Tensor, Tensor]:
        """Masks (K, 1, H, W) and patterns (K, C, H, W): per label, per square, the square's
        top-left corner (row, then column), then ``mu`` (C,), ``s`` (C,) and the (C, size,
        size) normal draws, all from one generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(self.seed)
        k, c, h, w, n = self.classes, self.channels, self.height, self.width, self.size
        union = torch.zeros(k, 1, h, w, dtype=torch.bool)
        patterns = torch.zeros(k, c, h, w)
        for t in range(k):
            for _ in range(self.squares):
                r = int(torch.randint(h - n + 1, (), generator=g))
                q = int(torch.randint(w - n + 1, (), generator=g))
                mu, s = torch.rand(c, generator=g), torch.rand(c, generator=g)
                noise = torch.randn(c, n, n, generator=g)
                union[t, :, r : r + n, q : q + n] = True
                patterns[t, :, r : r + n, q : q + n] += (
                    mu[:, None, None] + s[:, None, None] * noise
                ).clamp(0, 1)
        return union.float() * self.mask_ratio, patterns.clamp(0, 1)

    def config(self) -> dict[str, Any]:
        """The construction arguments (JSON-able): ``Trapdoors(**config())`` rebuilds the
        same triggers."""
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "classes": self.classes,
            "squares": self.squares,
            "size": self.size,
            "mask_ratio": self.mask_ratio,
            "seed": self.seed,
        }

    def check_images(self, x: Tensor) -> None:
        """ValueError unless ``x`` is (N, C, H, W) with the triggers' C, H, W."""
        want = (self.channels, self.height, self.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"the trapdoors are for images of shape (N, {want[0]}, {want[1]}, "
                f"{want[2]}), got {tuple(x.shape)}; build them for this data "
                "(channels, height, width of the images)"
            )

    def stamp(self, x: Tensor, labels: Tensor) -> Tensor:
        """``A_t(x_i) = (1 - m_t) * x_i + m_t * Delta_t`` with ``t = labels[i]``, a new
        (N, C, H, W) tensor in ``x.dtype`` (``x`` is not modified); differentiable in ``x``.
        ``labels`` (N,) are integers in ``[0, classes)``."""
        self.check_images(x)
        labels = torch.as_tensor(labels, device=self.masks.device).long()
        if labels.shape != (len(x),):
            raise ValueError(
                f"labels must have shape ({len(x)},), one per image, got {tuple(labels.shape)}"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise ValueError(
                f"trapdoor labels must be in [0, {self.classes}), got "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        m = self.masks[labels].to(device=x.device, dtype=x.dtype)
        p = self.patterns[labels].to(device=x.device, dtype=x.dtype)
        return (1 - m) * x + m * p

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

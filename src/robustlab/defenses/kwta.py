"""k-Winners-Take-All activations (Xiao, Zhong, Zheng, "Enhancing Adversarial Defense by
k-Winners-Take-All", ICLR 2020, arXiv:1905.10510; METHODS.md C11).

k-WTA keeps, per sample, the k largest values of a layer's output and zeroes the rest::

    k = max(1, floor(ratio * D)),   D = C * H * W (4-D input) or F (2-D input)
    kwta(y)_j = y_j if y_j >= t else 0,   t = the k-th largest value of the sample's y

over the whole C x H x W volume at once, as ``Sparsify2D_vol`` (and ``Sparsify1D`` for
features) of the reference code github.com/a554b554/kWTA-Activation ``kWTA/models.py``. Values
tied with the k-th largest are all kept, as there, so more than k can survive ties. The
sparsity ratio 0.1 is that of the adversarially trained ResNet-18 (``spresnet18_adv.json``).

The function is discontinuous in its input wherever a value crosses the threshold ``t``, but
autograd differentiates it without complaint (the gradient is the keep-mask): an attack gets
non-zero, finite gradients that change abruptly between nearby inputs ("shattered gradients").
Nothing here is declared non-differentiable; evaluate it with gradient-free attacks (Square),
EOT/smoothed gradients or transfer from the undefended model (Tramer et al., NeurIPS 2020).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from robustlab._modes import attach
from robustlab._validate import number
from robustlab.defenses.base import Defense
from robustlab.defenses.registry import register
from robustlab.models.layers import ACTIVATIONS, KWTA, RATIO

__all__ = ["RATIO", "KWTA", "KWTADefense", "activation_classes", "replace_activations"]


def activation_classes() -> tuple[type[nn.Module], ...]:
    """The activation module classes k-WTA replaces: those of every activation registered in
    :data:`robustlab.models.layers.ACTIVATIONS` (ReLU, Softplus, SiLU, GELU, KWTA)."""
    classes = {type(ACTIVATIONS.get(name)()) for name in ACTIVATIONS.names()} | {nn.ReLU}
    return tuple(sorted(classes, key=lambda c: c.__name__))


def replace_activations(model: nn.Module, ratio: float = RATIO) -> int:
    """Replace, in place, every activation module of ``model`` (see
    :func:`activation_classes`) by ``KWTA(ratio)``; returns how many were replaced.
    Activations applied functionally (``F.relu`` in ``forward``) cannot be seen and stay."""
    classes = activation_classes()
    ratio = number(ratio, "k-WTA ratio", low=0, high=1, low_open=True)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, classes):
                setattr(parent, name, KWTA(ratio))
                count += 1
    return count


@register("k-wta")
class KWTADefense(Defense):
    """A copy of ``model`` with every activation module replaced by :class:`KWTA`.

    ``self.net`` is the converted deep copy (what ``forward`` runs, what the state dict holds
    and what training updates); ``self.base`` is the undefended original, untouched, for use as
    a transfer surrogate. It is kept outside the module tree, so the state dict and
    ``parameters()`` hold ``net`` only; ``to()``/``cuda()``/``float()`` and ``train()``/``eval()``
    apply to it as well. A converted copy trained from scratch (or fine-tuned) is the defense of
        the paper; converting a ReLU-trained model without training changes its function.

    A model built by ``robustlab.models.create`` keeps a truthful build recipe: ``net``
    records ``activation="kwta"`` when ``ratio`` is 0.1 (the registered activation), so
    ``robustlab.models.save(defense.net, ...)`` and ``load`` round-trip; with another ratio
    ``net`` has no recipe, and ``save`` asks for one rather than write a ReLU recipe.

    Args:
        model: the base classifier; its activations must be modules (``nn.ReLU`` or a class
            registered in ``robustlab.models.layers.ACTIVATIONS``), not ``F.relu`` calls.
        ratio: fraction of each layer's values kept, in (0, 1] (default 0.1, Xiao et al.).

    Raises:
        ValueError: ``ratio`` outside (0, 1]; ``model`` has no activation module to replace.
    """

    def __init__(self, model: nn.Module, ratio: float = RATIO) -> None:
        super().__init__(model)
        self.ratio = number(ratio, "k-WTA ratio", low=0, high=1, low_open=True)
        # the original leaves the module tree (a tuple): the state dict holds net only
        self._modules.pop("base")
        self._original = (model,)
        self.net = copy.deepcopy(model)
        if replace_activations(self.net, self.ratio) == 0:
            names = ", ".join(c.__name__ for c in activation_classes())
            raise ValueError(
                f"k-wta: {type(model).__name__} has no activation module to "
                f"replace ({names}); it applies its activations functionally "
                "(e.g. F.relu in forward): build it with nn.ReLU modules, or with "
                "robustlab.models.create(..., activation='kwta')"
            )
        arch = getattr(self.net, "robustlab_arch", None)  # recorded by robustlab.models.create
        if arch is not None:  # keep robustlab.models.save(defense.net) truthful
            if self.ratio == RATIO:
                attach(
                    self.net,
                    "robustlab_arch",
                    {**arch, "kwargs": {**arch["kwargs"], "activation": "kwta"}},
                )
            else:  # no registered activation rebuilds this net: refuse to save it as relu
                del self.net.robustlab_arch

    # read-only here (Defense.base is a plain attribute): the base is kept out of the tree
    @property
    def base(self) -> nn.Module:  # type: ignore[override]
        """The undefended base model (not part of this module's state)."""
        return self._original[0]

    def _apply(self, fn: Any, recurse: bool = True) -> KWTADefense:
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> KWTADefense:
        super().train(mode)
        self.base.train(mode)
        return self

    def config(self) -> dict[str, Any]:
        return {**super().config(), "ratio": self.ratio}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"

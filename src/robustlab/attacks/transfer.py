"""Transfer attack (Papernot, McDaniel, Goodfellow, 2016, "Transferability in Machine
Learning: from Phenomena to Black-Box Attacks using Adversarial Samples",
https://arxiv.org/abs/1605.07277): adversarial examples crafted on a surrogate model with a
white-box attack, replayed on the attacked model.

Distance: any norm the inner attack supports. Black-box: no gradient of the attacked model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_labels, probe_model
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.registry import create, register
from robustlab.threat import ThreatModel

_PGD_DEFAULTS = {"steps": 40, "restarts": 1}


@register("transfer")
class Transfer(Attack):
    """Run a registered attack on ``surrogate`` and return its points for the attacked model.

    The surrogate runs in eval mode and gets its previous mode back; the inner attack is built
    with :func:`robustlab.attacks.create` on the same threat model and draws from the call's
    generator, so with ``surrogate`` the attacked model itself the result is the inner attack's.

    Args:
        threat: threat model (any norm the inner attack supports).
        surrogate: the model to craft on (``nn.Module``, same inputs and classes as the attacked
            model); required.
        attack: name of the inner attack. Default ``"pgd"``.
        attack_options: its options; default ``{"steps": 40, "restarts": 1}`` for pgd, the
            inner attack's own defaults otherwise.
        targeted: craft towards ``target`` (passed on to the inner attack).
        seed: seed of the generator when the call passes none.

    Shapes: as the inner attack. Returns ``Perturbation(x_adv, queries=...)``; ``queries`` (N,)
    is 1: the attacked model sees each point once, when ``Attack.__call__`` scores it.

    Example:
        >>> atk = Transfer(ThreatModel("linf", 8 / 255), surrogate=other_model)
        >>> res = atk(model, x, y)
    """

    uses_gradients = False
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        surrogate: nn.Module | None = None,
        attack: str = "pgd",
        attack_options: dict[str, Any] | None = None,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        if surrogate is None:
            raise ValueError("the transfer attack needs a surrogate model: "
                             "create('transfer', threat, surrogate=<nn.Module>)")
        if not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
        if not isinstance(attack, str) or attack == "transfer":
            raise ValueError(f"attack must be the name of a registered attack other than "
                             f"'transfer', got {attack!r}")
        if attack_options is not None and not isinstance(attack_options, dict):
            raise TypeError(f"attack_options must be a dict of the inner attack's options, got "
                            f"{type(attack_options).__name__}")
        options = dict(_PGD_DEFAULTS if attack == "pgd" else {}) if attack_options is None \
            else dict(attack_options)
        if self.targeted:
            options["targeted"] = True
        self.surrogate = surrogate
        self.inner = create(attack, threat, **options)
        self.loss_name, self.loss = self.inner.loss_name, self.inner.loss

    def config(self) -> dict[str, Any]:
        return super().config() | {"surrogate": type(self.surrogate).__name__,
                                   "attack": self.inner.config()}

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        with eval_mode(self.surrogate):
            probe = probe_model(self.surrogate, x[:2])
            check_labels(y, probe.shape[1], "targets" if self.targeted else "labels")
            out = self.inner.perturb(self.surrogate, x, y, generator)
        x_adv = out.x_adv if isinstance(out, Perturbation) else out
        return Perturbation(x_adv, queries=torch.ones(len(x), dtype=torch.long, device=x.device))

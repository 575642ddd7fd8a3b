"""Transfer attack (Papernot, McDaniel, Goodfellow, 2016, "Transferability in Machine
Learning: from Phenomena to Black-Box Attacks using Adversarial Samples",
https://arxiv.org/abs/1605.07277): adversarial examples crafted on a surrogate model with a
white-box attack, replayed on the attacked model. The surrogate may be an ensemble (Liu, Chen,
Liu, Song, 2017, https://arxiv.org/abs/1611.02770; Dong et al. 2018's ensemble in logits,
https://arxiv.org/abs/1710.06081): the inner attack then runs on the mean of their logits.

Distance: any norm the inner attack supports. Black-box: no gradient of the attacked model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import check_labels, probe_model
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.registry import create, register
from robustlab.threat import ThreatModel

_PGD_DEFAULTS = {"steps": 40, "restarts": 1}


class Ensemble(nn.Module):
    """The ensemble in logits: ``forward(x) = (1/K) sum_k model_k(x)`` for the K ``models``
    (each returning (N, num_classes) logits, the same num_classes), so its input gradient is
    the mean of the members' logit gradients. The members are held, not copied."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def _surrogates(surrogate: object) -> tuple[nn.Module, ...]:
    """The surrogate models: one module, or a non-empty list or tuple of modules."""
    if surrogate is None:
        raise ValueError(
            "the transfer attack needs a surrogate model: "
            "create('transfer', threat, surrogate=<nn.Module or list of them>)"
        )
    models = tuple(surrogate) if isinstance(surrogate, list | tuple) else (surrogate,)
    if not models:
        raise ValueError("surrogate is an empty list: pass a model, or a list of at least one")
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"surrogate must be a torch.nn.Module or a list of them, got {type(m).__name__}"
            )
    return models


@register("transfer")
class Transfer(Attack):
    """Run a registered attack on ``surrogate`` and return its points for the attacked model.

    The surrogate runs in eval mode and gets its previous mode back; the inner attack is built
    with :func:`robustlab.attacks.create` on the same threat model and draws from the call's
    generator, so with ``surrogate`` the attacked model itself the result is the inner attack's.

    Args:
        threat: threat model (any norm the inner attack supports).
        surrogate: the model to craft on (``nn.Module``, same inputs and classes as the attacked
            model), or a list of them: the ensemble in logits (:class:`Ensemble`), each member
            run in eval mode and given its own mode back; required. A one-model list is that
            model.
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
        surrogate: nn.Module | Sequence[nn.Module] | None = None,
        attack: str = "pgd",
        attack_options: dict[str, Any] | None = None,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.members = _surrogates(surrogate)
        if not isinstance(attack, str) or attack == "transfer":
            raise ValueError(
                f"attack must be the name of a registered attack other than "
                f"'transfer', got {attack!r}"
            )
        if attack_options is not None and not isinstance(attack_options, dict):
            raise TypeError(
                f"attack_options must be a dict of the inner attack's options, got "
                f"{type(attack_options).__name__}"
            )
        options = (
            dict(_PGD_DEFAULTS if attack == "pgd" else {})
            if attack_options is None
            else dict(attack_options)
        )
        if self.targeted:
            options["targeted"] = True
        self.surrogate = self.members[0] if len(self.members) == 1 else Ensemble(self.members)
        self.inner = create(attack, threat, **options)
        self.loss_name, self.loss = self.inner.loss_name, self.inner.loss

    def config(self) -> dict[str, Any]:
        names = [type(m).__name__ for m in self.members]
        return super().config() | {
            "surrogate": names[0] if len(names) == 1 else names,
            "attack": self.inner.config(),
        }

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        with ExitStack() as modes:  # each member's own mode comes back
            classes = set()
            for m in self.members:
                modes.enter_context(eval_mode(m))
                classes.add(probe_model(m, x[:2]).shape[1])
            if len(classes) > 1:
                raise ValueError(
                    f"the surrogate models disagree on the number of classes "
                    f"({sorted(classes)}); an ensemble needs one class list"
                )
            check_labels(y, classes.pop(), "targets" if self.targeted else "labels")
            out = self.inner.perturb(self.surrogate, x, y, generator)
        x_adv = out.x_adv if isinstance(out, Perturbation) else out
        return Perturbation(x_adv, queries=torch.ones(len(x), dtype=torch.long, device=x.device))

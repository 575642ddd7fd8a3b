"""The attack contract: ``attack(model, x, y) -> AttackResult``.

The base class owns everything every attack must get right, so each attack file holds only its
own optimisation (:meth:`Attack.perturb`): input checks, eval mode restored in ``finally``, the
caller's tensors untouched, the output verified inside the ball and the bounds, and success
recomputed from the model's own predictions on the returned points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, final

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import (
    check_inputs,
    check_labels,
    check_logits,
    generator_or_none,
    integer,
    probe_model,
)
from robustlab.attacks.bpda import bpda
from robustlab.attacks.eot import expected_grad
from robustlab.attacks.losses import CustomLoss, is_success, rejects, resolve_loss
from robustlab.threat import CONTINUOUS_NORMS, ThreatModel


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
        x_adv: adversarial inputs (N, ...), inside the threat ball and bounds (verified).
        success: bool (N,), recomputed from the model's predictions on ``x_adv``:
            prediction != y (untargeted; for a detector, :func:`~robustlab.attacks.losses.
            rejects`, also != its rejection output) or == target (targeted).
        loss: (N,) the attack loss at ``x_adv``.
        logits: (N, K) the model's logits at ``x_adv``.
        min_norm: minimum-norm attacks only: (N,) the smallest adversarial perturbation found
            for each sample, in the threat model's norm and whatever eps (``inf`` where none
            was found; 0 where the clean point is already misclassified), so one run gives the
            robust accuracy at every eps: ``(min_norm > e).float().mean()``.
        queries: score- and decision-based attacks only: (N,) model queries spent per sample.
    """

    x_adv: Tensor
    success: Tensor
    loss: Tensor
    logits: Tensor
    min_norm: Tensor | None = None
    queries: Tensor | None = None

    @property
    def robust_accuracy(self) -> float:
        """Fraction of points the attack did not break (untargeted attacks on clean-correct and
        clean-wrong points alike: a wrong clean prediction counts as broken)."""
        return 1.0 - self.success.float().mean().item()


class Perturbation(NamedTuple):
    """What :meth:`Attack.perturb` may return instead of a bare tensor, to pass on the
    per-sample extras of :class:`AttackResult`."""

    x_adv: Tensor
    min_norm: Tensor | None = None
    queries: Tensor | None = None


class Attack:
    """Base class. Subclasses implement :meth:`perturb`, the only method they override
    (``__call__`` is final); ``@register("name")`` gives the class its ``name``.

    Class attributes a subclass sets: ``norms`` (the norms it supports, by default linf, l2
    and l1, so an l0 attack declares ``"l0"``; others raise ValueError at construction),
    ``uses_gradients`` (False for score- and decision-based attacks: they only call the model
    under ``torch.no_grad``), ``minimum_norm`` (True if it searches the smallest perturbation
    and reports ``min_norm``), ``stochastic``.

    Args:
        threat: the threat model (norm, eps, bounds).
        loss: name of the loss to maximise (see ``robustlab.attacks.losses``), or a callable
            ``loss(logits, y) -> (N,)`` maximised as it is (recorded under its ``__name__``).
        targeted: if True, ``__call__`` needs ``target`` and success means predicting it.
        seed: seed of the attack's own ``torch.Generator`` when none is passed to the call.
    """

    name: ClassVar[str] = "attack"
    stochastic: bool = False  # a class default that an instance may override
    norms: ClassVar[tuple[str, ...]] = CONTINUOUS_NORMS
    uses_gradients: ClassVar[bool] = True
    minimum_norm: ClassVar[bool] = False

    def __init__(
        self,
        threat: ThreatModel,
        *,
        loss: str | CustomLoss = "ce",
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            raise ValueError(
                f"attack {self.name!r} supports the norms {', '.join(self.norms)}, "
                f"not {threat.norm!r}; pick another attack for {threat.norm}"
            )
        self.threat = threat
        self.eot_samples = 1
        self.bpda = False
        self.loss_name, self.loss = resolve_loss(loss)
        self.targeted = bool(targeted)
        self.seed = integer(seed, "seed")

    def config(self) -> dict[str, Any]:
        """The attack's settings, as recorded in results."""
        cfg = {"name": self.name, "loss": self.loss_name, "targeted": self.targeted}
        if self.eot_samples > 1:
            cfg["eot_samples"] = self.eot_samples
        if self.bpda:
            cfg["bpda"] = True
        return cfg

    def input_grad(
        self, loss_fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`input_grad`, averaged over ``self.eot_samples`` forward/backward passes
        (expectation over transformation, Athalye et al. 2018, for randomised models): loss,
        logits and gradient are the means over the draws. Gradient attacks call this."""
        return expected_grad(loss_fn, x, self.eot_samples)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({self.threat}, {args})"

    @final
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        """Attack ``model`` at ``(x, y)``; ``target`` (N,) for targeted attacks.

        The model runs in eval mode during the attack and gets its previous mode back after.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_inputs(x, y, self.threat)
        if self.targeted:
            if target is None:
                raise ValueError(f"{self.name} is targeted: pass target=<(N,) class tensor>")
            check_inputs(x, target)
        elif target is not None:
            raise ValueError(
                f"{self.name} is untargeted: create it with targeted=True to pass target"
            )
        # the checks above leave target set exactly when the attack is targeted
        labels = (y if target is None else target).to(device=x.device, dtype=torch.long)
        gen = generator_or_none(generator)
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        x0 = x.detach()
        with eval_mode(model):
            probe = probe_model(model, x0[:2])  # two samples: catches batch-collapsing models
            check_labels(labels, probe.shape[1], "targets" if self.targeted else "labels")
            with bpda(model, self.bpda):
                out = self.perturb(model, x0, labels, gen)
            out = out if isinstance(out, Perturbation) else Perturbation(out)
            x_adv = out.x_adv.detach()
            self.threat.check(x_adv, x0, who=f"attack {self.name!r}")
            with torch.no_grad():
                logits = check_logits(model(x_adv), len(x_adv))
                loss = self.loss(logits, labels, self.targeted)
            success = is_success(logits, labels, self.targeted, rejects(model))
        return AttackResult(
            x_adv=x_adv,
            success=success,
            loss=loss,
            logits=logits,
            min_norm=out.min_norm,
            queries=out.queries,
        )

    @final
    def craft(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, **how: Any
    ) -> Tensor:
        """Only the adversarial inputs, for training loops that checked their batch already:
        no input checks, no prediction on the result; still run in eval mode and verified
        inside the ball and the bounds. ``how``: keyword arguments of this attack's
        :meth:`perturb` for this call only (PGD's ``loss`` and ``start``), so an objective
        changes what the attack maximises without touching the attack object."""
        with eval_mode(model), bpda(model, self.bpda):
            out = self.perturb(model, x.detach(), y, generator, **how)
        x_adv = (out.x_adv if isinstance(out, Perturbation) else out).detach()
        self.threat.check(x_adv, x, who=f"attack {self.name!r}")
        return x_adv

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Tensor | Perturbation:
        """Return adversarial inputs for ``x`` (detached, not modified), or a
        :class:`Perturbation` with the extras; ``y`` holds the labels, or the targets when
        ``self.targeted``. Runs with the model in eval mode (and with BPDA stages switched on
        when ``self.bpda``). All randomness comes from
        ``generator``."""
        raise NotImplementedError

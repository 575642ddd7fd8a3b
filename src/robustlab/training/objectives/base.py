"""The objective contract: ``objective(model, x, y, threat=..., generator=...) -> scalar loss``.

An objective only says what to minimise for one minibatch; the trainer owns the optimiser, the
schedule, checkpoints, logging and distribution. Objectives with state or with needs beyond one
minibatch say so through the hooks below, which the trainer calls at fixed points:

- :meth:`Objective.setup` once before training (load a teacher, pseudo-label data);
- :meth:`Objective.begin_epoch` at the start of every pass over the data;
- ``replays`` optimiser steps per minibatch, each one ``__call__`` -> backward ->
  :meth:`Objective.after_backward` -> optimiser step -> :meth:`Objective.after_step`
  (free-at's replays);
- :meth:`Objective.record_validation` after each validation of the trainer's hold-out
  (``val_split``), with its accuracies;
- :meth:`Objective.state_dict` / :meth:`Objective.load_state_dict` for exact resume.

Rules every objective follows (the contract test checks them): the returned loss is a finite
scalar whose gradient reaches every trainable parameter; the model gets its mode back;
inner maximisations take input gradients with ``torch.autograd.grad`` only, so no parameter
gradient leaks out of them; nothing calls ``backward`` or touches the optimiser.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab.threat import ThreatModel


class Objective:
    """Base class. Subclasses implement :meth:`loss` and get their ``name`` from
    ``@register("name")``; options are keyword arguments of ``__init__``, validated there
    (with :mod:`robustlab._validate`) and reported by :meth:`config`.

    Class attributes a subclass sets: ``needs_threat`` (False for objectives that do not use
    the threat model: natural, clp, vat, grad-reg, distillation, mmc), ``single_step`` (True
    for one-step inner maximisations, which turns the catastrophic-overfitting probe on by
    default).
    """

    name: ClassVar[str] = "objective"
    needs_threat: bool = True  # a class default that an instance may override
    single_step: ClassVar[bool] = False
    #: optimiser steps per minibatch; the trainer makes ``ceil(epochs / replays)`` passes.
    replays: int = 1

    def config(self) -> dict[str, Any]:
        """The objective's settings (JSON-able), as recorded in checkpoints and logs."""
        return {"name": self.name}

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        threat: ThreatModel | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean loss on the minibatch ``(x, y)`` (x in the threat's bounds, y class ids)."""
        if self.needs_threat and threat is None:
            raise ValueError(
                f"objective {self.name!r} needs a threat model: pass "
                "threat=ThreatModel('linf', eps)"
            )
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        return self.loss(model, x, y, threat, generator)

    # --- hooks (no-ops by default) ------------------------------------------------------------
    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Called once before training with the whole training set; returns the training set
        to use (objectives that pseudo-label data change ``y`` here)."""
        return x, y

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called before pass ``epoch`` (0-based) of ``epochs`` passes."""

    def epoch_log(self) -> dict[str, float]:
        """Scalars that describe the pass just trained, added to its record of the training
        log (the curriculum's lesson); none by default. Called after the pass, before its
        hold-out check."""
        return {}

    def after_backward(self) -> None:
        """Called after each ``loss.backward()``, before the optimiser step."""

    def after_step(self) -> None:
        """Called after each optimiser step, once the weights hold their new values (AWP's
        perturbation removed), before the weight average takes them in."""

    def record_validation(self, metrics: dict[str, float]) -> None:
        """Called only in runs with a hold-out of the training data (``val_split``): once
        before training with ``{"holdout_n": n}`` alone, then after each of its checks
        (every ``val_every`` passes) with the log's ``holdout_*`` entries:
        ``holdout_clean_acc``, ``holdout_robust_acc`` (under the run's ``val_attack``, when
        there is a threat model; fractions in [0, 1]) and ``holdout_n``. The next
        :meth:`begin_epoch` follows a check."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors the objective carries between minibatches (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"objective {self.name!r} has no state, got {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

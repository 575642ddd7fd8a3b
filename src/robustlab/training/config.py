"""The training settings (:class:`TrainConfig`) and their one complete check.

:meth:`TrainConfig.validate` runs before anything is trained (the trainer calls it first, the
recipe loader right after parsing): every field's type and range with the field's name in the
message, the objective's and the schedule's names and options, and the validation attack's
name and options (with a threat model, the attack is built once, so a bad option value is
found now and not after the first epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from robustlab._validate import OptionTypeError, integer, number, one_of, positive_int
from robustlab.attacks import ATTACKS, create_for_evaluation
from robustlab.threat import ThreatModel
from robustlab.training.averaging import AVERAGES
from robustlab.training.objectives import get as get_objective
from robustlab.training.probe import ACTIONS
from robustlab.training.schedules import SCHEDULES, lr_at
from robustlab.training.split_loss import supporting

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "sgd")
_ATTACK_CREATE_OPTIONS = ("eot", "bpda")  # taken by attacks.create for any attack
_SCHEDULE_ARGS = 3  # lr, progress, epochs: what lr_at passes to every schedule


def _flag(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (TOML ``true`` / ``false``)."""
    if not isinstance(value, bool):
        raise OptionTypeError(f"{name} must be true or false, got {value!r}")
    return value


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OptionTypeError(f"{name} must be a table (a dict) of options, got {value!r}")
    return value


def check_val_attack(spec: Any, threat: ThreatModel | None) -> None:
    """The validation attack ``{"name": ..., **options}``: a registered attack with options it
    takes; with ``threat``, built once so that every option's value is checked too."""
    spec = _table(spec, "val_attack")
    if "name" not in spec:
        raise ValueError(
            f'val_attack needs a name ([val_attack] needs a name = "pgd" in a recipe), got {spec!r}'
        )
    name = spec["name"]
    opts = {k: v for k, v in spec.items() if k != "name"}
    try:
        if threat is not None:
            create_for_evaluation(name, threat, **opts)
            return
        cls = ATTACKS.get(name)
        valid = [*ATTACKS.options(name)[1:], *_ATTACK_CREATE_OPTIONS]
        if unknown := [k for k in opts if k not in valid]:
            raise TypeError(
                f"attack {cls.name!r}: unknown option {unknown[0]!r}; its options "
                f"are: {', '.join(valid)}"
            )
    except (TypeError, ValueError) as e:
        raise (OptionTypeError if isinstance(e, TypeError) else ValueError)(
            f"val_attack: {e}"
        ) from None


def check_schedule(name: Any, options: Any, lr: float, epochs: int) -> None:
    """The schedule ``name`` with ``options``: options it takes, and learning rates it can
    compute (finite, >= 0) over the run."""
    SCHEDULES.get(name)
    options = _table(options, "schedule_options")
    valid = SCHEDULES.options(name)[_SCHEDULE_ARGS:]
    if unknown := [k for k in options if k not in valid]:
        raise ValueError(
            f"unknown schedule option {unknown[0]!r} for schedule {name!r} "
            f"(the recipe's [schedule]); its options are: "
            f"{', '.join(valid) or 'none'}"
        )
    try:
        rates = [lr_at(name, lr, epochs * t, epochs, **options) for t in (0, 0.5, 0.99, 1)]
        if not all(isinstance(r, float | int) and math.isfinite(r) and r >= 0 for r in rates):
            raise ValueError(f"it gives learning rates {rates}")
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ValueError(
            f"schedule {name!r} with options {options} (the recipe's [schedule]) does not work: {e}"
        ) from None


@dataclass
class TrainConfig:
    """Every training setting, with its default, in one place.

    ``epochs`` is the budget in passes' worth of optimiser steps: an objective that replays
    each minibatch ``m`` times (free-at) makes ``ceil(epochs / m)`` passes over the data, so
    every objective takes about the same number of optimiser steps.
    ``overfit_probe``: ``auto`` (``stop`` for single-step objectives, else ``off``), ``off``,
    ``stop`` or ``rollback`` (see :mod:`robustlab.training.probe`). ``precision="bf16"`` runs
    the objective under bfloat16 autocast; ``channels_last`` stores the model and batches in
    channels-last memory format (both are for GPUs). ``init``: a ``.safetensors`` checkpoint
    whose weights a fresh run starts from (fine-tuning; relative to the current directory;
    see :func:`robustlab.models.init.init_weights`); a resumed run ignores it.

    Trainer features (issue 23; each module's docstring has the paper, formula and cost):

    - ``val_split``: training examples held out for model selection, a count (``1000``) or a
      fraction in [0, 1) (``0.02``); 0: none. ``val_every``: validate (the hold-out and the
      trainer's ``val``) every k passes and after the last. ``keep_best``: also save the
      weights of the epoch with the best hold-out robust accuracy as
      ``model_best.safetensors`` (needs ``val_split`` and ``out``;
      :mod:`robustlab.training.selection`).
    - ``average``: ``none``, ``ema`` (decay ``ema_decay``, warm-up min(decay, (1+t)/(10+t)))
      or ``swa`` (uniform mean of the weights after each epoch past ``swa_start``, BatchNorm
      recomputed); the average is what is validated and saved, and what the model holds at
      the end (:mod:`robustlab.training.averaging`).
    - ``awp``: adversarial weight perturbation of relative size ``awp_gamma`` after
      ``awp_warmup`` epochs without it; pgd-at, trades and mart
      (:mod:`robustlab.training.awp`).
    - ``augment``: random crop with ``crop_pad`` pixels of padding and, if the data set is
      mirrorable or ``flip = true``, random horizontal flips (``flip = false``: never;
      :mod:`robustlab.training.augment`).
    - ``label_smoothing``: the cross-entropy on the labels smoothed by this amount in [0, 1);
      natural, pgd-at and trades (:mod:`robustlab.training.split_loss`).
    """

    objective: str = "natural"
    objective_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.1
    momentum: float = 0.9  # SGD momentum; Adam's beta1
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # constant | piecewise | cosine | cyclic
    schedule_options: dict[str, Any] = field(default_factory=dict)
    grad_clip: float | None = None
    seed: int = 0
    val_attack: dict[str, Any] = field(default_factory=lambda: {"name": "pgd", "steps": 10})
    overfit_probe: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    dataset: str | None = None  # recorded in the checkpoint
    init: str | None = None  # checkpoint to start from (recipes: [model] init)
    val_split: float | int = 0  # held-out training examples: a count or a fraction
    val_every: int = 1  # validate every k passes (and after the last)
    keep_best: bool = False  # model_best.safetensors: the best hold-out robust accuracy
    average: str = "none"  # none | ema | swa
    ema_decay: float = 0.995  # Gowal et al.
    swa_start: int = 0  # SWA averages the epochs after this many
    awp: bool = False
    awp_gamma: float = 5e-3  # Wu et al., TRADES-AWP (PGD-AT-AWP: 1e-2)
    awp_warmup: int = 10  # epochs without AWP first (PGD-AT-AWP: 0)
    augment: bool = False  # random crop (+ flip where the data set allows it)
    crop_pad: int = 4  # pixels of padding of the random crop
    flip: bool | None = None  # None: the data set's own rule (CIFAR yes, Fashion-MNIST no)
    label_smoothing: float = 0.0

    def validate(self, threat: ThreatModel | None = None) -> None:
        """Check every setting (``ValueError`` / ``TypeError`` naming it); with the run's
        ``threat``, build the validation attack once to check its options' values."""
        get_objective(self.objective)
        _table(self.objective_options, "objective_options")
        for name in ("epochs", "batch_size"):
            positive_int(getattr(self, name), name)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        try:
            number(self.lr, "lr", low=0, low_open=True)
        except OptionTypeError:
            raise
        except ValueError:
            raise ValueError(f"lr must be > 0, got {self.lr!r}") from None
        number(self.momentum, "momentum", low=0, high=1, high_open=True)
        number(self.weight_decay, "weight_decay", low=0)
        _flag(self.nesterov, "nesterov")
        _flag(self.channels_last, "channels_last")
        if self.grad_clip is not None:
            number(self.grad_clip, "grad_clip", low=0, low_open=True)
        integer(self.seed, "seed")
        check_schedule(self.schedule, self.schedule_options, self.lr, self.epochs)
        check_val_attack(self.val_attack, threat)
        for value, name, choices in (
            (self.overfit_probe, "overfit_probe", ACTIONS),
            (self.precision, "precision", PRECISIONS),
        ):
            if value not in choices:  # the wording recipes and tests have always seen
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise OptionTypeError(f"dataset must be a data set's name, got {self.dataset!r}")
        if self.init is not None and not (
            isinstance(self.init, str) and self.init.endswith(".safetensors")
        ):
            raise ValueError(
                f"init must be the path of a .safetensors checkpoint, got {self.init!r}"
            )
        self._validate_selection()
        self._validate_features()

    def _validate_selection(self) -> None:
        """``val_split``, ``val_every``, ``keep_best``."""
        if isinstance(self.val_split, float):
            number(self.val_split, "val_split", low=0, high=1, high_open=True)
        else:
            integer(self.val_split, "val_split (a count, or a fraction such as 0.02)", minimum=0)
        positive_int(self.val_every, "val_every")
        if _flag(self.keep_best, "keep_best") and not self.val_split:
            raise ValueError(
                "keep_best chooses the epoch on training examples held out from "
                "training: set val_split (a count such as 1000, or a fraction "
                "such as 0.02 of the training set)"
            )

    def _validate_features(self) -> None:
        """Weight averaging, AWP, augmentation and label smoothing."""
        one_of(self.average, "average", AVERAGES)
        number(self.ema_decay, "ema_decay", low=0, high=1, high_open=True)
        integer(self.swa_start, "swa_start", minimum=0)
        if self.average == "swa" and self.swa_start >= self.epochs:
            raise ValueError(
                f"swa_start={self.swa_start} >= epochs={self.epochs}: SWA would "
                "average no epoch; lower swa_start"
            )
        number(self.awp_gamma, "awp_gamma", low=0, low_open=True)
        integer(self.awp_warmup, "awp_warmup", minimum=0)
        if _flag(self.awp, "awp"):
            if self.objective not in supporting("awp"):
                raise ValueError(
                    f"awp wraps the objectives {', '.join(supporting('awp'))}, "
                    f"not {self.objective!r}; set awp = false"
                )
            if self.awp_warmup >= self.epochs:
                raise ValueError(
                    f"awp_warmup={self.awp_warmup} >= epochs={self.epochs}: AWP "
                    "would never run; lower awp_warmup (0: from the first epoch)"
                )
        integer(self.crop_pad, "crop_pad", minimum=0)
        if self.flip is not None:
            _flag(self.flip, "flip")
        if not _flag(self.augment, "augment") and (self.flip is not None or self.crop_pad != 4):
            raise ValueError(
                "crop_pad and flip set how augment = true augments; set "
                "augment = true, or leave them out"
            )
        number(self.label_smoothing, "label_smoothing", low=0, high=1, high_open=True)
        if self.label_smoothing and self.objective not in supporting("smoothing"):
            raise ValueError(
                f"label_smoothing applies to the cross-entropy of the objectives "
                f"{', '.join(supporting('smoothing'))}, not {self.objective!r}; "
                "set label_smoothing = 0"
            )

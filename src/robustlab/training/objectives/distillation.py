"""Defensive distillation (Papernot, McDaniel, Wu, Jha, Swami, "Distillation as a Defense to
Adversarial Perturbations against Deep Neural Networks", IEEE S&P 2016,
https://arxiv.org/abs/1511.04508).

    teacher stage (teacher=None):  CE(f(x) / T, y)
    student stage:                 -sum_i softmax(f_t(x) / T)_i * log_softmax(f_s(x) / T)_i

The student has the teacher's architecture (not enforced) and is deployed at T = 1: the
model's logits are used as they are, about T times larger than the ones the loss saw, so its
softmax saturates and gradients of softmax-based losses vanish. That is gradient masking, not
robustness (Carlini & Wagner, arXiv:1607.04311): evaluate it with margin losses on the logits.
Original setting: T = 100 on MNIST and CIFAR-10 (a smaller T was also explored). The loss is
not multiplied by T^2 (Hinton et al.'s correction), as in the paper.

The teacher (a robustlab checkpoint path or an ``nn.Module``) is loaded in :meth:`setup` (or on
the first call) onto the student's device, runs in eval mode under ``no_grad`` and is never a
submodule of the trained model; a checkpoint-loaded teacher also gets ``requires_grad=False``.
Cost: 1 forward/backward (teacher stage); + 1 teacher forward per minibatch (student stage).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import number
from robustlab.models import load as load_model
from robustlab.threat import ThreatModel
from robustlab.training.objectives import register
from robustlab.training.objectives.base import Objective

Teacher = str | os.PathLike[str] | nn.Module


def check_teacher(teacher: Any, who: str) -> None:
    """TypeError unless ``teacher`` is a checkpoint path or an ``nn.Module``."""
    if not isinstance(teacher, str | os.PathLike | nn.Module):
        raise TypeError(
            f"{who} teacher must be a path to a robustlab checkpoint "
            f"(model.safetensors) or an nn.Module, got {type(teacher).__name__}"
        )


def teacher_name(teacher: Teacher | None) -> str | None:
    """How a teacher is recorded in ``config()``: its path, or ``"<module>"``."""
    if teacher is None:
        return None
    return "<module>" if isinstance(teacher, nn.Module) else str(teacher)


def load_teacher(teacher: Teacher, device: torch.device, who: str) -> nn.Module:
    """The teacher on ``device``: a checkpoint is loaded (eval mode, frozen); a module is moved
    there (its parameters keep their ``requires_grad``; callers run it under ``no_grad``)."""
    if isinstance(teacher, nn.Module):
        return teacher.to(device)
    path = Path(teacher)
    if not path.is_file():
        raise FileNotFoundError(
            f"{who} teacher checkpoint {str(path)!r} not found: train the "
            "teacher first (see the recipe's comment) or fix the path"
        )
    return load_model(path, device=device).requires_grad_(False)


def model_device(model: nn.Module, x: Tensor) -> torch.device:
    return next((p.device for p in model.parameters()), x.device)


@register("distillation")
class Distillation(Objective):
    """Cross-entropy at temperature T, on the labels (teacher stage) or on a teacher's soft
    labels softmax(f_t(x) / T) (student stage).

    Args:
        temperature: T (> 0), default 100 (Papernot et al.).
        teacher: ``None`` for the teacher stage; else a robustlab checkpoint path
            (``runs/<teacher>/model.safetensors``) or an ``nn.Module`` mapping the same inputs
            to as many logits as the student.
    """

    needs_threat = False

    def __init__(self, temperature: float = 100.0, teacher: Teacher | None = None) -> None:
        number(temperature, "distillation temperature", low=0, low_open=True)
        if teacher is not None:
            check_teacher(teacher, "distillation")
        self.temperature, self.teacher = float(temperature), teacher
        self._teacher: nn.Module | None = None  # loaded by setup() or the first call
        self._device: torch.device | None = None

    def config(self) -> dict:
        return super().config() | {
            "temperature": self.temperature,
            "teacher": teacher_name(self.teacher),
        }

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.teacher is not None:
            if self.teacher is model:
                raise ValueError(
                    "the distillation teacher must be another model than the "
                    "student (train a teacher with teacher=None first)"
                )
            self._load(model_device(model, x))
        return x, y

    def _load(self, device: torch.device) -> nn.Module:
        if self._teacher is None or self._device != device:
            assert self.teacher is not None
            self._teacher = load_teacher(self.teacher, device, "distillation")
            self._device = device
        return self._teacher

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel | None,
        generator: torch.Generator,
    ) -> Tensor:
        log_p = F.log_softmax(model(x) / self.temperature, dim=1)
        if self.teacher is None:
            return F.nll_loss(log_p, y)
        teacher = self._load(x.device)
        with eval_mode(teacher), torch.no_grad():
            soft = F.softmax(teacher(x) / self.temperature, dim=1)
        if soft.shape != log_p.shape:
            raise ValueError(
                f"the teacher returns {tuple(soft.shape)} logits but the student "
                f"{tuple(log_p.shape)}: they must have the same classes"
            )
        return -(soft * log_p).sum(1).mean()

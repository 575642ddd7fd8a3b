"""The model's outputs as the attacks see them, where the raw outputs would blind the attacks.

Two kinds of outputs make a model look robust to attacks written for logits:

- probabilities (rows non-negative and summing to 1: the ``softmax-output`` flag): the attacks
  run on their logarithm, the logits up to a per-row constant, so the cross-entropy and the
  margins mean what they mean on logits. Where the output is the very tensor a softmax call of
  the forward pass returned (``F.softmax``, ``torch.softmax``, ``Tensor.softmax``,
  ``nn.Softmax``), its logarithm is the ``log_softmax`` of that call's input: exact, also where
  the probabilities rounded to 0 and 1. Otherwise it is ``log(p.clamp_min(tiny))``, which has
  no gradient where a probability underflowed to 0.
- saturated logits (a huge temperature, e.g. ``100 * logits``, or the log of a saturated
  softmax): the median gap between the two top logits of the probe batch exceeds
  :data:`SATURATED_GAP`, where the cross-entropy's gradient (``~exp(-gap)``) underflows or
  vanishes under an l2 normalisation. The attacks then see the logits divided by one
  temperature, chosen so that the median gap becomes :data:`TARGET_GAP`: the same model at
  another temperature, so every loss (CE, margins, DLR) stays a fixed function of the input.

Both transforms keep the predicted class (the logarithm is increasing, the temperature
positive), and the cascade still judges every prediction on the model itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from robustlab._modes import declared

#: median top-2 logit gap above which the outputs count as saturated (CE's gradient ~1e-22)
SATURATED_GAP = 50.0
#: the median top-2 gap the temperature brings saturated logits to
TARGET_GAP = 10.0


class _LastSoftmax(TorchFunctionMode):
    """Records the last softmax call of a forward pass: its output, input, dim and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[Tensor, Tensor, int, Any] | None = None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") == "softmax" and args and isinstance(out, Tensor):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int):
                self.last = (out, args[0], dim, kwargs.get("dtype"))
        return out


class OutputView(nn.Module):
    """``model`` as the attacks see it: the logarithm of its outputs (``log``), divided by
    ``temperature``; same predicted class. Declares what the model declares (a detector stays
    one). ``exact``: whether the last forward pass took the log through the model's own
    softmax call (False: the clamped log)."""

    def __init__(self, model: nn.Module, *, log: bool, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.log = bool(log)
        self.temperature = float(temperature)
        self.exact = False
        self.robustlab_random = declared(model, "randomized")
        self.robustlab_reject = declared(model, "rejects")
        # the model's mode: an attack restores the view's mode, and with it the model's, after
        # each call (a fresh module is in training mode: BatchNorm would switch to batch stats)
        self.training = model.training

    def forward(self, x: Tensor) -> Tensor:
        if not self.log:
            out = self.model(x)
        else:
            with _LastSoftmax() as seen:
                p = self.model(x)
            self.exact = seen.last is not None and seen.last[0] is p
            if self.exact:
                _, logits, dim, dtype = seen.last
                out = F.log_softmax(logits, dim=dim, dtype=dtype)
            else:
                out = p.clamp_min(torch.finfo(p.dtype).tiny).log()
        return out if self.temperature == 1.0 else out / self.temperature


def top_gap(z: Tensor) -> float:
    """The median over rows of the gap between the two largest finite outputs (0 for fewer
    than two classes or no finite row)."""
    if z.shape[1] < 2:
        return 0.0
    top = z.detach().float().topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    gap = gap[torch.isfinite(gap)]
    return float(gap.median()) if len(gap) else 0.0


def output_plan(
    model: nn.Module, x: Tensor, outputs: Tensor, probabilities: bool, log_outputs: bool | None
) -> tuple[bool, float, str | None]:
    """Whether the attacks see the log of ``model``'s outputs, at which temperature, and why
    (None: they see the outputs as they are), from its probe batch ``x`` and its ``outputs``
    there; ``probabilities``: the ``softmax-output`` flag; ``log_outputs`` forces the log
    (None: the log exactly when the outputs are probabilities). The model must be in eval
    mode."""
    log = probabilities if log_outputs is None else log_outputs
    why = []
    if log:
        view = OutputView(model, log=True)
        with torch.no_grad():
            outputs = view(x)
        how = (
            "the log_softmax of the model's final softmax call"
            if view.exact
            else "their log, clamped at the smallest float (no gradient where a probability "
            "underflowed to 0)"
        )
        cause = (
            "the outputs are probabilities (the softmax-output flag)"
            if log_outputs is None
            else "forced by log_outputs=True"
        )
        why.append(f"{cause}: the attacks run on {how}")
    elif probabilities:
        why.append("log_outputs=False: the attacks run on the raw probabilities")
    gap, temperature = top_gap(outputs), 1.0
    if gap > SATURATED_GAP:
        temperature = gap / TARGET_GAP
        why.append(
            f"saturated logits: the median gap between the two top logits on the probe "
            f"batch is {gap:.4g} (> {SATURATED_GAP:g}, where the cross-entropy's "
            f"gradient underflows): the attacks see them at temperature "
            f"{temperature:.4g} (median gap {TARGET_GAP:g})"
        )
    return log, temperature, "; ".join(why) or None

"""What the random stages share: uniform draws from an optional generator, per-image pixel
gathers, and the defense that averages the prediction over several draws.

The stages themselves are in :mod:`~robustlab.defenses.tv_min`,
:mod:`~robustlab.defenses.crop_rescale` and :mod:`~robustlab.defenses.resize_pad`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._validate import generator_or_none, positive_int
from robustlab.defenses.preprocess import Preprocessed, Transform

__all__ = ["MeanOfDraws", "pick", "uniform"]


def uniform(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """U[0, 1) float32 draws on ``device``, from ``generator`` (drawn on its device) if given."""
    where = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=where).to(device)


def pick(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]`` for per-image index maps
    ``rows`` (N, h) and ``cols`` (N, w); differentiable in ``x`` (a gather)."""
    n, c, _, width = x.shape
    idx = (rows[:, :, None] * width + cols[:, None, :]).flatten(1)
    out = x.flatten(2).gather(2, idx[:, None, :].expand(n, c, idx.shape[1]))
    return out.view(n, c, rows.shape[1], cols.shape[1])


class MeanOfDraws(Preprocessed):
    """``base(stage(x))`` for one draw; for ``samples`` > 1 the log of the mean softmax over
    that many independent draws, ``log (1/S) sum_s softmax(base(stage_s(x)))``, the
    averaged prediction of Guo et al. (crops) and Xie et al. (30 resize-pad draws)."""

    def __init__(
        self, model: nn.Module, stage: Transform, samples: int, generator: torch.Generator | None
    ) -> None:
        super().__init__(model, stage)
        self.samples = positive_int(samples, "samples")
        self.stage.generator = generator_or_none(generator)

    def forward(self, x: Tensor) -> Tensor:
        if self.samples == 1:
            return super().forward(x)
        total: Tensor | None = None
        for _ in range(self.samples):
            p = F.softmax(self.base(self.stage(x)), dim=1)
            total = p if total is None else total + p
        assert total is not None
        mean = total / self.samples
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "samples": self.samples}

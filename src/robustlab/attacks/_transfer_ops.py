"""The input and gradient transforms of the transfer families (DI, TI, NI/SI, VMI), as plain
tensor functions: :mod:`robustlab.attacks._momentum_family` composes them on MI-FGSM's loop,
and each family's file (``di_fgsm.py``, ``ti_fgsm.py``, ``ni_fgsm.py``, ``vmi_fgsm.py``)
documents its paper's formula and defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.threat import ThreatModel

__all__ = ["diverse", "gaussian_kernel", "look_ahead", "neighbour", "scaled", "smooth"]

#: TI's kernel spans this many standard deviations on each side (``linspace(-3, 3, size)``)
KERNEL_SIGMAS = 3.0


def diverse(
    x: Tensor, p: float, resize: float, generator: torch.Generator, fill: float
) -> tuple[Tensor, bool]:
    """DI's random transform of the batch ``x`` (N, C, H, W): with probability ``p`` (one draw
    for the whole batch), resize to ``rh x rw`` by nearest neighbour, ``rh`` uniform in
    ``[max(1, int(H * resize)), H)`` (``H`` itself when that range is empty) and
    ``rw = round(W * rh / H)``, then pad with ``fill`` at a uniform random offset back to
    ``H x W``; otherwise ``x`` itself. Differentiable in ``x``. Returns the transformed batch
    and whether the transform was drawn."""
    dev = generator.device
    if float(torch.rand((), generator=generator, device=dev)) >= p:
        return x, False
    h, w = x.shape[-2:]
    low = max(1, int(h * resize))
    rh = int(torch.randint(low, h, (), generator=generator, device=dev)) if low < h else h
    rw = min(w, max(1, round(w * rh / h)))
    top = int(torch.randint(0, h - rh + 1, (), generator=generator, device=dev))
    left = int(torch.randint(0, w - rw + 1, (), generator=generator, device=dev))
    small = F.interpolate(x, size=(rh, rw), mode="nearest")
    return F.pad(small, (left, w - rw - left, top, h - rh - top), value=fill), True


def gaussian_kernel(size: int, like: Tensor) -> Tensor:
    """TI's kernel (size, size): the outer product of the standard normal density at
    ``linspace(-3, 3, size)`` with itself, normalised to sum 1 (so its standard deviation is
    ``(size - 1) / 6`` pixels); dtype and device of ``like``."""
    t = torch.linspace(-KERNEL_SIGMAS, KERNEL_SIGMAS, size, dtype=torch.float64)
    k1 = torch.exp(-t.square() / 2)  # the density up to its constant, which normalising drops
    k = torch.outer(k1, k1)
    return (k / k.sum()).to(dtype=like.dtype, device=like.device)


def smooth(grad: Tensor, kernel: Tensor) -> Tensor:
    """TI's smoothing: each channel of ``grad`` (N, C, H, W) convolved with ``kernel`` (k, k),
    k odd, zero padding (``SAME``): ``out[n, c] = sum_ij kernel[i, j] grad[n, c, . + i - k//2,
    . + j - k//2]``; same shape as ``grad``."""
    c, k = grad.shape[1], kernel.shape[-1]
    weight = kernel.expand(c, 1, k, k)  # symmetric, so correlation is convolution
    return F.conv2d(grad, weight, padding=k // 2, groups=c)


def look_ahead(x: Tensor, velocity: Tensor, length: float) -> Tensor:
    """NI's point ``x + length * g``, ``length = alpha * mu``, with ``g`` the velocity in the
    reference code's units (gradients normalised by their mean ``|.|``): ``d`` times
    ``velocity``, the :class:`~robustlab.attacks.optimizers.Momentum` velocity of
    l1-normalised gradients of ``d`` entries per sample. Not clipped to the bounds."""
    return x + length * x[0].numel() * velocity


def scaled(x: Tensor, i: int, bounds: tuple[float, float]) -> Tensor:
    """SI's copy ``c + (x - c) / 2**i`` of ``x``, ``c`` the centre of ``bounds``: the
    reference's ``x / 2**i`` on its [-1, 1] images."""
    centre = (bounds[0] + bounds[1]) / 2
    return x if i == 0 else centre + (x - centre) / 2**i


def neighbour(x: Tensor, threat: ThreatModel, radius: float, generator: torch.Generator) -> Tensor:
    """VMI's sample ``x + r``, ``r`` uniform in the ball of ``threat``'s norm and radius
    ``radius`` (linf: ``U[-radius, radius]^d``, the paper's), not clipped to the bounds."""
    lo, hi = threat.bounds
    wide = ThreatModel(threat.norm, radius, bounds=(lo - radius, hi + radius))
    return wide.random_init(x, generator)  # the widened box never clips x + r

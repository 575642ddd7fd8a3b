"""The model registry and ``create``, the one way robustlab builds a model."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustlab._modes import attach as attach_attribute
from robustlab._validate import positive_int
from robustlab.models.heads import attach as attach_head
from robustlab.models.layers import ACTIVATIONS
from robustlab.models.lipschitz import apply as apply_lipschitz
from robustlab.models.noise import inject as inject_noise
from robustlab.registry import Registry

__all__ = ["MODELS", "create", "names"]

MODELS: Registry[type[nn.Module]] = Registry("model")

# Arguments every architecture takes; create() validates them once for all.
COMMON = ("num_classes", "in_channels", "input_size", "activation", "mean", "std")


def names(pattern: str | None = None) -> list[str]:
    """Registered classifier architectures, sorted; ``pattern`` filters with shell wildcards.
    Image-to-image models registered for checkpoints (a class attribute ``task`` other than
    ``"classify"``, e.g. the ``"dncnn"`` denoiser) are not listed."""
    return [
        n for n in MODELS.names(pattern) if getattr(MODELS.get(n), "task", "classify") == "classify"
    ]


def _stat(value: float | Sequence[float] | torch.Tensor | None) -> list[float] | None:
    if value is None:
        return None
    return [float(v) for v in torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    activation: str = "relu",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    *,
    noise: str | None = None,
    noise_options: dict[str, Any] | None = None,
    head: str | None = None,
    head_options: dict[str, Any] | None = None,
    lipschitz: str | None = None,
    **arch_kwargs: Any,
) -> nn.Module:
    """Build the architecture ``name`` (see :func:`names`) with fresh weights.

    Args:
        name: registered architecture, e.g. ``"smallcnn"`` or ``"wrn-34-10"``.
        num_classes: number of logits the model returns.
        in_channels: image channels C (1 for MNIST-like data, 3 for CIFAR-like data).
        input_size: image height = width in pixels (28 and 32 are supported everywhere).
        activation: nonlinearity used everywhere the architecture has one:
            ``relu``, ``softplus``, ``silu``, ``gelu`` or ``kwta`` (k-winners-take-all,
            Xiao et al. 2020, ratio 0.1).
        mean, std: per-channel statistics in [0, 1] pixel units for the first layer,
            :class:`Normalize`; ``None`` means the identity (mean 0, std 1).
        noise: ``"pni-w"`` or ``"pni-a"`` (parametric noise injection) or ``"cni-w"``
            (colored, low-rank correlated weight noise) in every conv and linear layer
            (:mod:`robustlab.models.noise`; the model's output becomes random).
        noise_options: PNI: ``granularity`` (``"layer"``, ``"channel"``, ``"element"``) and
            ``init`` (0.25); CNI: ``rank`` (5), ``init`` (0.25) and ``factor_init`` (0.01);
            see :func:`robustlab.models.noise.inject`.
        head: ``"mmc"`` replaces the final linear layer by the Max-Mahalanobis center head
            (:class:`robustlab.models.heads.MMCHead`), for the ``mmc`` training objective.
        head_options: ``c_mm`` (10.0) and ``feature_dim`` (the replaced layer's input size).
        lipschitz: ``"spectral"``: spectral normalisation of every conv and linear weight;
            ``"parseval"``: Parseval networks' retraction of every trainable conv and linear
            weight after each optimiser step (the trainer runs it through the layers'
            ``robustlab_after_step`` hooks); see :mod:`robustlab.models.lipschitz`. Applied
            last (after head and noise).
        **arch_kwargs: architecture-specific options (``drop`` for smallcnn, ``depth``,
            ``widen_factor`` and ``drop`` for wrn-34-10).

    Returns:
        An ``nn.Module`` in training mode, on the default device, mapping inputs in [0, 1]
        shaped (N, C, input_size, input_size) to logits (N, num_classes). The build recipe is
        recorded as ``model.robustlab_arch = {"name": ..., "kwargs": {...}}`` (all arguments,
        defaults filled in, JSON-serialisable) so :func:`robustlab.models.save` can store it;
        ``head``/``head_options``, ``noise``/``noise_options`` and ``lipschitz`` appear there
        only when set.
        The head is attached before the noise, so an MMC head's linear map is noisy too.

    Raises:
        ValueError: unknown architecture, activation, head, noise or lipschitz, an invalid size,
            statistic or head/noise option, or options given without their head/noise.
        TypeError: an argument the architecture (or the head or noise) does not take, or one
            that is not JSON-serialisable.
    """
    if isinstance(name, str) and name not in MODELS:  # lists the classifiers, as names() does
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(names())}")
    cls = MODELS.get(name)  # TypeError for a name that is not a string
    ACTIVATIONS.get(activation)  # fail early with the list of valid activations
    params = inspect.signature(cls).parameters
    unknown = sorted(set(arch_kwargs) - set(params))
    if unknown:
        extra = [p for p in params if p not in COMMON]
        raise TypeError(f"{name} does not take {unknown}; its own arguments are {extra or 'none'}")
    common = _common(num_classes, in_channels, input_size, activation, mean, std)
    # an image-to-image model (the dncnn denoiser) takes only some of the common arguments
    kwargs = {**{k: v for k, v in common.items() if k in params}, **_own(name, params, arch_kwargs)}
    for kind, options, what in ((head, head_options, "head"), (noise, noise_options, "noise")):
        if options is not None and (kind is None or not isinstance(options, dict)):
            raise ValueError(
                f"{what}_options must be a dict and needs {what}=..., got "
                f"{what}={kind!r}, {what}_options={options!r}"
            )
    model = cls(**kwargs)
    if head is not None:
        opts = _options(attach_head, head_options, "head", skip=("model", "head", "num_classes"))
        kwargs["head"] = head
        kwargs["head_options"] = attach_head(model, head, common["num_classes"], **opts)
    if noise is not None:
        opts = _options(inject_noise, noise_options, "noise", skip=("model", "kind"))
        kwargs["noise"] = noise
        kwargs["noise_options"] = inject_noise(model, noise, **opts)
    if lipschitz is not None:
        apply_lipschitz(model, lipschitz)
        kwargs["lipschitz"] = lipschitz
    attach_attribute(model, "robustlab_arch", {"name": name.lower(), "kwargs": kwargs})
    return model


def _common(
    num_classes: Any, in_channels: Any, input_size: Any, activation: str, mean: Any, std: Any
) -> dict[str, Any]:
    """The arguments every architecture takes, checked and made JSON-able."""
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    for what, value in sizes.items():
        try:
            positive_int(value, what)
        except ValueError:
            raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    return {**sizes, "activation": activation.lower(), "mean": _stat(mean), "std": _stat(std)}


def _own(name: str, params: Any, arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture's own arguments, defaults filled in; TypeError for one that is not
    JSON-serialisable."""
    own = {}
    for key, param in params.items():
        if key in COMMON:
            continue  # validated by _common or by Normalize
        own[key] = arch_kwargs.get(key, param.default)
        try:
            json.dumps(own[key], allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"argument {key!r} of {name} must be JSON-serialisable") from err
    return own


def _options(
    fn: Any, options: dict[str, Any] | None, what: str, skip: tuple[str, ...]
) -> dict[str, Any]:
    """``options`` if ``fn`` takes them all, else a TypeError naming the valid ones."""
    valid = [p for p in inspect.signature(fn).parameters if p not in skip]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise TypeError(f"{what}_options {unknown} not understood; valid: {', '.join(valid)}")
    return dict(options or {})

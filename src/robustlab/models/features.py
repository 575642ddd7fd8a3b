"""Features of a classifier's inner layers, captured from one forward pass of the whole model.

:func:`feature_module` resolves a layer name (None: the last ``nn.Linear``, the head of a usual
network, also inside a defense wrapper); :func:`capture` runs the model once and returns its
logits together with the flattened input (or output) of each requested layer. The whole model
runs, so preprocessing, randomness and defense wrappers stay in place, and nothing is detached:
a score computed on the features is differentiable in the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["capture", "feature_module"]


def feature_module(
    model: nn.Module, name: str | None = None, *, option: str = "feature_layer"
) -> tuple[str | None, nn.Module | None]:
    """The module ``name`` (from ``model.named_modules()``), else the last ``nn.Linear`` in
    ``model.modules()`` order, as ``(name, module)``; ``(None, None)`` when ``name`` is None and
    the model has no ``nn.Linear`` (the caller then uses the logits). ``option`` is the name of
    the user's setting, quoted in the errors (an unknown name, a name that is not a str)."""
    modules = dict(model.named_modules())
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(
                f"{option} must be a module name (str) or None, got {type(name).__name__}"
            )
        if name not in modules:
            names = [n for n in modules if n][:20]
            raise ValueError(
                f"the model has no module named {name!r}; names from "
                f"model.named_modules(): {', '.join(names)}"
            )
        return name, modules[name]
    linear = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else (None, None)


def capture(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str | None],
    *,
    inputs: bool = True,
    option: str = "feature_layer",
    flatten: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """One forward pass of ``model`` on ``x`` (N, ...): ``(logits, features)``.

    ``logits`` is ``model(x)`` of that pass, unchanged. ``features`` has one (N, D) tensor per
    entry of ``layers`` (in that order), flattened after the batch dimension (``flatten=False``:
    as the layer saw or made them, e.g. (N, C, H, W) maps): the positional
    input of the layer (``inputs=True``, a forward pre-hook) or its output (``inputs=False``, a
    forward hook). Each entry is resolved by :func:`feature_module` (None: the last
    ``nn.Linear``; when the model has none, that entry is the flattened logits). A layer called
    several times in the pass (an internal ensemble) gives the mean of its captures. The hooks
    live for this call only and are removed even when the forward pass raises. Nothing is
    detached: gradients flow from the features back to ``x``. Runs in the current grad mode
    and the model's current train/eval mode.

    Raises ValueError when a layer did not run in the pass, got no positional tensor input
    (or returned no tensor, ``inputs=False``), or saw a batch of another size than ``x`` (the
    model replicates its inputs, e.g. noise samples); the message names ``option``, the user's
    setting, to pick another layer.
    """
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers must be a sequence of module names (str or None), got "
            f"{type(layers).__name__}; wrap a single name in a list"
        )
    resolved = [feature_module(model, name, option=option) for name in layers]
    seen: list[list[Tensor]] = [[] for _ in resolved]
    what = "input" if inputs else "output"

    def hook_for(i: int, name: str | None) -> Any:
        def take(value: Any) -> None:
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"feature layer {name!r} has no tensor {what} (positional "
                    f"input or plain output); name another layer with {option}="
                )
            seen[i].append(value)

        if inputs:
            return lambda module, args: take(args[0] if args else None)
        return lambda module, args, output: take(output)

    handles = []
    try:
        for i, (name, module) in enumerate(resolved):
            if module is not None:
                register = (
                    module.register_forward_pre_hook if inputs else module.register_forward_hook
                )
                handles.append(register(hook_for(i, name)))
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    feats = []
    for (name, module), got in zip(resolved, seen, strict=True):
        if module is None:
            feats.append(logits.flatten(1) if flatten else logits)
            continue
        if not got:
            raise ValueError(
                f"feature layer {name!r} did not run in the model's forward "
                f"pass; name a layer that does with {option}="
            )
        if any(f.shape[0] != x.shape[0] for f in got):
            raise ValueError(
                f"feature layer {name!r} sees batches of "
                f"{[f.shape[0] for f in got]} rows for {x.shape[0]} inputs (the "
                "model replicates its inputs, e.g. noise samples); name a layer "
                f"with one row per input with {option}="
            )
        flat = [f.flatten(1) if flatten else f for f in got]
        feats.append(flat[0] if len(flat) == 1 else torch.stack(flat).mean(0))
    return logits, feats

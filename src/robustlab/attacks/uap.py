"""Universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017,
"Universal adversarial perturbations", https://arxiv.org/abs/1610.08401): one perturbation
``v`` for a whole data set, applied to every input as ``clip(x + v, bounds)``.

Not an :class:`~robustlab.attacks.base.Attack` (the attack contract returns one point per
sample) and not in the attack registry: :func:`universal_perturbation` returns ``v`` itself
and the search's history; :func:`robustlab.evaluation.universal.evaluate_universal` fits
``v`` on one set and reports its fooling rate on another, recomputed from ``clip(x + v)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import (
    check_inputs,
    check_labels,
    generator_or_none,
    integer,
    number,
    positive_int,
    probe_model,
)
from robustlab.attacks.deepfool import DeepFool
from robustlab.threat import ThreatModel

#: the norms of the search: DeepFool's
NORMS = ("l2", "linf")


def apply(v: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """``clip(x + v, bounds)``: the universal perturbation ``v`` (shape ``x.shape[1:]``) on
    every input of ``x`` (N, ...). Inside the ball whenever ``v`` is: clipping only moves
    coordinates towards ``x``."""
    lo, hi = threat.bounds
    return (x + v).clamp(lo, hi)


def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """The model's predicted classes (N,) (argmax of its logits), in batches of
    ``batch_size``, without gradients; the model runs in the mode it is in."""
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )


def _project(v: Tensor, threat: ThreatModel) -> Tensor:
    """``v`` projected onto the eps ball, its values inside ``[low - high, high - low]`` (a
    larger value changes no clipped input): the nearest such point (l2: the paper's rescale
    wherever no value exceeds the box; linf: a clamp)."""
    lo, hi = threat.bounds
    room = ThreatModel(threat.norm, threat.eps, bounds=(lo - hi, hi - lo))
    return room.project(v[None], torch.zeros_like(v)[None])[0]


def check_search(
    model: Any, x: Any, y: Any, threat: Any, *, delta: Any, max_passes: Any, batch_size: Any
) -> tuple[float, int, int]:
    """Validate the inputs of :func:`universal_perturbation`; returns ``delta``,
    ``max_passes`` and ``batch_size`` normalised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y, threat)
    if threat.norm not in NORMS:
        raise ValueError(
            f"a universal perturbation is searched with DeepFool, which supports "
            f"the norms {', '.join(NORMS)}, not {threat.norm!r}; use "
            "ThreatModel('linf', ...) or ThreatModel('l2', ...)"
        )
    if threat.eps <= 0:
        raise ValueError(
            f"eps must be > 0 for a universal perturbation, got {threat.eps:g}: "
            "with eps 0 the only perturbation is v = 0; pass the radius of v, "
            "e.g. ThreatModel('linf', eps=10/255) (the paper's xi = 10 on 0-255)"
        )
    return (
        number(delta, "delta", low=0, high=1, high_open=True),
        positive_int(max_passes, "max_passes"),
        positive_int(batch_size, "batch_size"),
    )


def universal_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    delta: float = 0.2,
    max_passes: int = 10,
    overshoot: float = 0.02,
    deepfool_steps: int = 10,
    candidates: int = 10,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Search one perturbation ``v`` that changes the model's prediction on most points of
    ``x`` (the paper's Algorithm 1).

    ``v = 0``; each pass visits the points of ``x`` in a fresh random order; for each point
    ``x_i`` whose prediction ``k(clip(x_i + v)) = k(x_i)`` (not fooled yet), DeepFool
    (:class:`~robustlab.attacks.deepfool.DeepFool`, unbounded, from ``clip(x_i + v)`` with
    the label ``k(x_i)``) finds the minimal extra step ``dv`` across the boundary; if it
    found one, ``v <- P(v + dv)``, the projection onto the eps ball (l2: rescale to radius
    eps; linf: clip to [-eps, eps]). After each pass the fooling rate on ``x`` (the fraction
    of points whose prediction on ``clip(x + v)`` differs from that on ``x``) is computed; the
    search stops once it reaches ``1 - delta``, after ``max_passes`` passes, or after a pass
    in which no point moved ``v`` (for a deterministic model every later pass would repeat it).

    Args:
        model: the classifier (run in eval mode; its previous mode is restored).
        x: the fitting set (N, C, H, W) in the threat bounds; keep it disjoint from the points
            ``v`` is evaluated on.
        y: its labels (N,) int64: checked, and used only for the accuracy in the history (the
            search follows predictions, as the paper does).
        threat: l2 or linf threat model; ``eps`` (> 0) is the paper's ``xi``, in input units
            (the paper's linf xi = 10 on the 0-255 scale is ``10/255`` on [0, 1]).
        delta: the search stops once the fooling rate on ``x`` reaches ``1 - delta``, in
            [0, 1). Default 0.2 (80 %, the reference code).
        max_passes: most passes over ``x`` (>= 1). Default 10 (the reference's
            ``max_iter_uni``; the paper stops on delta alone).
        overshoot, deepfool_steps, candidates: DeepFool's overshoot (>= 0), iterations per
            point (>= 1) and candidate classes (>= 2). Defaults 0.02, 10, 10 (the reference).
        batch_size: points per forward pass of the fooling rate (>= 1). Default 256.
        generator: the order of the points; default ``torch.Generator().manual_seed(seed)``.

    Returns:
        ``v`` of shape ``x.shape[1:]`` with ``||v|| <= eps`` in the threat's norm, and the
        history: one dict per pass with ``pass`` (1-based), ``fooling_rate`` and ``accuracy``
        on ``clip(x + v)`` (fractions of ``len(x)``), ``updates`` (points that moved ``v``),
        ``deepfool_failed`` (unfooled points where DeepFool found no step), ``norm`` of ``v``
        and ``seconds``; the last one also ``stop``, why the search stopped.

    Cost: per pass, for each unfooled point one forward pass and a DeepFool call (at most
    ``deepfool_steps`` x (1 forward + ``candidates - 1`` backward passes), plus 3 forward
    passes of its input and output checks), then ``len(x)`` forward passes for the fooling
    rate. Points are visited one at a time, as in the paper: ``v`` changes after each.

    Differences from the reference code (LTS4/universal ``universal_pert.py``): ``x + v`` is
    clipped to the bounds, in the check, in DeepFool and in the fooling rate (the reference
    does not clip); DeepFool's iterates are clipped too; the projection is the nearest point
    of the ball with values in ``[low - high, high - low]`` (the same as the reference's
    rescale or clip unless ``v`` has a value beyond that range, which no clipped input can
    feel); the search also stops after a pass without an update.
    """
    delta, max_passes, batch_size = check_search(
        model, x, y, threat, delta=delta, max_passes=max_passes, batch_size=batch_size
    )
    generator = generator_or_none(generator) or torch.Generator().manual_seed(integer(seed, "seed"))
    lo, hi = threat.bounds
    unbounded = ThreatModel(threat.norm, threat.box_diameter(x.shape[1:]), bounds=(lo, hi))
    deepfool = DeepFool(
        unbounded,
        steps=positive_int(deepfool_steps, "deepfool_steps"),
        overshoot=overshoot,
        candidates=candidates,
    )
    x, y = x.detach(), y.detach()
    v = torch.zeros_like(x[0])
    history: list[dict[str, Any]] = []
    with eval_mode(model):
        check_labels(y, probe_model(model, x[:2]).shape[1])
        clean = predict(model, x, batch_size)
        for p in range(1, max_passes + 1):
            t0 = time.perf_counter()
            order = torch.randperm(len(x), generator=generator, device=generator.device)
            v, updates, failed = _one_pass(model, x, clean, v, threat, deepfool, order.to(x.device))
            fooled = predict(model, apply(v, x, threat), batch_size)
            record: dict[str, Any] = {
                "pass": p,
                "fooling_rate": (fooled != clean).float().mean().item(),
                "accuracy": (fooled == y).float().mean().item(),
                "updates": updates,
                "deepfool_failed": failed,
                "norm": norm_of(v, threat),
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            if record["fooling_rate"] >= 1 - delta:
                record["stop"] = f"fooling rate {record['fooling_rate']:.4g} >= 1 - delta"
                break
            if updates == 0:
                record["stop"] = "a pass without an update: later passes would repeat it"
                break
        else:
            record["stop"] = f"max_passes ({max_passes}) reached"
    return v, history


def norm_of(v: Tensor, threat: ThreatModel) -> float:
    """``||v||`` in the threat's norm, for one perturbation ``v`` (no batch dimension)."""
    return threat.distance(v[None], torch.zeros_like(v)[None]).item()


def _one_pass(
    model: nn.Module,
    x: Tensor,
    clean: Tensor,
    v: Tensor,
    threat: ThreatModel,
    deepfool: DeepFool,
    order: Tensor,
) -> tuple[Tensor, int, int]:
    """One pass of the search over the points of ``x`` in ``order``; returns the new ``v``,
    the number of points that moved it and the number where DeepFool found no step."""
    updates = failed = 0
    for i in order.tolist():
        xv = apply(v, x[i : i + 1], threat)
        label = clean[i : i + 1]
        with torch.no_grad():
            if model(xv).argmax(1).item() != label.item():
                continue  # fooled already
        res = deepfool(model, xv, label)
        # DeepFool always reports min_norm: inf where it found no step
        if res.min_norm is None or not torch.isfinite(res.min_norm).all():
            failed += 1
            continue
        v = _project(v + (res.x_adv - xv)[0], threat)
        updates += 1
    return v, updates, failed

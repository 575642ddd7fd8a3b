"""Bound propagation through feed-forward ReLU classifiers over an lp ball (linf or l2) around
each input intersected with the input box: interval bounds (IBP), CROWN's backward linear
bounds and CROWN-IBP.

- IBP: Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models", 2018, arXiv:1810.12715. Affine layer: centre c, radius r ->
  W c + b, |W| r; ReLU and max pooling: applied to both ends; the margin specification is
  folded into the last affine block ("elision").
- CROWN: Zhang et al., "Efficient Neural Network Robustness Certification with General
  Activation Functions", NeurIPS 2018, arXiv:1811.00866. A linear specification Λ is pushed
  back through the network; an unstable ReLU (l < 0 < u) is bounded above by u (z - l) / (u - l)
  and below by a z with the adaptive slope a = 1 if u > -l else 0; at the input,
  min over the ball of Λ z = Λ x - eps ||Λ||_q (q the dual norm), over the box Λ+ l + Λ- u.
- CROWN-IBP: Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust Neural
  Networks", ICLR 2020, arXiv:1906.06316: IBP for the intermediate bounds, one CROWN pass from
  the specification.

Promise (soundness): for every z with ||z - x||_p <= eps and lo <= z <= hi, the returned lower
bounds are <= the specification's value at z, in the units of the logits. Layers: nn.Linear,
nn.Conv2d (zero padding), nn.ReLU, nn.Flatten, :class:`~robustlab.models.layers.Normalize`,
nn.BatchNorm1d/2d (running statistics: eval mode), nn.AvgPool2d, nn.Dropout and nn.Identity
(eval mode: the identity), nn.MaxPool2d for IBP only. Differences from the reference code
(auto_LiRPA, CROWN-IBP's ``bound_layers.py``): no alpha optimisation; for l2 the affine prefix
up to the first nonlinearity is bounded exactly over the ball (the dual norm) even under IBP;
CROWN's intermediate bounds are intersected with IBP's. The user-facing verifier is
:func:`robustlab.defenses.verify.verify`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import one_of
from robustlab.models.layers import Normalize
from robustlab.threat import ThreatModel

__all__ = [
    "METHODS",
    "SUPPORTED",
    "Network",
    "logit_bounds",
    "margin_bounds",
    "margin_spec",
    "network",
]

METHODS = ("ibp", "crown", "crown-ibp")
NORMS = ("linf", "l2")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_IDENTITY = (nn.Dropout, nn.Identity)
_NONLINEAR = (nn.ReLU, nn.MaxPool2d)
SUPPORTED = (
    nn.Linear,
    nn.Conv2d,
    nn.Flatten,
    Normalize,
    *_BN,
    nn.AvgPool2d,
    *_IDENTITY,
    *_NONLINEAR,
)
_BUDGET = 2**24  # values of Λ held at once when bounding every neuron of a layer


@dataclass
class Network:
    """A classifier as a chain of supported layers: ``layers[i]`` named ``names[i]`` takes
    per-sample inputs of shape ``shapes[i]``; ``shapes[-1]`` is (K,), the logits."""

    layers: list[nn.Module]
    names: list[str]
    shapes: list[tuple[int, ...]]


def _walk(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        out += _walk(child, full + ".") if isinstance(child, nn.Sequential) else [(full, child)]
    return out


def _check_layer(name: str, m: nn.Module) -> None:
    fix = (
        "; bound propagation supports "
        + ", ".join(t.__name__ for t in SUPPORTED)
        + " (MaxPool2d with method='ibp' only)"
    )
    if not isinstance(m, SUPPORTED):
        raise ValueError(f"layer {name} ({type(m).__name__}) is not supported{fix}")
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or m.padding == "same"):
        raise ValueError(
            f"layer {name} (Conv2d) pads with {m.padding_mode!r}/{m.padding!r}; "
            "only zero padding given as numbers (or 'valid') is supported"
        )
    if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or (m.padding and not m.count_include_pad)):
        raise ValueError(
            f"layer {name} (AvgPool2d) uses ceil_mode or excludes its padding "
            "from the average; only the plain average over full windows is "
            "supported"
        )


def network(model: nn.Module, x: Tensor) -> Network:
    """``model`` as a :class:`Network`, checked on ``x`` (N, ...).

    The chain is ``model.bound_layers()`` when the model defines it (modules, or (name,
    module) pairs, in the order its forward applies them), else ``model``'s children in
    registration order with nested nn.Sequential unrolled, an nn.Flatten put before a Linear
    that meets a many-dimensional input. Run in eval mode, the chain must reproduce
    ``model(x)`` (to 1e-4 relative): a forward that is not this chain (residual connections,
    functional calls other than flattening) is refused.

    Raises:
        ValueError: naming the first unsupported layer (name and type), or saying that the
            forward is not the chain of its modules.
    """
    declared = getattr(model, "bound_layers", None)
    if callable(declared):
        items = [
            it if isinstance(it, tuple) else (f"layer{i}", it) for i, it in enumerate(declared())
        ]
    else:
        items = _walk(model, "") if list(model.children()) else [("model", model)]
    for name, m in items:
        _check_layer(name, m)
    layers: list[nn.Module] = []
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    t: Tensor | None
    with eval_mode(model), torch.no_grad():
        want, t = model(x[:8]), x[:8]
        try:
            for name, m in items:
                if isinstance(m, nn.Linear) and t.dim() > 2:
                    layers.append(nn.Flatten())
                    names.append(f"{name}:flatten")
                    shapes.append(tuple(t.shape[1:]))
                    t = t.flatten(1)
                layers.append(m)
                names.append(name)
                shapes.append(tuple(t.shape[1:]))
                t = _forward(m, t)
        except RuntimeError:  # shapes that do not chain: the forward does something else
            t = None
    if t is None or t.shape != want.shape or not torch.allclose(t, want, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"the forward of {type(model).__name__} is not the chain of its modules in "
            "registration order (the chain's outputs differ from the model's); give an "
            "nn.Sequential, or define bound_layers() returning the layers in forward order"
        )
    if t.dim() != 2:
        raise ValueError(f"the chain must end in logits (N, K), got shape {tuple(t.shape)}")
    shapes.append(tuple(t.shape[1:]))
    return Network(layers, names, shapes)


# --- one layer ----------------------------------------------------------------------------------
def _bn(m: nn.BatchNorm1d | nn.BatchNorm2d, dim: int) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as scale * t + shift, both broadcastable to (N, C, ...)."""
    var, mean = m.running_var, m.running_mean
    if var is None or mean is None:
        raise ValueError(
            f"{type(m).__name__} keeps no running statistics (track_running_stats=False), so "
            "it is not affine in eval mode; build it with track_running_stats=True"
        )
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale + (m.bias if m.bias is not None else 0)
    view = (1, -1) + (1,) * (dim - 2)
    return scale.view(view), shift.view(view)


def _pool_conv(m: nn.AvgPool2d, t: Tensor) -> tuple[Tensor, dict]:
    """Average pooling as a depthwise convolution: its weight and the conv's arguments."""
    k = nn.modules.utils._pair(m.kernel_size)
    stride = nn.modules.utils._pair(m.stride or m.kernel_size)
    c = t.shape[1]
    weight = t.new_full((c, 1, *k), 1.0 / (m.divisor_override or k[0] * k[1]))
    return weight, {"stride": stride, "padding": nn.modules.utils._pair(m.padding), "groups": c}


def _conv_args(m: nn.Conv2d) -> dict:
    padding = 0 if m.padding == "valid" else m.padding
    return {"stride": m.stride, "padding": padding, "dilation": m.dilation, "groups": m.groups}


def _forward(m: nn.Module, t: Tensor) -> Tensor:
    """The layer on ``t`` with eval-mode semantics (batch norm: running statistics)."""
    if isinstance(m, _BN):
        scale, shift = _bn(m, t.dim())
        return t * scale + shift
    if isinstance(m, _IDENTITY):
        return t
    if isinstance(m, nn.ReLU):
        return t.clamp(min=0)
    return m(t)


def _abs_linear(m: nn.Module, r: Tensor) -> Tensor:
    """|L| r for the linear part L of an affine layer (r >= 0, the interval's radius)."""
    if isinstance(m, nn.Linear):
        return F.linear(r, m.weight.abs())
    if isinstance(m, nn.Conv2d):
        return F.conv2d(r, m.weight.abs(), None, **_conv_args(m))
    if isinstance(m, Normalize):
        return r / m.std
    if isinstance(m, _BN):
        return r * _bn(m, r.dim())[0].abs()
    return _forward(m, r)  # Flatten, AvgPool2d, identities: non-negative already


def _transpose(m: nn.Module, lam: Tensor, shape: tuple[int, ...]) -> Tensor:
    """L^T lam for the linear part L of an affine layer: (B, *out) -> (B, *shape)."""
    if isinstance(m, nn.Linear):
        return lam @ m.weight
    if isinstance(m, nn.Flatten):
        return lam.reshape(lam.shape[0], *shape)
    if isinstance(m, Normalize):
        return lam / m.std
    if isinstance(m, _BN):
        return lam * _bn(m, lam.dim())[0]
    if isinstance(m, _IDENTITY):
        return lam
    if isinstance(m, nn.Conv2d):
        weight, args = m.weight, _conv_args(m)
    else:  # AvgPool2d, the one layer left that _check_layer admits
        weight, args = _pool_conv(cast(nn.AvgPool2d, m), lam.new_empty(1, shape[0], 1, 1))
    stride, padding = args["stride"], nn.modules.utils._pair(args["padding"])
    dilation = nn.modules.utils._pair(args.get("dilation", 1))
    extra = [
        shape[d - 1]
        - (
            (lam.shape[d] - 1) * stride[d - 2]
            - 2 * padding[d - 2]
            + dilation[d - 2] * (weight.shape[d] - 1)
            + 1
        )
        for d in (2, 3)
    ]
    return F.conv_transpose2d(
        lam, weight, None, stride, padding, tuple(extra), args["groups"], dilation
    )  # extra: rows the stride left over


def _interval(m: nn.Module, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """IBP through one layer: monotone layers on both ends, affine ones by centre and radius."""
    if isinstance(m, (*_NONLINEAR, *_IDENTITY)):
        return _forward(m, lo), _forward(m, hi)
    c, r = _forward(m, (hi + lo) / 2), _abs_linear(m, (hi - lo) / 2)
    return c - r, c + r


# --- the backward linear pass and its concretisation ---------------------------------------------
def _relu_back(lam: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Λ through a ReLU with input bounds [lo, hi] for a *lower* bound: the lower line where
    Λ > 0, the upper line where Λ < 0 (CROWN's adaptive lower slope); the bias collected."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    unstable, active = (lo < 0) & (hi > 0), (lo >= 0).to(lam.dtype)
    up_slope = torch.where(unstable, hi / (hi - lo).clamp(min=1e-12), active)
    up_bias = torch.where(unstable, -up_slope * lo, torch.zeros_like(lo))
    low_slope = torch.where(unstable, (hi > -lo).to(lam.dtype), active)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    return pos * low_slope + neg * up_slope, (neg * up_bias).flatten(2).sum(2)


def _backward(
    net: Network, start: int, end: int, lam: Tensor, pre: dict[int, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Lower-bound Λ (N, S, *shapes[end]) applied to layer ``end``'s input, through layers
    ``start`` .. ``end - 1``, as A z + b with z layer ``start``'s input: returns A (N, S,
    *shapes[start]) and b (N, S). ``pre[i]``: the input bounds of the ReLU ``i``; no max
    pooling between ``start`` and ``end`` (:func:`_spec_lower` refuses it first)."""
    n, s = lam.shape[:2]
    bias = lam.new_zeros(n, s)
    for i in range(end - 1, start - 1, -1):
        m, shape = net.layers[i], net.shapes[i]
        if isinstance(m, nn.ReLU):
            lam, b = _relu_back(lam, *pre[i])
            bias = bias + b
        else:
            f0 = _forward(m, lam.new_zeros(1, *shape))  # the layer's offset, (1, *out)
            bias = bias + (lam * f0.unsqueeze(1)).flatten(2).sum(2)
            lam = _transpose(m, lam.flatten(0, 1), shape).view(n, s, *shape)
    return lam, bias


def _input_box(x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    lo, hi = threat.bounds
    return (x - threat.eps).clamp(min=lo), (x + threat.eps).clamp(max=hi)


def _over_box(a: Tensor, b: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """min over lo <= z <= hi of A z + b, per sample and row: A+ lo + A- hi + b."""
    a = a.flatten(2)
    return (
        (a.clamp(min=0) * lo.flatten(1).unsqueeze(1)).sum(2)
        + (a.clamp(max=0) * hi.flatten(1).unsqueeze(1)).sum(2)
        + b
    )


def _over_input(a: Tensor, b: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """A lower bound of min over the ball ∩ box of A z + b: exact for linf (the set is a box);
    for l2 the larger of the ball's bound A x - eps ||A||_2 (exact when the ball lies inside
    the box) and the bound over the box [x - eps, x + eps] ∩ bounds."""
    box = _over_box(a, b, *_input_box(x, threat))
    if threat.norm == "linf":
        return box
    a = a.flatten(2)
    ball = (a * x.flatten(1).unsqueeze(1)).sum(2) - threat.eps * a.norm(dim=2) + b
    return torch.maximum(box, ball)


def _layer_bounds(
    net: Network, end: int, x: Tensor, threat: ThreatModel, pre: dict[int, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """Bounds of every value of layer ``end``'s input by backward passes from the input, a
    chunk of neurons at a time (a spec +e_k and -e_k each)."""
    shape, n = net.shapes[end], len(x)
    d = math.prod(shape)
    chunk = max(1, _BUDGET // (2 * n * max(math.prod(s) for s in net.shapes[: end + 1])))
    lows, ups = [], []
    for k in range(0, d, chunk):
        eye = torch.eye(d, dtype=x.dtype, device=x.device)[k : k + chunk]
        spec = torch.cat([eye, -eye]).view(1, -1, *shape).expand(n, -1, *shape)
        bound = _over_input(*_backward(net, 0, end, spec, pre), x, threat)
        lows.append(bound[:, : len(eye)])
        ups.append(-bound[:, len(eye) :])
    return torch.cat(lows, 1).view(n, *shape), torch.cat(ups, 1).view(n, *shape)


# --- the three methods ---------------------------------------------------------------------------
def _ibp(net: Network, x: Tensor, threat: ThreatModel) -> list[tuple[Tensor, Tensor]]:
    """Interval bounds of every layer's input (and, last, of the logits). For l2 the input of
    the first nonlinearity is also bounded exactly over the ball (the dual norm) and the two
    intervals intersected."""
    first = next((i for i, m in enumerate(net.layers) if isinstance(m, _NONLINEAR)), None)
    bounds = [_input_box(x, threat)]
    for i, m in enumerate(net.layers):
        lo, hi = _interval(m, *bounds[-1])
        if threat.norm == "l2" and i + 1 == first:
            lo2, hi2 = _layer_bounds(net, first, x, threat, {})
            lo, hi = torch.maximum(lo, lo2), torch.minimum(hi, hi2)
        bounds.append((lo, hi))
    return bounds


def _spec_lower(net: Network, spec: Tensor, x: Tensor, threat: ThreatModel, method: str) -> Tensor:
    """Lower bounds (N, S) of spec · logits (spec (N, S, K)) over the ball ∩ box."""
    one_of(method, "bound method", METHODS)
    one_of(threat.norm, "norm for bound propagation", NORMS)
    if method != "ibp":  # before any work: a linear relaxation of every nonlinearity
        pools = [
            n for n, m in zip(net.names, net.layers, strict=True) if isinstance(m, nn.MaxPool2d)
        ]
        if pools:
            raise ValueError(
                f"layer {pools[0]} (MaxPool2d) has no linear relaxation here: "
                f"{method} needs a ReLU network without max pooling; use "
                "method='ibp'"
            )
    ibp = _ibp(net, x, threat)
    relus = [i for i, m in enumerate(net.layers) if isinstance(m, nn.ReLU)]
    if method == "ibp":  # elision: the spec through the last affine block, then the box
        last = max(
            (i + 1 for i, m in enumerate(net.layers) if isinstance(m, _NONLINEAR)), default=0
        )
        a, b = _backward(net, last, len(net.layers), spec, {})
        return _over_input(a, b, x, threat) if last == 0 else _over_box(a, b, *ibp[last])
    pre: dict[int, tuple[Tensor, Tensor]] = {}
    for i in relus:
        if method == "crown":
            lo, hi = _layer_bounds(net, i, x, threat, pre)
            pre[i] = (torch.maximum(lo, ibp[i][0]), torch.minimum(hi, ibp[i][1]))
        else:
            pre[i] = ibp[i]
    return _over_input(*_backward(net, 0, len(net.layers), spec, pre), x, threat)


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The specification matrix C (N, K-1, K) of the margins z_y - z_j, the K-1 classes
    j != y in increasing order."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def margin_bounds(
    net: Network, x: Tensor, y: Tensor, threat: ThreatModel, method: str = "ibp"
) -> Tensor:
    """Lower bounds (N, K-1) of the margins z_y(z) - z_j(z), the classes j != y in increasing
    order, over the ball ∩ box around each x (logit units); computed directly from the margin
    specification (much tighter than from the logits' bounds). ``method``: ibp, crown or
    crown-ibp (the bound of that method alone: :func:`robustlab.defenses.verify.verify`
    takes the tighter of it and IBP's)."""
    spec = margin_spec(y, net.shapes[-1][0], x.dtype)
    return _spec_lower(net, spec, x, threat, method)


def logit_bounds(
    net: Network, x: Tensor, threat: ThreatModel, method: str = "ibp"
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (N, K) of the logits over the ball ∩ box around each x."""
    k = net.shapes[-1][0]
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    spec = torch.cat([eye, -eye]).expand(len(x), 2 * k, k)
    bound = _spec_lower(net, spec, x, threat, method)
    return bound[:, :k], -bound[:, k:]

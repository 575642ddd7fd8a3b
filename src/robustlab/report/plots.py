"""The report's plots: matplotlib figures as inline SVG that follow the page's colour theme.

Text, axes, ticks and grid are drawn in a placeholder colour that becomes ``currentColor`` in
the SVG, so an inline plot takes the text colour of the page: dark on a light theme, light on a
dark one. The data colours are mid-luminance hues readable on both backgrounds. Every function
takes recorded results (lists of dicts) and returns one ``<svg>`` element as a string; nothing
is computed here beyond what is drawn.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:  # matplotlib >= 3.8 ships the rc keys' type
    from matplotlib.typing import RcKeyType

INK = "#123456"  # placeholder colour, replaced by currentColor in the SVG
PALETTE = ("#3a8fd9", "#e8871e", "#2ca58d", "#d1495b", "#9b6bd3", "#8d8d2a", "#c76f9f", "#5f9ea0")
STYLES: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",  # real <text>: small files, selectable, and it takes currentColor
    "font.family": "sans-serif",
    "font.size": 9.0,
    "text.color": INK,
    "axes.labelcolor": INK,
    "axes.edgecolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "grid.color": INK,
    "grid.alpha": 0.2,
    "axes.grid": True,
    "axes.facecolor": "none",
    "figure.facecolor": "none",
    "savefig.facecolor": "none",
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 4.0,
}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", ":", "-.")


def series_style(i: int, markers: bool = True) -> dict[str, Any]:
    """The look of the ``i``-th of several series that may coincide (equal accuracies): its
    own colour, dash pattern and hollow marker, with the line width and the marker size
    shrinking along the series, so a later series drawn over an earlier one leaves it visible
    around it."""
    style: dict[str, Any] = {
        "color": PALETTE[i % len(PALETTE)],
        "linestyle": DASHES[i % len(DASHES)],
        "linewidth": max(0.8, 2.6 - 0.6 * i),
    }
    if markers:
        style |= {
            "marker": MARKERS[i % len(MARKERS)],
            "markersize": max(3.0, 8.0 - 1.5 * i),
            "markerfacecolor": "none",
            "markeredgewidth": 1.2,
        }
    return style


def _figure(ncols: int = 1, width: float = 5.2, height: float = 3.2) -> Figure:
    return Figure(figsize=(width * ncols, height), layout="constrained")


def _svg(fig: Figure, key: str, title: str) -> str:
    """The figure as an inline ``<svg>``: INK becomes currentColor, matplotlib's metadata (which
    holds URLs) is dropped, and ids are prefixed with ``key`` so several plots share a page."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": key}):  # reproducible ids
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = svg.replace(INK, "currentColor")
    # ids unique on the page: prefix every id and every reference to one with the key
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{key}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{key}-\1)", svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{key}-\1"', svg)
    label = title.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" class="plot" ', 1)


def eps_axis_label(norm: str) -> str:
    symbol = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}.get(norm, norm)
    return f"ε ({symbol} radius, input scale [0, 1])"


def robustness_curves(
    series: Sequence[dict[str, Any]], norm: str, eps: float | None, key: str
) -> str:
    """Robust accuracy (%) against eps. ``series``: dicts with ``label``, ``eps`` and
    ``accuracy`` (lists, fractions) and ``kind`` (``steps``: a step curve, ``points``:
    markers); ``eps``: the evaluated radius, marked by a vertical line."""
    with matplotlib.rc_context(STYLES):
        fig = _figure()
        ax = fig.add_subplot()
        for i, s in enumerate(series):
            ys = [100 * a for a in s["accuracy"]]
            color = PALETTE[i % len(PALETTE)]
            if s.get("kind") == "points":
                ax.plot(s["eps"], ys, "o--", color=color, label=s["label"])
            else:
                ax.plot(s["eps"], ys, "-", color=color, label=s["label"], drawstyle="steps-post")
        if eps is not None:
            ax.axvline(eps, color=INK, linestyle=":", linewidth=1.0, label=f"evaluated ε = {eps:g}")
        ax.set_xlabel(eps_axis_label(norm))
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(left=0)
        ax.legend(fontsize=8)
        return _svg(fig, key, f"robust accuracy against {norm} eps")


def training_curves(log: Sequence[dict[str, Any]], key: str) -> str:
    """Training loss and the validation / hold-out / probe accuracies (%) per epoch of a
    train_log; a dashed line marks the best hold-out epoch (``model_best``)."""
    epochs = [r["epoch"] for r in log]
    accuracies = [
        (k, label)
        for k, label in (
            ("val_clean_acc", "validation clean"),
            ("val_robust_acc", "validation robust"),
            ("holdout_clean_acc", "hold-out clean (training data)"),
            ("holdout_robust_acc", "hold-out robust (selects model_best)"),
            ("probe_robust_acc", "probe PGD-5 (overfitting check)"),
        )
        if any(k in r for r in log)
    ]
    with matplotlib.rc_context(STYLES):
        fig = _figure(ncols=2 if accuracies else 1)
        ax = fig.add_subplot(1, 2 if accuracies else 1, 1)
        ax.plot(epochs, [r["train_loss"] for r in log], "o-", color=PALETTE[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (objective, per example)")
        ax.set_title("loss", fontsize=9)
        if accuracies:
            ax2 = fig.add_subplot(1, 2, 2)
            for i, (k, label) in enumerate(accuracies):
                pts = [(r["epoch"], 100 * r[k]) for r in log if k in r]
                ax2.plot(
                    *zip(*pts, strict=True),
                    "o-",
                    color=PALETTE[(i + 1) % len(PALETTE)],
                    label=label,
                )
            for r in log:
                if "overfit" in r:
                    ax2.axvline(r["epoch"], color=PALETTE[3], linestyle=":", linewidth=1.0)
            if "best_epoch" in log[-1]:
                ax2.axvline(
                    log[-1]["best_epoch"],
                    color=PALETTE[0],
                    linestyle="--",
                    linewidth=1.0,
                    label=f"best hold-out epoch ({log[-1]['best_epoch']})",
                )
            ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax2.set_xlabel("epoch")
            ax2.set_ylabel("accuracy (%)")
            ax2.set_title("accuracy on held-out points", fontsize=9)
            ax2.legend(fontsize=8)
        return _svg(fig, key, "training curves")


def smoothing_curves(rows: Sequence[dict[str, Any]], base_accuracy: float | None, key: str) -> str:
    """Accuracy (%) of the smoothed classifier against the number of noise draws (log scale),
    one line per sigma (each its own dash and marker: equal accuracies stay visible), one
    panel per voting rule."""
    votes = list(dict.fromkeys(r["vote"] for r in rows))
    sigmas = sorted({r["sigma"] for r in rows})
    with matplotlib.rc_context(STYLES):
        fig = _figure(ncols=len(votes), width=3.8)
        axes = fig.subplots(1, len(votes), sharey=True, squeeze=False)[0]
        for ax, vote in zip(axes, votes, strict=True):
            for i, sigma in enumerate(sigmas):
                pts = sorted(
                    (r["samples"], 100 * r["accuracy"])
                    for r in rows
                    if r["vote"] == vote and r["sigma"] == sigma
                )
                ax.plot(*zip(*pts, strict=True), label=f"σ = {sigma:g}", **series_style(i))
            if base_accuracy is not None:
                ax.axhline(
                    100 * base_accuracy,
                    color=INK,
                    linestyle=":",
                    linewidth=1.0,
                    label="base model, no noise",
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("noise draws per prediction (n)")
            ax.set_title(f"{vote} vote", fontsize=9)
        axes[0].set_ylabel("accuracy of the smoothed classifier (%)")
        axes[-1].legend(fontsize=8)
        return _svg(fig, key, "smoothed accuracy against noise draws and sigma")


def certified_curves(curves: Sequence[dict[str, Any]], norm: str, key: str) -> str:
    """Certified accuracy (%) against the radius: ``curves`` dicts with ``label`` and
    ``points`` (``{"radius", "accuracy"}`` rows of a certification summary)."""
    with matplotlib.rc_context(STYLES):
        fig = _figure()
        ax = fig.add_subplot()
        for i, c in enumerate(curves):
            pts = [(p["radius"], 100 * p["accuracy"]) for p in c["points"]]
            ax.plot(
                *zip(*pts, strict=True),
                drawstyle="steps-post",
                label=c["label"],
                **series_style(i, markers=False),
            )
        ax.set_xlabel(f"certified radius ({norm}, input scale [0, 1])")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(left=0)
        ax.legend(fontsize=8)
        return _svg(fig, key, "certified accuracy against radius")

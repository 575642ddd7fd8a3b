"""The report's example images: clean inputs, the worst-case adversarial inputs and their
difference amplified, as inline PNGs in a table (:func:`examples_html`, part of the page that
:mod:`robustlab.report.html` assembles), from the examples an evaluation saved beside its
results and its per-sample rows."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from robustlab.report.markup import Markup, esc, table
from robustlab.report.runs import Document, Run

IMAGE_PX = 84  # displayed size of the example images (upscaled without smoothing)


def _png(img: np.ndarray) -> str:
    """(C, H, W) floats in [0, 1] -> a data URI of a PNG upscaled to about IMAGE_PX."""
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    pil = Image.fromarray(arr)
    scale = max(1, IMAGE_PX // max(pil.size))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _per_sample(run: Run, doc: Document, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    path = run.path / doc.path.parent / "per_sample.jsonl"
    if not path.exists():
        return {}
    wanted, rows = set(indices), {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["index"] in wanted:
                rows[r["index"]] = r
    return rows


def _class_names(run: Run, doc: Document) -> list[str] | None:
    """The class names of the evaluated data: recorded in the results (the CLI does), else in
    the model's sidecar (``models.save(..., meta={"classes": [...]})``) when it was trained on
    the same data set; None (class numbers are shown) otherwise."""
    cfg = doc.data.get("config") or {}
    names, model = cfg.get("classes"), run.model_of(doc) or {}
    if not names and (cfg.get("dataset") in (None, model.get("dataset"))):
        names = model.get("classes")
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None


def examples_html(run: Run, doc: Document) -> str:
    """The examples' table of an evaluation (empty where it saved none)."""
    ex = run.examples(doc)
    if ex is None:
        return ""
    d = doc.data
    names = _class_names(run, doc)

    def name(k: int) -> str:
        return names[k] if names and 0 <= k < len(names) else str(k)

    x, x_adv = ex["x"].numpy(), ex["x_adv"].numpy()
    delta = x_adv - x
    t = d["threat"]
    span = t["eps"] if t["norm"] == "linf" and t["eps"] > 0 else float(np.abs(delta).max())
    gain = 0.5 / span if span > 0 else 1.0
    idx = ex["index"].tolist()
    extra = _per_sample(run, doc, idx)
    head = ["", *(f"#{i}" for i in idx)]
    clean_row: list[Any] = ["clean"]
    adv_row: list[Any] = ["adversarial"]
    pert_row: list[Any] = [f"perturbation ×{gain:.3g}"]
    for j, i in enumerate(idx):
        label, cp, ap = (int(ex[k][j]) for k in ("label", "clean_pred", "adv_pred"))
        row = extra.get(i, {})
        # the recorded verdict (a majority of predictions on a randomised model), else the one
        # prediction saved
        mark = "robust" if row.get("robust", ap == label) else "broken"
        by = f" by {row['broken_by']}" if row.get("broken_by") else ""
        alt = f"example {i}, label {name(label)}"
        clean_row.append(
            Markup(
                f'<img src="{_png(x[j])}" alt="{esc(alt)} (clean)"><div class="cap">'
                f"label {esc(name(label))}<br>pred {esc(name(cp))}</div>"
            )
        )
        adv_row.append(
            Markup(
                f'<img src="{_png(x_adv[j])}" alt="{esc(alt)} (adversarial)"><div class="cap '
                f'{mark}">pred {esc(name(ap))}<br>{mark}{esc(by)}</div>'
            )
        )
        dist = f"{t['norm']} {row['distance']:.3g}" if "distance" in row else ""
        pert_row.append(
            Markup(
                f'<img src="{_png(0.5 + gain * delta[j])}" alt="{esc(alt)} (perturbation)">'
                f'<div class="cap">{esc(dist)}</div>'
            )
        )
    return (
        '<h4>Examples</h4><p class="note">Clean inputs, the worst-case adversarial inputs '
        "the evaluation found, and their difference amplified (mid-grey is no change). "
        "Points broken by an attack are chosen first; a robust point shows its clean input."
        "</p>" + table(head, [clean_row, adv_row, pert_row], "examples")
    )

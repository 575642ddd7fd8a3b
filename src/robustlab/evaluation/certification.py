"""Certification runs: Cohen et al.'s CERTIFY over a test set, streamed and resumable, and the
summary that certification papers report.

A run writes one JSON line per example to ``certify.jsonl`` as soon as it is certified (so a
crash loses at most the example in progress, and a rerun resumes after the last row), then
``certify.json``: the configuration, versions, seed and commit, the clean accuracy of the
smoothed prediction, the abstention rate, the approximate certified accuracy at each radius
(the fraction of examples predicted correctly with a certified radius >= r) and the average
certified radius (ACR: the mean radius over all examples, counting 0 for wrong or abstained
ones). Every example draws its noise from its own generator seeded by ``(seed, index)``, so a
resumed run gives the rows a single run would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._io import atomic_write
from robustlab._provenance import git_commit, versions
from robustlab._validate import check_inputs
from robustlab.defenses.certify import ABSTAIN, Certificate, certify_iter
from robustlab.evaluation.record import Progress
from robustlab.noise import CERTIFIED_NORM
from robustlab.threat import ThreatModel

__all__ = ["certification_summary", "run_certification"]

ROWS, SUMMARY = "certify.jsonl", "certify.json"


def _example_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def certification_summary(
    rows: Sequence[dict[str, Any]], radii: Sequence[float] | None = None, norm: str = "l2"
) -> dict[str, Any]:
    """Clean accuracy, abstention, certified accuracy per radius and ACR of certify rows (dicts
    with ``label``, ``prediction``, ``radius``). ``radii`` defaults to a grid from 0 to the
    largest certified radius in steps of 0.05 (l2 and l1 units alike; ``norm="l0"``: every
    whole number of pixels)."""
    n = len(rows)
    if n == 0:
        raise ValueError("no certified examples to summarise")
    correct = [r["prediction"] == r["label"] for r in rows]
    radius = [r["radius"] if ok else 0.0 for r, ok in zip(rows, correct, strict=True)]
    if radii is None:
        top = max(radius)
        radii = (
            list(range(int(top) + 2))
            if norm == "l0"
            else [round(0.05 * i, 2) for i in range(int(top / 0.05) + 2)]
        )
    return {
        "n": n,
        "clean_accuracy": sum(correct) / n,
        "abstain_rate": sum(r["prediction"] == ABSTAIN for r in rows) / n,
        "average_certified_radius": sum(radius) / n,
        "certified_accuracy": [
            {
                "radius": float(r),
                "accuracy": sum(ok and rad >= r for ok, rad in zip(correct, radius, strict=True))
                / n,
            }
            for r in radii
        ],
    }


def _read_rows(path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished rows of an earlier run with the same configuration (a half-written last
    line is dropped); a different configuration is an error rather than a silent mix."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if not lines:
        return []
    header = json.loads(lines[0])
    if header.get("config") != config:
        raise ValueError(
            f"{path} holds a certification with another configuration "
            f"({header.get('config')}); use another --out or --restart"
        )
    rows = []
    for line in lines[1:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written when the run died
    return rows


def _sequential_options(sequential: dict[str, Any] | None) -> dict[str, Any]:
    if not sequential:
        return {}
    unknown = set(sequential) - {"max_n", "radius_tolerance", "min_radius", "max_radius"}
    if unknown:
        raise ValueError(
            f"unknown sequential option(s) {sorted(unknown)}; valid: max_n, "
            "radius_tolerance, min_radius, max_radius"
        )
    return {"sequential": True, **sequential}


def _row(cert: Certificate, index: int, label: int, *, draws: bool) -> dict[str, Any]:
    """The ``certify.jsonl`` row of one certificate of example ``index`` (label ``label``);
    ``draws``: record the draws a sequential certificate took."""
    return {
        "index": index,
        "label": label,
        "prediction": cert.prediction,
        "radius": cert.radius,
        "p_lower": cert.p_lower,
        "count": cert.count,
        **({"draws": cert.draws} if draws else {}),
        "correct": cert.prediction == label,
        "seconds": round(cert.seconds, 4),
    }


def run_certification(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    noise: str = "gaussian",
    batch_size: int | None = 1000,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    out: str | Path,
    resume: bool = True,
    config: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    progress: bool = False,
    sequential: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Certify every input of ``x`` (labels ``y``) into the directory ``out``; returns the
    summary written to ``out/certify.json``. ``indices`` names the examples in the rows (their
    index in the data set; default 0..N-1); ``on_row`` is called with every new row;
    ``config`` adds entries (e.g. the checkpoint) to the recorded configuration. ``x`` must
    lie in the input box ``bounds``, as for every entry point (checked before anything is
    written). ``progress``: True: a progress bar on stderr over the noise draws x points
    (``n0 + n`` per point; a resumed run starts at its finished rows), below a header line
    saying what is about to run; ``on_row`` may print (the bar steps aside).
    ``batch_size``: rows per forward, shared across examples (None: measured, see
    :func:`robustlab.defenses.certify`). ``sequential``: None (Cohen's fixed ``n``) or the
    options of the sequential procedure, ``{"max_n": ..., "radius_tolerance": ...,
    "min_radius": ...}`` (recorded in the configuration; rows then hold ``draws``, and are
    written in the order the examples stop)."""
    check_inputs(x, y, ThreatModel("l2", 0.0, bounds))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(ids) != len(x) or len(y) != len(x):
        raise ValueError(
            f"x, y and indices must have one entry per example, got {len(x)}, {len(y)}, {len(ids)}"
        )
    cfg = {
        "sigma": float(sigma),
        "noise": noise,
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "seed": seed,
        **({"sequential": dict(sequential)} if sequential else {}),
        **(config or {}),
    }
    per_point = n0 + (sequential or {}).get("max_n", 100_000) if sequential else n0 + n
    path = out / ROWS
    rows = _read_rows(path, cfg) if resume else []
    done = {r["index"] for r in rows}
    if not rows:
        atomic_write(path, json.dumps({"config": cfg}) + "\n")
    bar = (
        None
        if not progress
        else Progress(
            desc="certify",
            unit="draw",
            total=len(ids) * per_point,
            initial=sum(i in done for i in ids) * per_point,
            header=f"certify: {len(ids)} points ({len(done)} done), {noise} noise sigma {sigma:g}, "
            f"{n0} + {f'<= {per_point - n0} (sequential)' if sequential else n} draws "
            f"each, alpha {alpha:g}; radii in {CERTIFIED_NORM[noise]}",
        )
    )
    with open(path, "a") as f, bar or nullcontext():
        todo = [pos for pos, index in enumerate(ids) if index not in done]
        certs = (
            []
            if not todo
            else certify_iter(
                model,
                x[todo],
                sigma=sigma,
                n0=n0,
                n=n,
                alpha=alpha,
                noise=noise,
                batch_size=batch_size,
                bounds=bounds,
                **_sequential_options(sequential),
                generator=[_example_generator(seed, ids[p], x.device) for p in todo],
            )
        )
        for cert in certs:
            pos = todo[cert.index]
            row = _row(cert, ids[pos], int(y[pos]), draws=bool(sequential))
            f.write(json.dumps(row) + "\n")
            f.flush()
            rows.append(row)
            if bar is not None:
                bar.bar.update(per_point if not sequential else n0 + cert.draws)
            if on_row is not None:
                with bar.aside() if bar is not None else nullcontext():
                    on_row(row)
    summary = {
        "config": cfg,
        "norm": CERTIFIED_NORM[noise],
        **certification_summary(rows, norm=CERTIFIED_NORM[noise]),
        "versions": versions(),
        "commit": git_commit(),
        "seconds": sum(r["seconds"] for r in rows),
    }
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2))
    return summary

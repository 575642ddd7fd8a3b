"""Evaluation split over the ranks of a ``torchrun`` launch, merged per sample.

Every rank evaluates its contiguous shard of the points with :func:`evaluate` (its own
resumable state in ``out/shard-<rank>/``); the per-sample results are then gathered in the
original order and rank 0 writes one ``results.json`` / ``per_sample.jsonl`` for all points.
Counts add up (points attacked and broken by each attack), accuracies are recomputed from the
merged per-sample outcomes, flags are the union over the shards, times are the slowest shard's.
Each shard draws its own attack randomness, so a sharded run is not bitwise the one-process run
for attacks with random starts (deterministic attacks give identical per-sample results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustlab import distributed
from robustlab.evaluation.checks import black_box_beats_white_box
from robustlab.evaluation.results import EvalResult, merged_spread, min_norm_curve
from robustlab.evaluation.run import evaluate
from robustlab.threat import ThreatModel


def evaluate_sharded(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    out: str | Path | None = None,
    **options: Any,
) -> EvalResult:
    """:func:`evaluate` with the points split over the open process group's ranks; every rank
    returns the merged result, rank 0 writes it to ``out``. One process: plain ``evaluate``."""
    world = distributed.current()
    if world.size == 1:
        return evaluate(model, x, y, threat, out=out, **options)
    xs, ys = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
    shard_out = Path(out) / f"shard-{world.rank}" if out is not None else None
    res = evaluate(model, xs, ys, threat, out=shard_out, **options)
    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, {"record": res.record, "per_sample": res.per_sample})
    x_adv = distributed.gather_rows(res.x_adv.to(_device(model)), world).cpu()
    merged = merge(parts, x_adv, threat, x=x.detach().cpu())
    if world.main and out is not None:
        merged.save(out)
    distributed.barrier(world)
    return merged


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def merge(
    parts: list[dict[str, Any]], x_adv: Tensor, threat: ThreatModel, x: Tensor | None = None
) -> EvalResult:
    """One result from the shards' ``{"record", "per_sample"}`` in rank order; ``x``: the clean
    inputs (for the saved examples)."""
    per_sample, offset = [], 0
    for p in parts:
        per_sample += [row | {"index": row["index"] + offset} for row in p["per_sample"]]
        offset += p["record"]["n"]
    n = len(per_sample)
    records = [p["record"] for p in parts]
    robust = torch.tensor([row["robust"] for row in per_sample], dtype=torch.bool)
    clean = sum(r["clean_accuracy"] * r["n"] for r in records) / n
    per_attack = []
    for entries in zip(*(r["per_attack"] for r in records), strict=True):
        merged = dict(entries[0])
        merged["attacked"] = sum(e["attacked"] for e in entries)
        merged["broken"] = sum(e["broken"] for e in entries)
        merged["robust_accuracy"] = (
            sum(e["robust_accuracy"] * r["n"] for e, r in zip(entries, records, strict=True)) / n
        )
        merged["time_s"] = max(e["time_s"] for e in entries)
        per_attack.append(merged)
    flags = {
        f["name"]: f
        for r in records
        for f in r["flags"]
        if f["name"] != "black-box-beats-white-box"
    }
    if (flag := black_box_beats_white_box(per_attack, n)) is not None:
        flags[flag["name"]] = flag
    record = (
        records[0]
        | {
            "n": n,
            "clean_accuracy": clean,
            "robust_accuracy": float(robust.float().mean()),
            "per_attack": per_attack,
            "flags": list(flags.values()),
            "shards": len(parts),
            "timings": {k: max(r["timings"][k] for r in records) for k in records[0]["timings"]},
        }
        | merged_spread(records)
    )
    record.pop("min_norm_curve", None)
    record.pop("examples", None)  # shard 0's; the merged result saves its own
    if "detection" in record:  # AUROC needs every shard's scores, which the records lack
        record["detection"] = {
            "skipped": "a sharded evaluation records no detection figures "
            "(AUROC needs the scores of every shard); evaluate "
            "in one process for them"
        }
    if all("min_norm_curve" in r for r in records):
        norms = torch.tensor(
            [float("inf") if row["min_norm"] is None else row["min_norm"] for row in per_sample]
        )
        search = (
            "minimal"
            if all(r.get("min_norm_search", "minimal") == "minimal" for r in records)
            else "early-stop"
        )
        record["min_norm_curve"] = min_norm_curve(norms, threat, search=search)
        record["min_norm_search"] = search
    return EvalResult(
        clean_accuracy=clean,
        robust_accuracy=record["robust_accuracy"],
        per_attack=per_attack,
        flags=record["flags"],
        robust=robust,
        x_adv=x_adv,
        broken_by=[row["broken_by"] for row in per_sample],
        per_sample=per_sample,
        record=record,
        x=x,
    )

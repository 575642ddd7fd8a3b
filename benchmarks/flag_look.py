"""A closer look at a leaderboard row's ``black-box-beats-white-box`` flag: masked gradients, or
points at the edge of the ball?

The ``standard`` suite runs APGD-CE, APGD-T and FAB-T, then Square on the points they leave. If
Square breaks more of them than the tolerance allows, the evaluation flags the row. There are two
readings. Either the gradients are masked, so the gradient attacks fail where the model is not
robust. Or the points lie at the edge of the ball, where Square's random search of the corners
lands on an adversarial example that a 100-step gradient attack just missed. This script tells the
two apart. It uses the row's evaluated checkpoint and its cached ``standard`` evaluation, both
written by ``benchmarks/leaderboard.py``.

1. **How far the gradient reaches.** Each point's ``min_norm`` is FAB-T's smallest adversarial
   example, an upper bound on its distance to the boundary found from the gradient. The table
   sets the points Square broke beside the points that stayed robust. With masked gradients,
   FAB-T finds nothing close to the points Square broke. At the edge of the ball, it finds an
   adversarial example just outside eps.
2. **A stronger white-box attack** on the points Square broke: APGD-CE and APGD-T with
   ``--steps`` steps and ``--restarts`` restarts each. If it breaks them, the gradient reaches
   them.
3. **The audit** (:func:`robustlab.audit`) on the first ``--audit-n`` test points. It runs plain
   PGD against the adaptive attacks, Square, NAttack and RayS at ``--queries`` queries, transfer
   from ``--surrogate`` (a zoo model), the eps sweep, the unbounded attack, convergence and the
   gradient checks.

Run from the repository root, after the row's leaderboard run:
``.venv/bin/python benchmarks/flag_look.py --row free-at`` (``--record`` names the row's record
when the cache holds it at several budgets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import CACHE_DIR, machine_record, write_results

import robustlab as rl

DATASET = "fashion-mnist"
GRADIENT_FREE = ("square", "nattack", "rays")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", default="free-at", help="the leaderboard row (seed --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", type=Path, help="the row's record (<cache>/rows/*.json)")
    p.add_argument("--cache", type=Path, default=CACHE_DIR / "leaderboard")
    p.add_argument("--steps", type=int, default=1000, help="APGD steps of the stronger attack")
    p.add_argument("--restarts", type=int, default=5, help="APGD restarts of the stronger attack")
    p.add_argument("--audit-n", type=int, default=200, help="points of the audit (0 skips it)")
    p.add_argument("--queries", type=int, default=1000, help="the audit's gradient-free queries")
    p.add_argument("--surrogate", default="fmnist-pgd-at-smallcnn",
                   help="zoo model for the audit's transfer attack")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--stem", default=None, help="results name (default: flag_look_<row>)")
    return p.parse_args()


def find_record(args: argparse.Namespace) -> Path:
    """The row's finished record: ``--record``, or the only one of the row and seed."""
    if args.record is not None:
        return args.record
    found = sorted((args.cache / "rows").glob(f"{args.row}-s{args.seed}-*.json"))
    if len(found) != 1:
        raise SystemExit(
            f"{len(found)} records of row {args.row!r} seed {args.seed} in "
            f"{args.cache / 'rows'}: {[p.name for p in found]}; run benchmarks/leaderboard.py "
            f"--rows {args.row} first, or name one with --record"
        )
    return found[0]


def quantiles(values: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(values, n=20, method="inclusive")
    return {"min": min(values), "p5": qs[0], "p25": qs[4], "median": qs[9]}


def reach(per_sample: list[dict[str, Any]], eps: float) -> dict[str, Any]:
    """Step 1: FAB-T's ``min_norm`` of the points a gradient-free attack broke, and how many
    robust points have one at most as far out."""
    broken = [r for r in per_sample if (r["broken_by"] or "").split(":")[-1] in GRADIENT_FREE]
    robust = [r["min_norm"] for r in per_sample if r["robust"] and r["min_norm"] is not None]
    points = [
        {
            "index": r["index"],
            "broken_by": r["broken_by"],
            "min_norm": r["min_norm"],
            "over_eps": None if r["min_norm"] is None else r["min_norm"] / eps,
            "robust_as_close": sum(m <= (r["min_norm"] or 0.0) for m in robust),
        }
        for r in broken
    ]
    return {"points": points, "robust_n": len(robust), "robust_min_norm": quantiles(robust)}


def stronger(model: torch.nn.Module, idx: list[int], threat: rl.ThreatModel, steps: int,
             restarts: int, n_test: int) -> dict[str, Any]:  # fmt: skip
    """Step 2: APGD-CE then APGD-T at ``steps`` x ``restarts`` on the test points ``idx``."""
    x, y = rl.data.load(DATASET, split="test", n=n_test)
    attacks = [("apgd-ce", {"steps": steps, "restarts": restarts}),
               ("apgd-t", {"steps": steps, "restarts": restarts})]  # fmt: skip
    t0 = time.perf_counter()
    res = rl.evaluate(model, x[idx], y[idx], threat, attacks=attacks, seed=0)
    return {
        "attacks": attacks,
        "robust": [bool(v) for v in res.robust.tolist()],
        "per_attack": [
            {k: a.get(k) for k in ("attack", "attacked", "broken")}
            for a in res.record["per_attack"]
        ],  # fmt: skip
        "seconds": time.perf_counter() - t0,
    }


def run_audit(model: torch.nn.Module, threat: rl.ThreatModel, args: argparse.Namespace) -> dict:
    """Step 3: the audit on the first ``--audit-n`` test points."""
    x, y = rl.data.load(DATASET, split="test", n=args.audit_n)
    surrogate = rl.models.pretrained(args.surrogate)
    t0 = time.perf_counter()
    res = rl.audit(model, x, y, threat, surrogate=surrogate, queries=args.queries,
                   binarization_points=0, seed=0)  # fmt: skip
    return {
        "n": len(x),
        "robust_accuracy": res.robust_accuracy,
        "checks": [{k: c.get(k) for k in ("name", "status", "evidence")} for c in res.checks],
        "flags": [f["name"] if isinstance(f, dict) else str(f) for f in res.flags],
        "seconds": time.perf_counter() - t0,
    }


def markdown(rec: dict[str, Any]) -> str:
    r, eps = rec["reach"], rec["eps"]
    q = r["robust_min_norm"]
    lines = [
        f"# A closer look at {rec['row']} (seed {rec['seed']}): black-box-beats-white-box", "",
        f"Checkpoint `{rec['checkpoint']}`; its `standard` evaluation `{rec['folder']}`; "
        f"linf eps {eps}.", "",
        "## 1. How far the gradient reaches (FAB-T's smallest adversarial example)", "",
        f"The {r['robust_n']} robust points: min_norm min {q['min']:.4f}, 5th percentile "
        f"{q['p5']:.4f}, 25th {q['p25']:.4f}, median {q['median']:.4f}.", "",
        "| test index | broken by | FAB-T min_norm | / eps | robust points as close |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for p in r["points"]:
        mn = "none found" if p["min_norm"] is None else f"{p['min_norm']:.4f}"
        ratio = "-" if p["over_eps"] is None else f"{p['over_eps']:.3f}"
        lines.append(f"| {p['index']} | {p['broken_by']} | {mn} | {ratio} | "
                     f"{p['robust_as_close']} |")  # fmt: skip
    s = rec.get("stronger")
    if s is not None:
        kept = sum(s["robust"])
        lines += ["", f"## 2. APGD-CE and APGD-T, {rec['steps']} steps x {rec['restarts']} "
                  "restarts, on those points", "",
                  f"{len(s['robust']) - kept} of {len(s['robust'])} broken by the white-box "
                  f"attacks alone ({s['seconds']:.0f} s)."]  # fmt: skip
        lines += [f"- {a['attack']}: {a['broken']} of {a['attacked']}" for a in s["per_attack"]]
    a = rec.get("audit")
    if a is not None:
        lines += ["", f"## 3. The audit on the first {a['n']} test points "
                  f"({rec['queries']} queries per gradient-free attack, transfer from "
                  f"{rec['surrogate']}; {a['seconds']:.0f} s)", "",
                  f"Robust accuracy {100 * a['robust_accuracy']:.1f}%; flags: "
                  f"{', '.join(a['flags']) or 'none'}.", "",
                  "| check | verdict | evidence |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {c['name']} | {c['status']} | {c['evidence']} |" for c in a["checks"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = find_record(args)
    row = json.loads(path.read_text())
    folder = Path(row["standard"]["folder"])
    per_sample = [json.loads(s) for s in (folder / "per_sample.jsonl").read_text().splitlines()]
    threat_rec = row["standard"]["record"]["threat"]
    threat = rl.ThreatModel(threat_rec["norm"], float(threat_rec["eps"]))
    model = rl.models.load(row["checkpoint"])
    rec: dict[str, Any] = {
        "row": row["row"], "seed": row["seed"], "record": str(path), "folder": str(folder),
        "checkpoint": row["checkpoint"], "eps": threat.eps, "steps": args.steps,
        "restarts": args.restarts, "queries": args.queries, "surrogate": args.surrogate,
        "reach": reach(per_sample, threat.eps),
    }  # fmt: skip
    idx = [p["index"] for p in rec["reach"]["points"]]
    if idx:
        rec["stronger"] = stronger(model, idx, threat, args.steps, args.restarts, len(per_sample))
    if args.audit_n > 0:
        rec["audit"] = run_audit(model, threat, args)
    rec["machine"] = machine_record()
    md = markdown(rec)
    print(md)
    write_results(args.stem or f"flag_look_{args.row.replace('-', '_')}", md, rec)


if __name__ == "__main__":
    main()

"""How the ``fast`` suite was chosen: candidate cascades against ``standard`` on dev points.

Test images 5000-5499 of Fashion-MNIST (disjoint from the first 1000 that
``benchmarks/evaluation.py`` reports on), linf eps 0.1, the two smallcnn models of
``attack_speed.py``. Each candidate runs through ``rl.evaluate(attacks=...)``; the output gives
its robust accuracy, wall time, and the points it left robust that ``standard`` broke
("missed") or broke that ``standard`` left robust ("extra").

Run from the repository root (about 20 minutes on 2 cores)::

    .venv/bin/python benchmarks/fast_suite_design.py | tee benchmarks/results/fast_suite_design.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import robustlab as rl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_record, trained_model  # noqa: E402
from attack_speed import RECIPES  # noqa: E402

CANDIDATES = {
    "standard": None,
    "A ce25 t25x3": [("apgd-ce", {"steps": 25}), ("apgd-t", {"steps": 25, "n_target_classes": 3})],
    "B ce50 t50x9": [("apgd-ce", {"steps": 50}), ("apgd-t", {"steps": 50, "n_target_classes": 9})],
    "C ce100 mm9x20": [("apgd-ce", {"steps": 100}), ("mm", {"k": 9, "steps": 20})],
    "D ce50 mm3x20 t100x9": [
        ("apgd-ce", {"steps": 50}),
        ("mm", {"k": 3, "steps": 20}),
        ("apgd-t", {"steps": 100}),
    ],
    "E ce25 mm9x20": [("apgd-ce", {"steps": 25}), ("mm", {"k": 9, "steps": 20})],
    "F ce100 t100x9": [("apgd-ce", {"steps": 100}), ("apgd-t", {"steps": 100})],
}


def main() -> None:
    torch.set_num_threads(2)
    print(machine_record())
    x, y = rl.data.load("fashion-mnist", split="test")
    x, y = x[5000:5500], y[5000:5500]
    threat = rl.ThreatModel("linf", 0.1)
    for name in ("pgd-at", "natural"):
        model = trained_model(f"smallcnn-{name}", RECIPES[name]).eval()
        ref = None
        for label, attacks in CANDIDATES.items():
            t0 = time.perf_counter()
            r = rl.evaluate(model, x, y, threat, suite="standard", attacks=attacks, batch_size=500)
            dt = time.perf_counter() - t0
            diff = (
                ""
                if ref is None
                else (
                    f" missed {int((r.robust & ~ref).sum())} extra {int((~r.robust & ref).sum())}"
                )
            )
            ref = r.robust if ref is None else ref
            stages = [
                f"{a['attack']} {a['time_s']:.1f}s {100 * a['robust_accuracy']:.1f}"
                for a in r.per_attack
            ]
            print(
                f"{name} {label} {100 * r.robust_accuracy:.1f}% {dt:.1f}s{diff} {stages}",
                flush=True,
            )


if __name__ == "__main__":
    main()

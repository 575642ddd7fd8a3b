"""The cost of the own-model wrappers on evaluation time, as a ratio to the bare model.

One PGD-trained smallcnn (``attack_speed.py``'s ``pgd-at`` recipe, from ``benchmarks/.cache/``)
is evaluated on the first Fashion-MNIST test points in five ways, timed interleaved (round
robin, rotated each round) and compared by their medians:

- ``bare``: the model object as ``models.load`` gives it (the reference, ratio 1);
- ``from_spec``: ``models.from_spec("robustlab.models.smallcnn:SmallCNN", weights=...)``, the
  user's-model path, with the same weights;
- ``normalized``: the bare model inside ``models.Normalized`` with mean 0, std 1 (one extra
  elementwise layer per forward);
- ``spec_checkpoint``: the ``from_spec`` model saved with ``models.save`` and loaded back with
  ``models.load(..., trust_code=True)``;
- ``rl.benchmark``: the one line, ``rl.benchmark(spec, "fashion-mnist", weights=...,
  out=None)``: building the model and reading the data included in its time.

Every way must give the same robust accuracy (the same weights, points and seed); the script
fails otherwise.

    .venv/bin/python benchmarks/own_model.py                 # 200 points, PGD-10, 5 rounds
    .venv/bin/python benchmarks/own_model.py --suite fast    # the fast suite instead of PGD

Results go to ``benchmarks/results/own_model.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import robustlab as rl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import interleaved, machine_record, median, trained_model, write_results  # noqa: E402
from attack_speed import DATASET, EPS, RECIPES  # noqa: E402

SPEC = "robustlab.models.smallcnn:SmallCNN"
RECIPE = "pgd-at"


def _ways(folder: Path, suite: str | None, steps: int, n: int) -> dict[str, Any]:
    """The five evaluations to time, each a function of no arguments returning its result."""
    bare = trained_model(f"smallcnn-{RECIPE}", RECIPES[RECIPE]).eval()
    weights = rl.models.save(bare, folder / "weights.safetensors")  # a plain state dict
    options = dict(bare.robustlab_arch["kwargs"])
    spec_model = rl.models.from_spec(SPEC, weights=weights, **options).eval()
    saved = rl.models.save(spec_model, folder / "spec.safetensors")
    models = {
        "bare": bare,
        "from_spec": spec_model,
        "normalized": rl.models.Normalized(bare, 0.0, 1.0).eval(),
        "spec_checkpoint": rl.models.load(saved, trust_code=True),
    }
    threat = rl.ThreatModel("linf", EPS)
    x, y = rl.data.load(DATASET, split="test", n=n)
    how: dict[str, Any] = {"suite": suite} if suite else {"attacks": [("pgd", {"steps": steps})]}
    ways = {
        name: (lambda m=m: rl.evaluate(m, x, y, threat, seed=0, **how))
        for name, m in models.items()
    }
    ways["rl.benchmark"] = lambda: rl.benchmark(
        SPEC,
        DATASET,
        threat=threat,
        n=n,
        device="cpu",
        out=None,
        seed=0,
        weights=weights,
        model_options=options,
        **how,
    )
    return ways


def _markdown(rec: dict[str, Any]) -> str:
    rows = [
        f"| {name} | {r['median_s']:.3f} | {min(r['times_s']):.3f} - "
        f"{max(r['times_s']):.3f} | {r['ratio']:.3f} | {r['robust_accuracy']:.3f} |"
        for name, r in rec["ways"].items()
    ]
    m = rec["machine"]
    return "\n".join(
        [
            "# The cost of the own-model wrappers on evaluation time",
            "",
            f"smallcnn ({RECIPE}), {rec['n']} Fashion-MNIST test points, linf eps {EPS}, "
            f"{rec['evaluation']}, {rec['rounds']} interleaved rounds (median), "
            f"{m['torch_threads']} torch thread(s), torch {m.get('torch')}.",
            "",
            "| way | median time (s) | range (s) | ratio to bare (medians) | robust accuracy |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Command: `{m['command']}` ({m['date']}).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test points (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument(
        "--suite",
        type=str,
        default=None,
        help="evaluate with this suite (e.g. fast) instead of PGD",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ways = _ways(Path(tmp), args.suite, args.steps, args.n)
        interleaved(ways, 1)  # warm-up round
        times, results = interleaved(
            ways,
            args.rounds,
            on_done=lambda r, name, s: print(f"round {r + 1} {name}: {s:.3f} s", flush=True),
        )
    base = median(times["bare"])
    accuracies = {name: res.robust_accuracy for name, res in results.items()}
    rec = {
        "n": args.n,
        "rounds": args.rounds,
        "eps": EPS,
        "recipe": RECIPES[RECIPE],
        "evaluation": f"suite {args.suite}" if args.suite else f"PGD-{args.steps}",
        "machine": machine_record() | {"torch_threads": torch.get_num_threads()},
        "ways": {
            name: {
                "times_s": t,
                "median_s": median(t),
                "ratio": median(t) / base,
                "robust_accuracy": accuracies[name],
            }
            for name, t in times.items()
        },
    }
    md, js = write_results("own_model", _markdown(rec), rec)
    print(_markdown(rec))
    print(f"results: {md} {js}")
    if len(set(accuracies.values())) != 1:
        print(f"FAILED: the ways disagree on the robust accuracy: {accuracies}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

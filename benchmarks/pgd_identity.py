"""PGD's adversarial examples, bit for bit, on the attack-speed benchmark's models.

A refactor of the attacks must not change a single returned point. ``--save FILE`` runs PGD
(and the attacks built on its loop) with fixed generators on the cached benchmark models
(``attack_speed.py``'s recipes) and writes every ``x_adv`` to a safetensors file; ``--compare
FILE`` reruns them and exits non-zero unless each tensor is bit-identical to the saved one.

    python benchmarks/pgd_identity.py --save /tmp/pgd-before.safetensors   # on the old commit
    python benchmarks/pgd_identity.py --compare /tmp/pgd-before.safetensors  # on the new one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import robustlab as rl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import trained_model  # noqa: E402
from attack_speed import DATASET, EPS, RECIPES  # noqa: E402

# (name, attack, norm, eps, options): PGD in each norm and mode, and the attacks on its loop
CASES: list[tuple[str, str, str, float, dict[str, Any]]] = [
    ("pgd-linf", "pgd", "linf", EPS, {"steps": 10, "step_size": 0.025}),
    ("pgd-linf-restarts", "pgd", "linf", EPS, {"steps": 5, "restarts": 2}),
    ("pgd-linf-early-stop", "pgd", "linf", EPS, {"steps": 10, "early_stop": True}),
    ("pgd-linf-dlr", "pgd", "linf", EPS, {"steps": 10, "loss": "dlr"}),
    ("pgd-linf-momentum", "pgd", "linf", EPS, {"steps": 10, "optimizer": "momentum"}),
    ("pgd-linf-adam", "pgd", "linf", EPS, {"steps": 10, "optimizer": "adam"}),
    ("pgd-l2", "pgd", "l2", 1.5, {"steps": 10}),
    ("pgd-l1", "pgd", "l1", 10.0, {"steps": 10}),
    ("fgsm", "fgsm", "linf", EPS, {}),
    ("mi-fgsm", "mi-fgsm", "linf", EPS, {"steps": 10}),
    ("apgd-ce", "apgd-ce", "linf", EPS, {"steps": 10}),
    ("apgd-dlr", "apgd-dlr", "linf", EPS, {"steps": 10}),
]


def run_all(n: int) -> dict[str, torch.Tensor]:
    x, y = rl.data.load(DATASET, split="test", n=n)
    out = {}
    for model_name, recipe in RECIPES.items():
        model = trained_model(f"smallcnn-{model_name}", recipe).eval()
        for case, attack, norm, eps, options in CASES:
            atk = rl.attacks.create(attack, rl.ThreatModel(norm, eps), **options)
            res = atk(model, x, y, generator=torch.Generator().manual_seed(0))
            out[f"{model_name}/{case}"] = res.x_adv.contiguous()
            print(f"{model_name}/{case}: success {res.success.float().mean():.3f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the examples to this safetensors file")
    what.add_argument("--compare", type=Path, help="compare with the examples in this file")
    p.add_argument("--n", type=int, default=200, help="test images (default 200)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # thread count can change float reduction order
    now = run_all(args.n)
    if args.save:
        save_file(now, str(args.save))
        print(f"saved {len(now)} tensors to {args.save}")
        return 0
    before = load_file(str(args.compare))
    differ = sorted(k for k in before if k not in now or not torch.equal(before[k], now[k]))
    missing = sorted(set(now) - set(before))
    for k in differ:
        print(f"DIFFERS: {k}")
    print(
        f"{len(before) - len(differ)} of {len(before)} identical"
        + (f"; new cases not in the file: {', '.join(missing)}" if missing else "")
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

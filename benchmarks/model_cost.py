"""What a leaderboard row would cost with a larger network, before one spends the hours.

The capacity rows (``pgd-at-resnet20``, ``pgd-at-preact-resnet18``) train and attack larger
networks than smallcnn. Training and every attack of the suites are forward/backward passes,
so a row's time scales with the cost of one. This times a forward and backward pass of a
minibatch (cross-entropy, 128 Fashion-MNIST-sized inputs) of each leaderboard architecture,
round robin in one run, and scales a recorded smallcnn row's times (training, ``standard``,
``fast``) by each architecture's ratio to smallcnn:

    python benchmarks/model_cost.py --threads 1 \\
        --reference benchmarks/.cache/leaderboard/rows/pgd-at-best-s0-4a0493c6d5.json

The estimate assumes the time is all in the network (batch handling and the attacks' own
arithmetic are small next to it on these models) and that the reference row ran under the
same load; it is a plan, not a measurement of the larger rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import robustlab as rl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import interleaved, machine_record, median, write_results  # noqa: E402

ARCHS = ("smallcnn", "resnet20", "preact-resnet18")  # the leaderboard's networks
SHAPE = (1, 28, 28)  # Fashion-MNIST
BATCH = 128  # the recipes' batch size
STAGES = ("train_s", "standard", "fast")  # the reference row's timed stages


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and backward pass, as a training step or an attack's gradient takes it."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def stage_seconds(record: dict[str, Any]) -> dict[str, float]:
    """The reference row's seconds per stage: training, and each suite's evaluation."""
    return {
        "train_s": float(record["train_s"]),
        "standard": float(record["standard"]["seconds"]),
        "fast": float(record["fast"]["seconds"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--reference", type=Path, required=True, help="a smallcnn row's record (json)")
    p.add_argument("--stem", default="model_cost")
    args = p.parse_args()
    if not args.reference.is_file():
        sys.exit(
            f"--reference {args.reference}: no such file; pass a row record from "
            "benchmarks/.cache/leaderboard/rows/ (run a smallcnn leaderboard row first)"
        )
    reference = json.loads(args.reference.read_text())
    if reference.get("architecture", {}).get("name") != "smallcnn":
        sys.exit(f"--reference {args.reference}: not a smallcnn row; the ratios are to smallcnn")
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    nets = {
        arch: rl.models.create(arch, num_classes=10, in_channels=SHAPE[0], input_size=SHAPE[1])
        for arch in ARCHS
    }
    tasks = {arch: (lambda m=net: step(m, x, y)) for arch, net in nets.items()}
    interleaved(tasks, 1)  # warm-up
    times, _ = interleaved(tasks, args.repeats)
    seconds = {arch: median(ts) for arch, ts in times.items()}
    ratio = {arch: seconds[arch] / seconds["smallcnn"] for arch in ARCHS}
    ref = stage_seconds(reference)
    estimate = {arch: {k: v * ratio[arch] for k, v in ref.items()} for arch in ARCHS}

    machine = machine_record()
    lines = [
        "# Network cost: one forward/backward pass per architecture, and a row's time scaled by it",
        "",
        f"Batch {BATCH} of {SHAPE}, cross-entropy, {args.threads} thread(s), median of "
        f"{args.repeats} round-robin rounds after one warm-up round. Reference row: "
        f"`{reference['row']}` seed {reference['seed']} ({reference.get('where', '?')}), "
        f"`{args.reference}`. The estimate scales each of its stages by the ratio; it is a "
        "plan, not a measurement of the larger rows.",
        "",
        f"Machine: {machine.get('cpu', '?')}, torch {machine.get('torch', '?')}; "
        f"`{machine['command']}`",
        "",
        "| architecture | parameters | s per step | x smallcnn | train (est.) | standard (est.) "
        "| fast (est.) | row (est.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        n_params = sum(t.numel() for t in nets[arch].parameters())
        e = estimate[arch]
        lines.append(
            f"| {arch} | {n_params:,} | {seconds[arch]:.3f} | {ratio[arch]:.1f} | "
            + " | ".join(f"{e[k] / 3600:.1f} h" for k in STAGES)
            + f" | {sum(e.values()) / 3600:.1f} h |"
        )
    record = {
        "machine": machine,
        "threads": args.threads,
        "batch": BATCH,
        "repeats": args.repeats,
        "reference": str(args.reference),
        "reference_seconds": ref,
        "step_seconds": times,
        "ratio_to_smallcnn": ratio,
        "estimate_seconds": estimate,
    }
    md, _ = write_results(args.stem, "\n".join(lines) + "\n", record)
    print(md.read_text())


if __name__ == "__main__":
    main()

"""Trains a tiny model with the trainer, either as one process or as one rank of a ``torchrun``
launch; used by tests/test_distributed.py. Writes the final weights and history to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import robustlab as rl  # noqa: E402
from helpers import make_quadrants, write_gloo_threads  # noqa: E402
from robustlab import distributed  # noqa: E402

CASES = {"natural": {}, "pgd-at": {"steps": 2, "random_start": False}}


def main(out: Path, objective: str) -> None:
    torch.set_num_threads(1)
    world = distributed.init_from_env()[0] if distributed.launched() else distributed.World()
    torch.manual_seed(0)
    model = rl.models.create("lenet", num_classes=4, input_size=16)
    x, y = make_quadrants(203, seed=0)  # the last global batch (11) splits 6 / 5
    history = rl.training.fit(
        model,
        (x, y),
        objective=objective,
        threat=rl.ThreatModel("linf", 0.1),
        objective_options=CASES[objective],
        epochs=2,
        batch_size=64,
        optimizer="sgd",
        lr=0.05,
        schedule="cosine",
        val=(x[:41], y[:41]),
        val_attack={"name": "pgd", "steps": 2},
        out=out / "run",
    )
    if world.main:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(out / "weights.safetensors"),
        )
        (out / "history.json").write_text(json.dumps(history))
    distributed.shutdown(world)
    write_gloo_threads(out, world.rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

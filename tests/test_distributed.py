"""DistributedDataParallel: two gloo processes on the CPU train exactly as one process does on
the same global batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import assert_gloo_ended, launch, launch_env, launcher
from robustlab import distributed
from test_cli import RECIPE  # a one-epoch pgd-at lenet recipe on the fake data

WORKER = Path(__file__).parent / "ddp_worker.py"
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="this PyTorch build has no gloo backend",
)


def _run(out: Path, objective: str, procs: int) -> tuple[dict, list]:
    out.mkdir()
    proc = launch([*launcher(procs), str(WORKER), str(out), objective], launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    if procs > 1:
        assert_gloo_ended(out)
    return load_file(str(out / "weights.safetensors")), json.loads(
        (out / "history.json").read_text()
    )


@pytest.mark.parametrize("objective", ["natural", "pgd-at"])
def test_two_processes_equal_one(tmp_path, objective):
    w1, h1 = _run(tmp_path / "one", objective, 1)
    w2, h2 = _run(tmp_path / "two", objective, 2)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(h1, h2, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        # sharded validation, merged: the same per-sample results as one process
        assert a["val_clean_acc"] == b["val_clean_acc"]
        assert a["val_robust_acc"] == b["val_robust_acc"]
    assert (tmp_path / "two" / "run" / "model.safetensors").exists()


def test_shard_and_world():
    idx = torch.arange(11)
    parts = [distributed.shard(idx, distributed.World(r, 2)) for r in range(2)]
    assert [len(p) for p in parts] == [6, 5] and torch.equal(torch.cat(parts), idx)
    assert distributed.current() == distributed.World(0, 1)
    assert distributed.all_sum([1.0, 2.0], distributed.World(), torch.device("cpu")) == [1.0, 2.0]


def test_torchrun_cli_train_and_sharded_evaluate(tmp_path, fake_fmnist):
    """``torchrun --nproc_per_node=2 -m robustlab train``: one checkpoint and log, by rank 0;
    ``torchrun ... evaluate``: the points split over the ranks, merged per sample into one
    results file equal to a one-process evaluation (FGSM: no randomness)."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(RECIPE)
    env = launch_env(ROBUSTLAB_DATA=str(fake_fmnist), ROBUSTLAB_OFFLINE="1")
    torchrun = [*launcher(2), "-m", "robustlab"]
    proc = launch([*torchrun, "train", "--config", str(cfg), "--out", str(tmp_path / "run")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training lenet") == 1 and "on 2 processes" in proc.stdout
    log = (tmp_path / "run/train_log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["val_n"] == 32
    ckpt = str(tmp_path / "run/model.safetensors")
    args = ["evaluate", ckpt, "--eps", "0.1", "--attack", "fgsm", "--n-points", "51", "--quiet"]
    results = {}
    for name, cmd in (("one", [sys.executable, "-m", "robustlab"]), ("two", torchrun)):
        proc = launch([*cmd, *args, "--out", str(tmp_path / name)], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = (tmp_path / name / "per_sample.jsonl").read_text().splitlines()
        results[name] = (
            json.loads((tmp_path / name / "results.json").read_text()),
            [json.loads(r) for r in rows],
        )
    (one, rows1), (two, rows2) = results["one"], results["two"]
    assert two["shards"] == 2 and two["n"] == one["n"] == 51
    assert [r["index"] for r in rows2] == list(range(51))
    assert [r["robust"] for r in rows2] == [r["robust"] for r in rows1]
    assert two["robust_accuracy"] == one["robust_accuracy"]
    assert two["clean_accuracy"] == pytest.approx(one["clean_accuracy"])
    assert two["per_attack"][0]["broken"] == one["per_attack"][0]["broken"]
    assert two["per_attack"][0]["attacked"] == one["per_attack"][0]["attacked"]
    # the merged examples: the same points as one process, indices over all 51 points
    assert two["examples"] == one["examples"]
    ex1, ex2 = (load_file(str(tmp_path / n / "examples.safetensors")) for n in ("one", "two"))
    assert torch.equal(ex1["x"], ex2["x"]) and torch.equal(ex1["x_adv"], ex2["x_adv"])

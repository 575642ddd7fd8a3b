"""The command line, end to end on a small generated Fashion-MNIST-format data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import robustlab as rl
from robustlab.cli import main
from robustlab.cli_args import build_parser
from robustlab.config import load_recipe

RECIPE = """
[data]
dataset = "fashion-mnist"
val_n = 32
[model]
arch = "lenet"
[threat]
norm = "linf"
eps = "0.1"
[train]
objective = "pgd-at"
epochs = 1
batch_size = 64
optimizer = "adam"
lr = 0.001
[objective]
steps = 2
"""


@pytest.fixture
def env(monkeypatch, fake_fmnist):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attacks: apgd-ce, apgd-dlr, apgd-t" in out and "objectives:" in out
    assert "fashion-mnist" in out
    assert main(["list", "suites"]) == 0
    assert capsys.readouterr().out.startswith("suites ")


def test_train_then_evaluate(tmp_path, env, capsys):
    cfg = tmp_path / "r.toml"
    cfg.write_text(RECIPE)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--quiet"]) == 0
    assert (run / "model.safetensors").exists() and (run / "train_log.jsonl").exists()
    code = main(
        [
            "evaluate",
            str(run / "model.safetensors"),
            "--eps",
            "8/255",
            "--attack",
            "pgd",
            "--steps",
            "3",
            "--n",
            "50",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    (results,) = run.glob("eval-linf-0.0313725-pgd-n50-seed0-*/results.json")  # + --steps' hash
    assert "robust accuracy" in out and str(results) in out
    rec = json.loads(results.read_text())
    assert rec["threat"]["eps"] == pytest.approx(8 / 255) and rec["n"] == 50
    assert rec["attacks"][0]["steps"] == 3 and rec["config"]["dataset"] == "fashion-mnist"
    assert 0 <= rec["robust_accuracy"] <= rec["clean_accuracy"] <= 1
    assert (run / "tensorboard").is_dir()  # the tensorboard package is a dev dependency
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * len(rec["examples"]["indices"]) > 0
    assert "training curves" in page and f"Evaluation: {results.parent.name}/results.json" in page
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "quiet"),
                "--quiet",
                "--no-tensorboard",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_errors_are_clear(tmp_path, env, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(RECIPE.replace("[objective]", "[objectiv]"))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "unknown section [objectiv]" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.safetensors"), "--eps", "0.1"]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "m.safetensors", "--eps", "eight"])
    assert "cannot parse eps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.toml")), ids=lambda p: p.name
)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    needs_threat = rl.training.OBJECTIVES.get(recipe.train.objective).needs_threat
    assert (recipe.threat is not None or not needs_threat) and recipe.train.epochs >= 1
    assert recipe.dataset in rl.data.names() and recipe.model["arch"] in rl.models.names()


REQUIRED = {
    "evaluate": ["--eps", "0.1"],
    "audit": ["--eps", "0.1"],
    "certify": ["--sigma", "0.25"],
    "smooth": ["--sigmas", "0.1", "--samples", "4"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_every_command_shares_the_common_options(command):
    shared = [
        "--dataset",
        "mnist",
        "--split",
        "train",
        "--batch-size",
        "7",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        "o",
        "--quiet",
    ]
    args = build_parser().parse_args([command, "m.safetensors", *REQUIRED[command], *shared])
    assert (
        args.dataset,
        args.split,
        args.batch_size,
        args.seed,
        args.device,
        args.out,
        args.quiet,
    ) == ("mnist", "train", 7, 3, "cpu", Path("o"), True)
    if command != "certify":  # certify's --n counts noise draws; its points are --n-points
        assert (
            build_parser().parse_args([command, "m", *REQUIRED[command], "--n-points", "9"]).n == 9
        )


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_a_device_that_is_not_there_is_a_clear_error(command, capsys):
    base = [command, "missing.safetensors", *REQUIRED[command], "--device"]
    assert main(base + ["cuda:99"]) == 2
    assert "'cuda:99' is not available" in capsys.readouterr().err
    assert main(base + ["tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err

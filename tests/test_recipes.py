"""Training recipes are checked completely before the first epoch (issue 16, item 8): every key's
type with the key's name, the validation attack's name and options, the data, model and threat
sections, and a recipe without a ``[train]`` section (or an empty file) is an error, not ten
epochs of natural training on defaults.

Each case goes through the Python loader and through ``robustlab train --config``; the CLI's
data set is a path that does not exist, so a check that came after the data load (or after an
epoch) would show up as a data error instead of the recipe's."""

from __future__ import annotations

import pytest

import robustlab as rl
from robustlab.cli import main
from robustlab.config import load_recipe
from robustlab.training import TrainConfig

RECIPE = """
[data]
dataset = "fashion-mnist"
val_n = 32
[model]
arch = "smallcnn"
[threat]
norm = "linf"
eps = "0.1"
[train]
objective = "pgd-at"
epochs = 1
batch_size = 64
lr = 0.05
[objective]
steps = 2
[val_attack]
name = "pgd"
steps = 3
"""

# (replace this, with that) -> a phrase the error must hold
BAD = {
    "lr-string": (("lr = 0.05", 'lr = "0.05"'), "lr must be a finite number > 0, got '0.05'"),
    "epochs-float": (("epochs = 1", "epochs = 1.5"), "epochs must be an integer >= 1, got 1.5"),
    "batch-size-bool": (("batch_size = 64", "batch_size = true"), "batch_size must be"),
    "momentum-string": (("lr = 0.05", 'lr = 0.05\nmomentum = "0.9"'), "momentum must be"),
    "weight-decay-negative": (
        ("lr = 0.05", "lr = 0.05\nweight_decay = -1"),
        "weight_decay must be",
    ),
    "nesterov-string": (
        ("lr = 0.05", 'lr = 0.05\nnesterov = "yes"'),
        "nesterov must be true or false, got 'yes'",
    ),
    "seed-string": (("lr = 0.05", 'lr = 0.05\nseed = "0"'), "seed must be an integer"),
    "grad-clip-string": (("lr = 0.05", 'lr = 0.05\ngrad_clip = "1"'), "grad_clip must be"),
    "optimizer-number": (("lr = 0.05", "lr = 0.05\noptimizer = 3"), "unknown optimizer 3"),
    "val-attack-typo": (('name = "pgd"', 'name = "pgdd"'), "val_attack: unknown attack 'pgdd'"),
    "val-attack-option-typo": (
        ('name = "pgd"\nsteps = 3', 'name = "pgd"\nstep = 3'),
        "val_attack: attack 'pgd': unknown option 'step'",
    ),
    "val-attack-option-type": (
        ('name = "pgd"\nsteps = 3', 'name = "pgd"\nsteps = "3"'),
        "val_attack: steps must be an integer",
    ),
    "val-attack-no-name": (('name = "pgd"\n', ""), "[val_attack] needs a name"),
    "schedule-option-typo": (
        ("[objective]", "[schedule]\nmilestone = [0.5]\n[objective]"),
        "unknown schedule option 'milestone'",
    ),
    "schedule-option-type": (
        ("[objective]", '[schedule]\nmilestones = "half"\n[objective]'),
        "[schedule]",
    ),
    "dataset-typo": (
        ('dataset = "fashion-mnist"', 'dataset = "fmnist"'),
        "unknown dataset 'fmnist'",
    ),
    "val-n-string": (("val_n = 32", 'val_n = "32"'), "val_n must be an integer"),
    "arch-typo": (('arch = "smallcnn"', 'arch = "smalcnn"'), "unknown architecture 'smalcnn'"),
    "threat-no-norm": (('norm = "linf"\n', ""), "[threat] needs norm and eps"),
    "val-split-string": (("lr = 0.05", 'lr = 0.05\nval_split = "10%"'), "val_split"),
    "val-split-fraction-one": (
        ("lr = 0.05", "lr = 0.05\nval_split = 1.0"),
        "val_split must be a number in [0, 1)",
    ),
    "val-every-zero": (
        ("lr = 0.05", "lr = 0.05\nval_every = 0"),
        "val_every must be an integer >= 1",
    ),
    "keep-best-without-split": (
        ("lr = 0.05", "lr = 0.05\nkeep_best = true"),
        "keep_best chooses the epoch on training examples",
    ),
    "keep-best-string": (
        ("lr = 0.05", 'lr = 0.05\nval_split = 8\nkeep_best = "yes"'),
        "keep_best must be true or false",
    ),
    "average-typo": (("lr = 0.05", 'lr = 0.05\naverage = "emma"'), "unknown average 'emma'"),
    "ema-decay-one": (("lr = 0.05", "lr = 0.05\nema_decay = 1.0"), "ema_decay must be"),
    "swa-start-past-the-end": (
        ("lr = 0.05", 'lr = 0.05\naverage = "swa"\nswa_start = 1'),
        "SWA would average no epoch",
    ),
    "awp-gamma-negative": (("lr = 0.05", "lr = 0.05\nawp_gamma = -0.01"), "awp_gamma must be"),
    "awp-warmup-past-the-end": (("lr = 0.05", "lr = 0.05\nawp = true"), "AWP would never run"),
    "awp-objective": (
        ('objective = "pgd-at"', 'objective = "natural"\nawp = true\nawp_warmup = 0'),
        "awp wraps the objectives pgd-at, trades, mart",
    ),
    "augment-string": (("lr = 0.05", 'lr = 0.05\naugment = "on"'), "augment must be true or false"),
    "crop-pad-negative": (
        ("lr = 0.05", "lr = 0.05\naugment = true\ncrop_pad = -1"),
        "crop_pad must be an integer >= 0",
    ),
    "flip-without-augment": (("lr = 0.05", "lr = 0.05\nflip = true"), "set augment = true"),
    "label-smoothing-one": (
        ("lr = 0.05", "lr = 0.05\nlabel_smoothing = 1"),
        "label_smoothing must be",
    ),
    "label-smoothing-objective": (
        ('objective = "pgd-at"', 'objective = "mart"\nlabel_smoothing = 0.1'),
        "not 'mart'",
    ),
}


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """A data root without any data: loading a data set fails there."""
    monkeypatch.setenv("ROBUSTLAB_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")


def test_the_base_recipe_is_valid(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, RECIPE))
    assert recipe.train.lr == 0.05 and recipe.train.val_attack == {"name": "pgd", "steps": 3}


@pytest.mark.parametrize("case", sorted(BAD))
def test_recipe_errors_name_the_key_before_training(case, tmp_path, no_data, capsys):
    (old, new), phrase = BAD[case]
    assert old in RECIPE
    path = _recipe(tmp_path, RECIPE.replace(old, new, 1))
    with pytest.raises((ValueError, TypeError)) as err:
        load_recipe(path)
    assert phrase in str(err.value) and str(path) in str(err.value)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr().err
    assert phrase in captured and "Traceback" not in captured
    assert not out.exists()


@pytest.mark.parametrize(
    "text", ["", "# nothing yet\n", '[data]\ndataset = "mnist"\n', "[train]\nepochs = 3\n"]
)
def test_a_recipe_without_train_objective_is_an_error(text, tmp_path, no_data, capsys):
    path = _recipe(tmp_path, text)
    with pytest.raises(ValueError, match=r"\[train\]"):
        load_recipe(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "[train]" in err and "objective" in err and "configs/" in err


def test_train_config_checks_types_in_python():
    with pytest.raises(TypeError, match="lr must be a finite number > 0, got '0.05'"):
        TrainConfig(lr="0.05").validate()
    with pytest.raises(ValueError, match="val_attack: unknown attack 'pgdd'"):
        TrainConfig(val_attack={"name": "pgdd"}).validate()
    threat = rl.ThreatModel("linf", eps=0.1)
    with pytest.raises(TypeError, match="val_attack: steps must be an integer"):
        TrainConfig(val_attack={"name": "pgd", "steps": "3"}).validate(threat)
    with pytest.raises(TypeError, match="val_attack must be a table"):
        TrainConfig(val_attack="pgd").validate()
    with pytest.raises(ValueError, match="channels_last must be true or false"):
        TrainConfig(channels_last=1).validate()


def test_the_trainer_checks_the_val_attack_before_the_first_epoch(toy_data):
    """Before: a misspelt validation attack was found after a whole epoch of training."""
    model = rl.models.create("lenet", num_classes=4, in_channels=1, input_size=16)
    threat = rl.ThreatModel("linf", eps=0.1)
    for spec, phrase in (
        ({"name": "pgdd"}, "val_attack: unknown attack 'pgdd'"),
        ({"name": "pgd", "steps": 0}, "val_attack: steps must be"),
    ):
        cfg = TrainConfig(epochs=1, val_attack=spec)
        with pytest.raises(ValueError, match=phrase):
            rl.training.Trainer(model, toy_data, cfg, threat=threat, val=toy_data)


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    """An installed wheel has no configs/ folder: the recipes ship inside the package, found by
    a bare name or by their checkout path; an unknown name lists the shipped ones."""
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_recipe("trades").train.objective == "trades"
    assert load_recipe("configs/pgd_at.toml").train.objective == "pgd-at"
    with pytest.raises(FileNotFoundError, match="shipped recipe of that name|quickstart, rst"):
        load_recipe("no_such_recipe")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe("elsewhere/trades.toml")  # a path that is not configs/ is taken as given

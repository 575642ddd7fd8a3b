"""TOML training recipes: every section, key and value checked when the recipe is read (before
any data is loaded), unknown ones named with the valid ones."""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from torch import nn

from robustlab import data, models
from robustlab._validate import OptionTypeError, integer, one_of, positive_int
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig
from robustlab.training.objectives import get as get_objective
from robustlab.training.objectives import names as objective_names

#: the recipes shipped with the package (the checkout's configs/ links here)
RECIPES = files("robustlab") / "recipes"

_SECTIONS = {
    # val: the last val_n images of the test split, watched every val_every epochs and never
    # used to choose; keep_best chooses on [train] val_split, a hold-out of the training split
    # unlabeled: the pool of rst, uat, mart-semi and noisy-student (cli_inputs.unlabeled_pool)
    "data": {"dataset", "n_train", "val_n", "unlabeled", "unlabeled_n"},
    "model": None,  # any keyword of models.create, and init (a checkpoint to start from)
    "threat": {"norm", "eps", "bounds"},
    "train": set(TrainConfig.__dataclass_fields__)
    - {"objective_options", "schedule_options", "val_attack", "dataset", "init"},
    "objective": None,  # options of the objective function
    "schedule": None,  # options of the schedule
    "val_attack": None,  # attack name + options for the per-epoch robust validation
}


@dataclass
class Recipe:
    """A parsed recipe: data, model, threat and training settings. ``val_n``: the last test
    images, validated during training and only watched; the trainer's model selection
    (``keep_best``) uses ``train.val_split`` training examples instead. ``unlabeled``: the
    unlabelled pool, a registered data set (its training images; for the training data set
    itself, those after the first ``n_train``) or an array file or folder (labels not read),
    its first ``unlabeled_n`` images (None: all); the CLI passes it to the objective."""

    dataset: str = "fashion-mnist"
    n_train: int | None = None
    val_n: int = 500
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "smallcnn"})
    threat: ThreatModel | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    source: dict[str, Any] = field(default_factory=dict)
    unlabeled: str | None = None
    unlabeled_n: int | None = None

    def create_model(self) -> nn.Module:
        """The recipe's model for its data set (the ``[model]`` options; classes, channels and
        input size from the data set where the recipe does not say). Its initial weights come
        from torch's global generator, which torch seeds at random when a process starts: the
        caller seeds it with ``train.seed`` first (``robustlab train`` does) so that two runs
        of one recipe and seed start from the same weights."""
        info = data.info(self.dataset)
        opts = {k: v for k, v in self.model.items() if k != "arch"}
        opts.setdefault("num_classes", info.num_classes)
        opts.setdefault("in_channels", info.shape[0])
        opts.setdefault("input_size", info.shape[1])
        return models.create(self.model["arch"], **opts)


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped inside the package (``robustlab/recipes/*.toml``; the
    checkout's ``configs/`` is the same folder)."""
    return sorted(
        f.name.removesuffix(".toml") for f in RECIPES.iterdir() if f.name.endswith(".toml")
    )


def _find(path: Path) -> Traversable | Path:
    """``path`` if it is a file; else, for a bare name (``pgd_at``) or a path into the
    checkout's ``configs/`` (``configs/pgd_at.toml``, e.g. from an installed wheel), the shipped
    recipe of that name."""
    if path.is_file():
        return path
    bare = path.parent == Path() or path.parent.name == "configs"
    shipped = RECIPES / f"{path.name.removesuffix('.toml')}.toml"
    if bare and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"recipe {path} not found; give a TOML file, or the name of a shipped recipe: "
        + ", ".join(shipped_recipes())
    )


def _parse(path: Path) -> dict[str, Any]:
    """The TOML document of ``path`` (see :func:`_find`), its sections and keys checked against
    ``_SECTIONS``."""
    try:
        doc = tomllib.loads(_find(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from None
    for section, value in doc.items():
        if section not in _SECTIONS:
            raise ValueError(f"{path}: unknown section [{section}]; valid: {', '.join(_SECTIONS)}")
        keys = _SECTIONS[section]
        if not isinstance(value, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        if keys is not None and (bad := set(value) - keys):
            raise ValueError(
                f"{path}: unknown key(s) {sorted(bad)} in [{section}]; "
                f"valid: {', '.join(sorted(keys))}"
            )
    if "objective" not in doc.get("train", {}):
        what = "has no [train] section" if "train" not in doc else "[train] has no objective"
        raise ValueError(
            f"recipe {path} {what}: a recipe says what to train, at least "
            '[train] objective = "natural" (or "pgd-at", ...: robustlab list '
            "objectives) and epochs = ...; see the recipes in configs/"
        )
    return doc


def _threat(t: dict[str, Any] | None) -> ThreatModel | None:
    if t is None:
        return None
    if "norm" not in t or "eps" not in t:
        raise ValueError(
            f'[threat] needs norm and eps (e.g. norm = "linf", eps = "8/255"), '
            f"got {', '.join(sorted(t)) or 'an empty table'}"
        )
    return ThreatModel(t["norm"], t["eps"], tuple(t.get("bounds", (0.0, 1.0))))


def _recipe(doc: dict[str, Any]) -> Recipe:
    d = doc.get("data", {})
    dataset = d.get("dataset", "fashion-mnist")
    data.info(dataset)  # a ValueError naming the valid data sets
    n_train = d.get("n_train")
    if n_train is not None:
        positive_int(n_train, "n_train")
    val_n = integer(d.get("val_n", 500), "val_n", minimum=0)
    model = dict(doc.get("model", {}))
    model.setdefault("arch", "smallcnn")
    one_of(model["arch"], "architecture", models.names())
    threat = _threat(doc.get("threat"))
    train = dict(doc["train"])
    train["objective_options"] = doc.get("objective", {})
    train["schedule_options"] = doc.get("schedule", {})
    if "val_attack" in doc:
        train["val_attack"] = doc["val_attack"]
    train["dataset"] = dataset
    train["init"] = model.pop("init", None)  # the trainer loads it, models.create never sees it
    cfg = TrainConfig(**train)
    cfg.validate(threat)
    unlabeled, unlabeled_n = _pool(d, cfg.objective)
    return Recipe(
        dataset=dataset,
        n_train=n_train,
        val_n=val_n,
        model=model,
        threat=threat,
        train=cfg,
        source=doc,
        unlabeled=unlabeled,
        unlabeled_n=unlabeled_n,
    )


def _pool(d: dict[str, Any], objective: str) -> tuple[str | None, int | None]:
    """``[data] unlabeled`` and ``unlabeled_n``, for an objective that takes a pool."""
    unlabeled, n = d.get("unlabeled"), d.get("unlabeled_n")
    if n is not None:
        positive_int(n, "unlabeled_n")
        if unlabeled is None:
            raise ValueError(
                "unlabeled_n counts the images of [data] unlabeled: set unlabeled "
                '= "<data set or file>", or drop unlabeled_n'
            )
    if unlabeled is None:
        return None, None
    if not isinstance(unlabeled, str):
        raise OptionTypeError(
            f"unlabeled must be a data set's name or a file or folder, got {unlabeled!r}"
        )
    if "unlabeled" not in inspect.signature(get_objective(objective)).parameters:
        takers = [
            m
            for m in objective_names()
            if "unlabeled" in inspect.signature(get_objective(m)).parameters
        ]
        raise ValueError(
            f"objective {objective!r} takes no unlabelled pool: drop [data] "
            f"unlabeled, or train with one of {', '.join(takers)}"
        )
    return unlabeled, n


def load_recipe(path: str | Path) -> Recipe:
    """Parse a TOML recipe (see ``configs/``) and check all of it before anything runs: its
    sections and keys, every value's type (the error names the key), the data set, the
    architecture, the threat model, the objective, the schedule and the validation attack.
    A recipe needs ``[train]`` with an ``objective``."""
    path = Path(path)
    doc = _parse(path)
    try:
        return _recipe(doc)
    except (TypeError, ValueError) as e:  # name the file; a type error stays a TypeError
        raise (OptionTypeError if isinstance(e, TypeError) else ValueError)(
            f"{path}: {e}"
        ) from None

"""TOML training recipes: every section and key checked, unknown ones named with the valid ones."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig

_SECTIONS = {
    "data": {"dataset", "n_train", "val_n"},  # val: the last val_n images of the test split
    "model": None,  # any keyword of models.create, and init (a checkpoint to start from)
    "threat": {"norm", "eps", "bounds"},
    "train": set(TrainConfig.__dataclass_fields__) - {"objective_options", "schedule_options",
                                                      "val_attack", "dataset", "init"},
    "objective": None,  # options of the objective function
    "schedule": None,  # options of the schedule
    "val_attack": None,  # attack name + options for the per-epoch robust validation
}


@dataclass
class Recipe:
    """A parsed recipe: data, model, threat and training settings."""

    dataset: str = "fashion-mnist"
    n_train: int | None = None
    val_n: int = 500
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "smallcnn"})
    threat: ThreatModel | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    source: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    """Parse a TOML recipe (see ``configs/``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found; the recipes shipped are in configs/")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from None
    for section, value in doc.items():
        if section not in _SECTIONS:
            raise ValueError(f"{path}: unknown section [{section}]; valid: {', '.join(_SECTIONS)}")
        keys = _SECTIONS[section]
        if not isinstance(value, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        if keys is not None and (bad := set(value) - keys):
            raise ValueError(f"{path}: unknown key(s) {sorted(bad)} in [{section}]; "
                             f"valid: {', '.join(sorted(keys))}")
    d, t = doc.get("data", {}), doc.get("threat")
    train = dict(doc.get("train", {}))
    train["objective_options"] = doc.get("objective", {})
    train["schedule_options"] = doc.get("schedule", {})
    if "val_attack" in doc:
        train["val_attack"] = doc["val_attack"]
    train["dataset"] = d.get("dataset", "fashion-mnist")
    model = dict(doc.get("model", {}))
    train["init"] = model.pop("init", None)  # the trainer loads it, models.create never sees it
    cfg = TrainConfig(**train)
    cfg.validate()
    model.setdefault("arch", "smallcnn")
    threat = ThreatModel(t["norm"], t["eps"], tuple(t.get("bounds", (0.0, 1.0)))) if t else None
    return Recipe(dataset=cfg.dataset, n_train=d.get("n_train"), val_n=d.get("val_n", 500),
                  model=model, threat=threat, train=cfg, source=doc)

"""``benchmarks/model_cost.py``: the reference row's stages it scales, and the records it
refuses (a missing file; a row of another network, whose times are not smallcnn's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import model_cost  # noqa: E402


def _record(arch: str) -> dict:
    return {"row": "pgd-at", "seed": 0, "architecture": {"name": arch}, "train_s": 900.0,
            "standard": {"seconds": 2700.0}, "fast": {"seconds": 300.0}}  # fmt: skip


def test_stage_seconds_are_training_and_each_suite() -> None:
    assert model_cost.stage_seconds(_record("smallcnn")) == {
        "train_s": 900.0, "standard": 2700.0, "fast": 300.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "exists", "message"),
    [("smallcnn", False, "no such file"), ("resnet20", True, "not a smallcnn row")],
)
def test_a_reference_it_cannot_scale_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, exists: bool, message: str
) -> None:
    path = tmp_path / "row.json"
    if exists:
        path.write_text(json.dumps(_record(arch)))
    monkeypatch.setattr(sys, "argv", ["model_cost.py", "--reference", str(path)])
    with pytest.raises(SystemExit, match=message):
        model_cost.main()

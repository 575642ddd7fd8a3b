"""``benchmarks/flag_look.py``: which points it looks at, and how it places them among the
robust points."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import flag_look  # noqa: E402


def _point(i: int, broken_by: str | None, min_norm: float | None) -> dict:
    return {"index": i, "robust": broken_by is None and min_norm is not None,
            "broken_by": broken_by, "min_norm": min_norm}  # fmt: skip


def test_reach_takes_the_points_a_gradient_free_attack_broke() -> None:
    per_sample = [
        _point(0, None, 0.12),
        _point(1, None, 0.105),
        _point(2, None, 0.2),
        _point(3, "1:apgd-ce", 0.05),  # a gradient attack's break: not looked at
        _point(4, "4:square", 0.11),
        _point(5, "5:rays", None),  # FAB-T found nothing
        _point(6, None, 0.15),
    ]
    out = flag_look.reach(per_sample, eps=0.1)
    assert [p["index"] for p in out["points"]] == [4, 5]
    first, second = out["points"]
    assert first["over_eps"] == pytest.approx(1.1)
    assert first["robust_as_close"] == 1  # only 0.105 is at most 0.11
    assert second["over_eps"] is None and second["robust_as_close"] == 0
    assert out["robust_n"] == 4
    assert out["robust_min_norm"]["min"] == pytest.approx(0.105)
    assert out["robust_min_norm"]["median"] == pytest.approx(0.135)


def test_find_record_names_what_it_found(tmp_path: Path) -> None:
    rows = tmp_path / "rows"
    rows.mkdir()
    args = argparse.Namespace(record=None, cache=tmp_path, row="free-at", seed=0)
    with pytest.raises(SystemExit, match="0 records of row 'free-at'.*leaderboard.py --rows"):
        flag_look.find_record(args)
    for key in ("aaa", "bbb"):
        (rows / f"free-at-s0-{key}.json").write_text("{}")
    with pytest.raises(SystemExit, match="2 records.*free-at-s0-aaa.json.*--record"):
        flag_look.find_record(args)
    (rows / "free-at-s0-bbb.json").unlink()
    assert flag_look.find_record(args) == rows / "free-at-s0-aaa.json"

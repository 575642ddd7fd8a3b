"""A CUDA out-of-memory error in an attack batch: the cascade attacks the batch in halves and
goes on, with the result of a run without the error, and records the splits. Simulated on the
CPU: the attack raises ``torch.cuda.OutOfMemoryError`` when given more points than fit."""

from __future__ import annotations

import json

import pytest
import torch

import robustlab as rl

THREAT = rl.ThreatModel("linf", eps=0.2)


def _attacks() -> list[rl.attacks.Attack]:
    """Deterministic attacks that treat each point on its own: a split batch gives the same
    points as the whole batch."""
    return [
        rl.attacks.create("pgd", THREAT, steps=3, random_start=False),
        rl.attacks.create("fgsm", THREAT),
    ]


def _limit_memory(
    monkeypatch: pytest.MonkeyPatch, atk: rl.attacks.Attack, fits: int, sizes: list[int]
) -> None:
    """Make ``atk`` run out of 'CUDA memory' on more than ``fits`` points; log every call."""
    perturb = atk.perturb

    def limited(model, x, y, generator):  # noqa: ANN001, ANN202
        sizes.append(len(x))
        if len(x) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return perturb(model, x, y, generator)

    monkeypatch.setattr(atk, "perturb", limited)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_out_of_memory_batch_is_attacked_in_halves_with_the_same_result(
    monkeypatch, tmp_path, toy_model, toy_data, device
):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, (x, y) = toy_model.to(device), (toy_data[0][:12], toy_data[1][:12])
    whole = rl.evaluate(model, x, y, THREAT, attacks=_attacks(), batch_size=8)
    attacks, sizes = _attacks(), []
    _limit_memory(monkeypatch, attacks[0], fits=3, sizes=sizes)
    split = rl.evaluate(model, x, y, THREAT, attacks=attacks, batch_size=8, out=tmp_path)

    assert torch.equal(split.robust, whole.robust)
    assert torch.equal(split.x_adv, whole.x_adv)
    assert split.broken_by == whole.broken_by
    assert split.robust_accuracy == whole.robust_accuracy
    assert 0 < whole.robust_accuracy < whole.clean_accuracy, "some points must be broken"
    attacked = whole.per_attack[0]["attacked"]
    assert attacked > 4, "the test needs a first batch of more than 4 points"
    # 8 points fail, 4 fail, then calls of 2 points for the rest of the attack
    assert sizes[:2] == [min(8, attacked), 4] and set(sizes[2:]) == {2}
    assert sum(sizes[2:]) == attacked
    pgd, fgsm = split.per_attack
    assert pgd["oom_splits"] == 2 and pgd["oom_batch_size"] == 2
    assert "oom_splits" not in fgsm and "oom_splits" not in whole.per_attack[0]
    assert not any("oom" in f["name"] for f in split.flags)  # a record, not a trust flag
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["per_attack"][0]["oom_splits"] == 2


def test_a_single_point_that_does_not_fit_raises_clearly(monkeypatch, toy_model, toy_data):
    model, (x, y) = toy_model, (toy_data[0][:12], toy_data[1][:12])
    attacks, sizes = _attacks(), []
    _limit_memory(monkeypatch, attacks[0], fits=0, sizes=sizes)
    with pytest.raises(
        torch.cuda.OutOfMemoryError,
        match="pgd runs out of CUDA memory on a single point .*evaluate on the CPU",
    ):
        rl.evaluate(model, x, y, THREAT, attacks=attacks, batch_size=8)
    assert sizes[-1] == 1


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch, toy_model, toy_data):
    model, (x, y) = toy_model, (toy_data[0][:12], toy_data[1][:12])
    attacks = _attacks()

    def broken(model, x, y, generator):  # noqa: ANN001, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr(attacks[0], "perturb", broken)
    with pytest.raises(RuntimeError, match="boom"):
        rl.evaluate(model, x, y, THREAT, attacks=attacks, batch_size=8)

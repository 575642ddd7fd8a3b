"""A custom attack with a custom loss, added through the public API only, passes the contract
that every registered attack passes (``test_attacks.test_contract``)."""

from __future__ import annotations

import pytest
import torch

import test_attacks as contract
from robustlab import ThreatModel, attacks

NAME = "test-soft-margin-pgd"  # a name no shipped attack uses


def add_custom_attack() -> type[attacks.Attack]:
    """The whole recipe: a loss, a PGD subclass maximising it, one decorator."""

    def soft_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``logsumexp_{j != y} z_j - z_y`` per sample: positive once y stops winning."""
        others = logits.scatter(1, y[:, None], float("-inf"))
        return others.logsumexp(1) - logits.gather(1, y[:, None]).squeeze(1)

    @attacks.register(NAME)
    class SoftMarginPGD(attacks.PGD):
        """PGD with momentum steps on the soft logit margin."""

        def __init__(
            self,
            threat: ThreatModel,
            *,
            steps: int = 20,
            restarts: int = 1,
            early_stop: bool = False,
            seed: int = 0,
        ) -> None:
            super().__init__(
                threat,
                steps=steps,
                restarts=restarts,
                loss=soft_margin,
                optimizer="momentum",
                early_stop=early_stop,
                seed=seed,
            )

    return SoftMarginPGD


@pytest.fixture
def custom(monkeypatch):
    """The custom attack, registered for one test: the registry gets its entries back after,
    so tests that list every attack are unaffected."""
    monkeypatch.setattr(attacks.ATTACKS, "_items", dict(attacks.ATTACKS._items))
    return add_custom_attack()


def test_registered_under_its_name(custom):
    assert NAME in attacks.names() and custom.name == NAME
    atk = attacks.create(NAME, ThreatModel("linf", 0.1), steps=3)
    assert isinstance(atk, custom)
    assert atk.config()["loss"] == "soft_margin" and atk.config()["optimizer"] == "momentum"
    with pytest.raises(TypeError, match=f"attack '{NAME}'.*unknown option 'stepz'"):
        attacks.create(NAME, ThreatModel("linf", 0.1), stepz=3)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_passes_the_attack_contract(custom, norm, toy_model, toy_data):
    contract.test_contract(NAME, norm, toy_model, toy_data)


def test_mode_restored_on_exception(custom, toy_model, toy_data):
    contract.test_mode_restored_on_exception(NAME, toy_model, toy_data)


def test_unregistered_after_the_test():
    assert NAME not in attacks.names()


def test_a_loss_that_is_not_per_sample_is_a_clear_error(toy_model, toy_data):
    atk = attacks.PGD(ThreatModel("linf", 0.1), loss=lambda logits, y: logits.sum())
    with pytest.raises(ValueError, match=r"one value per sample, shape \(8,\)"):
        atk(toy_model, toy_data[0][:8], toy_data[1][:8])

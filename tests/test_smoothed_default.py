"""The default evaluation of a smoothed classifier: the smoothing-aware cascade, not EOT on
top of the module's own draws (issue 17)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import robustlab as rl
from robustlab.defenses import Smoothing
from robustlab.evaluation.adapt import SMOOTHED_REPEATS, adaptation
from robustlab.evaluation.suites import default_suite, get_suite

THREAT = rl.ThreatModel("linf", 0.15)


class Plateau(nn.Module):
    """Two classes by the mean pixel m: logit gap 10 * max((m - 0.5) / 0.02, -1). Its gradient
    is zero below m = 0.48, so PGD on it from a point at m = 0.42 has nothing to follow; under
    noise (sigma 0.35 on 16 pixels: the mean moves by 0.09) some draws land above 0.48, and
    the soft smoothed classifier's gradient leads across."""

    def forward(self, x: Tensor) -> Tensor:
        g = 10 * ((x.flatten(1).mean(1) - 0.5) / 0.02).clamp_min(-1)
        return torch.stack([-g, g], 1)


def _data(n: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = 0.42 + 0.01 * (torch.rand(n, 1, 4, 4, generator=gen) - 0.5)
    return x, torch.zeros(n, dtype=torch.long)


def _smoothed() -> Smoothing:
    return Smoothing(Plateau(), sigma=0.35, samples=32, generator=torch.Generator().manual_seed(1))


def test_plain_pgd_on_the_base_model_fails_there() -> None:
    x, y = _data()
    res = rl.evaluate(Plateau(), x, y, THREAT, attacks=[("pgd", {"steps": 20})])
    assert res.clean_accuracy == 1.0 and res.robust_accuracy == 1.0


def test_default_on_a_smoothed_model_is_the_smoothing_aware_cascade() -> None:
    x, y = _data()
    res = rl.evaluate(_smoothed(), x, y, THREAT)
    rec = res.record
    assert rec["suite"] == "smoothed"
    names = [a["config"]["name"] for a in rec["per_attack"]]
    assert names == ["transfer", "smoothadv", "epgd", "epgd"]
    assert rec["clean_accuracy"] == 1.0
    assert rec["per_attack"][0]["broken"] == 0  # transfer from the base model: no gradient
    assert res.robust_accuracy == 0.0  # SmoothAdv follows the soft smoothed classifier
    ad = rec["adaptive"]
    assert ad["eot"] == 1 and ad["repeats"] == SMOOTHED_REPEATS
    assert ad["smoothed"] == {"sigma": 0.35, "noise": "gaussian", "n": 32}
    assert all(a["config"].get("eot_samples", 1) == 1 for a in rec["per_attack"])
    assert rec["per_attack"][1]["config"]["samples"] == 8


def test_generic_suites_on_a_smoothed_model_get_no_eot_on_top() -> None:
    x, y = _data(2)
    res = rl.evaluate(_smoothed(), x, y, THREAT, suite="quick")
    assert res.record["adaptive"]["eot"] == 1
    forced = rl.evaluate(_smoothed(), x, y, THREAT, suite="quick", eot=3)
    assert forced.record["adaptive"]["eot"] == 3


def test_default_suite_for_other_models_is_standard() -> None:
    assert default_suite(False) == "standard" and default_suite(True) == "smoothed"
    assert get_suite("smoothed").repeats == SMOOTHED_REPEATS


def test_smoothed_suite_on_a_plain_model_is_a_clear_error() -> None:
    x, y = _data(2)
    with pytest.raises(ValueError, match="smoothed classifiers"):
        rl.evaluate(Plateau(), x, y, THREAT, suite="smoothed")


def test_forcing_log_outputs_on_a_smoothed_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="smoothed classifier"):
        adaptation(_smoothed(), [], log_outputs=True)


def test_a_random_model_that_is_not_smoothed_keeps_eot() -> None:
    flags = [{"name": "randomised-output", "message": ""}]
    ad = adaptation(Plateau(), flags)
    assert ad.eot == 20 and ad.repeats == 10 and ad.smoothed is None


def test_cli_without_suite_runs_the_smoothed_suite_on_a_smoothed_model(
    tmp_path, monkeypatch, fake_fmnist
):
    import json

    from robustlab.cli import main
    from robustlab.cli_args import build_parser
    from robustlab.cli_out import default_folder

    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    model = rl.models.create("lenet", num_classes=10, in_channels=1, input_size=28)
    ckpt = tmp_path / "run" / "model.safetensors"
    ckpt.parent.mkdir()
    rl.models.save(model, ckpt, meta={"dataset": "fashion-mnist"})
    argv = [
        "evaluate",
        str(ckpt),
        "--eps",
        "0.1",
        "--n",
        "3",
        "--defense",
        "smoothing",
        "--defense-option",
        "samples=2",
        "--quiet",
    ]
    folder = default_folder(build_parser().parse_args(argv))
    assert folder.name.startswith("eval-linf-0.1-smoothed-n3")
    assert main(argv) == 0
    rec = json.loads((folder / "results.json").read_text())
    assert rec["suite"] == "smoothed" and rec["adaptive"]["eot"] == 1
    plain = default_folder(build_parser().parse_args(argv[:6]))
    assert "-standard-" in plain.name


def test_the_report_says_how_a_smoothed_model_was_attacked_and_judged() -> None:
    from robustlab.report import markdown

    x, y = _data(2)
    text = markdown(rl.evaluate(_smoothed(), x, y, THREAT).record)
    assert "smoothed classifier (gaussian noise, sigma 0.35, n = 32 per prediction)" in text
    assert "strict majority of 3 predictions" in text
    assert "smoothadv (10 steps, 8 noise draws per step)" in text

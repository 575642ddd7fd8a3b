"""The spread of an evaluation over the model's randomness: each point's probability of being
judged robust from the fractions of its repeated predictions that were correct, the standard
error of the robust accuracy it gives, its flag, its place in the reports, and its resumption."""

from __future__ import annotations

import hashlib
import html
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.stats import binom
from torch import nn

import robustlab as rl
from helpers import FlakyPGD, Interrupt
from linear_oracle import train_linear
from robustlab._modes import Declares
from robustlab.evaluation import record as record_mod
from robustlab.evaluation.cascade import judge
from robustlab.evaluation.results import merged_spread, spread
from robustlab.evaluation.state import FILENAME, majority_chance
from robustlab.report.html import render_html
from robustlab.report.runs import load_run

ATTACKS = [("fgsm", {}), ("pgd", {"steps": 3})]
THREAT = rl.ThreatModel("linf", 0.1)


class ReplayableNoise(Declares, nn.Module):
    """``model(x)`` plus Gaussian noise of scale ``sigma`` on the logits of predictions (outside
    autograd; the attacks' gradients see the model itself), drawn from a generator seeded by
    the batch's content and how often that batch was predicted before: repeated predictions
    differ, and a resumed evaluation draws what an uninterrupted one drew (global draws
    would not, and nor would per-row keys: PGD on a linear model can end where FGSM did)."""

    randomized = True

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma
        self.seen: dict[bytes, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if torch.is_grad_enabled():
            return logits
        key = hashlib.blake2b(
            x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8
        ).digest()
        count = self.seen[key] = self.seen.get(key, -1) + 1
        seed = int.from_bytes(key[:7], "little") + count
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
        return logits + self.sigma * noise.to(logits)


@pytest.fixture(scope="module")
def linear():
    model, x, y = train_linear()
    return model, x[:60], y[:60]


def _noisy(linear) -> ReplayableNoise:
    return ReplayableNoise(linear[0], sigma=3.0)


def test_majority_chance_is_the_binomial_tail():
    q = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.6, 1.0], dtype=torch.float64)
    for repeats in (1, 2, 4, 5, 10):
        want = binom.sf(repeats // 2, repeats, q.numpy())  # P(more than half correct)
        assert torch.allclose(majority_chance(q, repeats), torch.from_numpy(want), atol=1e-12)
    assert majority_chance(q, 1).tolist() == q.tolist()  # one prediction: its own outcome


def test_spread_formula_on_given_probabilities():
    p = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.9, 0.2])
    expected, se = spread(p)
    assert expected == pytest.approx(3.6 / 6)
    assert se == pytest.approx(math.sqrt(0.25 + 0.09 + 0.16) / 6)
    assert spread(torch.tensor([1.0, 0.0, 1.0])) == (pytest.approx(2 / 3), 0.0)
    merged = merged_spread(
        [
            {
                "n": 6,
                "robust_accuracy": 0.5,
                "robust_accuracy_expected": expected,
                "robust_accuracy_se": se,
                "clean_accuracy_se": 0.0,
            },
            {
                "n": 3,
                "robust_accuracy": 2 / 3,
                "robust_accuracy_expected": 2 / 3,
                "robust_accuracy_se": 0.0,
                "clean_accuracy_se": 0.1,
            },
        ]
    )
    both = spread(torch.cat([p, torch.tensor([1.0, 0.0, 1.0])]))
    assert merged["robust_accuracy_expected"] == pytest.approx(both[0])
    assert merged["robust_accuracy_se"] == pytest.approx(both[1])
    assert merged["clean_accuracy_se"] == pytest.approx(0.1 * 3 / 9)


def test_judge_counts_the_fraction_of_correct_predictions(linear):
    model, x, y = linear
    got = judge(_noisy(linear), x, y, 25, torch.device("cpu"), 5)
    assert got.fraction.dtype == torch.float64
    assert torch.equal(got.fraction * 5, (got.fraction * 5).round())  # k of 5 predictions
    assert torch.equal(got.ok, got.fraction > 0.5)
    assert ((got.fraction > 0) & (got.fraction < 1)).any()  # the noise flips some points
    exact = judge(model, x, y, 25, torch.device("cpu"), 5)
    assert set(exact.fraction.tolist()) <= {0.0, 1.0}


def test_randomised_model_reports_its_spread_and_a_deterministic_one_none(linear, tmp_path):
    _, x, y = linear
    res = rl.evaluate(
        _noisy(linear), x, y, THREAT, attacks=ATTACKS, repeats=5, batch_size=25, out=tmp_path
    )
    rec = res.record
    assert rec["repeats"] == 5 and rec["adaptive"]["randomised"]
    assert rec["robust_accuracy_se"] > 0 and res.robust_accuracy_se == rec["robust_accuracy_se"]
    assert rec["clean_accuracy_se"] > 0 and res.clean_accuracy_se == rec["clean_accuracy_se"]
    # the attacks' checks count: the robust expectation falls below the clean one
    assert rec["robust_accuracy_expected"] < rec["clean_accuracy"] - 0.1
    # the majority-vote accuracy lies within a few standard errors of its expectation
    assert abs(rec["robust_accuracy"] - rec["robust_accuracy_expected"]) <= 4 * rec[
        "robust_accuracy_se"
    ] + 1 / len(x)
    flag = {f["name"]: f for f in res.flags}.get("unstable-estimate")
    assert rec["robust_accuracy_se"] > 0.01 and flag is not None
    assert f"{100 * rec['robust_accuracy_se']:.2f} points" in flag["message"]
    assert "repeats" in flag["message"]

    det = rl.evaluate(linear[0], x, y, THREAT, attacks=ATTACKS, repeats=5, batch_size=25)
    assert det.record["robust_accuracy_se"] == 0 and det.record["clean_accuracy_se"] == 0
    assert det.record["robust_accuracy_expected"] == det.robust_accuracy
    assert "unstable-estimate" not in {f["name"] for f in det.flags}


def test_reports_show_the_spread_of_a_randomised_model_only(linear, tmp_path):
    _, x, y = linear
    noisy, plain = tmp_path / "noisy", tmp_path / "plain"
    res = rl.evaluate(
        _noisy(linear), x, y, THREAT, attacks=ATTACKS, repeats=5, batch_size=60, out=noisy
    )
    rl.evaluate(linear[0], x, y, THREAT, attacks=ATTACKS, batch_size=60, out=plain)
    line = (
        f"robust accuracy {100 * res.robust_accuracy:.2f}% ± "
        f"{100 * res.robust_accuracy_se:.2f}% (standard error over the model's randomness, "
        "5 predictions per point)"
    )
    assert line in (noisy / "summary.md").read_text()
    assert "±" not in (plain / "summary.md").read_text()
    page = render_html([load_run(noisy), load_run(plain)])
    assert page.count("±") == 1 and line in html.unescape(page)


def test_interrupted_randomised_evaluation_resumes_to_the_same_spread(
    linear, tmp_path, monkeypatch
):
    monkeypatch.setattr(record_mod, "_SAVE_EVERY_S", 0.0)  # save after every batch
    _, x, y = linear
    opts = {"steps": 3, "early_stop": True}  # as the evaluation builds PGD from its name
    kw = {"repeats": 5, "batch_size": 20, "eot": 1}  # eot 1: FlakyPGD's own, same settings
    want = rl.evaluate(_noisy(linear), x, y, THREAT, attacks=[("fgsm", {}), ("pgd", opts)], **kw)
    with pytest.raises(Interrupt):
        rl.evaluate(
            _noisy(linear),
            x,
            y,
            THREAT,
            attacks=[("fgsm", {}), FlakyPGD(THREAT, 2, **opts)],
            out=tmp_path,
            **kw,
        )
    got = rl.evaluate(
        _noisy(linear), x, y, THREAT, attacks=[("fgsm", {}), ("pgd", opts)], out=tmp_path, **kw
    )
    assert want.record["robust_accuracy_se"] > 0
    assert torch.equal(got.robust, want.robust)
    for key in ("robust_accuracy_se", "robust_accuracy_expected", "clean_accuracy_se"):
        assert got.record[key] == want.record[key], key


def test_a_state_without_the_probabilities_is_refused_with_the_fix(linear, tmp_path, monkeypatch):
    monkeypatch.setattr(record_mod, "_SAVE_EVERY_S", 0.0)
    _, x, y = linear
    attacks = [("fgsm", {}), FlakyPGD(THREAT, 2, steps=3, early_stop=True)]
    with pytest.raises(Interrupt):
        rl.evaluate(linear[0], x, y, THREAT, attacks=attacks, batch_size=20, out=tmp_path)
    path = tmp_path / FILENAME
    with safe_open(str(path), framework="pt") as f:  # as an older robustlab wrote it
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("p_")}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="older robustlab.*resume=False"):
        rl.evaluate(
            linear[0],
            x,
            y,
            THREAT,
            attacks=[("fgsm", {}), ("pgd", {"steps": 3})],
            batch_size=20,
            out=tmp_path,
        )
    assert json.loads(meta["robustlab_eval_state"])["attack"] == 1

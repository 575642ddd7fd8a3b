"""Evaluation that knows about detectors: the joint classifier-and-detector loss, the detector
suite's adaptive stage against a toy detector the naive attack cannot evade, the detection
figures (AUROC, TPR at the threshold, clean FPR) and the flag on a detector that rejects
everything."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.attacks.losses import get_loss
from robustlab.defenses.detector import Detector
from robustlab.evaluation.checks import rejects_clean
from robustlab.evaluation.detection import auroc, joint_stage
from robustlab.evaluation.suites import default_suite
from robustlab.evaluation.verdicts import adaptive_detector
from robustlab.report.html import render_html
from robustlab.report.runs import load_run

H = 16  # inputs (N, 1, 1, 2H): the detector reads the first half, the classifier the second
EPS = 0.2
LINF = rl.ThreatModel("linf", EPS)


class Halves(nn.Module):
    """Two classes: class 1 iff the mean of the second half exceeds 0.5 + 0.9 eps."""

    def forward(self, x):
        z1 = 10 * (x.flatten(1)[:, H:].mean(1) - 0.5 - 0.9 * EPS)
        return torch.stack([-z1, z1], 1)


class FirstHalf(Detector):
    """Rejects inputs whose first half has a mean above 0.5 + threshold: a linear score that
    the naive attack raises at every step, while the joint attack can lower it."""

    def score_from(self, x, logits):
        return x.flatten(1)[:, :H].mean(1) - 0.5


def _data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.01 * (2 * torch.rand(n, 1, 1, 2 * H, generator=g) - 1)
    return x, torch.zeros(n, dtype=torch.long)


def test_detector_margin_on_given_logits():
    loss = get_loss("detector-margin")
    # classes 0..2, rejection column 3
    z = torch.tensor(
        [
            [5.0, 1.0, 2.0, 0.0],  # correct, not rejected: 2 - 5
            [1.0, 4.0, 2.0, 3.0],  # wrong class wins: 4 - max(1, 3)
            [1.0, 2.0, 0.0, 6.0],  # rejected: 2 - 6
            [1.0, 2.0, 0.0, 1.5],
        ]
    )  # label 1 wins: 1 - max(2, 1.5)
    y = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(loss(z, y), torch.tensor([-3.0, 1.0, -4.0, -1.0]))
    assert (loss(z, y) > 0).tolist() == [False, True, False, False]  # success iff > 0
    # targeted: the target must beat every other output, the rejection included
    assert torch.allclose(
        loss(z, torch.tensor([2, 1, 1, 0]), True), torch.tensor([-3.0, 1.0, -4.0, -1.0])
    )


def test_detector_margin_refuses_outputs_without_a_rejection_column():
    loss = get_loss("detector-margin")
    with pytest.raises(ValueError, match="does not reject"):
        loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))  # label 2 is "the last column"
    with pytest.raises(ValueError, match="at least 3"):
        loss(torch.randn(4, 2), torch.tensor([0, 0, 0, 0]))
    x, y = _data(4)
    with pytest.raises(ValueError, match="does not declare rejects"):
        rl.evaluate(Halves(), x, y, LINF, attacks=[("pgd", {"loss": "detector-margin"})])


def test_auroc_exact_with_ties_counted_half():
    neg = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pos = torch.tensor([0.35, 0.4, 0.5])
    # pairs won: 0.35 beats 3; 0.4 beats 3 and ties 1; 0.5 beats 4 -> (3 + 3.5 + 4) / 12
    assert auroc(neg, pos) == pytest.approx(10.5 / 12, abs=0)
    assert auroc(neg, neg + 10) == 1.0 and auroc(neg + 10, neg) == 0.0
    assert auroc(torch.ones(3), torch.ones(5)) == 0.5
    with pytest.raises(ValueError, match="both kinds"):
        auroc(neg, torch.tensor([]))


def _ties_data():
    g = torch.Generator().manual_seed(1)
    neg = torch.randint(0, 20, (200,), generator=g).float()  # many ties
    return neg, torch.randint(5, 25, (150,), generator=g).float()


def test_auroc_agrees_with_every_pair_and_scipy():
    neg, pos = _ties_data()
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auroc(neg, pos) == pytest.approx(float(pairs.mean()), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    u = stats.mannwhitneyu(pos.numpy(), neg.numpy()).statistic  # pos > neg, ties half
    assert auroc(neg, pos) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_auroc_agrees_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    neg, pos = _ties_data()
    labels = [0] * len(neg) + [1] * len(pos)
    want = metrics.roc_auc_score(labels, torch.cat([neg, pos]).numpy())
    assert auroc(neg, pos) == pytest.approx(want, abs=1e-12)


def test_default_for_a_detector_is_the_detector_suite():
    assert default_suite(False, rejects=True) == "detector"
    assert default_suite(True, rejects=True) == "smoothed"
    assert default_suite(False) == "standard"
    x, y = _data(4)
    with pytest.raises(ValueError, match="for detectors"):
        rl.evaluate(Halves(), x, y, LINF, suite="detector")


def test_adaptive_stage_breaks_a_detector_the_naive_attack_cannot_evade(tmp_path):
    x, y = _data()
    det = FirstHalf(Halves(), threshold=0.1 * EPS)
    assert not det.detect(x).any()  # no clean point rejected, all classified correctly
    naive = rl.evaluate(det, x, y, LINF, attacks=["pgd"])
    assert naive.clean_accuracy == 1.0 and naive.robust_accuracy == 1.0  # every output rejected
    res = rl.evaluate(det, x, y, LINF, out=tmp_path)
    assert res.record["suite"] == "detector" and res.robust_accuracy == 0.0
    names = [(a["config"]["name"], a["config"]["loss"]) for a in res.per_attack]
    assert names[:3] == [
        ("apgd-ce", "ce"),
        ("apgd-ce", "detector-margin"),
        ("pgd", "detector-margin"),
    ]
    assert res.per_attack[0]["broken"] == 0  # the naive APGD-CE is caught too
    assert res.per_attack[3]["config"]["attack"]["kappa"] > 0  # high-confidence C&W ran
    det_rec = res.record["detection"]
    assert det_rec["score"] == "score" and det_rec["clean_fpr"] == 0.0
    assert det_rec["threshold"] == pytest.approx(0.1 * EPS) and det_rec["left_out"] == []
    first, joint = det_rec["stages"][0], det_rec["stages"][1:3]
    assert not first["joint"] and all(s["joint"] for s in joint)
    # the naive attack's outputs all score above every clean point and are all rejected
    assert first["points"] == 8 and first["auroc"] == 1.0 and first["tpr"] == 1.0
    # the joint attacks see every point the naive one left, and evade the detector on all
    # (APGD on the joint margin, which counts a rejected iterate as no success, gets them all)
    assert joint[0]["points"] == 8 and joint[0]["tpr"] == 0.0 and joint[1]["points"] == 0
    assert sum(a["broken"] for a in res.per_attack[1:3]) == 8
    assert [f["name"] for f in res.flags] == []
    # the figures reach the record on disk and the summary
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["detection"]["stages"][0]["auroc"] == 1.0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Detection" in summary and "clean false-positive rate: 0.00%" in summary
    assert "| 1:apgd-ce | no | 8 | 1.000 | 100.00% |" in summary
    page = render_html([load_run(tmp_path)])
    assert "<h4>Detection</h4>" in page and "clean false-positive rate: 0.00%" in page


def test_a_detector_that_rejects_everything_is_flagged():
    x, y = _data()
    det = FirstHalf(Halves(), threshold=-1.0)  # every score is above it
    res = rl.evaluate(det, x, y, LINF, attacks=[("pgd", {"steps": 2})])
    assert res.clean_accuracy == 0.0 and res.record["detection"]["clean_fpr"] == 1.0
    flag = next(f for f in res.flags if f["name"] == "rejects-clean")
    assert flag["clean_rejection_rate"] == 1.0 and "all of the 8 clean" in flag["message"]
    stage = res.record["detection"]["stages"][0]
    assert stage["points"] == 0 and stage["auroc"] is None and "no point" in stage["note"]
    kept = FirstHalf(Halves(), threshold=0.1 * EPS)  # none rejected: no flag
    res = rl.evaluate(kept, x, y, LINF, attacks=[("pgd", {"steps": 2})])
    assert "rejects-clean" not in {f["name"] for f in res.flags}


def test_rejects_clean_threshold():
    assert rejects_clean(None, 10) is None and rejects_clean(0.49, 100) is None
    flag = rejects_clean(0.5, 10)
    assert flag is not None and "50.0% of the 10" in flag["message"]


def test_a_model_that_does_not_reject_records_no_detection():
    x, y = _data()
    res = rl.evaluate(Halves(), x, y, LINF, attacks=[("pgd", {"steps": 2})])
    assert "detection" not in res.record


def test_joint_stage_recognises_the_adaptive_attacks():
    assert joint_stage({"name": "pgd", "loss": "detector-margin"})
    assert not joint_stage({"name": "apgd-ce", "loss": "ce"})
    assert joint_stage({"name": "transfer", "attack": {"name": "cw-linf", "kappa": 50.0}})
    assert not joint_stage({"name": "transfer", "attack": {"name": "pgd", "loss": "ce"}})


def test_adaptive_detector_verdict():
    def stage(loss, broken):
        return {"config": {"name": "pgd", "loss": loss}, "broken": broken, "robust_accuracy": 0.0}

    assert adaptive_detector([stage("ce", 0)], 100, False)["status"] == "SKIP"
    ok = adaptive_detector([stage("ce", 10), stage("detector-margin", 2)], 100, True)
    bad = adaptive_detector([stage("ce", 10), stage("detector-margin", 6)], 100, True)
    assert ok["status"] == "PASS" and bad["status"] == "FLAG"
    assert "6.0 points" in bad["evidence"]


def test_audit_flags_the_gap_between_the_naive_and_the_joint_attack():
    x, y = _data()
    fast = {"steps": 20, "queries": 100, "binarization_points": 0, "check_points": 8}
    res = rl.audit(FirstHalf(Halves(), threshold=0.1 * EPS), x, y, LINF, **fast)
    check = next(c for c in res.checks if c["name"] == "adaptive-detector-attack")
    assert check["status"] == "FLAG" and check["naive"] == 1.0 and check["broken"] == 8
    stages = [a["config"] for a in res.record["per_attack"]]
    assert stages[0]["name"] == "pgd" and joint_stage(stages[1]) and joint_stage(stages[2])
    assert "audit:adaptive-detector-attack" in {f["name"] for f in res.flags}
    assert "stages" in res.record["detection"]
    # a model that does not reject: not among the checks, recorded apart with the reason
    plain = rl.audit(Halves(), x, y, LINF, **fast)
    assert "adaptive-detector-attack" not in {c["name"] for c in plain.checks}
    (skip,) = plain.record["audit"]["not_applicable"]
    assert skip["status"] == "SKIP" and "not a detector" in skip["evidence"]
    assert "| adaptive-detector-attack | not applicable |" in rl.report.markdown(plain.record)


def test_a_resumed_evaluation_says_which_outputs_its_figures_cover(tmp_path, monkeypatch):
    from helpers import FlakyPGD, Interrupt
    from robustlab.evaluation import record as record_mod

    monkeypatch.setattr(record_mod, "_SAVE_EVERY_S", 0.0)  # save after every batch
    x, y = _data()
    det = FirstHalf(Halves(), threshold=0.1 * EPS)
    opts = {"steps": 5, "early_stop": True}
    with pytest.raises(Interrupt):  # FGSM done, 2 of the 4 batches of PGD done
        rl.evaluate(
            det,
            x,
            y,
            LINF,
            attacks=[("fgsm", {}), FlakyPGD(LINF, 3, **opts)],
            batch_size=2,
            out=tmp_path,
        )
    res = rl.evaluate(
        det, x, y, LINF, attacks=[("fgsm", {}), ("pgd", opts)], batch_size=2, out=tmp_path
    )
    fgsm, pgd = res.record["detection"]["stages"]
    assert fgsm["points"] == 0 and fgsm["auroc"] is None and "before" in fgsm["note"]
    assert res.per_attack[1]["attacked"] == 8 and pgd["points"] == 4
    assert "4 of its 8" in pgd["note"] and pgd["tpr"] == 1.0


class _Loose(nn.Module):
    """A user's detector: K + 1 outputs declared by an attribute, no score, no ``base``."""

    robustlab_reject = True

    def __init__(self, det):
        super().__init__()
        self.det = det

    def forward(self, x):
        return self.det(x)


def test_a_detector_without_score_or_classifier_uses_the_margin_and_says_what_it_left_out():
    x, y = _data()
    det = FirstHalf(Halves(), threshold=0.1 * EPS)
    res = rl.evaluate(_Loose(det), x, y, LINF)
    assert res.record["suite"] == "detector" and res.robust_accuracy == 0.0
    assert [a["config"]["name"] for a in res.per_attack] == ["apgd-ce", "apgd-ce", "pgd"]
    rec = res.record["detection"]
    assert rec["score"] == "rejection-margin" and rec["threshold"] is None
    assert len(rec["left_out"]) == 1 and "surrogate=" in rec["left_out"][0]
    assert rec["stages"][0]["auroc"] == 1.0  # the margin orders the points as the score does

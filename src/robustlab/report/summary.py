"""Markdown summary rendered from a results document (never recomputed here)."""

from __future__ import annotations

from typing import Any


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def attack_label(cfg: dict[str, Any]) -> str:
    name = cfg.get("name", "?")
    if name == "transfer" and isinstance(cfg.get("attack"), dict):  # what was crafted, where
        return f"transfer of {attack_label(cfg['attack'])} from the surrogate"
    parts = []
    if "steps" in cfg:
        parts.append(f"{cfg['steps']} steps")
    if cfg.get("restarts", 1) > 1:
        parts.append(f"{cfg['restarts']} restarts")
    if cfg.get("loss") and cfg["loss"] != "ce":
        parts.append(cfg["loss"])
    if cfg.get("kappa"):
        parts.append(f"kappa {cfg['kappa']:g}")
    for key, unit in (
        ("n_target_classes", "targets"),
        ("k", "targets"),
        ("n_queries", "queries"),
        ("samples", "noise draws per step"),
        ("eot_samples", "EOT samples"),
    ):
        if key in cfg:
            parts.append(f"{cfg[key]} {unit}")
    return f"{name} ({', '.join(parts)})" if parts else name


def _audit_table(aud: dict[str, Any]) -> list[str]:
    """The audit's verdicts, one line per check."""
    lines = ["| check | verdict | evidence |", "|---|---|---|"]
    for c in aud["checks"]:
        verdict = f"**{c['status']}**" if c["status"] == "FLAG" else c["status"]
        lines.append(f"| {c['name']} | {verdict} | {c['evidence'].replace('|', '/')} |")
    fgsm = aud["fgsm_robust_accuracy"]
    lines += [
        f"| {c['name']} | not applicable | {c['evidence'].replace('|', '/')} |"
        for c in aud.get("not_applicable", [])
    ]
    lines += [
        "",
        f"- plain PGD-20 robust accuracy: {_pct(aud['naive_robust_accuracy'])} · "
        f"FGSM: {'-' if fgsm is None else _pct(fgsm)}",
        f"- adaptive attacks: {adaptive_text(aud['adaptive'])}",
        "",
    ]
    return lines


def smoothed_text(ad: dict[str, Any]) -> str | None:
    """How a smoothed classifier was judged (the ``adaptive`` record's ``smoothed``), in words;
    None for other models."""
    sm = ad.get("smoothed")
    if not sm:
        return None
    n = f"n = {sm['n']}" if sm.get("n") else "its own draws"
    return (
        f"smoothed classifier ({sm['noise']} noise, sigma {sm['sigma']:g}, {n} per "
        f"prediction): its attacks draw their own noise per step (EOT {ad['eot']} on top), "
        f"and each point is judged by a strict majority of {ad['repeats']} predictions at "
        f"{n}"
    )


def randomness_notes(rec: dict[str, Any]) -> list[str]:
    """What a reader of a randomised model's result must know, in words: the spread of the
    robust accuracy (:func:`spread_text`) and how a smoothed classifier was judged
    (:func:`smoothed_text`); empty for a deterministic model."""
    notes = [spread_text(rec), smoothed_text(rec.get("adaptive") or {})]
    return [n for n in notes if n is not None]


def adaptive_text(ad: dict[str, Any]) -> str:
    """What the adaptive attacks did (the ``adaptive`` record), in words."""
    if (text := smoothed_text(ad)) is not None:
        return text
    bpda = f"on ({', '.join(ad['bpda_stages'])})" if ad["bpda"] else "off"
    text = f"BPDA {bpda}, EOT {ad['eot']} draws, {ad['repeats']} prediction(s) per point"
    outputs = [
        what
        for what, on in (
            ("the log of the outputs", ad.get("log_outputs")),
            (f"a temperature of {ad.get('temperature', 1.0):g}", ad.get("temperature", 1.0) != 1.0),
        )
        if on
    ]
    return text + ("; attacks on " + " and ".join(outputs) if outputs else "")


def spread_text(rec: dict[str, Any]) -> str | None:
    """The robust accuracy with its standard error over the model's randomness, in words,
    for a randomised model (``repeats`` > 1 predictions per point and the spread recorded);
    None for a deterministic one."""
    repeats = rec.get("repeats", 1)
    if repeats <= 1 or "robust_accuracy_se" not in rec:
        return None
    return (
        f"robust accuracy {_pct(rec['robust_accuracy'])} ± "
        f"{_pct(rec['robust_accuracy_se'])} (standard error over the model's randomness, "
        f"{repeats} predictions per point)"
    )


DETECTION_HEAD = (
    "stage",
    "attacks the detector",
    "points",
    "AUROC",
    "TPR at threshold",
    "fooled the classifier",
    "of those rejected",
    "note",
)


def detection_notes(det: dict[str, Any]) -> list[str]:
    """What the detection figures (a record's ``detection`` section) rest on, in words (or
    why there are none)."""
    if "skipped" in det:
        return [det["skipped"]]
    if det["score"] == "score":
        score = "the detector's own score"
        if det.get("threshold") is not None:
            score += f", rejected above the threshold {det['threshold']:.4g}"
        if det.get("fit_samples"):
            score += (
                f" (fitted for a false-positive rate of {_pct(det['fitted_fpr'])} on "
                f"{det['fit_samples']} held-out clean training points)"
            )
        elif det.get("threshold") is not None:
            score += " (given, not fitted)"
    else:
        score = "the rejection margin z_K - max_k z_k of the outputs (rejected above 0)"
    fpr = "-" if det.get("clean_fpr") is None else _pct(det["clean_fpr"])
    return [
        f"score: {score}",
        f"clean false-positive rate: {fpr} of the {det['clean_points']} clean test points rejected",
        f"AUROC and TPR over {det['over']}",
        *(f"left out: {why}" for why in det.get("left_out", [])),
    ]


def detection_rows(det: dict[str, Any]) -> list[list[str]]:
    """One row per stage of the detection figures, as :data:`DETECTION_HEAD`."""

    def pct(v: float | None) -> str:
        return "-" if v is None else _pct(v)

    return [
        [
            s["stage"],
            "yes" if s.get("joint") else "no",
            str(s["points"]),
            "-" if s["auroc"] is None else f"{s['auroc']:.3f}",
            pct(s["tpr"]),
            str(s["fooled"]),
            pct(s["tpr_fooled"]),
            s.get("note", ""),
        ]
        for s in det.get("stages", [])
    ]


def _detection(det: dict[str, Any]) -> list[str]:
    lines = [
        "## Detection",
        "",
        *(f"- {n}" for n in detection_notes(det)),
        "",
        "| " + " | ".join(DETECTION_HEAD) + " |",
        "|" + "---|" * len(DETECTION_HEAD),
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in detection_rows(det)
    ]
    return [*lines, ""]


def verified_text(rec: dict[str, Any]) -> str:
    """The verified accuracy of a result that has one (``robustlab certify --method``), in
    words: a lower bound of the robust accuracy, which is an upper bound."""
    ver = rec["verification"]
    return (
        f"- verified accuracy ({ver['method']}, bound propagation; a guarantee, <= the "
        f"robust accuracy above): **{_pct(rec['verified_accuracy'])}**"
    )


def markdown(rec: dict[str, Any]) -> str:
    """A short Markdown report: flags first, then accuracies and the attack cascade."""
    t = rec["threat"]
    lines = ["# robustlab audit" if "audit" in rec else "# robustlab evaluation", ""]
    if "audit" in rec:
        lines += _audit_table(rec["audit"])
    if rec["flags"]:
        lines += ["**FLAGGED: do not trust this robust accuracy as it stands.**", ""]
        lines += [f"- **{f['name']}**: {f['message']}" for f in rec["flags"]]
        lines.append("")
    lines += [
        f"- threat model: {t['norm']} eps = {t['eps']:g}, bounds {t['bounds']}",
        f"- points: {rec['n']} · suite: {rec['suite']} · seed: {rec['seed']} · "
        f"commit: {rec.get('commit') or 'unknown'}",
        f"- clean accuracy: **{_pct(rec['clean_accuracy'])}**",
        *(
            [
                f"- each point predicted {rec['repeats']} times (randomised model): correct means "
                "correct in a strict majority"
            ]
            if rec.get("repeats", 1) > 1
            else []
        ),
        f"- robust accuracy (per-sample worst case over all attacks): "
        f"**{_pct(rec['robust_accuracy'])}**",
        *[f"- {text}" for text in randomness_notes(rec)],
        *([verified_text(rec)] if "verified_accuracy" in rec else []),
        "",
        "| # | attack | step size | points attacked | broken | robust accuracy after | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(rec["per_attack"], 1):
        if a.get("skipped"):
            lines.append(f"| {i} | {attack_label(a['config'])} | - | {a['skipped']} | - | - | - |")
            continue
        step = a["config"].get("step_size")
        lines.append(
            f"| {i} | {attack_label(a['config'])} | {f'{step:.4g}' if step else '-'} | "
            f"{a['attacked']} | {a['broken']} | {_pct(a['robust_accuracy'])} | {a['time_s']:.1f} |"
        )
    lines.append("")
    if rec.get("detection"):
        lines += _detection(rec["detection"])
    return "\n".join(lines)

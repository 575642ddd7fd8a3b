"""The detectors table (issue 19): each detector of ``robustlab.defenses`` that declares
``rejects``, wrapped around a Fashion-MNIST smallcnn, under the naive and the adaptive attack.

Per (model, detector), one row, cached in ``benchmarks/.cache/detectors/`` as it finishes (a
killed run resumes where it stopped; ``--fresh`` starts over), one record
(``benchmarks/results/<stem>.md/.json``). Threat: linf, eps 0.1. The detector is fitted
(threshold at its default fpr, 0.05) on the first ``--fit-n`` clean *training* points (never
test points); the evaluation is on ``--images`` test points (every ``10000 / images``-th).

- clean: accuracy with rejection (a rejected clean point is an error) and the clean FPR (the
  fraction of the clean test points rejected);
- naive: PGD-20 on the detector's outputs (``rl.evaluate(det, x, y, threat,
  attacks=[("pgd", {"steps": 20})])``): detection-aware robust accuracy (a rejected
  adversarial input counts as defended), AUROC and TPR of its outputs (``record["detection"]``,
  see ``robustlab/evaluation/detection.py``);
- adaptive: the ``detector`` suite (``rl.evaluate``'s default on a detector), its robust
  accuracy and per-stage detection figures. With ``--steps k`` its stages are rebuilt with k
  steps each (APGD-CE, APGD and PGD on the joint margin, C&W from the classifier) instead of
  100, passed as ``attacks=[...]``; the record says which;
- undefended: the classifier alone under the ``fast`` suite (one row per model).

Two detectors are trained into their own model, so they get rows of their own model only:
``extra-class`` (Grosse et al.: smallcnn with 11 outputs, the ``extra-class`` objective, FGSM
points labelled 10) and ``trapdoor`` (Shan et al.: smallcnn trained with the ``trapdoor``
objective's injected triggers, with its recipe's Adam settings), each trained with the
benchmark's budget (``--epochs`` on the first ``--train-n`` points; extra-class with the other
settings of the pgd-at and natural models). The other
detectors are wrapped around the ``pgd-at`` and ``natural`` models. "undefended" is the
classifier alone (the extra-class model's first 10 logits).

``kd-bu`` is randomised (Monte-Carlo dropout of smallcnn's classifier): each score already
averages ``samples`` = 50 dropout masks, so its attacks take one such average per step (EOT 1,
``eot=1``) instead of the evaluation's automatic 20 (which made one PGD-20 run take more than
5 CPU minutes on 50 images); its points are still judged by repeated predictions.

MagNet needs an autoencoder: one ``MagNetAutoencoder`` (pooling, the paper's detector I) is
trained for ``--ae-epochs`` epochs on ``--ae-n`` training points after the first ``--fit-n``
(so the threshold's held-out points are not its training points) and cached in
``benchmarks/.cache/detectors/autoencoder/``.

Run from the repository root: ``.venv/bin/python benchmarks/detectors.py``. Times are CPU
seconds of this process (``time.process_time``), all threads; ``--threads`` defaults to 1 since
another benchmark may run beside it.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from _common import CACHE_DIR, machine_record, trained_model, write_results
from smoothed_eval import cached, cpu_seconds, pct
from smoothing import log, recipes
from torch import Tensor, nn

import robustlab as rl
from robustlab.evaluation.suites import get_suite
from robustlab.models.autoencoder import MagNetAutoencoder
from robustlab.models.heads import ClassLogits
from robustlab.training.autoencoder import train_autoencoder

ROWS = CACHE_DIR / "detectors"
THREAT = rl.ThreatModel("linf", 0.1)
DETECTORS = (
    "feature-squeezing,pca-detector,mahalanobis,mahalanobis-ensemble,lid,kd-bu,magnet,"
    "detector-net,extra-class,trapdoor"
)
#: detectors trained into a model of their own: the model's name, the only one they wrap
OWN_MODEL = ("extra-class", "trapdoor")
NAIVE = [("pgd", {"steps": 20})]
#: the non-adaptive attacks of the detectors' papers: crafted on the classifier alone (the
#: detector's ``base``, the default surrogate of ``transfer``) and shown to the detector
PAPER = {
    "fgsm": ("transfer", {"attack": "fgsm"}),
    "bim": (
        "transfer",
        {
            "attack": "pgd",
            "attack_options": {"steps": 10, "step_size": 0.01, "random_start": False},
        },
    ),
}
#: the evaluation's eot for the detectors that set it (see the module docstring)
EOT = {"kd-bu": 1}


def own_model_recipes(natural: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The models the ``extra-class`` and ``trapdoor`` detectors are trained into: the
    natural model's recipe with their objective (extra-class: 11 outputs; trapdoor: the
    optimiser settings of ``configs/trapdoor.toml``, Adam lr 1e-3, batch 32, constant lr)."""
    return {
        "extra-class": natural
        | {"objective": "extra-class", "eps": 0.1, "model": {"num_classes": 11}},
        "trapdoor": natural
        | {
            "objective": "trapdoor",
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 32,
            "weight_decay": 0.0,
            "schedule": "constant",
        },
    }


def with_steps(spec: Any, steps: int) -> Any:
    """A copy of an attack spec (nested options included) with every ``steps`` set to
    ``steps``."""
    if isinstance(spec, dict):
        return {k: (steps if k == "steps" else with_steps(v, steps)) for k, v in spec.items()}
    if isinstance(spec, list | tuple):
        return type(spec)(with_steps(v, steps) for v in spec)
    return copy.deepcopy(spec)


def adaptive_attacks(steps: int | None) -> list[Any] | None:
    """The ``detector`` suite's linf stages with ``steps`` steps each (None: the suite as
    registered, run as ``rl.evaluate``'s default)."""
    if steps is None:
        return None
    return [with_steps(spec, steps) for spec in get_suite("detector").for_norm("linf")]


def autoencoder(x_train: Tensor, args: argparse.Namespace) -> nn.Module:
    """MagNet's autoencoder, trained on ``--ae-n`` training points after the first
    ``--fit-n`` (resumed or reused from the cache)."""
    out = ROWS / f"autoencoder-n{args.ae_n}-e{args.ae_epochs}"
    ae = MagNetAutoencoder(in_channels=1, pool=True)
    xs = x_train[args.fit_n : args.fit_n + args.ae_n]
    sec = cpu_seconds(lambda: train_autoencoder(ae, xs, epochs=args.ae_epochs, out=out))[1]
    log(f"magnet autoencoder: {len(xs)} points, {args.ae_epochs} epochs ({sec:.0f} CPU s)")
    return ae.eval()


def detector(
    name: str,
    model: nn.Module,
    x_fit: Tensor,
    y_fit: Tensor,
    x_train: Tensor,
    args: argparse.Namespace,
) -> nn.Module:
    options = {"autoencoder": autoencoder(x_train, args)} if name == "magnet" else {}
    det = rl.defenses.create(name, model, **options).eval()
    det.fit(x_fit, y_fit)
    return det


def stages(res: Any) -> list[dict[str, Any]]:
    """Per stage: the attack, its robust accuracy after it, and its detection figures."""
    det = res.record.get("detection") or {}
    figs = det.get("stages") or [{}] * len(res.per_attack)
    return [
        {
            "attack": a["attack"],
            "config": a.get("config"),
            "robust_after": a.get("robust_accuracy"),
            "time_s": a.get("time_s"),
            **{
                k: f.get(k)
                for k in ("joint", "points", "auroc", "tpr", "fooled", "tpr_fooled", "note")
            },
        }
        for a, f in zip(res.per_attack, figs, strict=False)
    ]


def row(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_train: Tensor,
    y_train: Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    x_fit, y_fit = x_train[: args.fit_n], y_train[: args.fit_n]
    det, fit_s = cpu_seconds(lambda: detector(name, model, x_fit, y_fit, x_train, args))
    log(f"{name}: fitted, threshold {det.threshold:.4g} ({fit_s:.0f} CPU s)")
    eot = EOT.get(name)
    naive, naive_s = cpu_seconds(lambda: rl.evaluate(det, x, y, THREAT, attacks=NAIVE, eot=eot))
    nd = naive.record["detection"]
    log(
        f"{name}: clean {naive.clean_accuracy:.3f}, fpr {nd['clean_fpr']:.3f}; naive robust "
        f"{naive.robust_accuracy:.3f} ({naive_s:.0f} CPU s)"
    )
    adapt, adapt_s = cpu_seconds(
        lambda: rl.evaluate(det, x, y, THREAT, attacks=adaptive_attacks(args.steps), eot=eot)
    )
    ad = adapt.record["detection"]
    log(f"{name}: adaptive robust {adapt.robust_accuracy:.3f} ({adapt_s:.0f} CPU s)")
    first = nd["stages"][0] if nd["stages"] else {}
    return {
        "detector": name,
        "config": det.config(),
        "fit_seconds": fit_s,
        "eot": eot,
        "clean_accuracy": naive.clean_accuracy,
        "clean_fpr": nd["clean_fpr"],
        "naive": {
            "robust_accuracy": naive.robust_accuracy,
            "auroc": first.get("auroc"),
            "tpr": first.get("tpr"),
            "tpr_fooled": first.get("tpr_fooled"),
            "fooled": first.get("fooled"),
            "points": first.get("points"),
            "seconds": naive_s,
        },
        "adaptive": {
            "robust_accuracy": adapt.robust_accuracy,
            "seconds": adapt_s,
            "suite": "detector"
            if args.steps is None
            else f"detector stages with {args.steps} steps each",
            "clean_fpr": ad["clean_fpr"],
            "left_out": ad.get("left_out"),
            "stages": stages(adapt),
        },
    }


def paper_attacks(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_train: Tensor,
    y_train: Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Detection figures against each of :data:`PAPER`'s attacks (one evaluation each, all
    points), with the detector fitted again as in :func:`row`."""
    det = detector(name, model, x_train[: args.fit_n], y_train[: args.fit_n], x_train, args)
    out = {}
    for label, spec in PAPER.items():
        res, sec = cpu_seconds(
            lambda spec=spec: rl.evaluate(det, x, y, THREAT, attacks=[spec], eot=EOT.get(name))
        )
        first = res.record["detection"]["stages"][0]
        out[label] = {
            "robust_accuracy": res.robust_accuracy,
            "seconds": sec,
            **{k: first.get(k) for k in ("auroc", "tpr", "fooled", "tpr_fooled", "points")},
        }
        log(
            f"{name}: {label} on the classifier: AUROC {fig(first.get('auroc'))}, TPR "
            f"{fig(first.get('tpr'))}, robust {res.robust_accuracy:.3f} ({sec:.0f} CPU s)"
        )
    return out


def undefended(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    res, sec = cpu_seconds(lambda: rl.evaluate(model, x, y, THREAT, suite="fast"))
    return {
        "clean_accuracy": res.clean_accuracy,
        "robust_accuracy": res.robust_accuracy,
        "seconds": sec,
    }


def fig(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(record: dict[str, Any]) -> str:
    a, m = record["args"], record["machine"]
    suite = (
        "the `detector` suite (100 steps a stage)"
        if a["steps"] is None
        else f"the `detector` suite's stages with {a['steps']} steps each (not the registered "
        "100: `--steps`)"
    )
    lines = [
        "# Detectors: naive and adaptive attacks (linf 0.1, Fashion-MNIST smallcnn)",
        "",
        f"`{m['command']}` · {m['date']} · commit {m['robustlab_commit']} · torch "
        f"{m['torch']} · {m['nproc']} cores ({m['cpu']}) · {a['threads']} thread(s)",
        "",
        f"Fitted on the first {a['fit_n']} clean training points (threshold at fpr 0.05); "
        f"evaluated on {a['images']} test points. Naive: PGD-20 on the detector. "
        f"Adaptive: {suite}. Accuracies in %, a rejected adversarial input counts as "
        "defended, a rejected clean one as an error. AUROC / TPR: the naive attack's "
        "outputs on the points it attacked against the clean test points.",
        "",
        "| model | detector | clean acc | clean FPR | naive robust | naive AUROC | naive "
        "TPR | adaptive robust | undefended robust (fast) | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        n, ad = r["naive"], r["adaptive"]
        sec = r["fit_seconds"] + n["seconds"] + ad["seconds"]
        lines.append(
            f"| {r['model']} | {r['detector']} | {pct(r['clean_accuracy'])} | "
            f"{pct(r['clean_fpr'])} | {pct(n['robust_accuracy'])} | {fig(n['auroc'])} "
            f"| {fig(n['tpr'])} | {pct(ad['robust_accuracy'])} | "
            f"{pct(record['undefended'][r['model']]['robust_accuracy'])} | {sec:.0f} |"
        )
    lines += [
        "",
        "## The papers' non-adaptive attacks (crafted on the classifier alone)",
        "",
        "FGSM (one step of eps) and BIM (10 steps of 0.01, no random start), linf 0.1, "
        "crafted on the detector's classifier and shown to the detector (`transfer`): "
        "the setting the detectors' papers report. AUROC and TPR at the fitted threshold "
        "over the points each attack ran on; robust: detection-aware accuracy.",
        "",
        "| model | detector | FGSM AUROC | FGSM TPR | FGSM robust | BIM AUROC | BIM TPR | "
        "BIM robust |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        pa = r.get("paper") or {"error": "not run"}
        if "error" in pa:
            lines.append(f"| {r['model']} | {r['detector']} | {pa['error']} ||||||")
            continue
        f, b = pa["fgsm"], pa["bim"]
        lines.append(
            f"| {r['model']} | {r['detector']} | {fig(f['auroc'])} | {fig(f['tpr'])} "
            f"| {pct(f['robust_accuracy'])} | {fig(b['auroc'])} | {fig(b['tpr'])} | "
            f"{pct(b['robust_accuracy'])} |"
        )
    lines += [
        "",
        "## Adaptive stages (detection figures of each stage's outputs)",
        "",
        "| model | detector | stage | joint | robust after | points | AUROC | TPR | "
        "fooled | TPR on fooled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        for s in r["adaptive"]["stages"]:
            lines.append(
                f"| {r['model']} | {r['detector']} | {s['attack']} | {s['joint']} | "
                f"{pct(s['robust_after'])} | {s['points']} | {fig(s['auroc'])} | "
                f"{fig(s['tpr'])} | {s['fooled']} | {fig(s['tpr_fooled'])} |"
            )
    lines += [
        "",
        "## Undefended classifiers (`fast` suite)",
        "",
        "| model | clean | robust | CPU s |",
        "|---|---|---|---|",
    ]
    for name, u in record["undefended"].items():
        lines.append(
            f"| {name} | {pct(u['clean_accuracy'])} | {pct(u['robust_accuracy'])} | "
            f"{u['seconds']:.0f} |"
        )
    if a.get("note"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in a["note"]]
    if record.get("failed"):
        lines += ["", "## Rows that failed or were not run", ""]
        lines += [f"- {f['model']} / {f['detector']}: {f['error']}" for f in record["failed"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="pgd-at,natural," + ",".join(OWN_MODEL))
    p.add_argument("--detectors", default=DETECTORS)
    p.add_argument("--images", type=int, default=200)
    p.add_argument(
        "--fit-n",
        type=int,
        default=2000,
        help="clean training points the detectors are fitted on (the first ones)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of each adaptive stage (default: the detector suite's 100)",
    )
    p.add_argument("--ae-n", type=int, default=10000)
    p.add_argument(
        "--ae-epochs",
        type=int,
        default=30,
        help="autoencoder epochs (2 left the reformer at 9 per cent clean accuracy)",
    )
    p.add_argument("--train-n", type=int, default=15000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="recompute cached rows")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="assemble the record from cached rows only; list the others as not run",
    )
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the record (e.g. a row left out, with the reason); repeatable",
    )
    p.add_argument("--stem", default="detectors")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recs = recipes(
        argparse.Namespace(
            train_n=args.train_n, epochs=args.epochs, cni_epochs=2, cni_sigma=0.1, cert_sigmas=[]
        )
    )
    recs |= own_model_recipes(recs["natural"])
    x_train, y_train = rl.data.load("fashion-mnist", split="train")
    x_test, y_test = rl.data.load("fashion-mnist", split="test")
    step = len(x_test) // args.images
    x, y = x_test[::step][: args.images], y_test[::step][: args.images]
    tag = f"{args.images}-fit{args.fit_n}-k{args.steps or 'suite'}"
    record: dict[str, Any] = {
        "machine": machine_record(),
        "args": vars(args),
        "recipes": {m: recs[m] for m in args.models.split(",")},
        "undefended": {},
        "rows": [],
        "failed": [],
    }
    for mname in args.models.split(","):
        model = trained_model(mname, recs[mname], log=log)
        classifier = ClassLogits(model) if mname == "extra-class" else model
        record["undefended"][mname] = cached(
            f"undefended-{mname}-{args.images}",
            args.fresh,
            lambda model=classifier: undefended(model, x, y),
            ROWS,
        )
        for dname in args.detectors.split(","):
            if (dname in OWN_MODEL or mname in OWN_MODEL) and dname != mname:
                continue
            ae = f"-ae{args.ae_n}e{args.ae_epochs}" if dname == "magnet" else ""
            key = f"{mname}-{dname}-{tag}{ae}"
            if args.cached_only and not (ROWS / f"{key}.json").exists():
                record["failed"].append(
                    {
                        "model": mname,
                        "detector": dname,
                        "error": "not run (--cached-only and no cached row)",
                    }
                )
                continue
            try:
                r = cached(
                    key,
                    args.fresh,
                    lambda model=model, dname=dname: row(
                        dname, model, x, y, x_train, y_train, args
                    ),
                    ROWS,
                )
            except Exception as e:  # noqa: BLE001 - a failed row is recorded, not hidden
                log(f"{mname}/{dname} FAILED: {type(e).__name__}: {e}")
                record["failed"].append(
                    {"model": mname, "detector": dname, "error": f"{type(e).__name__}: {e}"}
                )
                continue
            if args.cached_only and not (ROWS / f"{key}-paper.json").exists():
                r["paper"] = {"error": "not run (--cached-only and no cached part)"}
                record["rows"].append({"model": mname} | r)
                continue
            try:
                r["paper"] = cached(
                    f"{key}-paper",
                    args.fresh,
                    lambda model=model, dname=dname: paper_attacks(
                        dname, model, x, y, x_train, y_train, args
                    ),
                    ROWS,
                )
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                log(f"{mname}/{dname} paper attacks FAILED: {type(e).__name__}: {e}")
                r["paper"] = {"error": f"{type(e).__name__}: {e}"}
            record["rows"].append({"model": mname} | r)
    md, js = write_results(args.stem, markdown(record), record)
    print(markdown(record))
    log(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()

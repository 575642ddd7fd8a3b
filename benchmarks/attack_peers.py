"""Attack peers: robustlab's attacks of issue 20 against torchattacks, ART and foolbox.

Every attack robustlab has that a peer also has, on the smallcnn models of ``attack_speed.py``
(natural, PGD-AT) and the same points (every 50th Fashion-MNIST test image), in one run:
minimum-norm attacks (DeepFool l2/linf, EAD l1, JSMA l0 targeted at ``(y + 1) mod 10``: the
median norm over the clean-correct points, inf where the returned point is not adversarial, and
the success rate), transfer attacks (DI/TI/NI/VMI-FGSM at linf 0.1, 10 steps: robust accuracy
on the source and on the other model) and the universal perturbation (linf 0.1, fitted on
training images: the fooling rate on the test points). Everything is recomputed here from the
returned points (norms, predictions, the box, the ball). Settings equal on every side
(``SETTINGS``; what still differs: ``DIFFERENCES``). Time: CPU and wall seconds of one run after
a warm-up. Each (attack, tool, model) row is cached in ``benchmarks/.cache/attack_peers/`` as it
finishes (keyed by settings and points): a rerun resumes. From the repository root::

    .bench-venv/bin/python benchmarks/attack_peers.py --fit 200 --limit ead-l1=20
    .bench-venv/bin/python benchmarks/attack_peers.py --images 8 --fit 20 --stem attack_peers_quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab as rl
from robustlab.attacks.uap import universal_perturbation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

from _common import CACHE_DIR, machine_record, trained_model, write_results  # noqa: E402
from attack_speed import DATASET, EPS, RECIPES, accuracy, available_peers  # noqa: E402

GOAL = "at least the strongest peer's strength at no more than its time"
STRIDE, FIT_STRIDE, WARMUP, BATCH, BOX_TOL = 50, 60, 4, 500, 1e-5
OTHER = {"natural": "pgd-at", "pgd-at": "natural"}
# One value per knob, given to every tool (its own name for it in the builders below).
SETTINGS: dict[str, dict[str, Any]] = {
    "deepfool": {"steps": 50, "overshoot": 0.02, "candidates": 10},
    "ead": {
        "steps": 100,
        "search_steps": 9,
        "initial_const": 1e-3,
        "lr": 1e-2,
        "beta": 1e-2,
        "kappa": 0.0,
        "decision_rule": "EN",
        "abort_early": True,
    },
    "jsma": {"theta": 1.0, "gamma": 0.1, "target": "(y + 1) mod 10"},
    "transfer": {
        "eps": EPS,
        "steps": 10,
        "step_size": EPS / 10,
        "momentum": 1.0,
        "diversity": 0.5,
        "resize": 0.9,
        "kernel": 7,
        "nsig": 3,
        "samples": 20,
        "beta": 1.5,
        "random_start": False,
    },
    "uap": {
        "eps": EPS,
        "norm": "linf",
        "delta": 0.2,
        "max_passes": 5,
        "deepfool_steps": 10,
        "overshoot": 0.02,
        "candidates": 10,
    },
}
DIFFERENCES = {  # what the settings do not make equal, and what differs from the defaults
    "deepfool": "ART's is l2 only, overshoots once at the end and follows the clean prediction; "
    "torchattacks' runs one image at a time on all 10 classes and overshoots each "
    "step; foolbox's and robustlab's are batched over the top 10 classes.",
    "ead": "100 iterations per search step for all (ART's and torchattacks' default; "
    "robustlab's is 1000, foolbox's 10000); beta 1e-2 (the paper's; ART and "
    "torchattacks default to 1e-3); the EN rule and abort-early are every "
    "tool's default (torchattacks' EADEN; ART has no abort-early).",
    "jsma": "torchattacks' defaults (ART's: theta 0.1, gamma 1.0); the target is "
    "torchattacks' untargeted rule.",
    "transfer": "alpha eps/steps (torchattacks' default 2/255), decay 1 (torchattacks' DI, TI: "
    "0), TI without DI and 7x7 (robustlab's 'auto' on 28 px; torchattacks' TI: DI "
    "p 0.5, 15x15), VMI N 20 (torchattacks' 5). Left as they are: robustlab keeps "
    "each point's best iterate (keep_best=True; the keep_best=False rows return "
    "the last one, as torchattacks), its DI resizes by nearest neighbour and pads "
    "with 0.5 (torchattacks: bilinear, 0). torchattacks' TIFGSM hard-codes "
    "groups=3: on 1-channel images its conv runs with groups=1 (the same kernel).",
    "uap": "ART's UniversalPerturbation with its (l2) DeepFool, max_iter 10, epsilon 0.02, "
    "nb_grads 10; robustlab's uses linf DeepFool and stops after a pass without update.",
    "lbfgs": "no peer has it (torchattacks 3.5.1, foolbox 3.3.4, ART 1.20.1): not compared.",
}


class Row(NamedTuple):
    """One tool on one attack: ``build(model)`` is ``fn(x, y) -> x_adv`` (UAP: ``-> v``)."""

    family: str  # "min-norm", "transfer" or "uap"
    attack: str  # "deepfool-l2", ...: its SETTINGS key is the part before the first "-"
    tool: str  # "robustlab" or a key of attack_speed.PEERS
    label: str
    build: Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]]
    norm: str = "linf"  # min-norm: the distance measured


# --- the tools ----------------------------------------------------------------------------
Fn = Callable[[Tensor, Tensor], Tensor]


def _art(model: nn.Module) -> Any:
    from art.estimators.classification import PyTorchClassifier

    info = rl.data.info(DATASET)
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=info.shape,
        nb_classes=info.num_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def _target(y: Tensor) -> Tensor:
    return (y + 1) % 10


def ours(attack: str, norm: str, **kw: Any) -> Callable[[nn.Module], Fn]:
    """robustlab's ``attack``; minimum-norm attacks get the box's diameter as eps (no cut)."""

    def fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        d = x[0].numel()
        eps = (
            EPS
            if attack.endswith("fgsm")
            else {"linf": 1.0, "l2": d**0.5, "l1": float(d), "l0": x[0, 0].numel()}[norm]
        )
        atk = rl.attacks.create(attack, rl.ThreatModel(norm, eps), **kw)
        return atk(model, x, y, target=_target(y) if kw.get("targeted") else None).x_adv

    return lambda model: lambda x, y: fn(model, x, y)


def ours_jsma(model: nn.Module) -> Fn:
    """robustlab's JSMA (written concurrently) with the SETTINGS knobs its signature takes."""
    known = rl.attacks.ATTACKS.options("jsma")
    kw = {k: v for k, v in SETTINGS["jsma"].items() if k in known}
    return ours("jsma", "l0", targeted=True, **kw)(model)


def ta(cls: str, **kw: Any) -> Callable[[nn.Module], Fn]:
    def build(model: nn.Module) -> Fn:
        import torchattacks

        if cls == "TIFGSM":  # its conv hard-codes groups=3: run it with groups = channels
            shim = types.ModuleType("F")
            shim.__dict__.update(vars(F))
            shim.conv2d = lambda g, w, **k: F.conv2d(
                g, w[: g.shape[1]], **k | {"groups": g.shape[1]}
            )
            torchattacks.attacks.tifgsm.F = shim
        atk = getattr(torchattacks, cls)(model, **kw)
        if cls == "JSMA":
            atk.set_mode_targeted_by_function(lambda x, y: _target(y))

        def fn(x: Tensor, y: Tensor) -> Tensor:
            torch.manual_seed(0)  # its random draws come from torch's global RNG
            return atk(x, y)

        return fn

    return build


def fb(cls: str, **kw: Any) -> Callable[[nn.Module], Fn]:
    def build(model: nn.Module) -> Fn:
        import foolbox

        fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
        atk = getattr(foolbox.attacks, cls)(**kw)
        return lambda x, y: atk(fmodel, x, y, epsilons=None)[1]  # (raw, clipped, success)

    return build


def art(cls: str, **kw: Any) -> Callable[[nn.Module], Fn]:
    def build(model: nn.Module) -> Fn:
        from art.attacks import evasion

        atk = getattr(evasion, cls)(_art(model), verbose=False, **kw)
        labels = {"DeepFool": lambda y: None, "SaliencyMapMethod": _target}.get(cls, lambda y: y)
        return lambda x, y: torch.from_numpy(
            atk.generate(x.numpy(), y=None if labels(y) is None else labels(y).numpy())
        ).float()

    return build


def ours_uap(model: nn.Module) -> Fn:
    s = SETTINGS["uap"]
    return lambda x, y: universal_perturbation(
        model,
        x,
        y,
        rl.ThreatModel("linf", s["eps"]),
        delta=s["delta"],
        max_passes=s["max_passes"],
        overshoot=s["overshoot"],
        deepfool_steps=s["deepfool_steps"],
        candidates=s["candidates"],
        seed=0,
    )[0]


def art_uap(model: nn.Module) -> Fn:
    from art.attacks.evasion import UniversalPerturbation

    s = SETTINGS["uap"]
    atk = UniversalPerturbation(
        _art(model),
        attacker="deepfool",
        delta=s["delta"],
        max_iter=s["max_passes"],
        eps=s["eps"],
        norm=np.inf,
        batch_size=BATCH,
        verbose=False,
        attacker_params={
            "max_iter": s["deepfool_steps"],
            "epsilon": s["overshoot"],
            "nb_grads": s["candidates"],
            "verbose": False,
        },
    )

    def fn(x: Tensor, y: Tensor) -> Tensor:
        random.seed(0)  # its visiting order comes from Python's global RNG
        atk.generate(x.numpy(), y=None)  # None: follow the predictions, as the paper
        return torch.from_numpy(atk.noise[0]).float()

    return fn


def rows() -> list[Row]:
    """Every (attack, tool) row; robustlab's default row first in each attack."""
    df, e, js, tr = (SETTINGS[k] for k in ("deepfool", "ead", "jsma", "transfer"))
    dfk = {k: df[k] for k in ("steps", "overshoot", "candidates")}
    ek = {k: e[k] for k in ("steps", "search_steps", "initial_const", "lr", "beta", "kappa")}
    m, j = "min-norm", {"theta": js["theta"], "gamma": js["gamma"]}
    out = [
        Row(
            m, "deepfool-l2", "robustlab", "robustlab deepfool", ours("deepfool", "l2", **dfk), "l2"
        ),
        Row(
            m,
            "deepfool-l2",
            "torchattacks",
            "torchattacks DeepFool",
            ta("DeepFool", steps=df["steps"], overshoot=df["overshoot"]),
            "l2",
        ),
        Row(
            m,
            "deepfool-l2",
            "art",
            "ART DeepFool",
            art(
                "DeepFool",
                max_iter=df["steps"],
                epsilon=df["overshoot"],
                nb_grads=df["candidates"],
                batch_size=BATCH,
            ),
            "l2",
        ),
        Row(
            m,
            "deepfool-l2",
            "foolbox",
            "foolbox L2DeepFoolAttack",
            fb("L2DeepFoolAttack", **dfk),
            "l2",
        ),
        Row(m, "deepfool-linf", "robustlab", "robustlab deepfool", ours("deepfool", "linf", **dfk)),
        Row(
            m,
            "deepfool-linf",
            "foolbox",
            "foolbox LinfDeepFoolAttack",
            fb("LinfDeepFoolAttack", **dfk),
        ),
        Row(m, "ead-l1", "robustlab", "robustlab ead", ours("ead", "l1", **ek), "l1"),
        Row(
            m,
            "ead-l1",
            "torchattacks",
            "torchattacks EADEN",
            ta(
                "EADEN",
                kappa=e["kappa"],
                lr=e["lr"],
                binary_search_steps=e["search_steps"],
                max_iterations=e["steps"],
                initial_const=e["initial_const"],
                beta=e["beta"],
            ),
            "l1",
        ),
        Row(
            m,
            "ead-l1",
            "foolbox",
            "foolbox EADAttack",
            fb(
                "EADAttack",
                binary_search_steps=e["search_steps"],
                steps=e["steps"],
                initial_stepsize=e["lr"],
                confidence=e["kappa"],
                initial_const=e["initial_const"],
                regularization=e["beta"],
            ),
            "l1",
        ),
        Row(
            m,
            "ead-l1",
            "art",
            "ART ElasticNet",
            art(
                "ElasticNet",
                confidence=e["kappa"],
                learning_rate=e["lr"],
                max_iter=e["steps"],
                binary_search_steps=e["search_steps"],
                beta=e["beta"],
                initial_const=e["initial_const"],
                batch_size=BATCH,
            ),
            "l1",
        ),
        Row(m, "jsma-l0", "robustlab", "robustlab jsma", ours_jsma, "l0"),
        Row(m, "jsma-l0", "torchattacks", "torchattacks JSMA", ta("JSMA", **j), "l0"),
        Row(
            m,
            "jsma-l0",
            "art",
            "ART SaliencyMapMethod",
            art("SaliencyMapMethod", batch_size=BATCH, **j),
            "l0",
        ),
    ]
    theirs = {
        "eps": tr["eps"],
        "alpha": tr["step_size"],
        "steps": tr["steps"],
        "decay": tr["momentum"],
    }
    mine = {"steps": tr["steps"], "step_size": tr["step_size"], "momentum": tr["momentum"]}
    for name, cls, extra, peer in (
        (
            "di-fgsm",
            "DIFGSM",
            {"diversity": tr["diversity"], "resize": tr["resize"]},
            {"diversity_prob": tr["diversity"], "resize_rate": tr["resize"]},
        ),
        (
            "ti-fgsm",
            "TIFGSM",
            {"kernel": tr["kernel"]},
            {"len_kernel": tr["kernel"], "nsig": tr["nsig"], "diversity_prob": 0.0},
        ),
        ("ni-fgsm", "NIFGSM", {}, {}),
        (
            "vmi-fgsm",
            "VMIFGSM",
            {"samples": tr["samples"], "beta": tr["beta"]},
            {"N": tr["samples"], "beta": tr["beta"]},
        ),
    ):
        out += [
            Row(
                "transfer",
                name,
                "robustlab",
                f"robustlab {name}",
                ours(name, "linf", **mine, **extra),
            ),
            Row(
                "transfer",
                name,
                "robustlab",
                f"robustlab {name}, keep_best=False",
                ours(name, "linf", keep_best=False, **mine, **extra),
            ),
            Row("transfer", name, "torchattacks", f"torchattacks {cls}", ta(cls, **theirs, **peer)),
        ]
    return out + [
        Row("uap", "uap-linf", "robustlab", "robustlab universal_perturbation", ours_uap),
        Row("uap", "uap-linf", "art", "ART UniversalPerturbation (DeepFool)", art_uap),
    ]


# --- measurement ----------------------------------------------------------------------------
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes (N,), no grad (the models stay in eval mode throughout)."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])


def distances(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-point ``||x_adv - x||`` (N,), float64; l0: the pixels with any channel changed."""
    d = x_adv.double() - x.double()
    if norm == "l0":
        return d.ne(0).any(1).flatten(1).sum(1).double()
    return d.flatten(1).norm(p={"linf": float("inf"), "l2": 2, "l1": 1}[norm], dim=1)


def score(
    row: Row, models: dict[str, nn.Module], name: str, x: Tensor, y: Tensor, out: Tensor
) -> dict[str, Any]:
    """The row's strength, recomputed from what the tool returned (``out``)."""
    model = models[name]
    if row.family == "uap":
        v_linf, xa = float(out.abs().max()), (x + out).clamp(0, 1)
        return {
            "v_linf": v_linf,
            "valid": v_linf <= EPS + 1e-6 and out.shape == x.shape[1:],
            "fooling_rate": 100 * (predict(model, xa) != predict(model, x)).double().mean().item(),
            "perturbed_acc": accuracy(model, xa, y, BATCH),
        }
    excess = float(torch.maximum(-out.amin(), out.amax() - 1).clamp_min(0))
    valid = bool(torch.isfinite(out).all()) and excess <= BOX_TOL
    out = out.clamp(0, 1)  # rounding within BOX_TOL: scored on the box's nearest point
    rec = {"valid": valid, "box_excess": excess}
    if row.family == "transfer":
        dist = float(distances(out, x, "linf").max())
        return rec | {
            "valid": valid and dist <= EPS + 1e-6,
            "max_linf": dist,
            "white_acc": accuracy(model, out, y, BATCH),
            "transfer_acc": accuracy(models[OTHER[name]], out, y, BATCH),
        }
    pred = predict(model, out)
    ok = (pred == _target(y)) if row.norm == "l0" else (pred != y)
    clean = predict(model, x) == y
    norms = torch.where(ok, distances(out, x, row.norm), float("inf"))[clean].numpy()
    median = float(np.median(norms)) if len(norms) else float("inf")
    return rec | {
        "points": int(clean.sum()),
        "success": 100 * ok[clean].double().mean().item(),
        "median": median if np.isfinite(median) else None,
    }  # None: inf (JSON)


def why_not(row: Row, peers: dict[str, str | None], ours_status: str) -> str | None:
    """Why the row cannot run here, or None."""
    if row.tool != "robustlab" and not peers.get(row.tool):
        return f"{row.tool} is not installed (make bench-env)"
    if row.tool == "robustlab" and row.attack == "jsma-l0" and "jsma" not in rl.attacks.names():
        return "robustlab has no 'jsma' (robustlab.attacks.names() does not list it)"
    if row.tool != "robustlab" and ours_status.startswith("not run"):
        return "robustlab's row did not run: nothing to compare"
    return None


def run_row(
    row: Row,
    name: str,
    models: dict[str, nn.Module],
    data: tuple[Tensor, ...],
    threads: int,
    reason: str | None,
) -> dict[str, Any]:
    """One (attack, tool, model) row: cached, or warm-up, one timed run, scored and cached.
    ``data``: (x, y) attacked, or for the UAP (x_fit, y_fit, x, y)."""
    rec: dict[str, Any] = {
        "family": row.family,
        "attack": row.attack,
        "tool": row.tool,
        "label": row.label,
        "model": name,
        "n": len(data[-1]),
    }
    if reason:
        return rec | {"status": f"not run: {reason}"}
    setting = SETTINGS[row.attack.split("-")[0] if row.family != "transfer" else "transfer"]
    key = hashlib.sha256(
        json.dumps([rec, setting, threads, [float(t.double().sum()) for t in data]]).encode()
    ).hexdigest()[:12]
    path = (
        CACHE_DIR / "attack_peers" / f"{row.attack}-{row.label.replace(' ', '_')}-{name}-{key}.json"
    )
    if path.exists():
        print(f"  {row.label:<44} {name:<8} cached {path.name}", flush=True)
        return json.loads(path.read_text())
    fn = row.build(models[name])
    try:
        fn(data[0][: 2 * WARMUP], data[1][: 2 * WARMUP])  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(data[0], data[1]).detach()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    except Exception as err:  # a peer's failure is a row of the table, not the end of the run
        return rec | {"status": f"failed: {type(err).__name__}: {err}"}
    rec |= {
        "status": "ok",
        "cpu_s": cpu,
        "wall_s": wall,
        **score(row, models, name, data[-2], data[-1], out),
    }
    shown = {k: v for k, v in rec.items() if k in SHOWN}
    print(f"  {row.label:<44} {name:<8} {cpu:7.1f} CPU s {wall:7.1f} s {shown}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


# --- the goal -----------------------------------------------------------------------------
# family -> (the strength key, True when higher is stronger)
STRENGTH = {
    "min-norm": ("median", False),
    "transfer": ("transfer_acc", False),
    "uap": ("fooling_rate", True),
}
SHOWN = ("median", "success", "white_acc", "transfer_acc", "fooling_rate", "valid")


def strength(r: dict[str, Any]) -> float:
    """The row's strength as a number to maximise (a failed median, None, is -inf)."""
    key, higher = STRENGTH[r["family"]]
    v = float("inf") if r.get(key) is None else r[key]
    return v if higher else -v


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (attack, model): robustlab's default row against the strongest valid peer row."""
    out = []
    for attack, name in dict.fromkeys((r["attack"], r["model"]) for r in results):
        group = [r for r in results if (r["attack"], r["model"]) == (attack, name)]
        me = group[0]  # robustlab's default row comes first (rows())
        peers = [
            r for r in group if r["tool"] != "robustlab" and r["status"] == "ok" and r["valid"]
        ]
        v = {"attack": attack, "model": name}
        if me["status"] != "ok" or not peers:
            out.append(
                v
                | {
                    "verdict": "not run: "
                    + (me["status"] if me["status"] != "ok" else "no valid peer row")
                }
            )
            continue
        best = max(peers, key=lambda r: (strength(r), r.get("success", 0), -r["cpu_s"]))
        s_ok = me["valid"] and (strength(me), me.get("success", 0)) >= (
            strength(best),
            best.get("success", 0),
        )  # equal medians (inf): success decides
        t_ok = me["cpu_s"] <= best["cpu_s"]
        key = STRENGTH[me["family"]][0]
        a, b = me.get(key), best.get(key)
        gap = (
            f"median {_num(a)} vs {_num(b)} (ratio {_ratio(me, best, key)})"
            if key == "median"
            else f"{key} {a:.1f} vs {b:.1f} ({a - b:+.1f} points)"
        )
        out.append(
            v
            | {
                "peer": best["label"],
                "strength": gap,
                "strength_met": s_ok,
                "time": f"CPU {_ratio(me, best, 'cpu_s')}x ({me['cpu_s']:.1f} vs "
                f"{best['cpu_s']:.1f} s)",
                "time_met": t_ok,
                "verdict": "met"
                if s_ok and t_ok
                else "not met" + ("" if s_ok else " (weaker)") + ("" if t_ok else " (slower)"),
            }
        )
    return out


# --- the record ---------------------------------------------------------------------------
def _num(v: float | None) -> str:
    return "inf (failed)" if v is None else f"{v:.4g}"


def _ratio(r: dict[str, Any], p: dict[str, Any] | None, key: str) -> str:
    ok = p is not None and r.get(key) is not None and p.get(key)
    return f"{r[key] / p[key]:.3f}" if ok else "–"


# family -> (title, its columns: (header, key)); the strength key also gets "/ strongest peer's"
TABLES = {
    "min-norm": (
        "Minimum-norm attacks: median norm over the clean-correct points",
        [("success %", "success"), ("median norm", "median")],
    ),
    "transfer": (
        f"Transfer attacks, linf eps {EPS}, 10 steps: source model -> the other",
        [("white-box rob. acc %", "white_acc"), ("transfer rob. acc %", "transfer_acc")],
    ),
    "uap": (
        f"Universal perturbation, linf eps {EPS}: fooling rate on the test points",
        [
            ("perturbed acc %", "perturbed_acc"),
            ("max abs v", "v_linf"),
            ("fooling rate %", "fooling_rate"),
        ],
    ),
}


def family_table(record: dict[str, Any], family: str) -> list[str]:
    cols, key = TABLES[family][1], STRENGTH[family][0]
    lines = [
        "| attack | model | tool | points | "
        + " | ".join(h for h, _ in cols)
        + " | strength / strongest peer's | CPU s | wall s | CPU / strongest peer's |",
        "|---|---|---|---:|" + "---:|" * (len(cols) + 4),
    ]
    best = {(v["attack"], v["model"]): v.get("peer") for v in record["verdicts"]}
    for r in (r for r in record["results"] if r["family"] == family):
        head = [r["attack"], r["model"], r["label"], str(r.get("points", r["n"]))]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(head + [r["status"]] + [""] * (len(cols) + 3)) + " |")
            continue
        p = next(
            (
                q
                for q in record["results"]
                if (q["attack"], q["model"], q["label"])
                == (r["attack"], r["model"], best.get((r["attack"], r["model"])))
            ),
            None,
        )
        head[2] += "" if r["valid"] else " (INVALID)"
        lines.append(
            "| "
            + " | ".join(
                head
                + [_num(r[k]) for _, k in cols]
                + [
                    _ratio(r, p, key),
                    f"{r['cpu_s']:.1f}",
                    f"{r['wall_s']:.1f}",
                    _ratio(r, p, "cpu_s"),
                ]
            )
            + " |"
        )
    return lines


def render(record: dict[str, Any]) -> str:
    m = record["machine"]
    peers = ", ".join(f"{k} {v}" for k, v in m["peers"].items() if v) or "none"
    lines = [
        "# Attack peers: robustlab's attacks of issue 20 against torchattacks, ART, foolbox",
        "",
        f"- Goal, per (attack, model): {GOAL}.",
        f"- Command: `{m['command']}`",
        f"- Date: {m['date']}; robustlab {m['robustlab']} at commit {m['robustlab_commit']}; "
        f"uncommitted under src/: {', '.join(m['src_changes'] or []) or 'none'}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), shared with other jobs during the run; "
        f"`torch.set_num_threads({record['threads']})`, BLAS {record['blas_limit']}; torch "
        f"{m['torch']}, python {m['python']}; peers: {peers}",
        f"- Points: every {STRIDE}th {DATASET} test image, {record['images']} (fewer, the "
        f"first N of them for every tool, where --limit says: {record['limits'] or 'none'}); "
        f"the UAP fitted on {record['fit']} training images (every {FIT_STRIDE}th). Clean "
        "accuracy: " + ", ".join(f"{k} {v:.1f}%" for k, v in record["clean_acc"].items()),
        "- Recomputed here: norms of the returned x_adv, predictions (not adversarial: inf), "
        f"[0, 1] (rounding up to {BOX_TOL} clipped; more: INVALID), the eps ball (transfer, "
        f"UAP). Time: one run after a warm-up on {2 * WARMUP} points; CPU seconds "
        "(process_time, all threads) decide. This run: "
        f"{record['wall_s'] / 60:.0f} min wall; the rows' own runs, cached ones included: "
        f"{sum(r.get('wall_s', 0) for r in record['results']) / 60:.0f} min wall.",
        "",
        "## Settings, equal for every tool",
        "",
        *[f"- {k}: `{json.dumps(v)}`. {DIFFERENCES.get(k, '')}" for k, v in SETTINGS.items()],
        f"- lbfgs: {DIFFERENCES['lbfgs']}",
    ]
    for family, (title, _) in TABLES.items():
        if any(r["family"] == family for r in record["results"]):
            lines += ["", f"## {title}", "", *family_table(record, family)]
    lines += [
        "",
        "## Verdicts",
        "",
        "| attack | model | strongest peer | strength (robustlab vs peer) | time | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {v['attack']} | {v['model']} | {v.get('peer', '–')} | {v.get('strength', '–')}"
        f" | {v.get('time', '–')} | {v['verdict']} |"
        for v in record["verdicts"]
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    attacks = list(dict.fromkeys(r.attack for r in rows()))
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=200, help="test points (default 200)")
    p.add_argument("--fit", type=int, default=1000, help="UAP fitting points (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--limit",
        nargs="*",
        default=[],
        metavar="ATTACK=N",
        help="the first N points only, for every tool of a slow attack",
    )
    p.add_argument("--attacks", nargs="+", choices=attacks, default=attacks)
    p.add_argument("--stem", default="attack_peers", help="results/<stem>.{md,json}")
    args = p.parse_args(argv)
    try:
        args.limit = {a: int(n) for a, n in (s.split("=") for s in args.limit)}
    except ValueError:
        p.error("--limit takes ATTACK=N, e.g. --limit ead-l1=20")
    if min(args.images, args.fit, args.threads, *args.limit.values()) < 1:
        p.error("--images, --fit, --threads and every --limit N must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # numpy's BLAS (ART) on the same budget
        blas = f"limited to {args.threads} thread(s) by threadpoolctl"
    except ImportError:
        blas = "not limited (threadpoolctl missing)"
    peers = available_peers()
    x, y = (t[::STRIDE][: args.images] for t in rl.data.load(DATASET, split="test"))
    xf, yf = (t[::FIT_STRIDE][: args.fit] for t in rl.data.load(DATASET, split="train"))
    models = {name: trained_model(f"smallcnn-{name}", RECIPES[name]).eval() for name in RECIPES}
    t0, results = time.perf_counter(), []
    for row in (r for r in rows() if r.attack in args.attacks):
        n = args.limit.get(row.attack, len(x))
        data = (xf, yf, x[:n], y[:n]) if row.family == "uap" else (x[:n], y[:n])
        for name in models:
            mine = next(
                (
                    r["status"]
                    for r in results
                    if (r["attack"], r["model"], r["tool"]) == (row.attack, name, "robustlab")
                ),
                "ok",
            )
            results.append(
                run_row(row, name, models, data, args.threads, why_not(row, peers, mine))
            )
    record = {
        "benchmark": "attack_peers",
        "goal": GOAL,
        "machine": machine_record(peers),
        "threads": args.threads,
        "blas_limit": blas,
        "images": len(x),
        "fit": len(xf),
        "limits": args.limit,
        "settings": SETTINGS,
        "differences": DIFFERENCES,
        "clean_acc": {k: accuracy(m, x, y, BATCH) for k, m in models.items()},
        "wall_s": time.perf_counter() - t0,
        "results": results,
    }
    record["verdicts"] = verdicts(results)
    markdown = render(record)
    print("\n" + markdown)
    md, js = write_results(args.stem, markdown, record)
    print(f"wrote {md} and {js}")
    return record


if __name__ == "__main__":
    main()

"""``evaluate``: clean accuracy, then a cascade of attacks over the still-robust points.

Every attack runs only on points no earlier attack broke; each returned input is checked to lie
in the ball and the bounds, and the prediction on it is recomputed here, so the reported robust
accuracy is the per-sample worst case over every attack run. A model without a gradient path is
flagged and attacked with the gradient-free attacks only (never a crash, never a silent
'robust'). The evaluation adapts its attacks to what the model is (Athalye et al. 2018): a model
with stages that declare themselves non-differentiable (JPEG, quantisation, thermometer
encoding, ...) is attacked with BPDA through them, and a randomised one (declared or seen) with
EOT gradients and judged by a majority of repeated predictions (``repeats``); both are recorded
in the results under ``adaptive`` and can be forced either way. A detector's rejection
(``robustlab_reject``) of an adversarial input counts as defended, of a clean input as an
error.
With ``out`` the evaluation saves its state after attack batches and an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._progress import append_jsonl
from robustlab._provenance import git_commit, versions
from robustlab._validate import check_inputs, check_labels, check_logits, probe_model
from robustlab.attacks import Attack, create_for_evaluation
from robustlab.attacks.bpda import bpda as bpda_mode
from robustlab.attacks.bpda import nondifferentiable_stages
from robustlab.attacks.losses import rejects
from robustlab.evaluation.checks import black_box_beats_white_box, gradient_health, run_checks
from robustlab.evaluation.results import SCHEMA, EvalResult
from robustlab.evaluation.state import FILENAME, EvalState, fingerprint
from robustlab.evaluation.suites import get_suite
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)
AttackLike = Attack | tuple[str, dict[str, Any]] | str


# gradient-free attacks run on a model without input gradients when its suite has none
_FALLBACK: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "linf": [("square", {"n_queries": 5000, "p_init": 0.8}), ("rays", {})],
    "l2": [("square", {"n_queries": 5000, "p_init": 0.8})],
    "l1": [],
}
_SAVE_EVERY_S = 30.0
EOT_SAMPLES = 20  # AutoAttack's rand version (Croce & Hein 2020)
RANDOM_REPEATS = 10  # predictions per point on a randomised model, as the rand suite


def _build(spec: AttackLike, threat: ThreatModel, surrogate: nn.Module | None) -> Attack:
    if isinstance(spec, Attack):
        if spec.threat != threat:
            raise ValueError(f"attack {spec!r} has threat {spec.threat}, evaluation has {threat}")
        return spec
    if isinstance(spec, str):
        spec = (spec, {})
    if not (isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise TypeError(f"attack spec {spec!r} must be an Attack, a name or a (name, options "
                        "dict) pair, e.g. ('pgd', {'steps': 20})")
    name, opts = spec[0], dict(spec[1])
    if name == "transfer" and "surrogate" not in opts:
        if surrogate is None:
            raise ValueError("the transfer attack needs a surrogate model: pass "
                             "evaluate(..., surrogate=model) or ('transfer', {'surrogate': m})")
        opts["surrogate"] = surrogate
    return create_for_evaluation(name, threat, **opts)


def _batch_generator(seed: int, attack: int, batch: int, device: torch.device) -> torch.Generator:
    """One generator per (attack, batch): a resumed run draws what an uninterrupted one drew."""
    s = int(np.random.SeedSequence([seed, attack, batch]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(s)


def _channels_last_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with its weights in channels_last layout (faster convolutions on
    CPU, same answer); the caller's model is never converted. None if it cannot be copied."""
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except (TypeError, RuntimeError, copy.Error) as e:
        log.warning("evaluating the model as it is: cannot copy it to channels_last (%s)", e)
        return None


def _defended(pred: Tensor, y: Tensor, reject: bool, k: int) -> Tensor:
    """The prediction is the label, or a detector's rejection (the last of ``k`` classes)."""
    ok = pred == y
    return ok | (pred == k - 1) if reject else ok


def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device,
             repeats: int, reject: bool = False) -> tuple[Tensor, Tensor]:
    """Per point: correct (or, with ``reject``, rejected by a detector: for adversarial
    inputs) in a strict majority of ``repeats`` predictions (bool), and the prediction of the
    first draw."""
    hits, first = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            votes = torch.zeros(len(xb), dtype=torch.long, device=device)
            for r in range(repeats):
                logits = check_logits(model(xb), len(xb))
                p = logits.argmax(1)
                votes += _defended(p, yb, reject, logits.shape[1])
                if r == 0:
                    first.append(p.cpu())
            hits.append((2 * votes > repeats).cpu())
    return torch.cat(hits), torch.cat(first)


def _plan(built: list[Attack], threat: ThreatModel, no_gradient: bool, bpda_no_gradient: bool,
          surrogate: nn.Module | None) -> list[tuple[Attack, str | None]]:
    """The attacks to run, each with the reason it is skipped (None: it runs). A gradient
    attack is skipped where the model has no input gradient as it runs it (``no_gradient``:
    the model itself; ``bpda_no_gradient``: with its BPDA stages switched on); gradient-free
    ones are added if no attack is left."""
    why = "skipped: the model has no input gradient (see the no-gradient flag)"

    def blocked(a: Attack) -> bool:
        return a.uses_gradients and (bpda_no_gradient if a.bpda else no_gradient)

    plan = [(a, why if blocked(a) else None) for a in built]
    if all(blocked(a) for a in built):
        extra = list(_FALLBACK[threat.norm])
        if surrogate is not None:
            extra.append(("transfer", {}))
        plan += [(_build(s, threat, surrogate), None) for s in extra]
    if all(reason for _, reason in plan):
        raise ValueError(f"the model has no input gradient and no gradient-free attack exists for "
                         f"{threat.norm}: pass a surrogate model for the transfer attack")
    return plan


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    suite: str = "standard",
    attacks: Sequence[AttackLike] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = True,
    repeats: int | None = None,
    surrogate: nn.Module | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    channels_last: bool | None = None,
    bpda: bool | None = None,
    eot: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` under ``threat``.

    Args:
        suite: a registered suite name (``robustlab.evaluation.suites()``: ``standard`` is the
            AutoAttack standard cascade, ``fast`` our cheaper one, ``rand`` for randomised
            models), used when ``attacks`` is None.
        attacks: instead of a suite, attacks as ``Attack`` objects, names or
            ``(name, options)`` pairs, run in this order. ``Attack`` objects run exactly as
            they were built (their own ``bpda`` and EOT draws); names and pairs get the
            evaluation's ``bpda`` and ``eot``.
        batch_size: points per attack call.
        seed: seeds the attacks' generators (one per attack and batch: deterministic results,
            also across an interruption).
        out: directory for ``results.json``, ``per_sample.jsonl``, ``summary.md`` and the
            resumable state ``eval_state.safetensors`` (removed once the results are written).
        resume: continue from the state in ``out`` if there is one (it must belong to the same
            model, data and settings); False starts over.
        repeats: predictions per point, robust only if a strict majority is correct (for
            randomised models); default: the suite's (``rand``: 10, others 1), and at least
            10 on a randomised model.
        surrogate: a model for the ``transfer`` attack (crafted on it, replayed on ``model``).
        config: extra JSON-able context recorded in the results (checkpoint, data set, ...).
        channels_last: attack a copy of the model with channels_last weights (about 1.3x faster
            per step on CPU, see BENCHMARKS.md); None: on for 4-D inputs on CPU.
        bpda: run the gradient attacks with BPDA through the model's non-differentiable stages
            (those declaring ``robustlab_differentiable = False``); None: whenever it has some.
        eot: average each gradient of the gradient attacks over this many draws; None: 20 on a
            randomised model (declared ``robustlab_random`` or seen to differ between two
            forward passes), else each attack's own setting.

    Returns:
        :class:`EvalResult`; robust accuracy counts a point robust only if it is classified
        correctly without attack and after every attack.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    check_inputs(x, y, threat)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(attacks, str) or (attacks is not None and not hasattr(attacks, "__iter__")):
        raise TypeError(f"attacks must be a list of attacks, names or (name, options) pairs, "
                        f"got {attacks!r}; for one attack pass [{attacks!r}]")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int)
                                or repeats < 1):
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
    if bpda is not None and not isinstance(bpda, bool):
        raise TypeError(f"bpda must be True, False or None (automatic), got {bpda!r}")
    if eot is not None and (isinstance(eot, bool) or not isinstance(eot, int) or eot < 1):
        raise ValueError(f"eot must be an integer >= 1 or None (automatic), got {eot!r}")
    if attacks is not None:
        suite_name, specs, suite_repeats = "custom", list(attacks), 1
    else:
        chosen = get_suite(suite)
        suite_name, specs, suite_repeats = suite, chosen.for_norm(threat.norm), chosen.repeats
    built = [_build(s, threat, surrogate) for s in specs]
    device = next(iter(model.parameters()), torch.empty(0)).device
    x, y = x.detach().cpu(), y.detach().cpu().long()
    t_start = time.perf_counter()
    if channels_last is None:
        channels_last = x.dim() == 4 and device.type == "cpu"
    fast = _channels_last_copy(model) if channels_last and x.dim() == 4 else None
    channels_last = fast is not None
    original, model = model, fast if fast is not None else model
    state_path = Path(out) / FILENAME if out is not None else None
    with eval_mode(model):
        xp, yp = x[:64].to(device), y[:64].to(device)
        probe_logits = probe_model(model, xp)
        check_labels(y, probe_logits.shape[1])
        flags = run_checks(model, xp, yp, probe_logits)
        adaptive = _adaptation(model, flags, bpda, eot, repeats, suite_repeats)
        repeats = adaptive["repeats"]
        built = [a if isinstance(spec, Attack) else _adapt(a, adaptive)
                 for spec, a in zip(specs, built, strict=True)]
        no_gradient = _lacks_gradient(model, xp, yp, flags, with_bpda=False)
        bpda_no_gradient = (_lacks_gradient(model, xp, yp, flags, with_bpda=True)
                            if any(a.bpda for a in built) else no_gradient)
        plan = _plan(built, threat, no_gradient, bpda_no_gradient, surrogate)
        settings = {"threat": threat.to_dict(), "attacks": [a.config() for a, _ in plan],
                    "seed": seed, "batch_size": batch_size, "repeats": repeats}
        fp = fingerprint(original, x, y, settings) if state_path is not None else ""
        clean, pred = _correct(model, x, y, batch_size, device, repeats)
        clean_time = time.perf_counter() - t_start
        if state_path is not None and resume and state_path.exists():
            st = EvalState.load(state_path, fp)
            log.info("resuming the evaluation from %s (attack %d, batch %d)", state_path,
                     st.attack + 1, st.batch)
        else:
            st = EvalState(robust=clean.clone(), x_adv=x.clone(), adv_pred=pred.clone(),
                           min_norm=torch.where(clean, math.nan, 0.0),  # NaN: unknown
                           start_robust=clean.clone(),
                           broken_by=[None if r else "clean" for r in clean.tolist()])
        elapsed0, last_save = st.elapsed_s, time.perf_counter()
        bar = None
        if progress:  # unit: attack batches, total: an upper bound that falls as points break
            from tqdm.auto import tqdm

            done = sum(math.ceil(r["attacked"] / batch_size) for r in st.per_attack) + st.batch
            left = _batches_left(plan, st.attack, int(st.start_robust.sum() if st.batch
                                                      else st.robust.sum()), batch_size)
            bar = tqdm(total=done + left - st.batch, initial=done, desc="attacks",
                       unit="batch", leave=False, dynamic_ncols=True)
        log_path = None
        if out is not None:  # the event log: appended line by line, never rewritten
            log_path = Path(out) / "eval_log.jsonl"
            append_jsonl(log_path, {
                "event": "start", "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "n": len(x), "suite": suite_name, "threat": threat.to_dict(),
                "attacks": [f"{k + 1}:{a.name}" for k, (a, _) in enumerate(plan)],
                "resumed": st.attack > 0 or st.batch > 0})
        for i in range(st.attack, len(plan)):
            atk, skipped = plan[i]
            label = f"{i + 1}:{atk.name}"
            if st.batch == 0:
                st.begin_attack()
            idx = st.start_robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            if bar is not None:
                bar.total = bar.n - st.batch + _batches_left(plan, i, len(idx), batch_size)
                bar.set_description(label, refresh=False)
                bar.set_postfix(robust=f"{100 * float(st.robust.float().mean()):.2f}%")
            for j in range(st.batch * batch_size, 0 if skipped else len(idx), batch_size):
                b = idx[j:j + batch_size]
                gen = _batch_generator(seed, i, j // batch_size, device)
                _attack_batch(model, atk, threat, x, y, b, gen, repeats, label, st)
                st.batch = j // batch_size + 1
                if bar is not None:
                    bar.set_postfix(robust=f"{100 * float(st.robust.float().mean()):.2f}%",
                                    refresh=False)
                    bar.update(1)
                if state_path is not None and time.perf_counter() - last_save > _SAVE_EVERY_S:
                    st.elapsed_s = elapsed0 + time.perf_counter() - t_start
                    st.save(state_path, fp, attack_time_s=time.perf_counter() - t0)
                    last_save = time.perf_counter()
            record = {"attack": label, "config": atk.config(),
                      "uses_gradients": atk.uses_gradients,
                      "attacked": 0 if skipped else len(idx),
                      "broken": int((st.start_robust & ~st.robust).sum()),
                      "robust_accuracy": float(st.robust.float().mean()),
                      "time_s": st.attack_time_s + time.perf_counter() - t0}
            if skipped:
                record["skipped"] = skipped
            st.end_attack(record)
            st.elapsed_s = elapsed0 + time.perf_counter() - t_start
            if log_path is not None:
                keys = ("attack", "attacked", "broken", "robust_accuracy", "time_s", "skipped")
                line = {k: record[k] for k in keys if k in record}
                append_jsonl(log_path, {"event": "attack", **line, "elapsed_s": st.elapsed_s})
            if state_path is not None:
                st.save(state_path, fp)
                last_save = time.perf_counter()
        if log_path is not None:
            append_jsonl(log_path, {"event": "end", "clean_accuracy": float(clean.float().mean()),
                                    "robust_accuracy": float(st.robust.float().mean()),
                                    "total_s": elapsed0 + time.perf_counter() - t_start})
        if bar is not None:
            bar.close()
    flags += st.flags
    flag = black_box_beats_white_box(st.per_attack, len(x))
    if flag is not None:
        flags.append(flag)
    result = _result(st, x, y, pred, clean, threat, flags, {
        "suite": suite_name, "attacks": [a.config() for a, _ in plan], "seed": seed,
        "batch_size": batch_size, "repeats": repeats, "channels_last": channels_last,
        "adaptive": adaptive, "config": config or {},
        "timings": {"clean_s": clean_time,
                    "total_s": elapsed0 + time.perf_counter() - t_start},
    })
    if out is not None:
        result.save(out)
        if state_path is not None:
            state_path.unlink(missing_ok=True)
    return result


def _batches_left(plan: list[tuple[Attack, str | None]], i: int, attacked: int,
                  batch_size: int) -> int:
    """Attack batches from the start of attack ``i`` to the end of ``plan`` when attack ``i``
    runs on ``attacked`` points: an upper bound, as each later attack runs on at most those
    (skipped attacks run none)."""
    return math.ceil(attacked / batch_size) * sum(why is None for _, why in plan[i:])


def _lacks_gradient(model: nn.Module, x: Tensor, y: Tensor, flags: list[dict[str, Any]], *,
                    with_bpda: bool) -> bool:
    """The model has no input gradient as an attack runs it: its own no-gradient flag, checked
    again with its BPDA stages switched on when ``with_bpda`` (BPDA may restore the path; it
    never removes one). The model must be in eval mode."""
    if not any(f["name"] == "no-gradient" for f in flags):
        return False
    if not with_bpda:
        return True
    with bpda_mode(model):
        still = gradient_health(model, x, y)
    return still is not None and still["name"] == "no-gradient"


def _adaptation(model: nn.Module, flags: list[dict[str, Any]], bpda: bool | None,
                eot: int | None, repeats: int | None, suite_repeats: int) -> dict[str, Any]:
    """What the evaluation adapts to this model: BPDA through its declared non-differentiable
    stages, EOT and repeated predictions for randomness; ``auto`` records which were chosen
    here rather than forced by the caller."""
    stages = nondifferentiable_stages(model)
    randomised = any(f["name"] == "randomised-output" for f in flags)
    use_bpda = bool(stages) if bpda is None else bpda
    n_eot = (EOT_SAMPLES if randomised else 1) if eot is None else eot
    if repeats is None:
        repeats = max(suite_repeats, RANDOM_REPEATS) if randomised else suite_repeats
    return {"bpda": use_bpda, "bpda_stages": stages, "eot": n_eot, "repeats": repeats,
            "randomised": randomised, "rejects": rejects(model),
            "auto": {"bpda": bpda is None, "eot": eot is None}}


def _adapt(atk: Attack, adaptive: dict[str, Any]) -> Attack:
    """A gradient attack with the evaluation's BPDA and EOT settings (a copy: the caller's
    attack is left as it was). Automatic EOT never lowers an attack's own number of draws."""
    if not atk.uses_gradients:
        return atk
    atk = copy.copy(atk)
    if not adaptive["auto"]["bpda"] or adaptive["bpda"]:
        atk.bpda = adaptive["bpda"]
    if not adaptive["auto"]["eot"]:
        atk.eot_samples = adaptive["eot"]
    elif adaptive["eot"] > atk.eot_samples:
        atk.eot_samples = adaptive["eot"]
    return atk


def _attack_batch(model: nn.Module, atk: Attack, threat: ThreatModel, x: Tensor, y: Tensor,
                  b: Tensor, gen: torch.Generator, repeats: int, label: str,
                  st: EvalState) -> None:
    """Run ``atk`` on the points ``b`` and fold the points it broke into ``st``."""
    device = gen.device
    xb, yb = x[b].to(device), y[b].to(device)
    res = atk(model, xb, yb, generator=gen)
    own_call = type(atk).__call__ is not Attack.__call__
    if own_call:  # an attack with its own __call__: check and recompute, trust nothing
        threat.check(res.x_adv, xb, who=f"attack {atk.name!r}")
    reject = rejects(model)
    if repeats > 1 or own_call:
        correct, p = _correct(model, res.x_adv, yb.cpu(), len(b), device, repeats, reject)
        hit = ~correct
    else:  # Attack.__call__ verified the ball and ran the model on res.x_adv itself
        p = res.logits.argmax(1).cpu()
        hit = ~_defended(p, yb.cpu(), reject, res.logits.shape[1])
    if (own_call and not atk.targeted and not torch.equal(hit, res.success.cpu())
            and not any(f["name"] == "prediction-mismatch" for f in st.flags)):
        st.flags.append({
            "name": "prediction-mismatch",
            "message": f"{atk.name} reported successes that the model's predictions on its "
                       "x_adv do not confirm (a randomised model, or an attack that misreports)"})
    bi = b[hit]
    st.robust[bi] = False
    st.x_adv[bi] = res.x_adv[hit.to(res.x_adv.device)].cpu()
    st.adv_pred[bi] = p[hit]
    if res.min_norm is not None:
        st.min_norm[b] = torch.fmin(st.min_norm[b], res.min_norm.cpu().float())  # NaN: unknown
    for s in bi.tolist():
        st.broken_by[s] = label


def _min_norm_curve(min_norm: Tensor, threat: ThreatModel, points: int = 41) -> list[dict]:
    """Robust accuracy against eps from the per-sample minimal norms: robust at e iff the
    smallest adversarial perturbation found is larger than e (an upper bound, like any attack's
    number)."""
    finite = min_norm[torch.isfinite(min_norm)]
    top = max(2 * threat.eps, float(finite.max()) if len(finite) else 0.0) or 1.0
    grid = torch.linspace(0, top, points)
    return [{"eps": float(e), "robust_accuracy": float((min_norm > e).float().mean())}
            for e in grid]


def _result(st: EvalState, x: Tensor, y: Tensor, pred: Tensor, clean: Tensor,
            threat: ThreatModel, flags: list[dict[str, Any]],
            extra: dict[str, Any]) -> EvalResult:
    dist = threat.distance(st.x_adv, x)
    per_sample = []
    for i in range(len(x)):
        row = {"index": i, "label": int(y[i]), "clean_pred": int(pred[i]),
               "adv_pred": int(st.adv_pred[i]), "robust": bool(st.robust[i]),
               "broken_by": st.broken_by[i], "distance": float(dist[i])}
        m = float(st.min_norm[i])
        if not math.isnan(m):  # known: a minimum-norm attack ran on it (None: found none)
            row["min_norm"] = m if math.isfinite(m) else None
        per_sample.append(row)
    flags = list({f["name"]: f for f in flags}.values())  # one flag per kind
    record = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "clean_accuracy": float(clean.float().mean()),
        "robust_accuracy": float(st.robust.float().mean()),
        "threat": threat.to_dict(),
        "n": len(x),
        "per_attack": st.per_attack,
        "flags": flags,
        "commit": git_commit(),
        "versions": versions(),
    } | extra
    if not torch.isnan(st.min_norm).any():
        record["min_norm_curve"] = _min_norm_curve(st.min_norm, threat)
    return EvalResult(
        clean_accuracy=record["clean_accuracy"], robust_accuracy=record["robust_accuracy"],
        per_attack=st.per_attack, flags=flags, robust=st.robust, x_adv=st.x_adv,
        broken_by=st.broken_by, per_sample=per_sample, record=record, x=x,
    )

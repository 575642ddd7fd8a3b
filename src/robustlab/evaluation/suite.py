"""``evaluate``: clean accuracy, then a cascade of attacks over the still-robust points.

Every attack runs only on points no earlier attack broke; each returned input is checked to lie
in the ball and the bounds, and the prediction on it is recomputed here, so the reported robust
accuracy is the per-sample worst case over every attack run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._provenance import git_commit, versions
from robustlab._validate import check_inputs, check_labels, check_logits, probe_model
from robustlab.attacks import Attack, create_for_evaluation
from robustlab.attacks.base import eval_mode
from robustlab.evaluation.checks import run_checks
from robustlab.evaluation.results import SCHEMA, EvalResult
from robustlab.evaluation.suites import suite_attacks
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)
AttackLike = Attack | tuple[str, dict[str, Any]] | str


def _build(spec: AttackLike, threat: ThreatModel) -> Attack:
    if isinstance(spec, Attack):
        if spec.threat != threat:
            raise ValueError(f"attack {spec!r} has threat {spec.threat}, evaluation has {threat}")
        return spec
    if isinstance(spec, str):
        return create_for_evaluation(spec, threat)
    if not (isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise TypeError(f"attack spec {spec!r} must be an Attack, a name or a (name, options "
                        "dict) pair, e.g. ('pgd', {'steps': 20})")
    name, opts = spec
    return create_for_evaluation(name, threat, **dict(opts))


def _channels_last_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with its weights in channels_last layout (faster convolutions on
    CPU, same answer); the caller's model is never converted. None if it cannot be copied."""
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except (TypeError, RuntimeError, copy.Error) as e:
        log.warning("evaluating the model as it is: cannot copy it to channels_last (%s)", e)
        return None


def _predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device)
            out.append(check_logits(model(xb), len(xb)).argmax(1).cpu())
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    suite: str = "pgd",
    attacks: Sequence[AttackLike] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    out: str | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    channels_last: bool | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` under ``threat``.

    Args:
        suite: a registered suite name (``robustlab.evaluation.suites.names()``), used when
            ``attacks`` is None.
        attacks: instead of a suite, attacks as ``Attack`` objects, names or
            ``(name, options)`` pairs, run in this order.
        batch_size: points per attack call.
        seed: seeds the one generator all attacks draw from (deterministic results).
        out: directory for ``results.json``, ``per_sample.jsonl`` and ``summary.md``.
        config: extra JSON-able context recorded in the results (checkpoint, data set, ...).
        channels_last: attack a copy of the model with channels_last weights (about 1.3x faster
            per step on CPU, see BENCHMARKS.md); None: on for 4-D inputs on CPU.

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
    suite_name = "custom" if attacks is not None else suite
    specs = list(attacks) if attacks is not None else suite_attacks(suite)
    built = [_build(s, threat) for s in specs]
    device = next(iter(model.parameters()), torch.empty(0)).device
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n = len(x)
    gen = torch.Generator(device=device).manual_seed(seed)
    t_start = time.perf_counter()
    if channels_last is None:
        channels_last = x.dim() == 4 and device.type == "cpu"
    fast = _channels_last_copy(model) if channels_last and x.dim() == 4 else None
    channels_last = fast is not None
    model = fast if fast is not None else model
    with eval_mode(model):
        xp, yp = x[:64].to(device), y[:64].to(device)
        probe_logits = probe_model(model, xp)
        check_labels(y, probe_logits.shape[1])
        pred = _predict(model, x, batch_size, device)
        clean_time = time.perf_counter() - t_start
        flags = run_checks(model, xp, yp, probe_logits)
        robust = pred == y
        adv_pred = pred.clone()
        x_adv = x.clone()
        broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
        per_attack = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(built), desc="attacks", unit="attack", leave=False)
        for i, atk in enumerate(built):
            label = f"{i + 1}:{atk.name}"
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            attacked, broken = len(idx), 0
            for j in range(0, len(idx), batch_size):
                b = idx[j:j + batch_size]
                xb, yb = x[b].to(device), y[b].to(device)
                res = atk(model, xb, yb, generator=gen)
                if type(atk).__call__ is Attack.__call__:
                    # Attack.__call__ itself verified the ball and ran the model on res.x_adv
                    p = res.logits.argmax(1)
                    hit = (p != yb).cpu()
                else:  # an attack with its own __call__: check and recompute, trust nothing
                    threat.check(res.x_adv, xb, who=f"attack {atk.name!r}")
                    with torch.no_grad():
                        p = model(res.x_adv).argmax(1)
                    hit = (p != yb).cpu()
                    if not atk.targeted and not torch.equal(hit, res.success.cpu()):
                        flags.append({
                            "name": "prediction-mismatch",
                            "message": f"{atk.name} reported successes that the model's "
                                       "predictions on its x_adv do not confirm (a randomised "
                                       "model, or an attack that misreports)"})
                bi = b[hit]
                robust[bi] = False
                x_adv[bi] = res.x_adv[hit.to(res.x_adv.device)].cpu()
                adv_pred[bi] = p.cpu()[hit]
                for s in bi.tolist():
                    broken_by[s] = label
                broken += len(bi)
            per_attack.append({
                "attack": label, "config": atk.config(), "attacked": attacked,
                "broken": broken, "robust_accuracy": float(robust.float().mean()),
                "time_s": time.perf_counter() - t0,
            })
            if bar is not None:
                bar.update(1)
                bar.set_postfix(robust=f"{100 * float(robust.float().mean()):.2f}%")
        if bar is not None:
            bar.close()
    total = time.perf_counter() - t_start
    dist = threat.distance(x_adv, x)
    per_sample = [
        {"index": i, "label": int(y[i]), "clean_pred": int(pred[i]), "adv_pred": int(adv_pred[i]),
         "robust": bool(robust[i]), "broken_by": broken_by[i], "distance": float(dist[i])}
        for i in range(n)
    ]
    flags = list({f["name"]: f for f in flags}.values())  # one flag per kind
    record = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "clean_accuracy": float((pred == y).float().mean()),
        "robust_accuracy": float(robust.float().mean()),
        "threat": threat.to_dict(),
        "suite": suite_name,
        "attacks": [a.config() for a in built],
        "n": n,
        "per_attack": per_attack,
        "flags": flags,
        "seed": seed,
        "batch_size": batch_size,
        "channels_last": channels_last,
        "commit": git_commit(),
        "versions": versions(),
        "config": config or {},
        "timings": {"clean_s": clean_time, "total_s": total},
    }
    result = EvalResult(
        clean_accuracy=record["clean_accuracy"], robust_accuracy=record["robust_accuracy"],
        per_attack=per_attack, flags=flags, robust=robust, x_adv=x_adv, broken_by=broken_by,
        per_sample=per_sample, record=record,
    )
    if out is not None:
        result.save(out)
    return result

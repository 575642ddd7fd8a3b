"""The cascade: robust accuracy as the per-sample worst case over a list of attacks.

For each attack, for each batch of the points no earlier attack broke: attack them, recompute
the model's predictions on the returned inputs (a strict majority of ``repeats`` predictions
on a randomised model) and fold the points broken into the worst case (:func:`fold`). A point
is robust only if it is classified correctly without attack and after every attack. The state
(:class:`~robustlab.evaluation.state.EvalState`) holds the worst case and where the cascade
stands, so an interrupted cascade continues at the batch it stopped at; the observer
(:class:`~robustlab.evaluation.record.EvalRecord`) times, logs and saves. ``evaluate``
(:mod:`robustlab.evaluation.run`) and the trainer's validation run this one function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from robustlab._validate import check_logits
from robustlab.attacks import AttackResult
from robustlab.attacks.losses import rejects
from robustlab.evaluation.adapt import Step
from robustlab.evaluation.record import EvalRecord
from robustlab.evaluation.state import EvalState

Generators = Callable[[int, int], torch.Generator]


def run_cascade(model: nn.Module, steps: Sequence[Step], x: Tensor, y: Tensor, st: EvalState,
                *, batch_size: int, repeats: int, generators: Generators,
                record: EvalRecord, view: nn.Module | None = None) -> EvalState:
    """Run ``steps`` on ``model`` (in eval mode) from where ``st`` stands; ``x, y`` on the CPU.
    ``generators(i, j)``: the generator of attack ``i``'s batch ``j``. ``view``: the model as
    the attacks see it (:meth:`~robustlab.evaluation.adapt.Adaptation.view`; None: ``model``);
    predictions on their points are then made by ``model`` again. Returns ``st``, its worst
    case over every attack."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    reject = rejects(model)
    attacked = model if view is None else view
    for i in range(st.attack, len(steps)):
        atk, skipped = steps[i]
        label = f"{i + 1}:{atk.name}"
        if st.batch == 0:
            st.begin_attack()
        idx = st.start_robust.nonzero().squeeze(1)  # the points no earlier attack broke
        record.attack_begins(st, steps, i, label, len(idx))
        for j in range(st.batch * batch_size, 0 if skipped else len(idx), batch_size):
            b = idx[j:j + batch_size]
            res = atk(attacked, x[b].to(device), y[b].to(device),
                      generator=generators(i, j // batch_size))
            broken, pred = _broken(model, res, y[b], repeats, reject, device,
                                   rejudge=view is not None)
            if not atk.targeted and repeats == 1:
                _confirm(st, atk.name, res.success.cpu(), broken)
            fold(st, b, broken, res, pred, label)
            st.batch = j // batch_size + 1
            record.batch_done(st)
        record.attack_done(st, steps[i], label, len(idx))
    return st


def _confirm(st: EvalState, name: str, reported: Tensor, broken: Tensor) -> None:
    """Flag (once) an attack whose reported successes the predictions do not confirm."""
    if torch.equal(reported, broken) or any(f["name"] == "prediction-mismatch"
                                            for f in st.flags):
        return
    st.flags.append({"name": "prediction-mismatch",
                     "message": f"{name} reported successes that the model's predictions on its "
                                "x_adv do not confirm (a randomised model, or an attack that "
                                "misreports)"})


def fold(st: EvalState, b: Tensor, broken: Tensor, res: AttackResult, pred: Tensor,
         label: str) -> None:
    """Fold one attacked batch (the points ``b``) into the worst case: each ``broken`` point
    stops being robust and keeps the attack's input, the prediction on it and ``label``;
    minimal norms keep the smallest found (NaN: unknown)."""
    bi = b[broken]
    st.robust[bi] = False
    st.x_adv[bi] = res.x_adv[broken.to(res.x_adv.device)].cpu()
    st.adv_pred[bi] = pred[broken]
    if res.min_norm is not None:
        st.min_norm[b] = torch.fmin(st.min_norm[b], res.min_norm.cpu().float())
    for s in bi.tolist():
        st.broken_by[s] = label


def _broken(model: nn.Module, res: AttackResult, y: Tensor, repeats: int, reject: bool,
            device: torch.device, rejudge: bool = False) -> tuple[Tensor, Tensor]:
    """Per point of an attacked batch: broken (bool, on the CPU), and the prediction on
    ``res.x_adv``. One prediction is the attack's own logits, which ``Attack.__call__``
    computed on ``res.x_adv``; with ``repeats > 1`` they are drawn again, and with
    ``rejudge`` (the attack saw a view of ``model``) made by ``model`` itself."""
    y = y.cpu()
    if repeats > 1 or rejudge:
        ok, pred = correct(model, res.x_adv, y, len(y), device, repeats, reject)
        return ~ok, pred
    pred = res.logits.argmax(1).cpu()
    return ~defended(pred, y, reject, res.logits.shape[1]), pred


def defended(pred: Tensor, y: Tensor, reject: bool, k: int) -> Tensor:
    """The prediction is the label, or a detector's rejection (the last of ``k`` classes)."""
    ok = pred == y
    return ok | (pred == k - 1) if reject else ok


def correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device,
            repeats: int, reject: bool = False) -> tuple[Tensor, Tensor]:
    """Per point: correct (or, with ``reject``, rejected by a detector: for adversarial
    inputs) in a strict majority of ``repeats`` predictions (bool, on the CPU), and the
    prediction of the first draw."""
    hits, first = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            votes = torch.zeros(len(xb), dtype=torch.long, device=device)
            for r in range(repeats):
                logits = check_logits(model(xb), len(xb))
                p = logits.argmax(1)
                votes += defended(p, yb, reject, logits.shape[1])
                if r == 0:
                    first.append(p.cpu())
            hits.append((2 * votes > repeats).cpu())
    return torch.cat(hits), torch.cat(first)


def batch_generator(seed: int, attack: int, batch: int, device: torch.device) -> torch.Generator:
    """One generator per (attack, batch): a resumed run draws what an uninterrupted one drew."""
    s = int(np.random.SeedSequence([seed, attack, batch]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(s)

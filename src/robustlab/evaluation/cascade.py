"""The cascade: robust accuracy as the per-sample worst case over a list of attacks.

For each attack, for each batch of the points no earlier attack broke: attack them, recompute
the model's predictions on the returned inputs (a strict majority of ``repeats`` predictions
on a randomised model) and fold the points broken into the worst case (:func:`fold`). A point
is robust only if it is classified correctly without attack and after every attack. Each check
also gives each point's fraction of correct predictions, which the state turns into the
probability that the point is judged robust (``EvalState.p_robust``: the spread of the result
over the model's randomness). The state
(:class:`~robustlab.evaluation.state.EvalState`) holds the worst case and where the cascade
stands, so an interrupted cascade continues at the batch it stopped at (a batch that runs out
of CUDA memory is attacked in halves within its step: :class:`Split`); the observer
(:class:`~robustlab.evaluation.record.EvalRecord`) times, logs and saves. ``evaluate``
(:mod:`robustlab.evaluation.run`) and the trainer's validation run this one function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from robustlab._validate import check_logits
from robustlab.attacks import Attack, AttackResult
from robustlab.attacks.losses import rejects
from robustlab.evaluation.adapt import Step
from robustlab.evaluation.record import EvalRecord
from robustlab.evaluation.state import EvalState, majority_chance

Generators = Callable[[int, int], torch.Generator]
log = logging.getLogger(__name__)


def run_cascade(
    model: nn.Module,
    steps: Sequence[Step],
    x: Tensor,
    y: Tensor,
    st: EvalState,
    *,
    batch_size: int,
    repeats: int,
    generators: Generators,
    record: EvalRecord,
    view: nn.Module | None = None,
) -> EvalState:
    """Run ``steps`` on ``model`` (in eval mode) from where ``st`` stands; ``x, y`` on the CPU.
    ``generators(i, j)``: the generator of attack ``i``'s batch ``j``. ``view``: the model as
    the attacks see it (:meth:`~robustlab.evaluation.adapt.Adaptation.view`; None: ``model``);
    predictions on their points are then made by ``model`` again. Returns ``st``, its worst
    case over every attack. A CUDA out-of-memory error in an attack call halves the points per
    call for the rest of that attack (:class:`Split`); the attack's record then holds
    ``oom_splits`` (errors caught) and ``oom_batch_size`` (points per call at its end;
    counted in this session: a resumed attack counts from where it resumed)."""
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
        split = Split(batch_size)
        for j in range(st.batch * batch_size, 0 if skipped else len(idx), batch_size):
            b = idx[j : j + batch_size]
            res = split.attack(
                atk, attacked, x[b].to(device), y[b].to(device), generators(i, j // batch_size)
            )
            broken, pred, fraction = _broken(
                model, res, y[b], repeats, reject, device, rejudge=view is not None
            )
            if not atk.targeted and repeats == 1:
                _confirm(st, atk.name, res.success.cpu(), broken)
            fold(st, b, broken, res, pred, label)
            st.p_robust[b] *= majority_chance(fraction, repeats)
            st.batch = j // batch_size + 1
            record.batch_done(st)
        record.attack_done(st, steps[i], label, len(idx))
        if split.splits:
            st.per_attack[-1].update(split.record())
    return st


class Split:
    """One attack's calls on its batches, halved on CUDA out-of-memory errors.

    A batch is attacked in chunks of at most ``limit`` points (at first the whole batch),
    in turn, with the batch's one generator, and the chunks' results are joined in order: the
    batch boundaries, hence the resumable state and the generator of each batch, stay those
    of a run without the error. An attack that treats each point on its own and draws no
    random numbers (PGD without random start, FGSM) gives the same result; a randomised one
    draws its numbers in another order on a split batch (still seeded). An out-of-memory
    error (``torch.cuda.OutOfMemoryError``) in a chunk frees the CUDA cache and halves
    ``limit`` for the rest of the attack; a chunk of one point that still does not fit
    re-raises, saying so. Any other error propagates unchanged.
    """

    def __init__(self, batch_size: int) -> None:
        self.limit = batch_size  #: points per attack call
        self.splits = 0  #: out-of-memory errors caught, each halving ``limit``

    def attack(
        self, atk: Attack, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> AttackResult:
        """``atk(model, x, y, generator=generator)``, in chunks that fit in memory."""
        parts, start = [], 0
        while start < len(x):
            stop, halve = start + self.limit, False
            try:
                parts.append(atk(model, x[start:stop], y[start:stop], generator=generator))
            except torch.cuda.OutOfMemoryError as err:
                if min(self.limit, len(x) - start) == 1:
                    raise torch.cuda.OutOfMemoryError(
                        f"{atk.name} runs out of CUDA memory on a single point ({err}); free "
                        "memory on the device (other processes, a smaller model) or evaluate "
                        "on the CPU (device 'cpu')"
                    ) from err
                halve = True  # outside the handler, which holds the failed call's tensors
            if halve:
                torch.cuda.empty_cache()
                self.limit = (min(self.limit, len(x) - start) + 1) // 2
                self.splits += 1
                log.warning(
                    "%s: CUDA out of memory; attacking %d points per call from now on",
                    atk.name,
                    self.limit,
                )
                continue
            start = stop
        return parts[0] if len(parts) == 1 else _joined(parts)

    def record(self) -> dict[str, int]:
        """What the attack's record holds of the splits (only where there were some)."""
        return {"oom_splits": self.splits, "oom_batch_size": self.limit}


def _joined(parts: Sequence[AttackResult]) -> AttackResult:
    """The results of consecutive chunks of one batch as one result."""

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    # every field, whatever its type: the required ones are tensors in every part
    joined: dict[str, Any] = {f.name: cat(f.name) for f in fields(AttackResult)}
    return AttackResult(**joined)


def _confirm(st: EvalState, name: str, reported: Tensor, broken: Tensor) -> None:
    """Flag (once) an attack whose reported successes the predictions do not confirm."""
    if torch.equal(reported, broken) or any(f["name"] == "prediction-mismatch" for f in st.flags):
        return
    st.flags.append(
        {
            "name": "prediction-mismatch",
            "message": f"{name} reported successes that the model's predictions on its "
            "x_adv do not confirm (a randomised model, or an attack that "
            "misreports)",
        }
    )


def fold(
    st: EvalState, b: Tensor, broken: Tensor, res: AttackResult, pred: Tensor, label: str
) -> None:
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


def _broken(
    model: nn.Module,
    res: AttackResult,
    y: Tensor,
    repeats: int,
    reject: bool,
    device: torch.device,
    rejudge: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per point of an attacked batch: broken (bool, on the CPU), the prediction on
    ``res.x_adv`` and the fraction of defended predictions (see :func:`judge`). One
    prediction is the attack's own logits, which ``Attack.__call__`` computed on
    ``res.x_adv``; with ``repeats > 1`` they are drawn again, and with ``rejudge`` (the
    attack saw a view of ``model``) made by ``model`` itself."""
    y = y.cpu()
    if repeats > 1 or rejudge:
        ok, pred, fraction = judge(model, res.x_adv, y, len(y), device, repeats, reject)
        return ~ok, pred, fraction
    pred = res.logits.argmax(1).cpu()
    ok = defended(pred, y, reject, res.logits.shape[1])
    return ~ok, pred, ok.double()


def defended(pred: Tensor, y: Tensor, reject: bool, k: int) -> Tensor:
    """The prediction is the label, or a detector's rejection (the last of ``k`` classes)."""
    ok = pred == y
    return ok | (pred == k - 1) if reject else ok


class Judgement(NamedTuple):
    """The outcome of :func:`judge`, per point (on the CPU)."""

    ok: Tensor  #: correct (or defended) in a strict majority of the predictions (bool)
    pred: Tensor  #: the prediction of the first draw (long)
    fraction: Tensor  #: the fraction of the predictions that were correct, in [0, 1] (float64)


def judge(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    device: torch.device,
    repeats: int,
    reject: bool = False,
) -> Judgement:
    """Predict each point ``repeats`` times: correct (or, with ``reject``, rejected by a
    detector: for adversarial inputs) in a strict majority of them, the first prediction,
    and the fraction correct (its plug-in probability of a majority:
    :func:`~robustlab.evaluation.state.majority_chance`)."""
    hits, first, fractions = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            votes = torch.zeros(len(xb), dtype=torch.long, device=device)
            for r in range(repeats):
                logits = check_logits(model(xb), len(xb))
                p = logits.argmax(1)
                votes += defended(p, yb, reject, logits.shape[1])
                if r == 0:
                    first.append(p.cpu())
            hits.append((2 * votes > repeats).cpu())
            fractions.append(votes.cpu().double() / repeats)
    return Judgement(torch.cat(hits), torch.cat(first), torch.cat(fractions))


def correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    device: torch.device,
    repeats: int,
    reject: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`judge` without the fractions: per point correct in a strict majority of
    ``repeats`` predictions (bool, on the CPU), and the prediction of the first draw."""
    ok, pred, _ = judge(model, x, y, batch_size, device, repeats, reject)
    return ok, pred


def batch_generator(seed: int, attack: int, batch: int, device: torch.device) -> torch.Generator:
    """One generator per (attack, batch): a resumed run draws what an uninterrupted one drew."""
    s = int(np.random.SeedSequence([seed, attack, batch]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(s)

"""The resumable evaluation state: where a cascade stands, saved after attack batches.

One safetensors file (``eval_state.safetensors`` in the results directory), replaced atomically:
the per-sample tensors (robust mask, worst-case inputs, predictions, minimal norms, the robust
mask at the start of the current attack, the probabilities of being judged correct and robust
(:func:`majority_chance`)) and, in its header, the JSON state (which attack, how
far into its batches, the finished attacks' records, the fingerprint of the run). An interrupted
``evaluate(..., out=DIR)`` called again with the same model, data and settings continues from
there and gives the result an uninterrupted run gives; different settings raise instead of
mixing two evaluations.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from robustlab._io import atomic_path

FILENAME = "eval_state.safetensors"
_KEY = "robustlab_eval_state"


def majority_chance(fraction: Tensor, repeats: int) -> Tensor:
    """Per point, the probability that a strict majority of ``repeats`` independent predictions
    is correct, were each correct with probability ``fraction`` (the fraction of the point's
    ``repeats`` predictions that were correct: a plug-in estimate): P(Binomial(repeats,
    fraction) > repeats / 2), float64. 0 or 1 where ``fraction`` is (a deterministic model,
    one prediction per point)."""
    q = fraction.double().unsqueeze(1)
    k = torch.arange(repeats // 2 + 1, repeats + 1, dtype=torch.float64)
    ways = torch.tensor([math.comb(repeats, int(i)) for i in k], dtype=torch.float64)
    return (ways * q**k * (1 - q) ** (repeats - k)).sum(1)


def fingerprint(model: torch.nn.Module, x: Tensor, y: Tensor, settings: dict[str, Any]) -> str:
    """SHA-256 over the model's weights, the data and the JSON settings of the run."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in [x, y, *(v for _, v in sorted(model.state_dict().items()))]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class EvalState:
    """Per-sample worst case so far (updated by :func:`robustlab.evaluation.cascade.fold`),
    the position in the cascade, and the flags the attacks raised so far.

    ``p_clean``: per point (float64), the probability that the clean check judges it correct,
    ``p_robust``: that the clean check and the check after every attack run on it so far judge
    it correct (the product of their :func:`majority_chance`; each check's own plug-in
    estimate). Both are the 0/1 outcomes on a deterministic model; they give the spread of the
    accuracies over the model's randomness (:func:`~robustlab.evaluation.results.spread`)."""

    robust: Tensor
    x_adv: Tensor
    adv_pred: Tensor
    min_norm: Tensor
    start_robust: Tensor
    broken_by: list[str | None]
    p_clean: Tensor
    p_robust: Tensor
    attack: int = 0
    batch: int = 0
    per_attack: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    attack_time_s: float = 0.0

    @classmethod
    def fresh(
        cls,
        clean: Tensor,
        pred: Tensor,
        x: Tensor,
        fraction: Tensor | None = None,
        repeats: int = 1,
    ) -> EvalState:
        """The state before the first attack: the clean-correct points robust, each point's
        worst case its clean input and prediction, minimal norms unknown (NaN) but 0 for the
        points misclassified without attack. ``fraction``: per point, the fraction of the clean
        check's ``repeats`` predictions that were correct
        (:func:`~robustlab.evaluation.cascade.judge`); None where the check made one
        prediction per point (its outcome ``clean`` is then all there is)."""
        p = clean.double() if fraction is None else majority_chance(fraction, repeats)
        return cls(
            robust=clean.clone(),
            x_adv=x.clone(),
            adv_pred=pred.clone(),
            min_norm=torch.where(clean, math.nan, 0.0),
            start_robust=clean.clone(),
            broken_by=[None if r else "clean" for r in clean.tolist()],
            p_clean=p,
            p_robust=p.clone(),
        )

    def begin_attack(self) -> None:
        self.start_robust = self.robust.clone()
        self.batch = 0
        self.attack_time_s = 0.0

    def end_attack(self, record: dict[str, Any]) -> None:
        self.per_attack.append(record)
        self.attack += 1
        self.batch = 0

    def save(self, path: Path, fp: str, attack_time_s: float = 0.0) -> None:
        """``attack_time_s``: time spent so far on the current, unfinished attack."""
        header = {
            "fingerprint": fp,
            "attack": self.attack,
            "batch": self.batch,
            "per_attack": self.per_attack,
            "flags": self.flags,
            "broken_by": self.broken_by,
            "elapsed_s": self.elapsed_s,
            "attack_time_s": attack_time_s,
        }
        tensors = {
            "robust": self.robust,
            "x_adv": self.x_adv.contiguous(),
            "adv_pred": self.adv_pred,
            "min_norm": self.min_norm,
            "start_robust": self.start_robust,
            "p_clean": self.p_clean,
            "p_robust": self.p_robust,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: Path, fp: str) -> EvalState:
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads(f.metadata()[_KEY])
            t = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise ValueError(
                f"cannot resume: {path} is not a valid robustlab evaluation state "
                f"({e}); delete it to start over"
            ) from None
        if header["fingerprint"] != fp:
            raise ValueError(
                f"cannot resume: {path} belongs to another evaluation (different model, data, "
                "threat model, attacks, seed or batch size); delete it to start over, pass "
                "resume=False (CLI: --restart), or write to another directory"
            )
        if "p_robust" not in t or "p_clean" not in t:
            raise ValueError(
                f"cannot resume: {path} was written by an older robustlab, without the "
                "per-point probabilities the spread of the result needs; delete it to start "
                "over or pass resume=False (CLI: --restart)"
            )
        return cls(
            robust=t["robust"],
            x_adv=t["x_adv"],
            adv_pred=t["adv_pred"],
            min_norm=t["min_norm"],
            start_robust=t["start_robust"],
            p_clean=t["p_clean"],
            p_robust=t["p_robust"],
            broken_by=header["broken_by"],
            attack=header["attack"],
            batch=header["batch"],
            per_attack=header["per_attack"],
            flags=header["flags"],
            elapsed_s=header["elapsed_s"],
            attack_time_s=header["attack_time_s"],
        )

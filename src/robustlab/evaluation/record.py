"""The record of a run, as one observer: what a run leaves besides its computation.

:class:`RunLog` is a run's append-only JSONL log (one object a line, flushed line by line), its
optional TensorBoard scalars, which mirror the log, and its optional progress bar; the trainer
(:mod:`robustlab.training.trainer`) writes its epochs through one. :class:`EvalRecord` is the
evaluation's: besides its event log (``eval_log.jsonl``: start, one line per attack, end) and
its bar over the attack batches, it times the attacks, writes their per-attack records into
the state, saves the resumable state (:mod:`robustlab.evaluation.state`) after attack batches
and at the end the results. The cascade (:mod:`robustlab.evaluation.cascade`) calls it and
never writes or prints itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from robustlab._progress import append_jsonl
from robustlab.evaluation.adapt import Step
from robustlab.evaluation.results import EvalResult
from robustlab.evaluation.state import FILENAME, EvalState
from robustlab.threat import ThreatModel

log = logging.getLogger(__name__)
_SAVE_EVERY_S = 30.0  # the evaluation's state is saved after a batch at most this often
EVAL_LOG = "eval_log.jsonl"


class RunLog:
    """A run's JSONL log at ``path``, TensorBoard scalars in ``tensorboard`` and a progress bar
    (with ``progress``); each part is off where its argument is None / False.

    ``scalars`` maps one log record to ``(step, {tag: value})`` for TensorBoard. The writer
    is opened with ``purge_step=1``: TensorBoard discards the steps of earlier event files, and
    :meth:`open` writes the history again, so a resumed run shows each step once.
    """

    def __init__(self, path: Path | None = None, *, progress: bool = False,
                 tensorboard: Path | None = None,
                 scalars: Callable[[dict[str, Any]], tuple[int, dict[str, float]]] | None = None
                 ) -> None:
        self.path, self.progress = path, progress
        self.tensorboard, self.to_scalars = tensorboard, scalars
        self.bar: Any = None
        self.writer: Any = None

    def open(self, *, total: int, initial: int = 0, desc: str,
             history: Iterable[dict[str, Any]] = ()) -> None:
        """Start the bar over ``total`` units standing at ``initial``, and the TensorBoard
        writer holding the scalars of ``history``."""
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                            dynamic_ncols=True)
        if self.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard), purge_step=1)
            for rec in history:
                self._scalars(rec)

    def event(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` to the JSONL log."""
        if self.path is not None:
            append_jsonl(self.path, rec)

    def write(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` to the log and its scalars to TensorBoard."""
        self.event(rec)
        self._scalars(rec)

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        """Replace the log by ``records`` (a resumed run drops what its state does not hold)."""
        if self.path is not None:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in records)

    def _scalars(self, rec: dict[str, Any]) -> None:
        if self.writer is None or self.to_scalars is None:
            return
        step, values = self.to_scalars(rec)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def show(self, postfix: dict[str, str], *, desc: str | None = None,
             total: int | None = None, refresh: bool = True) -> None:
        """Set the bar's total, description and postfix (in this order)."""
        if self.bar is None:
            return
        if total is not None:
            self.bar.total = total
        if desc is not None:
            self.bar.set_description(desc, refresh=False)
        self.bar.set_postfix(postfix, refresh=refresh)

    def advance(self, postfix: dict[str, str]) -> None:
        """One unit done; the bar shows ``postfix``."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    @contextmanager
    def aside(self) -> Iterator[None]:
        """The bar cleared for the block (which may print) and drawn again after it."""
        if self.bar is not None:
            self.bar.clear()
        yield
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def batches_left(steps: Sequence[Step], i: int, attacked: int, batch_size: int) -> int:
    """Attack batches from the start of step ``i`` to the end of ``steps`` when its attack runs
    on ``attacked`` points: an upper bound, as each later attack runs on at most those
    (skipped attacks run none)."""
    return math.ceil(attacked / batch_size) * sum(s.skipped is None for s in steps[i:])


def _robust(st: EvalState) -> dict[str, str]:
    return {"robust": f"{100 * float(st.robust.float().mean()):.2f}%"}


class EvalRecord(RunLog):
    """The evaluation's observer; its clock starts when it is made. With ``out``: the event
    log ``out/eval_log.jsonl``, the state ``out/eval_state.safetensors`` (saved after a batch
    at most every :data:`_SAVE_EVERY_S` seconds and after every attack) and the results."""

    def __init__(self, out: str | Path | None, *, batch_size: int,
                 progress: bool = False) -> None:
        self.out = Path(out) if out is not None else None
        super().__init__(self.out / EVAL_LOG if self.out is not None else None,
                         progress=progress)
        self.state_path = self.out / FILENAME if self.out is not None else None
        self.batch_size = batch_size
        self.t_start = time.perf_counter()
        self.elapsed0 = 0.0  # seconds an interrupted run had spent before this one
        self.fp = ""
        self.t_attack = self.last_save = self.t_start

    def elapsed(self) -> float:
        """Seconds spent on the evaluation, earlier sessions of a resumed one included."""
        return self.elapsed0 + time.perf_counter() - self.t_start

    def resume(self, fp: str, resume: bool) -> EvalState | None:
        """The saved state of this evaluation (fingerprint ``fp``), if ``resume`` and there is
        one; ValueError if it belongs to another evaluation."""
        self.fp = fp
        if self.state_path is None or not resume or not self.state_path.exists():
            return None
        st = EvalState.load(self.state_path, fp)
        log.info("resuming the evaluation from %s (attack %d, batch %d)", self.state_path,
                 st.attack + 1, st.batch)
        return st

    def start(self, st: EvalState, steps: Sequence[Step], *, suite: str,
              threat: ThreatModel) -> None:
        self.elapsed0, self.last_save = st.elapsed_s, time.perf_counter()
        if self.progress:  # unit: attack batches, total: an upper bound that falls
            bs = self.batch_size
            done = sum(math.ceil(r["attacked"] / bs) for r in st.per_attack) + st.batch
            left = batches_left(steps, st.attack, int(st.start_robust.sum() if st.batch
                                                      else st.robust.sum()), bs)
            self.open(total=done + left - st.batch, initial=done, desc="attacks")
        self.event({"event": "start", "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "n": len(st.robust), "suite": suite, "threat": threat.to_dict(),
                    "attacks": [f"{k + 1}:{s.attack.name}" for k, s in enumerate(steps)],
                    "resumed": st.attack > 0 or st.batch > 0})

    def attack_begins(self, st: EvalState, steps: Sequence[Step], i: int, label: str,
                      attacked: int) -> None:
        self.t_attack = time.perf_counter()
        if self.bar is not None:
            total = self.bar.n - st.batch + batches_left(steps, i, attacked, self.batch_size)
            self.show(_robust(st), desc=label, total=total)

    def batch_done(self, st: EvalState) -> None:
        self.advance(_robust(st))
        if self.state_path is not None and time.perf_counter() - self.last_save > _SAVE_EVERY_S:
            st.elapsed_s = self.elapsed()
            st.save(self.state_path, self.fp, attack_time_s=time.perf_counter() - self.t_attack)
            self.last_save = time.perf_counter()

    def attack_done(self, st: EvalState, step: Step, label: str, attacked: int) -> None:
        """Close the attack in ``st`` with its per-attack record; log and save it."""
        atk, skipped = step
        record = {"attack": label, "config": atk.config(), "uses_gradients": atk.uses_gradients,
                  "attacked": 0 if skipped else attacked,
                  "broken": int((st.start_robust & ~st.robust).sum()),
                  "robust_accuracy": float(st.robust.float().mean()),
                  "time_s": st.attack_time_s + time.perf_counter() - self.t_attack}
        if skipped:
            record["skipped"] = skipped
        st.end_attack(record)
        st.elapsed_s = self.elapsed()
        keys = ("attack", "attacked", "broken", "robust_accuracy", "time_s", "skipped")
        self.event({"event": "attack", **{k: record[k] for k in keys if k in record},
                    "elapsed_s": st.elapsed_s})
        if self.state_path is not None:
            st.save(self.state_path, self.fp)
            self.last_save = time.perf_counter()

    def end(self, clean: torch.Tensor, st: EvalState) -> None:
        self.event({"event": "end", "clean_accuracy": float(clean.float().mean()),
                    "robust_accuracy": float(st.robust.float().mean()),
                    "total_s": self.elapsed()})
        self.close()

    def finish(self, result: EvalResult) -> None:
        """Save the results into ``out`` and remove the state they supersede."""
        if self.out is not None:
            result.save(self.out)
            if self.state_path is not None:
                self.state_path.unlink(missing_ok=True)

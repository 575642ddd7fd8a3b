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
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from robustlab._progress import append_jsonl
from robustlab.attacks import Attack
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

    def __init__(
        self,
        path: Path | None = None,
        *,
        progress: bool = False,
        tensorboard: Path | None = None,
        scalars: Callable[[dict[str, Any]], tuple[int, dict[str, float]]] | None = None,
    ) -> None:
        self.path, self.progress = path, progress
        self.tensorboard, self.to_scalars = tensorboard, scalars
        self.bar: Any = None
        self.writer: Any = None

    def open(
        self, *, total: int, initial: int = 0, desc: str, history: Iterable[dict[str, Any]] = ()
    ) -> None:
        """Start the bar over ``total`` units standing at ``initial``, and the TensorBoard
        writer holding the scalars of ``history``."""
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="batch",
                leave=False,
                dynamic_ncols=True,
            )
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

    def show(
        self,
        postfix: dict[str, str],
        *,
        desc: str | None = None,
        total: int | None = None,
        refresh: bool = True,
    ) -> None:
        """Set the bar's total, description and postfix (in this order)."""
        if self.bar is None:
            return
        if total is not None:
            self.bar.total = total
        if desc is not None:
            self.bar.set_description(desc, refresh=False)
        self.bar.set_postfix(postfix, refresh=refresh)

    def advance(self, postfix: dict[str, str], n: int = 1) -> None:
        """``n`` units done; the bar shows ``postfix``."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

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


def _units(c: dict[str, Any]) -> int:
    """Work per point of an attack from its config: see :func:`attack_units`."""
    if isinstance(c.get("attack"), dict):  # transfer: crafted on the surrogate, then replayed
        return _units(c["attack"]) + 1
    per = c.get("n_queries") or c.get("max_iters", 0) * c.get("population", 1) or c.get("steps", 1)
    # samples: noise draws per step, or VMI's neighbours (with beta) on top of the point itself
    samples = 1 + c["samples"] if "beta" in c and "samples" in c else (c.get("samples") or 1)
    return int(
        per
        * c.get("restarts", 1)
        * c.get("runs", 1)
        * c.get("n_target_classes", c.get("k", 1))
        * c.get("search_steps", 1)
        * samples
        * c.get("scales", 1)
    )


def attack_units(atk: Attack) -> int:
    """The work of ``atk`` on one point, the unit of the evaluation's progress bar: its
    iterations (gradient steps, or queries of a gradient-free attack; NAttack: iterations x
    population) x restarts x runs per restart (MD: 2) x target classes x binary-search steps x
    noise samples (VMI: 1 + its neighbours) x SI's scales x EOT draws (a transfer attack: its
    attack on the surrogate, plus one). An upper bound where the attack drops points once
    broken."""
    return max(1, _units(atk.config()) * (atk.eot_samples if atk.uses_gradients else 1))


def work_left(steps: Sequence[Step], i: int, attacked: int, done: int = 0) -> int:
    """Units of work from step ``i`` to the end of ``steps`` when its attack runs on
    ``attacked`` points of which ``done`` are done: an upper bound, as each later attack runs
    on at most those (skipped attacks run none)."""
    running = [attack_units(s.attack) if s.skipped is None else 0 for s in steps[i:]]
    return sum(running) * attacked - (running[0] * done if running else 0)


class Progress:
    """One progress bar over a run's work (:mod:`tqdm`, on stderr): attack steps x points for
    an evaluation (:func:`attack_units`), noise draws x points for a certification. Its total
    is the work done plus the work left, an upper bound that falls as attacks break points,
    so its rate and ETA count work, not batches of unequal cost. ``header``: a line written
    above the bar, saying what is about to run.

    A run of several evaluations (the audit) shares one: ``plan`` lists each evaluation's
    estimated work, in order; an evaluation that starts on it takes the first entry
    (:meth:`next_stage`), and the total counts the entries after it (:attr:`later`)."""

    def __init__(
        self,
        *,
        desc: str,
        total: int = 0,
        initial: int = 0,
        unit: str = "step",
        plan: Sequence[tuple[str, int]] = (),
        header: str | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        if header:
            log.info("%s", header)
            tqdm.write(header, file=sys.stderr)
        self.plan, self.later, self.stage = list(plan), 0, ""
        self.bar = tqdm(
            total=total + sum(u for _, u in self.plan),
            initial=initial,
            desc=desc,
            unit=unit,
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
        )

    def next_stage(self) -> str:
        """Take the first planned stage (its name; ``""`` if none is left)."""
        self.stage = self.plan.pop(0)[0] if self.plan else ""
        self.later = sum(u for _, u in self.plan)
        return self.stage

    def drop(self, name: str) -> None:
        """Forget the planned stages ``name`` (not run after all) and lower the total."""
        gone = sum(u for s, u in self.plan if s == name)
        self.plan = [(s, u) for s, u in self.plan if s != name]
        if self.bar.total is not None:  # always set here (None: tqdm's unknown total)
            self.bar.total -= gone

    def left(self, units: int) -> None:
        """The current stage has ``units`` of work left."""
        self.bar.total = self.bar.n + units + self.later

    @contextmanager
    def aside(self) -> Iterator[None]:
        """The bar cleared for the block (which may print) and drawn again after it."""
        self.bar.clear()
        yield
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _robust(st: EvalState) -> dict[str, str]:
    return {"robust": f"{100 * float(st.robust.float().mean()):.2f}%"}


class EvalRecord(RunLog):
    """The evaluation's observer; its clock starts when it is made. With ``out``: the event
    log ``out/eval_log.jsonl``, the state ``out/eval_state.safetensors`` (saved after a batch
    at most every :data:`_SAVE_EVERY_S` seconds and after every attack) and the results."""

    def __init__(
        self, out: str | Path | None, *, batch_size: int, progress: bool | Progress = False
    ) -> None:
        self.out = Path(out) if out is not None else None
        super().__init__(
            self.out / EVAL_LOG if self.out is not None else None, progress=bool(progress)
        )
        #: the bar shared with the run around this evaluation (the audit's), else None
        self.shared = progress if isinstance(progress, Progress) else None
        self.meter: Progress | None = None
        self.units = self.attacked = 0  # the current attack's work per point, its points
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
        log.info(
            "resuming the evaluation from %s (attack %d, batch %d)",
            self.state_path,
            st.attack + 1,
            st.batch,
        )
        return st

    def start(
        self, st: EvalState, steps: Sequence[Step], *, suite: str, threat: ThreatModel
    ) -> None:
        self.elapsed0, self.last_save = st.elapsed_s, time.perf_counter()
        if self.progress:
            self._open_bar(st, steps, suite, threat)
        self.event(
            {
                "event": "start",
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "n": len(st.robust),
                "suite": suite,
                "threat": threat.to_dict(),
                "attacks": [f"{k + 1}:{s.attack.name}" for k, s in enumerate(steps)],
                "resumed": st.attack > 0 or st.batch > 0,
            }
        )

    def attack_begins(
        self, st: EvalState, steps: Sequence[Step], i: int, label: str, attacked: int
    ) -> None:
        self.t_attack = time.perf_counter()
        self.units = attack_units(steps[i].attack) if steps[i].skipped is None else 0
        self.attacked = attacked
        if self.meter is not None:
            self.meter.left(
                work_left(steps, i, attacked, min(st.batch * self.batch_size, attacked))
            )
            stage = f"{self.meter.stage}: " if self.meter.stage else ""
            self.show(_robust(st), desc=stage + label)

    def batch_done(self, st: EvalState) -> None:
        if self.bar is not None:
            points = min(self.batch_size, self.attacked - (st.batch - 1) * self.batch_size)
            self.advance(_robust(st), n=self.units * points)
        if self.state_path is not None and time.perf_counter() - self.last_save > _SAVE_EVERY_S:
            st.elapsed_s = self.elapsed()
            st.save(self.state_path, self.fp, attack_time_s=time.perf_counter() - self.t_attack)
            self.last_save = time.perf_counter()

    def attack_done(self, st: EvalState, step: Step, label: str, attacked: int) -> None:
        """Close the attack in ``st`` with its per-attack record; log and save it."""
        atk, skipped = step
        record = {
            "attack": label,
            "config": atk.config(),
            "uses_gradients": atk.uses_gradients,
            "attacked": 0 if skipped else attacked,
            "broken": int((st.start_robust & ~st.robust).sum()),
            "robust_accuracy": float(st.robust.float().mean()),
            "time_s": st.attack_time_s + time.perf_counter() - self.t_attack,
        }
        if skipped:
            record["skipped"] = skipped
        st.end_attack(record)
        st.elapsed_s = self.elapsed()
        keys = ("attack", "attacked", "broken", "robust_accuracy", "time_s", "skipped")
        self.event(
            {
                "event": "attack",
                **{k: record[k] for k in keys if k in record},
                "elapsed_s": st.elapsed_s,
            }
        )
        if self.state_path is not None:
            st.save(self.state_path, self.fp)
            self.last_save = time.perf_counter()

    def end(self, clean: torch.Tensor, st: EvalState) -> None:
        self.event(
            {
                "event": "end",
                "clean_accuracy": float(clean.float().mean()),
                "robust_accuracy": float(st.robust.float().mean()),
                "total_s": self.elapsed(),
            }
        )
        if self.shared is not None:
            self.bar = None  # the run around this evaluation closes it
        self.close()

    def _open_bar(
        self, st: EvalState, steps: Sequence[Step], suite: str, threat: ThreatModel
    ) -> None:
        """The bar over the attacks' work (:func:`attack_units` x points), standing at the work
        done if the run resumes; the evaluation's own with a header line, or the shared one."""
        attacked = int(st.start_robust.sum() if st.batch else st.robust.sum())
        current = min(st.batch * self.batch_size, attacked)  # points done of the current attack
        left = work_left(steps, st.attack, attacked, current)
        done = (
            sum(
                attack_units(s.attack) * r["attacked"]  # finished attacks, current's part
                for s, r in zip(steps, st.per_attack, strict=False)
            )
            + work_left(steps, st.attack, attacked)
            - left
        )
        if self.shared is not None:
            self.meter = self.shared
            self.meter.next_stage()
        else:
            lo, hi = threat.bounds
            names = ", ".join(
                f"{k + 1}:{s.attack.name}" for k, s in enumerate(steps) if s.skipped is None
            )
            self.meter = Progress(
                desc="attacks",
                total=done + left,
                initial=done,
                header=(
                    f"evaluate: {len(st.robust)} points ({int(st.robust.sum())} to attack), "
                    f"{threat.norm} eps {threat.eps:g} in [{lo:g}, {hi:g}], suite {suite}: {names}"
                    + (" (resumed)" if done else "")
                ),
            )
        self.bar = self.meter.bar
        self.meter.left(left)

    def finish(self, result: EvalResult) -> None:
        """Save the results into ``out`` and remove the state they supersede."""
        if self.out is not None:
            result.save(self.out)
            if self.state_path is not None:
                self.state_path.unlink(missing_ok=True)

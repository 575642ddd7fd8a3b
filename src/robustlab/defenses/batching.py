"""The base model of randomised smoothing run at its best batch size, across inputs.

Two sizes are kept apart: ``draw``, the noisy rows made per call of
:func:`robustlab.noise.sample` (it fixes which noise a generator gives, so results for a given
seed depend on it), and ``batch``, the rows per forward of the base model, regrouped across
draws and inputs (it changes only the speed). A caller that gives a ``batch_size`` uses it for
both, which draws the noise exactly as before; one that gives none draws in chunks of
:data:`DRAW_CHUNK` (the former default, so results match ``batch_size=1000``) and forwards
:func:`best_batch_size` rows at a time. Used by :mod:`robustlab.defenses.certify`,
:mod:`robustlab.defenses.sequential` and :mod:`robustlab.evaluation.smoothing_curves`.

Models with weight noise (PNI/CNI, :func:`~robustlab.defenses.smoothing.shares_weight_noise`)
keep :func:`~robustlab.defenses.smoothing.noisy_logits`' draw-by-draw forwards, input by input.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab.defenses.smoothing import noisy_logits, shares_weight_noise
from robustlab.noise import sample

__all__ = ["CANDIDATES", "DRAW_CHUNK", "best_batch_size", "count_votes", "job_logits", "sizes"]

#: noisy rows per draw of the noise when the caller gives no batch_size (the former default)
DRAW_CHUNK = 1000
#: the batch sizes :func:`best_batch_size` times
CANDIDATES = (16, 32, 64, 128, 256, 512, 1024, 2048)
#: measure only for at least this many times the rows the measurement itself forwards
_WORTH = 10
_CHOSEN: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()

#: a job: inputs (n, ...), noisy copies per input, the generator they are drawn from
Job = tuple[Tensor, int, "torch.Generator | None"]


def best_batch_size(model: nn.Module, like: Tensor, rows: int, fallback: int) -> int:
    """The rows per forward at which ``model`` runs fastest per row on inputs shaped like
    ``like[0]``: one forward of each size in :data:`CANDIDATES` (at most ``rows``), timed twice
    after a warm-up, the fewest seconds per row wins. The choice is cached for the process per
    (model, input shape, dtype, device). A job of fewer than ``10 x`` the measured rows
    (about 82,000 rows for all candidates) is not worth measuring: it gets the cached choice,
    else ``fallback``. The model runs in eval mode without gradients (its mode is restored);
    the measurement draws no random numbers."""
    key = (tuple(like.shape[1:]), like.dtype, like.device)
    chosen = _CHOSEN.get(model, {})
    if key in chosen:
        return chosen[key]
    sizes_ = [c for c in CANDIDATES if c <= rows]
    if len(sizes_) < 2 or rows < _WORTH * 2 * sum(sizes_):
        return fallback
    best, best_rate = fallback, float("inf")
    with torch.no_grad(), eval_mode(model):
        model(like[:1])  # warm-up
        for size in sizes_:
            xs = like[:1].expand(size, *like.shape[1:]).contiguous()
            try:
                seconds = min(_timed(model, xs) for _ in range(2))
            except torch.cuda.OutOfMemoryError:
                break
            if seconds / size < best_rate:
                best, best_rate = size, seconds / size
    _CHOSEN.setdefault(model, {})[key] = best
    return best


def _timed(model: nn.Module, xs: Tensor) -> float:
    t0 = time.perf_counter()
    out = model(xs)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return time.perf_counter() - t0


def sizes(model: nn.Module, x: Tensor, rows: int, batch_size: int | None) -> tuple[int, int]:
    """``(draw, batch)`` for a job of ``rows`` noisy rows of inputs like ``x``: both
    ``batch_size`` when given, else :data:`DRAW_CHUNK` and :func:`best_batch_size`."""
    if batch_size is not None:
        return batch_size, batch_size
    return DRAW_CHUNK, best_batch_size(model, x, rows, DRAW_CHUNK)


def _noisy_chunks(
    x: Tensor,
    samples: int,
    offset: int,
    sigma: float,
    noise: str,
    draw: int,
    generator: torch.Generator | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(owners, x[rows] + noise)`` in chunks of ``draw`` of the ``len(x) * samples`` rows,
    input by input, drawn as :func:`~robustlab.defenses.smoothing.noisy_logits` draws them;
    ``owners`` = ``offset`` + the input's index."""
    total = len(x) * samples
    for start in range(0, total, draw):
        rows = torch.arange(start, min(start + draw, total), device=x.device) // samples
        xi = x[rows]
        yield rows + offset, xi + sample(xi, noise, sigma, generator)


def _forwards(
    model: nn.Module, chunks: Iterable[tuple[Tensor, Tensor]], batch: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(owners, logits)`` of the chunks' rows, in order, ``batch`` rows per forward (the
    last takes the rest); a CUDA out-of-memory error halves ``batch`` for the rest."""
    owners: list[Tensor] = []
    parts: list[Tensor] = []
    held = 0
    for own, xs in chunks:
        owners.append(own)
        parts.append(xs)
        held += len(own)
        while held >= batch:
            if len(parts) > 1:
                owners, parts = [torch.cat(owners)], [torch.cat(parts)]
            try:
                logits = model(parts[0][:batch])
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                continue
            yield owners[0][:batch], logits
            owners, parts = [owners[0][batch:]], [parts[0][batch:]]
            held -= batch
    if held:
        yield torch.cat(owners), model(torch.cat(parts))


def job_logits(
    model: nn.Module, jobs: Iterable[Job], *, sigma: float, noise: str, draw: int, batch: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(owners, logits)`` for every noisy row of ``jobs`` (taken lazily, in order): a job
    ``(x, samples, generator)`` draws ``samples`` copies of each input of ``x`` from its
    generator, in chunks of ``draw`` rows, input by input; its rows' ``owners`` number the
    jobs' inputs consecutively (the first job's inputs are 0..len(x)-1, the next job's follow).
    The base model sees ``batch`` rows per forward, across jobs (draw by draw, job by job for a
    model with weight noise). Call it without gradients and in eval mode."""
    numbered = _numbered(jobs)
    if shares_weight_noise(model):
        return (
            (rows + off, logits)
            for off, (x, k, gen) in numbered
            for rows, logits in noisy_logits(model, x, k, sigma, noise, draw, gen)
        )
    chunks = (
        c
        for off, (x, k, gen) in numbered
        for c in _noisy_chunks(x, k, off, sigma, noise, draw, gen)
    )
    return _forwards(model, chunks, batch)


def _numbered(jobs: Iterable[Job]) -> Iterator[tuple[int, Job]]:
    """Each job with the owner number of its first input."""
    offset = 0
    for job in jobs:
        yield offset, job
        offset += len(job[0])


def count_votes(stream: Iterator[tuple[Tensor, Tensor]], owners: int) -> Tensor:
    """(owners, K) int64: the argmax votes of a :func:`job_logits` stream, per owner."""
    counts: Tensor | None = None
    for rows, logits in stream:
        if counts is None:
            counts = torch.zeros(owners, logits.shape[1], dtype=torch.long, device=rows.device)
        counts.index_put_((rows, logits.argmax(1)), torch.ones_like(rows), accumulate=True)
    assert counts is not None
    return counts

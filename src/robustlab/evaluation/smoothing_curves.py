"""Smoothing curves: the accuracy of a smoothed classifier against the number of noise draws n
and the noise scale sigma, for each voting rule of :class:`robustlab.defenses.Smoothing`.

Every ``(sigma, n, vote)`` of one sigma is decided from the same ``max(n)`` draws per input: a
smaller n uses the first n of them, so the curve over n shows how the decision settles as
draws are added rather than the scatter between independent runs. The draws come from the
sampler of :class:`~robustlab.defenses.Smoothing`, and the votes follow its rules (soft vote on
probabilities; a tied vote goes to the tied class with the highest mean probability), so a
point of the curve is the accuracy that ``Smoothing(model, sigma=sigma, samples=n, vote=vote)``
has on the inputs. Each sigma's noise starts from a generator seeded with ``seed``: Gaussian
curves at different sigmas share the same standard-normal draws, scaled (common random numbers),
and a sigma's row does not depend on which other sigmas are listed. At sigma 0 a deterministic
model needs one draw (every n and vote is then its plain prediction); a randomised model (one
that declares itself randomised or whose two forward passes differ, e.g. PNI/CNI weight
noise, which draws from torch's global generator) gets ``max(n)`` draws there too.

The result is written as data (``smoothing.json``) for a report to plot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._io import atomic_write
from robustlab._provenance import git_commit, versions
from robustlab._validate import check_inputs, check_labels, integer, positive_int, probe_model
from robustlab.defenses.batching import DRAW_CHUNK, job_logits, sizes
from robustlab.defenses.smoothing import VOTES
from robustlab.evaluation.checks import randomised_output
from robustlab.noise import check_noise
from robustlab.threat import ThreatModel

__all__ = ["FILE", "SCHEMA", "draw_logits", "smoothing_curves", "vote_decisions"]

SCHEMA = "robustlab.smoothing/1"
FILE = "smoothing.json"
#: at most this many logits (inputs x draws x classes) are held at once
_MAX_LOGITS = 1 << 24


def draw_logits(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    draws: int,
    generator: torch.Generator | None = None,
    *,
    noise: str = "gaussian",
    batch_size: int | None = 1024,
) -> Tensor:
    """The base model's logits on ``draws`` noisy copies of each input, shape (N, draws, K):
    ``out[i, d] = model(x[i] + delta_id)``, without gradients.

    The noise comes from the sampler of :class:`~robustlab.defenses.Smoothing`
    (:func:`~robustlab.defenses.smoothing.noisy_logits`, ``batch_size`` noisy rows per
    forward) drawn from ``generator`` (torch's global generator when None), so ``out[i]`` holds
    the draws that ``Smoothing(model, sigma, samples=draws, noise=noise,
    batch_size=batch_size)`` votes over with the same generator, in the order they were drawn
    (input by input, or draw by draw for a model with weight noise). ``batch_size=None``: the
    noise is drawn as with ``batch_size=1000`` and the model sees the rows at its measured best
    batch size (:mod:`robustlab.defenses.batching`; only the speed differs)."""
    check_noise(noise, sigma)
    draws = positive_int(draws, "draws")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    n = len(x)
    draw, batch = sizes(model, x, n * draws, batch_size)
    out: Tensor | None = None
    filled = torch.zeros(n, dtype=torch.long, device=x.device)
    with torch.no_grad():
        for rows, logits in job_logits(
            model, [(x, draws, generator)], sigma=sigma, noise=noise, draw=draw, batch=batch
        ):
            if out is None:
                out = logits.new_empty(n, draws, logits.shape[1])
            # the how-many-th occurrence of its input each row is within this chunk
            order = torch.argsort(rows, stable=True)
            counts = torch.bincount(rows, minlength=n)
            first = counts.cumsum(0) - counts
            seen = torch.empty_like(rows)
            seen[order] = torch.arange(len(rows), device=rows.device) - first[rows[order]]
            out[rows, filled[rows] + seen] = logits
            filled += counts
    assert out is not None and bool((filled == draws).all())
    return out


def vote_decisions(logits: Tensor, n: int, votes: Sequence[str] = VOTES) -> dict[str, Tensor]:
    """Each vote's decision, (N,) class indices, from the first ``n`` draws of ``logits``
    (N, draws, K), by the rules of :class:`~robustlab.defenses.Smoothing`: ``"prediction"``
    (majority of the draws' argmax), ``"soft"`` (argmax of the mean softmax probability) and
    ``"weighted"`` (the class at rank r of a draw gets ``2^-r``); a tied vote goes to the tied
    class with the highest mean probability (then to the lowest index). Returns
    ``{vote: decisions}`` in the order of ``votes``."""
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (N, draws, K), got {shape}")
    try:
        integer(n, "n", minimum=1, maximum=logits.shape[1])
    except ValueError:
        raise ValueError(
            f"n must be an integer in 1..{logits.shape[1]} (the draws in logits), got {n!r}"
        ) from None
    votes = _votes(votes)
    sub = logits[:, :n]
    k = sub.shape[-1]
    mean_prob = F.softmax(sub, -1).mean(1)

    def decide(counts: Tensor) -> Tensor:
        top = counts == counts.amax(1, keepdim=True)
        return mean_prob.masked_fill(~top, -1.0).argmax(1)

    out = {}
    for vote in votes:
        if vote == "prediction":
            out[vote] = decide(F.one_hot(sub.argmax(-1), k).sum(1).float())
        elif vote == "soft":
            out[vote] = mean_prob.argmax(1)
        else:
            rank = sub.argsort(-1, descending=True).argsort(-1)
            out[vote] = decide(torch.exp2(-rank.float()).sum(1))
    return out


def _votes(votes: Any) -> list[str]:
    votes = _as_list(votes, "votes", "['prediction', 'soft']")
    for vote in votes:
        if vote not in VOTES:
            raise ValueError(f"unknown vote {vote!r}; valid votes are: {', '.join(VOTES)}")
    return list(dict.fromkeys(votes))


def _as_list(values: Any, what: str, example: str) -> list[Any]:
    if isinstance(values, str | bytes | Tensor) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a list, e.g. {example}, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{what} is empty: give at least one, e.g. {example}")
    return values


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def smoothing_curves(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    sigmas: Sequence[float],
    samples: Sequence[int],
    votes: Sequence[str] = VOTES,
    noise: str = "gaussian",
    batch_size: int | None = 1024,
    seed: int = 0,
    out: str | Path | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """Accuracy of the smoothed ``model`` on ``x`` (N, C, H, W) in ``bounds`` (the input box,
    checked as by every entry point; default [0, 1]) with labels ``y`` (N,)
    for every noise scale of ``sigmas``, number of draws of ``samples`` and voting rule of
    ``votes`` (see the module docstring for how the draws are shared).

    Args:
        model: the base classifier, run in the mode it is in (pass ``model.eval()``).
        sigmas: noise scales in input units, each finite and >= 0 (sorted, duplicates dropped).
        samples: numbers of draws n, each an integer >= 1 (sorted, duplicates dropped).
        votes: voting rules of :class:`~robustlab.defenses.Smoothing` (default: all three).
        noise: ``"gaussian"`` or ``"laplace"`` (scale sigma).
        batch_size: noisy rows per forward pass of the model. Default 1024. None: measured
            (:mod:`robustlab.defenses.batching`), the noise drawn as with 1000.
        seed: seeds each sigma's noise generator (on ``x``'s device).
        out: directory to write ``smoothing.json`` to (created); None writes nothing.
        config: extra JSON-able context for the record (checkpoint, data set, ...); its keys
            may not repeat the function's own.
        progress: show a progress bar over the inputs of each sigma.

    Returns:
        The record written to ``out/smoothing.json``: ``schema`` (``"robustlab.smoothing/1"``),
        ``created``, ``config`` (``sigmas``, ``samples``, ``votes``, ``noise``, ``seed``,
        ``batch_size``, ``n`` (points) and ``config``'s entries), ``base_accuracy`` (the model's
        accuracy on ``x`` without noise, one forward), ``random_model``, ``rows`` (one dict per
        ``(sigma, samples, vote)``, sigma-major: ``sigma``, ``samples``, ``vote``, ``accuracy``
        (a fraction in [0, 1]) and ``n`` (points)), ``versions``, ``commit`` and ``seconds``.

    Cost: ``N * max(samples)`` forward rows per sigma > 0 (the smaller n come free).
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_inputs(x, y, ThreatModel("l2", 0.0, bounds))
    cfg = _settings(sigmas, samples, votes, noise, seed, batch_size, len(x), config)
    probe = probe_model(model, x[:8])
    check_labels(y, probe.shape[1])
    random_model = randomised_output(model, x[:8], probe) is not None
    base_accuracy = _accuracy(model, x, y, cfg["batch_size"] or DRAW_CHUNK)
    rows = _rows(model, x, y, cfg, probe.shape[1], random_model, progress)
    record = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg,
        "base_accuracy": base_accuracy,
        "random_model": random_model,
        "rows": rows,
        "versions": versions(),
        "commit": git_commit(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        atomic_write(Path(out) / FILE, json.dumps(record, indent=2, allow_nan=False))
    return record


def _settings(
    sigmas: Any,
    samples: Any,
    votes: Any,
    noise: str,
    seed: Any,
    batch_size: Any,
    n: int,
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    """The checked, normalised settings of :func:`smoothing_curves` (sigmas and samples sorted
    and unique), with the caller's ``config`` entries added."""
    sigma_list = _as_list(sigmas, "sigmas", "[0, 0.12, 0.25, 0.5]")
    for sigma in sigma_list:
        check_noise(noise, sigma)
    sample_list = _as_list(samples, "samples", "[1, 4, 16, 64]")
    for k in sample_list:
        positive_int(k, "every entry of samples")
    vote_list = _votes(votes)
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    seed = integer(seed, "seed")  # a wrong type raises OptionTypeError, a TypeError
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict of JSON-able entries, got {type(config).__name__}")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"config must hold JSON-able entries (str, numbers, lists, dicts): {err}"
        ) from None
    cfg: dict[str, Any] = {
        "sigmas": sorted({float(s) for s in sigma_list}),
        "samples": sorted(set(sample_list)),
        "votes": vote_list,
        "noise": noise,
        "seed": seed,
        "batch_size": batch_size,
        "n": n,
    }
    clash = sorted(set(config or {}) & set(cfg))
    if clash:
        raise ValueError(
            f"config may not set {', '.join(clash)}: they are recorded from the arguments"
        )
    return cfg | (config or {})


def _rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: dict[str, Any],
    k: int,
    random_model: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """One row per (sigma, samples, vote), sigma-major: the smoothed accuracy on ``x``."""
    sample_list, vote_list = cfg["samples"], cfg["votes"]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # loaded only when a bar is wanted, as in record.py

        bar = tqdm(
            total=len(cfg["sigmas"]) * len(x), desc="smoothing curves", unit="image", leave=False
        )
    rows = []
    try:
        for sigma in cfg["sigmas"]:
            draws = 1 if sigma == 0 and not random_model else sample_list[-1]
            gen = torch.Generator(device=x.device).manual_seed(cfg["seed"])
            correct = dict.fromkeys(((n, v) for n in sample_list for v in vote_list), 0)
            step = max(1, _MAX_LOGITS // (draws * k))
            for i in range(0, len(x), step):
                logits = draw_logits(
                    model,
                    x[i : i + step],
                    sigma,
                    draws,
                    gen,
                    noise=cfg["noise"],
                    batch_size=cfg["batch_size"],
                )
                for n in sample_list:
                    for vote, pred in vote_decisions(logits, min(n, draws), vote_list).items():
                        correct[n, vote] += int((pred == y[i : i + step]).sum())
                if bar is not None:
                    bar.update(len(logits))
            rows += [
                {
                    "sigma": sigma,
                    "samples": n,
                    "vote": vote,
                    "accuracy": correct[n, vote] / len(x),
                    "n": len(x),
                }
                for n in sample_list
                for vote in vote_list
            ]
    finally:
        if bar is not None:
            bar.close()
    return rows

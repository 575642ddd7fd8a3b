"""Training the denoiser of denoised smoothing: ``train_denoiser(denoiser, x_train, sigma=...,
epochs=..., out=...)``.

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020, https://arxiv.org/abs/2003.01908; reference code
github.com/microsoft/denoised-smoothing (``code/train_denoiser.py``). The architecture is
:class:`robustlab.models.dncnn.Denoiser`; the defense that puts it in front of a classifier is
:class:`robustlab.defenses.denoise.Denoised`. Use it as::

    den = Denoiser(in_channels=1)
    train_denoiser(den, x_train, sigma=0.25, epochs=20, out="runs/den")           # "mse"
    train_denoiser(den, x_train, sigma=0.25, classifier=f, objective="stab",
                   epochs=40, out="runs/den-stab")                                  # fine-tune
    model = robustlab.defenses.create("denoised", f, denoiser=den)
    smooth = robustlab.defenses.create("smoothing", model, sigma=0.25)

Objectives (``delta`` drawn fresh for every batch, ``x`` a clean training batch):

- ``"mse"``: ``mean ||D(x + delta) - x||^2`` over every pixel (no classifier needed). For
  Gaussian noise a denoiser that does nothing scores ``sigma^2``.
- ``"stab"`` (stability): ``CE(f(D(x + delta)), argmax f(x))`` with ``f`` frozen in eval mode:
  the labels are the classifier's own predictions on the clean inputs, so no true labels are
  needed; gradients flow through ``f`` into ``D``, and ``f``'s parameters stay untouched.

The paper's recipe, from its reference code [code checked]: Adam, lr 1e-3, weight decay 1e-4,
batch 256, 90 epochs, lr x 0.1 every 30 epochs; noise ``randn * sigma`` added without clipping;
``"denoising"`` (MSE), ``"stability"`` and ``"classification"`` (CE with the true labels)
objectives. Certified with sigma in {0.12, 0.25, 0.50, 1.00} on CIFAR-10 and {0.25, 0.50,
1.00} on ImageNet (the names of its released plots). That MSE pre-training followed by Stab
fine-tuning works best, and the settings of the fine-tuning run, are from the paper's text as
we recall it (unverified). Our differences: the learning rate is constant and there is no
weight decay; the ``"classification"`` objective is not offered.

Cost, per batch: ``"mse"`` one forward + backward of ``D``; ``"stab"`` that plus one forward +
backward of ``f`` (input gradients only, ``f``'s parameters get none) and one forward of ``f``
on the clean batch. One "mse" epoch of the default denoiser over 60,000 28x28 images takes
about 9 minutes on 2 CPU cores (measured: 19 s for 2,048 images).

Checkpoints: the weights are a model checkpoint (:func:`robustlab.models.save`, architecture
``"dncnn"``); the resumable state is the trainer's (:mod:`robustlab.training.state`). Training
is deterministic (one explicit ``torch.Generator``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import frozen
from robustlab._validate import integer, number, one_of, positive_int
from robustlab.models.dncnn import Denoiser
from robustlab.noise import check_noise, sample
from robustlab.training.state import RunFiles

__all__ = ["LOG_FILE", "OBJECTIVES", "STATE_FILE", "WEIGHTS_FILE", "train_denoiser"]

logger = logging.getLogger(__name__)

OBJECTIVES = ("mse", "stab")
WEIGHTS_FILE = "denoiser.safetensors"
STATE_FILE = "denoiser_state.safetensors"
LOG_FILE = "denoiser_log.jsonl"
RUN = RunFiles(WEIGHTS_FILE, LOG_FILE, STATE_FILE, "a denoiser")
#: the settings recorded in the denoiser checkpoint's sidecar
CHECKPOINT_META = ("sigma", "noise", "objective", "seed", "classifier")


def _check_images(x: Any, channels: int | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x_train must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"x_train must be float images in [0, 1], got {x.dtype}; convert "
            "8-bit images with x.float() / 255"
        )
    if x.dim() != 4 or len(x) == 0:
        raise ValueError(
            f"x_train must be a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"x_train has {x.shape[1]} channels but the denoiser takes {channels}; "
            f"build Denoiser(in_channels={x.shape[1]})"
        )
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(
            "x_train must hold finite clean images in [0, 1] (the noise is added "
            "during training; do not pass noisy images)"
        )


def _config(
    denoiser: Any,
    x_train: Any,
    out: Any,
    sigma: Any,
    noise: str,
    objective: str,
    classifier: Any,
    epochs: Any,
    batch_size: Any,
    lr: Any,
    seed: Any,
) -> dict[str, Any]:
    """The run's settings, as saved with its state, once every argument is checked."""
    check_noise(noise, sigma)
    if sigma == 0:
        raise ValueError(
            "sigma must be > 0: a denoiser is trained for the noise scale that "
            "smoothing will use (e.g. 0.25)"
        )
    one_of(objective, "objective", OBJECTIVES)
    if objective == "stab" and classifier is None:
        raise ValueError(
            "objective 'stab' needs classifier=<the frozen classifier>; use "
            "objective='mse' to train without one"
        )
    if objective == "mse" and classifier is not None:
        raise ValueError(
            "objective 'mse' uses no classifier: drop classifier=..., or pass "
            "objective='stab' to train for it"
        )
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    number(lr, "lr", low=0, low_open=True)
    integer(seed, "seed", minimum=0)
    if not isinstance(denoiser, nn.Module):
        raise TypeError(f"denoiser must be an nn.Module, got {type(denoiser).__name__}")
    if out is not None and not isinstance(denoiser, Denoiser):
        raise TypeError(
            "checkpoints (out=...) need a robustlab Denoiser, whose architecture can be recorded"
        )
    _check_images(x_train, getattr(denoiser, "in_channels", None))
    if next(denoiser.parameters(), None) is None:
        raise ValueError("the denoiser has no parameters to train")
    return {
        "architecture": getattr(denoiser, "robustlab_arch", None),
        "sigma": float(sigma),
        "noise": noise,
        "objective": objective,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "x_train_shape": list(x_train.shape),
        "classifier": type(classifier).__name__ if classifier is not None else None,
    }


def noisy_reconstruction_epoch(
    denoiser: nn.Module,
    classifier: nn.Module | None,
    x_train: Tensor,
    objective: str,
    sigma: float,
    noise: str,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, float]:
    """One epoch of training ``denoiser`` to undo ``noise`` of scale ``sigma`` on ``x_train``
    (shuffled by ``generator``, ``batch_size`` images a step): ``objective`` ``"mse"`` (the
    clean image) or ``"stab"`` (the frozen ``classifier``'s prediction on it). Returns the
    epoch's mean loss (and, with a classifier, its stab accuracy). Shared with the MagNet
    autoencoder's training (:mod:`robustlab.training.autoencoder`)."""
    order = torch.randperm(len(x_train), generator=generator)
    total = agree = 0.0
    for i in range(0, len(x_train), batch_size):
        x = x_train[order[i : i + batch_size]].to(device)
        out = denoiser(x + sample(x, noise, sigma, generator))
        if classifier is None:
            loss = F.mse_loss(out, x)
        else:
            with torch.no_grad():
                target = classifier(x).argmax(1)
            logits = classifier(out)
            loss = F.cross_entropy(logits, target)
            agree += (logits.argmax(1) == target).sum().item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"denoiser training loss became {loss.item()}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
    rec = {"loss": total / len(x_train)}
    if classifier is not None:
        rec["stab_accuracy"] = agree / len(x_train)
    return rec


def train_denoiser(
    denoiser: nn.Module,
    x_train: Tensor,
    *,
    sigma: float,
    epochs: int,
    classifier: nn.Module | None = None,
    objective: str = "mse",
    batch_size: int = 128,
    lr: float = 1e-3,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    noise: str = "gaussian",
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``denoiser`` (in place) to remove ``noise`` of scale ``sigma`` from ``x_train``.

    Args:
        denoiser: the module to train, usually a :class:`~robustlab.models.dncnn.Denoiser`
            (required with ``out``). It is trained on the device of its parameters; batches
            are moved there.
        x_train: clean images (N, C, H, W) in [0, 1]; no labels are needed.
        sigma: noise scale in [0, 1] pixel units (Gaussian standard deviation, Laplace scale),
            > 0: the sigma the smoothed classifier will use.
        epochs: total number of passes over ``x_train`` (counting resumed epochs).
        classifier: the frozen classifier, for ``objective="stab"`` only; put in eval mode
            with ``requires_grad=False`` during training, both restored afterwards. It must
            be on the denoiser's device.
        objective: ``"mse"`` or ``"stab"`` (see the module docstring). Default ``"mse"``.
        batch_size: images per optimiser step. Default 128 (the paper: 256).
        lr: Adam learning rate, constant. Default 1e-3 (as the paper).
        out: directory for ``denoiser.safetensors`` + ``denoiser.json`` (a model checkpoint:
            architecture, sigma, noise, objective, epoch, seed, versions), ``denoiser_log.jsonl``
            and the resumable ``denoiser_state.safetensors`` (weights, Adam state, generator
            state, history), all rewritten atomically after every epoch. If ``out`` already
            holds a state, the run resumes from its last finished epoch (the settings must
            match; ``epochs`` may grow), and the result equals an uninterrupted run's.
        seed: seeds the one ``torch.Generator`` (CPU) that draws the batch order and the noise.
        noise: ``"gaussian"`` or ``"laplace"``.
        log: called with each epoch's record after it is saved.

    Returns:
        The history, one dict per epoch since the start of the run: ``epoch``, ``loss`` (the
        objective's mean over the epoch), ``time_s``, and for ``"stab"`` ``stab_accuracy``, the
        fraction of training images with ``argmax f(D(x + delta)) == argmax f(x)`` (measured as
        the batches were trained).

    Raises:
        ValueError: a bad option (sigma <= 0, unknown objective or noise, "stab" without a
            classifier, ...), images outside [0, 1], or an ``out`` whose saved run differs.
    """
    config = _config(
        denoiser, x_train, out, sigma, noise, objective, classifier, epochs, batch_size, lr, seed
    )
    param = next(denoiser.parameters())
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    outdir = Path(out) if out is not None else None
    was_training = denoiser.training
    # load_state sets the global RNG; fork it so that the caller's stays as it was
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
        history = RUN.resume(outdir, denoiser, optimizer, generator, config, epochs)
        try:
            with frozen(classifier) if classifier is not None else nullcontext():
                denoiser.train()
                for epoch in range(len(history), epochs):
                    t0 = time.perf_counter()
                    stats = noisy_reconstruction_epoch(
                        denoiser,
                        classifier,
                        x_train,
                        objective,
                        float(sigma),
                        noise,
                        batch_size,
                        optimizer,
                        generator,
                        param.device,
                    )
                    rec = {"epoch": epoch + 1, **stats, "time_s": time.perf_counter() - t0}
                    history.append(rec)
                    if outdir is not None:
                        RUN.save(
                            outdir,
                            denoiser,
                            optimizer,
                            generator,
                            config,
                            history,
                            {k: config[k] for k in CHECKPOINT_META},
                        )
                    logger.info("denoiser epoch %d/%d: %s", epoch + 1, epochs, rec)
                    if log is not None:
                        log(rec)
        finally:
            denoiser.train(was_training)
    return history

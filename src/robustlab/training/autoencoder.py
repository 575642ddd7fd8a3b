"""Training MagNet's autoencoder: ``train_autoencoder(ae, x_train, epochs=..., out=...)``.

Meng, Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017,
https://arxiv.org/abs/1705.09064; reference code github.com/Trevillie/MagNet
(``defensive_models.py``: ``DenoisingAutoEncoder.train``; ``train_defense.py``) [code checked].
The architecture is :class:`robustlab.models.autoencoder.MagNetAutoencoder`; the defense that
uses the trained autoencoder is :class:`robustlab.defenses.magnet.MagNet`. Use it as::

    ae = MagNetAutoencoder(in_channels=1, pool=True)
    train_autoencoder(ae, x_train[5000:], epochs=100, out="runs/magnet-ae")
    magnet = robustlab.defenses.create("magnet", f, autoencoder=ae).fit(x_train[:5000])

Objective (the paper's noise regularisation), ``z ~ N(0, I)`` drawn fresh for every batch and
``v`` the noise volume:

    ``mean || ae(clip(x + v z, 0, 1)) - x ||^2``   over every pixel of a clean batch ``x``.

Defaults from the reference code: Adam with Keras's defaults (lr 1e-3), mean squared error,
batch 256, 100 epochs, ``v = 0.1`` for MNIST; it trains on the MNIST training set less its
first 5,000 images, which it keeps as the validation set the detector thresholds are set on.
Differences: the reference draws the noise once for the whole training set before the first
epoch (we draw it afresh for every batch, as a denoising autoencoder usually is trained), and
adds an L2 activity regulariser of strength 1e-9 (left out).

The epoch itself is the denoiser's (:mod:`robustlab.training.denoiser`, objective ``"mse"``,
Gaussian noise of scale ``v``) with the clip put in front of the autoencoder. Cost, per batch:
one forward + backward of the autoencoder (about 138 k multiply-adds per 28x28 image).

Checkpoints: the weights are a model checkpoint (:func:`robustlab.models.save`, architecture
``"magnet-ae"``); the resumable state is the trainer's (:mod:`robustlab.training.state`).
Training is deterministic (one explicit ``torch.Generator``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab._validate import integer, number, positive_int
from robustlab.models.autoencoder import MagNetAutoencoder
from robustlab.training.denoiser import noisy_reconstruction_epoch
from robustlab.training.state import RunFiles

__all__ = ["LOG_FILE", "STATE_FILE", "WEIGHTS_FILE", "train_autoencoder"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "autoencoder.safetensors"
STATE_FILE = "autoencoder_state.safetensors"
LOG_FILE = "autoencoder_log.jsonl"
RUN = RunFiles(WEIGHTS_FILE, LOG_FILE, STATE_FILE, "an autoencoder")


class _ClippedInput(nn.Module):
    """``autoencoder(clip(x, 0, 1))``: the noisy training input clipped to the image range."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: Tensor) -> Tensor:
        return self.autoencoder(x.clamp(0, 1))


def _config(
    autoencoder: Any,
    x_train: Any,
    out: Any,
    noise: Any,
    epochs: Any,
    batch_size: Any,
    lr: Any,
    seed: Any,
) -> dict[str, Any]:
    """The run's settings, as saved with its state, once every argument is checked."""
    if not isinstance(autoencoder, nn.Module):
        raise TypeError(f"autoencoder must be an nn.Module, got {type(autoencoder).__name__}")
    if out is not None and not isinstance(autoencoder, MagNetAutoencoder):
        raise TypeError(
            "checkpoints (out=...) need a robustlab MagNetAutoencoder, whose "
            "architecture can be recorded"
        )
    if next(autoencoder.parameters(), None) is None:
        raise ValueError("the autoencoder has no parameters to train")
    number(noise, "noise", low=0, high=1)
    positive_int(epochs, "epochs")
    positive_int(batch_size, "batch_size")
    number(lr, "lr", low=0, low_open=True)
    integer(seed, "seed", minimum=0)
    if not isinstance(x_train, Tensor) or not x_train.is_floating_point() or x_train.dim() != 4:
        raise TypeError("x_train must be a float tensor of clean images (N, C, H, W) in [0, 1]")
    channels = getattr(autoencoder, "in_channels", x_train.shape[1])
    if len(x_train) == 0 or x_train.shape[1] != channels:
        raise ValueError(
            f"x_train must be a non-empty batch with the autoencoder's {channels} "
            f"channels, got shape {tuple(x_train.shape)}"
        )
    if not torch.isfinite(x_train).all() or x_train.min() < 0 or x_train.max() > 1:
        raise ValueError(
            "x_train must hold finite clean images in [0, 1] (the noise is added "
            "during training; do not pass noisy images)"
        )
    return {
        "architecture": getattr(autoencoder, "robustlab_arch", None),
        "noise": float(noise),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "x_train_shape": list(x_train.shape),
    }


def train_autoencoder(
    autoencoder: nn.Module,
    x_train: Tensor,
    *,
    epochs: int,
    noise: float = 0.1,
    batch_size: int = 256,
    lr: float = 1e-3,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``autoencoder`` (in place) to reconstruct clean ``x_train`` from noisy copies.

    Args:
        autoencoder: the module to train, usually a
            :class:`~robustlab.models.autoencoder.MagNetAutoencoder` (required with ``out``),
            on the device of its parameters; batches are moved there.
        x_train: clean images (N, C, H, W) in [0, 1]; no labels are needed. Keep the points
            the detector's threshold will be fitted on out of them.
        epochs: total number of passes over ``x_train`` (counting resumed epochs).
        noise: the noise volume ``v``: standard deviation of the Gaussian noise added before
            clipping, in [0, 1] pixel units, in [0, 1]. Default 0.1 (the paper's, MNIST).
        batch_size: images per optimiser step. Default 256 (the reference's).
        lr: Adam learning rate, constant. Default 1e-3 (Keras's default, the reference's).
        out: directory for ``autoencoder.safetensors`` + ``autoencoder.json`` (a model
            checkpoint: architecture, noise, epoch, seed, versions), ``autoencoder_log.jsonl``
            and the resumable ``autoencoder_state.safetensors``, all rewritten atomically after
            every epoch. If ``out`` already holds a state, the run resumes from its last
            finished epoch (the settings must match; ``epochs`` may grow), and the result
            equals an uninterrupted run's.
        seed: seeds the one ``torch.Generator`` (CPU) that draws the batch order and the noise.
        log: called with each epoch's record after it is saved.

    Returns:
        The history, one dict per epoch since the start of the run: ``epoch``, ``loss`` (the
        objective's mean over the epoch, squared [0, 1] pixel units) and ``time_s``.

    Raises:
        ValueError: a bad option, images outside [0, 1], or an ``out`` whose run differs.
    """
    config = _config(autoencoder, x_train, out, noise, epochs, batch_size, lr, seed)
    param = next(autoencoder.parameters())
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    outdir = Path(out) if out is not None else None
    was_training = autoencoder.training
    clipped = _ClippedInput(autoencoder)
    # load_state sets the global RNG; fork it so that the caller's stays as it was
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
        history = RUN.resume(outdir, autoencoder, optimizer, generator, config, epochs)
        try:
            autoencoder.train()
            for epoch in range(len(history), epochs):
                t0 = time.perf_counter()
                stats = noisy_reconstruction_epoch(
                    clipped,
                    None,
                    x_train,
                    "mse",
                    float(noise),
                    "gaussian",
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
                        autoencoder,
                        optimizer,
                        generator,
                        config,
                        history,
                        {"noise": config["noise"], "seed": config["seed"]},
                    )
                logger.info("autoencoder epoch %d/%d: %s", epoch + 1, epochs, rec)
                if log is not None:
                    log(rec)
        finally:
            autoencoder.train(was_training)
    return history

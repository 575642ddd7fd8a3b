"""Denoised smoothing: a trained denoiser in front of an off-the-shelf classifier.

Salman, Sun, Yang, Kapoor, Kolter, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers", NeurIPS 2020, https://arxiv.org/abs/2003.01908; reference code
github.com/microsoft/denoised-smoothing (``code/train_denoiser.py``, ``code/archs/dncnn.py``).

Randomised smoothing (Cohen et al.) certifies ``g(x) = argmax_c P(f(x + delta) = c)``, but a
classifier ``f`` trained on clean images is poor on ``x + delta``. Instead of retraining ``f``,
denoised smoothing smooths the composition ``f(D(x + delta))`` with a denoiser ``D`` trained
for the noise; ``f`` is never modified, and the certificate is Cohen et al.'s for the composed
classifier. In the abstract's words [abstract checked], prepending a custom-trained denoiser
to any off-the-shelf classifier and smoothing gives a classifier that is provably robust
"without modifying the pretrained classifier", in white-box and black-box settings (only
queries of ``f`` are needed to certify; training with "stab" needs its gradients). Use it as::

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

The paper's recipe, from its reference code [code checked]: DnCNN with 17 layers and 64
channels, 3x3 convolutions, BatchNorm (eps 1e-4, PyTorch momentum 0.95) on the inner layers,
orthogonal initialisation and a zero-initialised last layer (the untrained denoiser is the
identity), inputs in unnormalised [0, 1] pixels, output not clamped; Adam, lr 1e-3, weight
decay 1e-4, batch 256, 90 epochs, lr x 0.1 every 30 epochs; noise ``randn * sigma`` added
without clipping; ``"denoising"`` (MSE), ``"stability"`` and ``"classification"`` (CE with the
true labels) objectives. Certified with sigma in {0.12, 0.25, 0.50, 1.00} on CIFAR-10 and
{0.25, 0.50, 1.00} on ImageNet (the names of its released plots). That MSE pre-training followed
by Stab fine-tuning works best, and the settings of the fine-tuning run, are from the paper's
text as we recall it (unverified).

Cost. Training, per batch: ``"mse"`` one forward + backward of ``D``; ``"stab"`` that plus one
forward + backward of ``f`` (input gradients only, ``f``'s parameters get none) and one forward
of ``f`` on the clean batch. Inference: every smoothing sample costs a forward of ``D`` on top
of ``f``'s. DnCNN-17-64 on a 32x32 colour image is about 0.57 G multiply-adds (15 inner layers
of 64 * 64 * 9 * 1024; computed); our default (depth 8, width 32) on a 28x28 grey image is
about 44 M (6 * 32 * 32 * 9 * 784 plus the outer layers), and one "mse" epoch over 60,000
such images takes about 9 minutes on 2 CPU cores (measured: 19 s for 2,048 images).

Our differences: the default denoiser is small (``depth=8, width=32``, about 56 k parameters)
so that Fashion-MNIST training runs on a CPU; pass ``depth=17, width=64`` for the paper's.
BatchNorm uses PyTorch's default momentum 0.1 (the reference's 0.95 makes the running
statistics follow the last batch almost entirely, which looks like a Keras-convention port).
The learning rate is constant and there is no weight decay; the ``"classification"`` objective
is not offered. Training is resumable and deterministic (one explicit ``torch.Generator``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import save as safetensors_to_bytes
from torch import Tensor, nn

from robustlab._io import atomic_write
from robustlab._modes import frozen
from robustlab._provenance import git_commit, package_version
from robustlab.defenses.registry import register
from robustlab.noise import check_noise, sample

__all__ = ["OBJECTIVES", "Denoised", "Denoiser", "load_denoiser", "train_denoiser"]

logger = logging.getLogger(__name__)

OBJECTIVES = ("mse", "stab")
ARCH_NAME = "dncnn"
FORMAT_VERSION = 1
WEIGHTS_FILE = "denoiser.safetensors"
STATE_FILE = "denoiser_state.safetensors"
LOG_FILE = "denoiser_log.jsonl"


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


class Denoiser(nn.Module):
    """DnCNN-style residual denoiser (Zhang, Zuo, Chen, Meng, Zhang, "Beyond a Gaussian
    Denoiser: Residual Learning of Deep CNN for Image Denoising", IEEE TIP 2017,
    https://arxiv.org/abs/1608.03981): ``depth`` 3x3 convolutions (conv-ReLU, then
    ``depth - 2`` conv-BN-ReLU, then conv) predict the noise, and the output is
    ``x - predicted noise``.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10). Default 1.
        depth: number of convolutions, >= 2. Default 8 (the paper's DnCNN: 17).
        width: channels of the hidden layers, >= 1. Default 32 (the paper's: 64).

    Shapes and units: (N, C, H, W) -> (N, C, H, W), any H and W. Inputs are in [0, 1] pixel
    units plus noise, so they lie outside [0, 1]; nothing is clipped on the way in, and the
    output is not clamped either (as in the reference code): the classifier may see values
    slightly outside [0, 1]. The last convolution starts at zero, so an untrained denoiser is
    the identity.
    """

    def __init__(self, in_channels: int = 1, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.depth = _positive_int(depth, "depth", 2)
        self.width = _positive_int(width, "width")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width, eps=1e-4), nn.ReLU()]
        layers.append(nn.Conv2d(width, in_channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.body[-1].weight)
        self.robustlab_arch = {"name": ARCH_NAME, "kwargs": self.kwargs()}

    def kwargs(self) -> dict[str, int]:
        """The constructor arguments that rebuild this architecture."""
        return {"in_channels": self.in_channels, "depth": self.depth, "width": self.width}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kwargs().items())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the denoiser takes images (N, {self.in_channels}, H, W), got "
                             f"shape {tuple(x.shape)}")
        return x - self.body(x)


@register("denoised")
class Denoised(nn.Module):
    """``model(denoiser(x))``: a frozen classifier behind a denoiser, the base classifier of
    denoised smoothing (smooth it with ``robustlab.defenses.create("smoothing", ...)``).

    Args:
        model: the classifier (inputs in [0, 1] pixel units, logits out). It comes first, as for
            every defense: ``create("denoised", model, denoiser=den)``. It stays in ``eval()``
            mode whatever mode this module is put in (BatchNorm uses its running statistics;
            the classifier is never trained here).
        denoiser: a :class:`Denoiser` (or any image-to-image module), or the path of a
            ``denoiser.safetensors`` written by :func:`train_denoiser`, loaded with
            :func:`load_denoiser` onto the classifier's device.

    Shapes: (N, C, H, W) -> (N, K) logits.
    """

    def __init__(self, model: nn.Module, denoiser: nn.Module | str | os.PathLike[str]) -> None:
        super().__init__()
        if isinstance(denoiser, str | os.PathLike):
            param = next(model.parameters(), None)
            denoiser = load_denoiser(denoiser, device=param.device if param is not None else None)
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser must be an nn.Module or the path of a denoiser "
                            f"checkpoint, got {type(denoiser).__name__}")
        if isinstance(model, Denoiser) and not isinstance(denoiser, Denoiser):
            raise TypeError("the classifier comes first: Denoised(classifier, denoiser=den), "
                            "create('denoised', classifier, denoiser=den)")
        self.classifier = model
        self.denoiser = denoiser
        self.classifier.eval()

    def train(self, mode: bool = True) -> Denoised:
        super().train(mode)
        self.classifier.eval()
        return self

    def config(self) -> dict[str, Any]:
        """The defense's settings (JSON-able), as recorded in results."""
        meta = getattr(self.denoiser, "robustlab_meta", {})
        return {"name": "denoised",
                "denoiser": getattr(self.denoiser, "robustlab_arch", type(self.denoiser).__name__),
                **{k: meta[k] for k in ("sigma", "noise", "objective", "epoch") if k in meta}}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.denoiser(x))


def _check_images(x: Any, channels: int | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x_train must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x_train must be float images in [0, 1], got {x.dtype}; convert "
                         "8-bit images with x.float() / 255")
    if x.dim() != 4 or len(x) == 0:
        raise ValueError(f"x_train must be a non-empty batch (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x_train has {x.shape[1]} channels but the denoiser takes {channels}; "
                         f"build Denoiser(in_channels={x.shape[1]})")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("x_train must hold finite clean images in [0, 1] (the noise is added "
                         "during training; do not pass noisy images)")


def _check_options(sigma: Any, noise: str, objective: str, classifier: Any, epochs: Any,
                   batch_size: Any, lr: Any, seed: Any) -> None:
    check_noise(noise, sigma)
    if sigma == 0:
        raise ValueError("sigma must be > 0: a denoiser is trained for the noise scale that "
                         "smoothing will use (e.g. 0.25)")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "stab" and classifier is None:
        raise ValueError("objective 'stab' needs classifier=<the frozen classifier>; use "
                         "objective='mse' to train without one")
    if objective == "mse" and classifier is not None:
        raise ValueError("objective 'mse' uses no classifier: drop classifier=..., or pass "
                         "objective='stab' to train for it")
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    _positive_int(epochs, "epochs")
    _positive_int(batch_size, "batch_size")
    if (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
            or lr <= 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _save_weights(denoiser: Denoiser, path: Path, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    data = safetensors_to_bytes(state, metadata={"format": "pt", "robustlab": "1"})
    sidecar = {"format_version": FORMAT_VERSION, "architecture": denoiser.robustlab_arch,
               **meta, "robustlab_version": package_version(),
               "torch_version": torch.__version__, "git_commit": git_commit(),
               "created": datetime.now(UTC).isoformat(timespec="seconds"),
               "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(path, data)
    atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")


def load_denoiser(path: str | os.PathLike[str],
                  device: str | torch.device | None = None) -> Denoiser:
    """Rebuild the :class:`Denoiser` recorded in the JSON sidecar of ``path`` and load its
    weights (safetensors; nothing is unpickled). The SHA-256 of the weights must match the
    sidecar's.

    Returns:
        The denoiser in ``eval()`` mode on ``device`` (default CPU), with ``robustlab_meta`` =
        the sidecar (sigma, noise, objective, epoch, seed, versions).

    Raises:
        FileNotFoundError: the weights or the sidecar ``path.with_suffix('.json')`` is missing.
        ValueError: not a safetensors file, a corrupt sidecar, a SHA-256 mismatch, or weights
            that do not fit the recorded architecture.
    """
    path = Path(path)
    side = path.with_suffix(".json")
    for p in (path, side):
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} not found; denoiser checkpoints are written by "
                                    "train_denoiser(..., out=dir) as dir/denoiser.safetensors "
                                    "+ dir/denoiser.json")
    data = path.read_bytes()
    try:
        sidecar = json.loads(side.read_text())
        arch = sidecar["architecture"]
        if arch["name"] != ARCH_NAME:
            raise ValueError(f"architecture {arch['name']!r} is not a {ARCH_NAME!r} denoiser")
        state = safetensors_from_bytes(data)
        denoiser = Denoiser(**arch["kwargs"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"sidecar {str(side)!r} is not a denoiser sidecar ({e!r})") from None
    except safetensors.SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({e})") from None
    if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
        raise ValueError(f"SHA-256 of {str(path)!r} does not match its sidecar: the weights "
                         "were modified or belong to another checkpoint")
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights of {str(path)!r} do not fit {arch}: {e}") from None
    denoiser.robustlab_meta = sidecar
    return denoiser.to(device).eval() if device is not None else denoiser.eval()


def _epoch(denoiser: nn.Module, classifier: nn.Module | None, x_train: Tensor, objective: str,
           sigma: float, noise: str, batch_size: int, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, device: torch.device) -> dict[str, float]:
    order = torch.randperm(len(x_train), generator=generator)
    total = agree = 0.0
    for i in range(0, len(x_train), batch_size):
        x = x_train[order[i:i + batch_size]].to(device)
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
        denoiser: the module to train, usually a :class:`Denoiser` (required with ``out``).
            It is trained on the device of its parameters; batches are moved there.
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
        out: directory for ``denoiser.safetensors`` + ``denoiser.json`` (architecture, sigma,
            noise, objective, epoch, seed, versions), ``denoiser_log.jsonl`` and the resumable
            ``denoiser_state.safetensors`` (weights, Adam state, generator state, history),
            all rewritten atomically after every epoch. If ``out`` already holds a state, the
            run resumes from its last finished epoch (the settings must match; ``epochs`` may
            grow), and the result equals an uninterrupted run's.
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
    # imported here: robustlab.training imports the attacks, which import this package
    from robustlab.training.state import load_state

    _check_options(sigma, noise, objective, classifier, epochs, batch_size, lr, seed)
    if not isinstance(denoiser, nn.Module):
        raise TypeError(f"denoiser must be an nn.Module, got {type(denoiser).__name__}")
    if out is not None and not isinstance(denoiser, Denoiser):
        raise TypeError("checkpoints (out=...) need a robustlab Denoiser, whose architecture "
                        "can be recorded")
    _check_images(x_train, getattr(denoiser, "in_channels", None))
    param = next(denoiser.parameters(), None)
    if param is None:
        raise ValueError("the denoiser has no parameters to train")
    device = param.device
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    config = {"architecture": getattr(denoiser, "robustlab_arch", None), "sigma": float(sigma),
              "noise": noise, "objective": objective, "batch_size": batch_size, "lr": lr,
              "seed": seed, "x_train_shape": list(x_train.shape),
              "classifier": type(classifier).__name__ if classifier is not None else None}
    outdir = Path(out) if out is not None else None
    history: list[dict[str, Any]] = []
    start = 0
    was_training = denoiser.training
    devices = [device] if device.type == "cuda" else []
    # load_state sets the global RNG; fork it so that the caller's stays as it was
    with torch.random.fork_rng(devices=devices):
        if outdir is not None and (outdir / STATE_FILE).exists():
            _check_resumable(outdir, config, epochs)  # before anything is loaded into denoiser
            info, extra = load_state(outdir / STATE_FILE, denoiser, optimizer)
            start, history = int(info["epoch"]), info["history"]
            generator.set_state(extra["generator"].cpu())
        ctx = frozen(classifier) if classifier is not None else nullcontext()
        try:
            with ctx:
                denoiser.train()
                for epoch in range(start, epochs):
                    t0 = time.perf_counter()
                    rec = {"epoch": epoch + 1,
                           **_epoch(denoiser, classifier, x_train, objective, float(sigma),
                                    noise, batch_size, optimizer, generator, device),
                           "time_s": time.perf_counter() - t0}
                    history.append(rec)
                    if outdir is not None:
                        _save_run(outdir, denoiser, optimizer, generator, config, history)
                    logger.info("denoiser epoch %d/%d: %s", epoch + 1, epochs, rec)
                    if log is not None:
                        log(rec)
        finally:
            denoiser.train(was_training)
    return history


def _check_resumable(outdir: Path, config: dict[str, Any], epochs: int) -> None:
    """ValueError unless the run saved in ``outdir`` has the same settings and at most
    ``epochs`` epochs."""
    try:
        with safetensors.safe_open(str(outdir / STATE_FILE), framework="pt") as f:
            info = json.loads(f.metadata()["robustlab_train_state"])["info"]
        saved, start = info["config"], int(info["epoch"])
    except (safetensors.SafetensorError, OSError, KeyError, TypeError,
            json.JSONDecodeError) as e:
        raise ValueError(f"cannot resume: {outdir / STATE_FILE} is not a denoiser training "
                         f"state ({e!r}); delete it to start over, or use another out") from None
    diff = sorted(k for k in config if saved.get(k) != config[k])
    if diff:
        raise ValueError(f"cannot resume from {outdir}: settings differ from the saved run in "
                         f"{diff}; use another out directory")
    if start > epochs:
        raise ValueError(f"{outdir} already holds {start} epochs, more than epochs={epochs}; "
                         f"pass epochs >= {start}")


def _save_run(outdir: Path, denoiser: Denoiser, optimizer: torch.optim.Optimizer,
              generator: torch.Generator, config: dict[str, Any],
              history: list[dict[str, Any]]) -> None:
    """Weights + sidecar first, then the state: a crash between the two resumes from the
    previous epoch and rewrites both identically."""
    from robustlab.training.state import save_state

    epoch = history[-1]["epoch"]
    meta = {k: config[k] for k in ("sigma", "noise", "objective", "seed", "classifier")}
    _save_weights(denoiser, outdir / WEIGHTS_FILE, {**meta, "epoch": epoch})
    atomic_write(outdir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in history))
    save_state(outdir / STATE_FILE, denoiser, optimizer,
               {"epoch": epoch, "config": config, "history": history},
               extra={"generator": generator.get_state()})

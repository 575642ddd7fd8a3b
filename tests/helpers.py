"""Test helpers: a synthetic data set with a clear signal, a tiny CNN, an IDX writer, and
launching a script on one process or on several with ``torchrun``."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.pgd import PGD

NUM_CLASSES = 4


def make_quadrants(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, size, size) in [0, 1]; class k: bright quadrant k on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = 0.3 + 0.1 * torch.randn(n, 1, size, size, generator=g)
    h = size // 2
    for k in range(NUM_CLASSES):
        r, c = divmod(k, 2)
        x[y == k, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 0.4
    return x.clamp(0, 1), y


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format, gzip-compressed (as (Fashion-)MNIST ships)."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


class Noisy(nn.Module):
    """``model(x + N(0, sigma^2))``: randomised, declared nowhere."""

    def __init__(self, model: nn.Module, sigma: float = 0.05) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


class Rounded(nn.Module):
    """``model(round(x * levels) / levels)``, undeclared: the input gradient is zero almost
    everywhere (gradient masking)."""

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * self.levels) / self.levels)


class Interrupt(Exception):
    """Raised by :class:`FlakyPGD` to simulate a crash in the middle of an evaluation."""


class FlakyPGD(PGD):
    """PGD (same config as PGD, hence the same evaluation) interrupted at its ``fail_at``-th
    call."""

    def __init__(self, threat, fail_at: int, **kw) -> None:
        super().__init__(threat, **kw)
        self.calls, self.fail_at = 0, fail_at

    def perturb(self, model, x, y, generator):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        return super().perturb(model, x, y, generator)


# A gloo rank used to abort at exit with "terminate called without an active exception" (4
# of 88 launches of ddp_worker.py beside two training jobs, 2026-12-06; twice in a row in CI,
# 2026-12-08): DistributedDataParallel imports torch._dynamo, whose modules took the open
# world group as a default argument, so destroy_process_group left gloo's threads running and
# one could free tensors while the interpreter finalised. distributed.init_from_env now
# imports them first; the workers report the gloo threads left after shutdown, and the tests
# require none.
def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo runs (Linux's /proc; [] elsewhere)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.exists() else []
    return [n for n in names if "gloo" in n]


def write_gloo_threads(out: Path, rank: int, wait_s: float = 5.0) -> None:
    """After the group's shutdown, record its threads still running after up to ``wait_s``
    (none is right; the transport's loop thread can take a moment to end)."""
    deadline = time.monotonic() + wait_s
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / f"gloo_threads_{rank}.json").write_text(json.dumps(left))


def assert_gloo_ended(out: Path) -> None:
    """Every rank's process group ended its threads at shutdown (see :func:`gloo_threads`)."""
    left = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("gloo_threads_*.json"))}
    assert left and not any(left.values()), left


def launcher(procs: int) -> list[str]:
    """The command prefix that runs a script on ``procs`` processes (``torchrun`` if > 1)."""
    if procs == 1:
        return [sys.executable]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc_per_node={procs}"]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's rank variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with ``env``, its output captured, for at most four minutes."""
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

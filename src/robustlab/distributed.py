"""``torch.distributed`` for training and evaluation: one process per device, launched by
``torchrun``.

``torchrun --nproc_per_node=N -m robustlab train --config R --out D`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init_from_env` opens the
process group from them (``nccl`` on CUDA, ``gloo`` on CPU). Every rank builds the same global
batch order from the run's seed and takes its own contiguous slice of each global batch, so a
DDP step sees exactly the examples of the single-process step; gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (size 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """True on the process that writes checkpoints, logs and results (rank 0)."""
        return self.rank == 0


def current() -> World:
    """The world of the open process group, or a single process if none is open."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched() -> bool:
    """True when started by ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float = 1800) -> tuple[World, torch.device]:
    """Open the process group from the launcher's environment, once; returns the world and
    this process's device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU)."""
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo on first use, and through it modules
        # (torch.distributed.fsdp) whose default arguments take ``dist.group.WORLD`` when
        # imported: imported after the group opens, they hold it, so destroy_process_group
        # leaves gloo's threads running, and one of them can abort the process at exit
        # ("terminate called without an active exception"). Imported first, they hold none.
        importlib.import_module("torch._dynamo")

        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current(), device


def shard(idx: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of the global index batch ``idx`` (sizes differ by <= 1)."""
    return idx.tensor_split(world.size)[world.rank] if world.size > 1 else idx


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves with one rank)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(rows: Tensor, world: World) -> Tensor:
    """Concatenate each rank's per-sample tensor ``rows`` in rank order (shards may differ in
    length by one), so rank-sharded results merge back into the global order."""
    if world.size == 1:
        return rows
    sizes: list[int] = [0] * world.size  # all_gather_object fills in every rank's
    dist.all_gather_object(sizes, len(rows))
    pad = max(sizes) - len(rows)
    padded = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))]) if pad else rows
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    """Close the process group opened by :func:`init_from_env` (no-op for one process), once
    every rank has got here: a rank that tears its group down while another still talks to
    it can abort in gloo's threads ("terminate called without an active exception")."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

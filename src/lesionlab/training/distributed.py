"""Data-parallel training over processes: a launcher starts them, this module joins them into one run.

Two launchers, one training function (``loop.train``):

- ``torchrun --nproc-per-node N -m lesionlab train ...``: torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
  and the rendezvous address; :func:`join` initialises the process group (NCCL on CUDA, gloo on the CPU).
- Ray Train (``lesionlab train --backend ray``, ``ray_train.py``): Ray's TorchTrainer initialises the process
  group in each worker before calling ``train``; :func:`join` finds it initialised and only reads the ranks.

Every rank reads the same data, builds the same model (the same seed) and walks the same seeded epoch order,
taking its share of each global batch (``stream.EpochBatches``); DDP averages the gradients, and the loop
weights each rank's loss by its share of the batch, so a step is that of one process on the whole batch.
Only rank 0 writes the run folder; the resume state does not depend on the number of processes, so a run
killed on 8 GPUs resumes on one CPU and the other way round.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling shared caches), the other ranks after it, finding them full."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums of ``values`` over all ranks (float64; on ``device``, which NCCL needs)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def record(self) -> dict[str, Any]:
        """config.json's ``compute.distributed`` entry."""
        return {"world_size": self.world, "backend": self.backend}


def launched() -> bool:
    """Whether this process is one of several: a process group exists, or torchrun's environment says so."""
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_kind: str) -> tuple[Ranks, bool]:
    """This process's ranks, and whether this call initialised the process group (then :func:`leave` closes it).

    Outside a launcher: ``Ranks()`` (one process). Under torchrun: initialises the group from its environment,
    on NCCL for CUDA devices and gloo otherwise. Under Ray Train: the group Ray made."""
    if not dist.is_available():
        return Ranks(), False
    created = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks(), False
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        created = True
    local = int(os.environ.get("LOCAL_RANK", _ray_local_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend())), created


def leave(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def _ray_local_rank() -> int:
    try:
        from ray import train

        return int(train.get_context().get_local_rank())
    except Exception:  # not in a Ray Train worker (or no Ray): one process per machine
        return 0

"""Several processes sampling one run: `torchrun --nproc_per_node=K run.py ...` or K Slurm tasks.

Ranks only need to agree on which shards are whose and to wait for each other before rank 0 merges, so
the process group is always gloo (TCP, across nodes too), whatever the device: no tensors cross it.
Under Slurm without torchrun (Hydra's submitit launcher with `tasks_per_node` > 1), the rendezvous
variables come from submitit's `TorchDistributedEnvironment`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ranks meet at the end of sampling; a slow rank may finish hours after a fast one.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank r of world_size, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shards(self, count: int) -> range:
        """Round-robin share of shard indices 0..count-1, so every rank gets the same amount of work."""
        return range(self.rank, count, self.world_size)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; CPU stays CPU. An explicit cuda:N is kept only in one-process runs."""
        if device.type != "cuda" or not self.distributed:
            return device
        if device.index is not None and device.index != self.local_rank:
            raise ValueError(f"device={device} cannot be used with {self.world_size} processes: use device=auto or "
                             "device=cuda, and each rank takes cuda:LOCAL_RANK")
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible): start "
                             "at most one process per GPU")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run `action` on rank 0 only; its exception is raised on every rank (others get None otherwise).

        So a rank 0 that stops (a locked or conflicting run folder) stops the whole job at once, instead
        of leaving the other ranks waiting at the next barrier.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as raised:  # shared below, raised on every rank
                error = raised
        if self.distributed:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise error
        return result


def _slurm_world_size() -> int:
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")))


def setup() -> Ranks:
    """Join the process group when started as one of several processes; one process needs nothing."""
    if "RANK" not in os.environ and _slurm_world_size() > 1 and "SLURM_PROCID" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from Slurm
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=world_size, timeout=BARRIER_TIMEOUT)
    log.info("rank %d of %d (local rank %d)", ranks.rank, world_size, ranks.local_rank)
    return ranks


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""The processes of a training run: alone, or one of several under ``torchrun``.

Owns :class:`Dist` (this process's rank, the world size, its local GPU), starting the
process group from torchrun's environment (NCCL on CUDA, else Gloo), and the collective
steps the loop needs: sharing rank 0's value with every rank, waiting for every rank, and
tearing the group down at the end of a command. Every helper is a no-op for a single
process, so the loop reads the same alone and under DistributedDataParallel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait here until every process of the run arrives."""
        if self.world > 1:
            dist.barrier()


def init_distributed(device_kind: str) -> Dist:
    """This process's place in the run; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    """Wait for every process of a torchrun job (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Tear down the process group at the end of a command (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

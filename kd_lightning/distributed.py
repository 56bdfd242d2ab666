"""The process group of a data-parallel estimation run, read from ``torchrun``'s environment.

``torchrun --nproc_per_node=W -m kd_lightning.cli.main posterior ...`` starts W processes; each sees
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Sharded stores are built by all of them: shard ``j`` by rank
``j mod W`` (a fixed assignment, no scheduler), each shard seeded by ``j`` alone, so the store is the same
whatever W is. ``torch.distributed`` (gloo on CPU, NCCL on GPUs) only carries barriers and one flag.
Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the W that build one artifact together."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        """Whether this rank builds ``shard`` (rank ``shard mod W``)."""
        return shard % self.world_size == self.rank

    def device(self) -> torch.device:
        """``cuda:<local rank>`` when GPUs are visible, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (the others' argument is ignored)."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            value = value.to(self.device())
        dist.broadcast(value, src=0)
        return bool(value.item())


def process_group() -> ProcessGroup:
    """The group ``torchrun`` started this process in (initialising ``torch.distributed`` once)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # torchrun's workers only: Lightning's own DDP launcher also sets WORLD_SIZE, for its training processes
    if world <= 1 or "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return ProcessGroup()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # a rank waits at a barrier while the others build their shards: allow for long proxy passes
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))

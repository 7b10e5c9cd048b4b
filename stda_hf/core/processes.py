"""The processes of one job under ``torchrun`` or ``accelerate launch``: rank, world size, shards and a barrier.

A job that splits its work by item id needs only its rank and the world size (from the environment both
launchers set) and, at the end, a barrier so that rank 0 merges the shards once every process is done::

    rank, world, local = world_info()
    created = start_group(world)       # a gloo group when world > 1
    mine = [i for i in ids if shard_of(i, world) == rank]
    finish_group(world, created)       # every process waits here
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

from stda_hf.core.errors import StdaError


def world_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment torchrun and ``accelerate launch`` set."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise StdaError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from err
    if not 0 <= rank < world:
        raise StdaError(f"RANK {rank} is not between 0 and WORLD_SIZE-1 ({world - 1})")
    return rank, world, local


def shard_of(item_id: str, world: int) -> int:
    """The process (rank) that takes ``item_id`` among ``world`` processes: a stable hash of the id."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:15], 16) % world


def start_group(world: int) -> bool:
    """Join a gloo process group (for the final barrier) when there are several processes; True if created."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        return False
    try:
        dist.init_process_group("gloo", timeout=timedelta(days=30))
    except (RuntimeError, ValueError) as err:
        raise StdaError(
            f"WORLD_SIZE={world} but the processes could not connect ({err}); start them with torchrun or "
            "accelerate launch, which set MASTER_ADDR and MASTER_PORT"
        ) from err
    return True


def finish_group(world: int, created: bool) -> None:
    """Wait for every process (when there are several); leave the group if :func:`start_group` created it."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()
        if created:
            dist.destroy_process_group()

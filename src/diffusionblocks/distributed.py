"""Block-parallel training on torch.distributed: the world split into groups, each group training its blocks.

Blocks share no trained parameter, so groups never talk to each other while training: group g trains
its blocks one after the other, data-parallel (DDP) over the group's own ranks. With W ranks and B
blocks there are G = min(W, B) groups of contiguous ranks (sizes differ by at most one) and block b
goes to group b mod G. Launch with torchrun; backend NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assignment:
    """This rank's place in the block-parallel layout."""

    rank: int
    world_size: int
    group_ranks: tuple[tuple[int, ...], ...]  # ranks of each group
    group_blocks: tuple[tuple[int, ...], ...]  # blocks of each group, in training order
    group: int  # this rank's group

    @property
    def my_ranks(self) -> tuple[int, ...]:
        return self.group_ranks[self.group]

    @property
    def my_blocks(self) -> tuple[int, ...]:
        return self.group_blocks[self.group]

    @property
    def is_leader(self) -> bool:
        """The group's first rank: it writes the group's checkpoints and metrics."""
        return self.rank == self.my_ranks[0]

    @property
    def shard(self) -> tuple[int, int]:
        """(index of this rank in its group, group size): which part of each batch this rank computes."""
        return self.my_ranks.index(self.rank), len(self.my_ranks)

    def describe(self) -> str:
        return "; ".join(f"ranks {list(r)} train block(s) {list(b)}"
                         for r, b in zip(self.group_ranks, self.group_blocks))


def assign(rank: int, world_size: int, blocks: list[int]) -> Assignment:
    """Splits world_size ranks into min(world_size, len(blocks)) groups and deals the blocks round-robin."""
    G = min(world_size, len(blocks))
    bounds = [g * world_size // G for g in range(G + 1)]
    group_ranks = tuple(tuple(range(bounds[g], bounds[g + 1])) for g in range(G))
    group_blocks = tuple(tuple(blocks[g::G]) for g in range(G))
    group = next(g for g, r in enumerate(group_ranks) if rank in r)
    return Assignment(rank, world_size, group_ranks, group_blocks, group)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[int, int, torch.device]:
    """Initialises the default process group from torchrun's environment; returns (rank, world_size, device).

    On CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def new_groups(a: Assignment) -> list:
    """One process group per block group (every rank must create every group, in the same order)."""
    if a.world_size == 1:
        return [None]
    return [dist.new_group(list(r)) if len(r) > 1 else None for r in a.group_ranks]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """obj from rank src on every rank (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

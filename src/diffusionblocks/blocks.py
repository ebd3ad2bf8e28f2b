"""The block router: B independently trained block denoisers chained as one denoiser (method.md section 4).

A run's blocks and partition are its task's (`Task.build_block`, `Task.partition`); the router only chains them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .noise import Partition


class StreamingBlocks:
    """B blocks of which at most one is in memory: block b is loaded on first use and replaces the previous one.

    A sampler walks the sigma grid downwards, so each block is loaded once (Heun's correction at a
    boundary switches one step early). For models whose blocks do not fit on the device together.
    """

    def __init__(self, num_blocks: int, load: Callable[[int], nn.Module]):
        self.num_blocks, self.load = num_blocks, load
        self.current: tuple[int, nn.Module] | None = None
        self.loads = 0  # blocks loaded so far

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, b: int) -> nn.Module:
        if self.current is None or self.current[0] != b:
            self.current = None  # free the resident block before loading the next
            self.current = (b, self.load(b))
            self.loads += 1
        return self.current[1]


class BlockwiseDenoiser(nn.Module):
    """Routes each call `D(x, sigma, **cond)` to the block that owns sigma; block 0 owns the highest noise.

    Samples in one batch may carry different sigmas: each is sent to its own block. With the
    samplers' shared sigma, one step runs one block, i.e. L/B layers instead of L.
    """

    def __init__(self, blocks: list[nn.Module] | StreamingBlocks, partition: Partition):
        super().__init__()
        if len(blocks) != partition.num_blocks:
            raise ValueError(f"{len(blocks)} blocks given for a partition into {partition.num_blocks}")
        self.blocks = blocks if isinstance(blocks, StreamingBlocks) else nn.ModuleList(blocks)
        self.partition = partition
        self.sigma_min, self.sigma_max = partition.axis.lo, partition.axis.hi

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        owner = self.partition.owner(sigma)  # (N,)
        first = int(owner[0])
        if bool((owner == first).all()):
            return self.blocks[first](x, sigma, **cond)
        out = None
        for b in owner.unique().tolist():
            m = owner == b
            sub = {k: v[m] if torch.is_tensor(v) and v.shape[:1] == sigma.shape else v for k, v in cond.items()}
            D_b = self.blocks[b](x[m], sigma[m], **sub)
            out = D_b.new_empty((x.shape[0], *D_b.shape[1:])) if out is None else out
            out[m] = D_b
        return out
